"""What every Grid whose nodes live in this process shares: the Grid bookkeeping and the simulated nodes' contexts.

The in-process benchmark grid, the virtual-clock grid and the tests' fake grid
differ only in when and how replies come back; the message ids, the run record
Flower's `Grid` asks for and the simulated node contexts are the same, so they live
here once.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from corolla.proto import wire

#: first simulated node id (node ids are FIRST_NODE_ID + partition id)
FIRST_NODE_ID = 1000


class LocalGrid(Grid):
    """A Grid without a SuperLink: subclasses implement get_node_ids, push/pull and send_and_receive."""

    def __init__(self, run_id: int = 1, id_prefix: str = "m") -> None:
        self.run_id = run_id
        self._ids = itertools.count(1)
        self._id_prefix = id_prefix

    @property
    def run(self) -> Any:
        """Grid's abstract property; a local grid has no Run record."""
        return None

    def set_run(self, run_id: int) -> None:
        """Set the run id."""
        self.run_id = run_id

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """Build a message (Grid's abstract method)."""
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def _stamp(self, message: Message) -> str:
        """Give a pushed message its id, as the SuperLink would (replies copy it as reply_to)."""
        mid = f"{self._id_prefix}{next(self._ids)}"
        message.metadata.__dict__["_message_id"] = mid
        return mid


def simulated_contexts(num_nodes: int, run_config: Mapping[str, Any], run_id: int = 1) -> dict[int, Context]:
    """One Context per simulated node, with its partition id in the node config (as Flower's simulation sets it)."""
    return {FIRST_NODE_ID + i: Context(run_id=run_id, node_id=FIRST_NODE_ID + i, state=RecordDict(),
                                       run_config=dict(run_config),
                                       node_config={wire.NODE_PARTITION: i, wire.NODE_PARTITIONS: num_nodes})
            for i in range(num_nodes)}


def set_task_identity(run_id: int = 1) -> None:
    """Messages built outside a Flower run need a task identity (platform.md)."""
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1
