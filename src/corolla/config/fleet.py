"""Per-node properties of a simulated fleet: LoRA rank and speed (torch-free; the server and Ray actors agree)."""

from __future__ import annotations

import numpy as np

from corolla.config import RunConfig
from corolla.spec import TASKS


def simulated_rank(cfg: RunConfig, partition_id: int) -> int:
    """Return the rank of simulated node `partition_id`.

    Without `ranks`, every node trains at `lora-rank`. With `ranks` = r_1,…,r_k:
    `tier` gives node p the rank r_(p mod k) (equal-sized tiers); `random` draws
    each node's rank uniformly from the list with a generator seeded by `seed` and
    the node, so every process agrees on it.
    """
    if not TASKS[cfg.task].uses_lora:
        return 0  # the full model is trained: no adapter rank
    ranks = cfg.rank_list()
    if not ranks:
        return cfg.lora_rank
    if cfg.rank_assignment == "tier":
        return ranks[partition_id % len(ranks)]
    return int(np.random.default_rng([cfg.seed, partition_id]).choice(ranks))


def simulated_slowdown(cfg: RunConfig, partition_id: int) -> float:
    """Return how many times slower than the machine simulated node `partition_id` trains.

    `tiers`: node p gets tier p mod k of `speed-tiers` (e.g. 1×, 2×, 5×, 10×);
    `lognormal`: exp(σ·z) with z ~ N(0, 1) seeded by `seed` and the node, floored at 1.
    The trainer stretches each job to this factor × its real duration.
    """
    if cfg.speed_profile == "none":
        return 1.0
    if cfg.speed_profile == "tiers":
        tiers = [float(x) for x in cfg.speed_tiers.split(",") if x.strip()]
        return tiers[partition_id % len(tiers)]
    z = np.random.default_rng([cfg.seed, partition_id, 7]).standard_normal()
    return float(max(1.0, np.exp(cfg.speed_sigma * z)))
