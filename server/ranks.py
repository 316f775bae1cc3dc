"""Which LoRA rank a simulated client trains at."""

from __future__ import annotations

from server.config import RunConfig


def simulated_rank(cfg: RunConfig, partition_id: int) -> int:
    """Return the rank of simulated node `partition_id` (every node at `lora-rank` for now)."""
    return cfg.lora_rank
