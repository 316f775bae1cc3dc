"""Uniform random client selection (the plain baseline)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from corolla.strategies.base import Candidate, Selection, Selector


class UniformSelector(Selector):
    """Pick k clients uniformly at random without replacement, reproducibly from a seed."""

    name = "random"

    def __init__(self, config: None = None, *, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def select(self, candidates: Sequence[Candidate], k: int, step: int) -> Selection:
        """Pick min(k, len(candidates)) distinct node ids (every candidate scores 1)."""
        if k < 0:
            raise ValueError(f"`k` must be >= 0, got {k}")
        ids = sorted(c.node_id for c in candidates)
        k = min(k, len(ids))
        # choose positions, not ids: node ids are 64-bit unsigned and numpy may turn them into floats
        picked = [ids[i] for i in self.rng.choice(len(ids), size=k, replace=False)] if k else []
        return Selection(picked=picked, scores={i: {"score": 1.0} for i in ids})
