"""An in-process Grid: the whole server stack against ClientApp calls in one process.

Benchmarks that sweep many configurations (hundreds of rounds, several seeds) run
the real Federation, drivers, validation, strategies and ClientApp code — only
Flower's transport is replaced by direct calls, the way Flower's own servicer
tests run the real server in-process. Replies are computed when pulled, in push
order, so asynchronous drivers still see jobs finish one by one. Not a product
path: `corolla sim` (Ray) and `corolla server/client` (gRPC) are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Message

from corolla.client.app import app as client_app
from corolla.launch.local_grid import LocalGrid, set_task_identity, simulated_contexts


class InProcessGrid(LocalGrid):
    """A Grid whose nodes are ClientApp calls with simulated node configs (partition ids)."""

    def __init__(self, num_nodes: int, run_config: Mapping[str, Any], run_id: int = 1) -> None:
        super().__init__(run_id)
        self.contexts = simulated_contexts(num_nodes, run_config, run_id)
        self.pending: dict[str, Message] = {}
        set_task_identity(run_id)

    def get_node_ids(self) -> Iterable[int]:
        """Every simulated node, always up."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue messages; their replies are computed when pulled."""
        ids = []
        for m in messages:
            mid = self._stamp(m)
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
