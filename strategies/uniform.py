"""Uniform random client selection (the plain baseline)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies.base import Candidate, Selector


class UniformSelector(Selector):
    """Pick k clients uniformly at random without replacement, reproducibly from a seed."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def select(self, candidates: Sequence[Candidate], k: int, step: int) -> list[int]:
        """Return min(k, len(candidates)) distinct node ids."""
        if k < 0:
            raise ValueError(f"`k` must be >= 0, got {k}")
        ids = sorted(c.node_id for c in candidates)
        k = min(k, len(ids))
        # choose positions, not ids: node ids are 64-bit unsigned and numpy may turn them into floats
        return [ids[i] for i in self.rng.choice(len(ids), size=k, replace=False)] if k else []
