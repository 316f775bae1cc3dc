"""Node admission: profile every SuperNode that appears, admit or refuse it, and remember why."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.serverapp import Grid

from corolla.proto import wire
from corolla.server.clock import Clock
from corolla.server.codec import profile_message
from corolla.server.records import RunRecorder

log = logging.getLogger(__name__)


@dataclass
class NodeInfo:
    """What the server knows about one SuperNode (from its profile reply)."""

    node_id: int
    rank: int
    num_examples: int
    device: str = ""
    fingerprint: str = ""
    software_version: str = ""
    model_loads: int = 0
    telemetry: dict[str, float] = field(default_factory=dict)


class NodeRegistry:
    """The admitted nodes and the refused ones, kept current with the Grid.

    `refusal(info)` (the federation's rules: software version, model fingerprint,
    ranks the aggregation can serve) decides admission; a refusal is logged and
    recorded with its reason in nodes.jsonl.
    """

    def __init__(self, grid: Grid, recorder: RunRecorder, clock: Clock,
                 refusal: Callable[[NodeInfo], str | None], timeout: float) -> None:
        self.grid = grid
        self.recorder = recorder
        self.clock = clock
        self.refusal = refusal
        self.timeout = timeout
        self.nodes: dict[int, NodeInfo] = {}
        self.refused: dict[int, str] = {}

    def __getitem__(self, node_id: int) -> NodeInfo:
        return self.nodes[node_id]

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.nodes

    def refuse(self, nid: int, reason: str) -> None:
        """Drop a node for good and record why."""
        self.nodes.pop(nid, None)
        self.refused[nid] = reason
        log.warning("node %d refused: %s", nid, reason)
        self.recorder.node({"node": nid, "status": "refused", "reason": reason})

    def refresh(self, wait_for: int = 0, timeout: float | None = None) -> list[int]:
        """Profile nodes not seen before (waiting until `wait_for` are usable); return the usable ids present now."""
        timeout = self.timeout if timeout is None else timeout
        deadline = self.clock.monotonic() + timeout
        while True:
            ids = set(self.grid.get_node_ids())
            new = sorted(ids - set(self.nodes) - set(self.refused))
            if new:
                self._profile(new)
            usable = sorted(i for i in ids if i in self.nodes)
            if len(usable) >= wait_for:
                return usable
            if self.clock.monotonic() > deadline:
                refused = f"; {len(self.refused)} refused (reasons in nodes.jsonl)" if self.refused else ""
                raise TimeoutError(
                    f"only {len(usable)} of the {wait_for} nodes needed (min-nodes) joined within {timeout:.0f}s"
                    f"{refused}; start more SuperNodes or lower min-nodes."
                )
            self.clock.sleep(1.0)

    def _profile(self, node_ids: list[int]) -> None:
        replies = self.grid.send_and_receive([profile_message(n) for n in node_ids], timeout=self.timeout)
        answered = set()
        for reply in replies:
            nid = reply.metadata.src_node_id
            answered.add(nid)
            if reply.has_error():
                self.refuse(nid, f"profile failed: {reply.error.reason}")
                continue
            try:
                m, c = reply.content[wire.METRICS], reply.content[wire.CONFIG]
                info = NodeInfo(node_id=nid, rank=int(m[wire.LORA_RANK]), num_examples=int(m[wire.NUM_EXAMPLES]),
                                device=str(c[wire.DEVICE]), fingerprint=str(c[wire.FINGERPRINT]),
                                software_version=str(c[wire.SOFTWARE]), model_loads=int(m[wire.MODEL_LOADS]))
            except (KeyError, TypeError, ValueError) as e:
                self.refuse(nid, f"profile reply is malformed ({e!r}); the node runs another corolla version")
                continue
            reason = self.refusal(info)
            if reason:
                self.refuse(nid, reason)
            else:
                self.nodes[nid] = info
                self.recorder.node({"status": "ok", **info.__dict__})
                log.info("node %d joined: rank %d, %d examples, %s", nid, info.rank, info.num_examples, info.device)
        for nid in sorted(set(node_ids) - answered):
            log.warning("node %d did not answer its profile query within %.0fs; it will be asked again", nid,
                        self.timeout)
