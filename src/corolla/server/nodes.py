"""Node admission: profile every SuperNode that appears, admit or refuse it, and remember why.

A node is asked for its profile (a Describe query its ClientApp forwards to the node's
trainer) when it appears, and again whenever it is unavailable: its profile query or a
job failed with an error reply (e.g. its trainer is down while its SuperNode lives). An
unavailable node gets no work; it is asked again at every node refresh, at most every
`NODE_REFRESH_S`, and gets work again once a profile answers. Refusals (another
software version, base model or rank, or a TaskSpec its trainer cannot load) are for good.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from corolla.proto import wire
from corolla.server.clock import Clock
from corolla.server.codec import profile_message
from corolla.server.records import RunRecorder

log = logging.getLogger(__name__)

#: seconds between polls while waiting for nodes to join
POLL_S = 0.2
#: seconds between re-reads of the node list (async driver), and between profile queries to an unavailable node
NODE_REFRESH_S = 5.0


#: bounds on what a profile may declare: a trainer never reports more, and the server allocates and weighs by these
#: (rank 0: a task that trains the whole model; ranks above the run's max-rank are refused by the federation)
PROFILE_BOUNDS = {wire.LORA_RANK: (0, 65_536), wire.NUM_EXAMPLES: (0, 10**12), wire.MEMORY_BYTES: (0, 1 << 50),
                  wire.MODEL_LOADS: (0, 10**6)}
#: longest text a profile may hold per field (device names, fingerprints and versions are short)
PROFILE_TEXT_CHARS = 256


class ProfileError(ValueError):
    """A profile value no trainer reports: the node is refused with this text."""


def bounded_int(metrics: Mapping[str, Any], key: str) -> int:
    """`metrics[key]` as an int within PROFILE_BOUNDS[key]; ProfileError naming the key and the bound otherwise."""
    value = metrics[key]
    low, high = PROFILE_BOUNDS[key]
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value == int(value)
    if not ok or not low <= int(value) <= high:
        raise ProfileError(f"profile declares `{key}` = {value!r}, not an integer in [{low}, {high}]")
    return int(value)


def bounded_text(config: Mapping[str, Any], key: str) -> str:
    """`config[key]` as printable text of at most PROFILE_TEXT_CHARS characters."""
    value = config[key]
    if not isinstance(value, str) or len(value) > PROFILE_TEXT_CHARS or not value.isprintable():
        raise ProfileError(f"profile declares `{key}` that is not printable text of at most {PROFILE_TEXT_CHARS} "
                           "characters")
    return value


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
    """The admitted nodes, the unavailable ones and the refused ones, kept current with the Grid.

    `refusal(info)` (the federation's rules: software version, model fingerprint,
    ranks the aggregation can serve) decides admission; a refusal is logged and
    recorded with its reason in nodes.jsonl, as is every change between usable and
    unavailable (`status` "ok" / "unavailable").
    """

    def __init__(self, grid: Grid, recorder: RunRecorder, clock: Clock,
                 refusal: Callable[[NodeInfo], str | None], timeout: float,
                 task: Mapping[str, Any] | None = None) -> None:
        self.grid = grid
        self.recorder = recorder
        self.clock = clock
        self.refusal = refusal
        self.timeout = timeout
        self.task = dict(task or {})  # the run's TaskSpec, sent with every profile query (`wire.task_record`)
        self.nodes: dict[int, NodeInfo] = {}
        self.refused: dict[int, str] = {}
        self.unavailable: dict[int, str] = {}  # node → why it gets no work until a profile query answers
        self._pending: dict[str, tuple[int, float]] = {}  # profile query id → (node, when asked)
        self._retry_at: dict[int, float] = {}  # node → when to ask again after an unanswered or failed query

    def __getitem__(self, node_id: int) -> NodeInfo:
        return self.nodes[node_id]

    def __contains__(self, node_id: object) -> bool:
        """True for a usable node: admitted and not unavailable."""
        return node_id in self.nodes and node_id not in self.unavailable

    def refuse(self, nid: int, reason: str) -> None:
        """Drop a node for good and record why."""
        self.nodes.pop(nid, None)
        self.unavailable.pop(nid, None)
        self.refused[nid] = reason
        log.warning("node %d refused: %s", nid, reason)
        self.recorder.node({"node": nid, "status": "refused", "reason": reason})

    def mark_unavailable(self, nid: int, reason: str, ask_in: float = 0.0) -> None:
        """Send the node no work until it answers a profile query, asked in `ask_in` seconds (at a refresh).

        A job's error reply (its trainer unreachable, the node gone, the message expired)
        calls this with `ask_in` 0: the next refresh asks at once. The change is recorded
        once in nodes.jsonl, not at every failed query.
        """
        if nid in self.refused:
            return
        if nid not in self.unavailable:
            log.warning("node %d is unavailable and gets no work until it answers a profile query (asked again at "
                        "every node refresh): %s", nid, reason)
            self.recorder.node({"node": nid, "status": "unavailable", "reason": reason})
        self.unavailable[nid] = reason
        self._retry_at[nid] = self.clock.monotonic() + ask_in

    def refresh(self, wait_for: int = 0, timeout: float | None = None) -> list[int]:
        """Ask newcomers for their profile and collect answers; return the usable ids present now.

        Never blocks on a node: profile queries are pushed and their answers pulled on
        later calls, so a node that never answers delays nobody (it is asked again
        after `timeout`). With `wait_for`, polls until that many nodes are usable.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = self.clock.monotonic() + timeout
        while True:
            ids = set(self.grid.get_node_ids())
            self._ask(ids)
            self._collect()
            usable = sorted(i for i in ids if i in self)
            if len(usable) >= wait_for:
                return usable
            if self.clock.monotonic() > deadline:
                refused = f"; {len(self.refused)} refused (reasons in nodes.jsonl)" if self.refused else ""
                down = sum(i in self.unavailable for i in ids)
                down_s = f"; {down} unavailable (its trainer did not answer; reasons in nodes.jsonl)" if down else ""
                raise TimeoutError(
                    f"only {len(usable)} of the {wait_for} nodes needed (min-nodes) joined within {timeout:.0f}s"
                    f"{refused}{down_s}; start more SuperNodes or lower min-nodes."
                )
            self.clock.sleep(POLL_S)

    def _ask(self, ids: set[int]) -> None:
        now = self.clock.monotonic()
        asking = {n for n, _ in self._pending.values()}
        unknown = ids - set(self.nodes) - set(self.refused)
        new = sorted(n for n in (unknown | (ids & set(self.unavailable))) - asking if self._retry_at.get(n, 0.0) <= now)
        if not new:
            return
        msgs = [profile_message(n, ttl=self.timeout, task=self.task) for n in new]
        for mid, n in zip(self.grid.push_messages(msgs), new):
            self._pending[str(mid)] = (n, now)

    def _collect(self) -> None:
        if not self._pending:
            return
        for reply in self.grid.pull_messages(list(self._pending)):
            entry = self._pending.pop(str(reply.metadata.reply_to_message_id), None)
            if entry is not None:
                self._admit(entry[0], reply)
        now = self.clock.monotonic()
        for mid, (nid, asked) in list(self._pending.items()):
            if now - asked > self.timeout:
                del self._pending[mid]
                self._retry_at[nid] = now + self.timeout
                log.warning("node %d did not answer its profile query within %.0fs; it will be asked again",
                            nid, self.timeout)

    def _admit(self, nid: int, reply: Message) -> None:
        if reply.has_error():  # its trainer is down (or not yet up): not a refusal, it is asked again
            self.mark_unavailable(nid, f"profile failed: {reply.error.reason}", ask_in=NODE_REFRESH_S)
            return
        try:
            m, c = reply.content[wire.METRICS], reply.content[wire.CONFIG]
            if wire.MEMORY_BYTES in m:
                bounded_int(m, wire.MEMORY_BYTES)
            info = NodeInfo(node_id=nid, rank=bounded_int(m, wire.LORA_RANK), num_examples=bounded_int(m, wire.NUM_EXAMPLES),
                            device=bounded_text(c, wire.DEVICE), fingerprint=bounded_text(c, wire.FINGERPRINT),
                            software_version=bounded_text(c, wire.SOFTWARE), model_loads=bounded_int(m, wire.MODEL_LOADS))
        except ProfileError as e:
            self.refuse(nid, f"{e}; no corolla trainer reports this, so the node is not trusted")
            return
        except (KeyError, TypeError, ValueError) as e:
            self.refuse(nid, f"profile reply is malformed ({e!r}); the node runs another corolla version")
            return
        # the trainer's own word first: it could not load the run's TaskSpec (and keeps serving its model)
        reason = str(c.get(wire.REFUSAL, "") or "") or self.refusal(info)
        if reason:
            self.refuse(nid, reason)
            return
        back = nid in self.nodes  # back after being unavailable: what the selector learnt about it stays
        if back:
            info.telemetry = self.nodes[nid].telemetry
        self.unavailable.pop(nid, None)
        self.nodes[nid] = info
        row = {k: v for k, v in info.__dict__.items() if k != "node_id"}
        self.recorder.node({"node": nid, "status": "ok", **row})
        log.info("node %d %s: rank %d, %d examples, %s", nid, "is back" if back else "joined", info.rank,
                 info.num_examples, info.device)
