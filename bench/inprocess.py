"""An in-process Grid: the whole server stack against ClientApp calls in one process.

Benchmarks that sweep many configurations (hundreds of rounds, several seeds) run
the real Federation, drivers, validation, strategies and ClientApp code — only
Flower's transport is replaced by direct calls, the way Flower's own servicer
tests run the real server in-process. Replies are computed when pulled, in push
order, so asynchronous drivers still see jobs finish one by one. Not a product
path: `corolla sim` (Ray) and `corolla server/client` (gRPC) are.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from corolla.client.app import app as client_app
from corolla.proto import wire


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls with simulated node configs (partition ids)."""

    def __init__(self, num_nodes: int, run_config: Mapping[str, Any], run_id: int = 1) -> None:
        self.run_id = run_id
        self.contexts = {
            1000 + i: Context(run_id=run_id, node_id=1000 + i, state=RecordDict(), run_config=dict(run_config),
                              node_config={wire.NODE_PARTITION: i, wire.NODE_PARTITIONS: num_nodes})
            for i in range(num_nodes)
        }
        self.pending: dict[str, Message] = {}
        self.ids = itertools.count(1)
        TaskIdentity.run_id = run_id  # Messages built outside a Flower run need an identity (platform.md)
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 1

    @property
    def run(self) -> Any:
        """Grid's abstract property; the in-process grid has no Run record."""
        return None

    def set_run(self, run_id: int) -> None:
        """Set the run id."""
        self.run_id = run_id

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """Build a message (Grid's abstract method)."""
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Every simulated node, always up."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue messages; their replies are computed when pulled."""
        ids = []
        for m in messages:
            mid = f"m{next(self.ids)}"
            m.metadata.__dict__["_message_id"] = mid
            self.pending[mid] = m
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Answer the oldest requested pending message (one per pull, like jobs finishing one at a time)."""
        for mid in message_ids:
            if mid in self.pending:
                return [self._answer(mid)]
        return []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then answer everything."""
        return [self._answer(mid) for mid in list(self.push_messages(messages))]

    def _answer(self, mid: str) -> Message:
        msg = self.pending.pop(mid)
        ctx = self.contexts[msg.metadata.dst_node_id]
        return client_app(msg, ctx)
