"""HetLoRA: zero-padded averaging of heterogeneous-rank LoRA factors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from corolla.strategies import lora_ops
from corolla.strategies.base import Aggregator, Arrays, ClientUpdate, Dispatch, LoraSpec, MergedModel, Weights, example_weights
from corolla.strategies.exceptions import AggregationError, RankMismatchError


def norm_weights(norms: Sequence[float]) -> np.ndarray:
    """Return w_i = ‖ΔW_i‖_F / Σ_j ‖ΔW_j‖_F (uniform when every norm is zero)."""
    n = np.asarray(norms, dtype=np.float64)
    if n.size == 0:
        raise AggregationError("hetlora: no updates to weight; the global model is unchanged.")
    return n / n.sum() if n.sum() > 0 else np.full(n.size, 1.0 / n.size)


class HetLoRA(Aggregator):
    """HetLoRA (algorithms.md §2), a baseline for FedHL.

    Implementation based on Cho et al., EMNLP 2024 (https://arxiv.org/abs/2401.06432).
    The server keeps A (r_max × d_in) and B (d_out × r_max); a client of rank r
    gets the first r rows of A and columns of B. Aggregation zero-pads every
    client's factors to r_max and replaces the global factors with Σ w_i Ā_i,
    Σ w_i B̄_i, w_i ∝ ‖s_i B_i A_i‖_F (summed over layers). Decisions: the norm is
    taken of the scaled ΔW; `server_lr` interpolates, global ← global + lr (avg − global).
    Self-pruning of the trailing rank block is not implemented. Not for asynchronous
    rules (`supports_async` False): replacing the factors by Σ w_i Ā_i under weights that
    do not sum to 1 (staleness, FedFix) shrinks the model even when nobody changed it.
    """

    name = "hetlora"
    supports_async = False

    def __init__(self, initial: Arrays, lora: LoraSpec, *, max_rank: int | None = None) -> None:
        super().__init__(initial, lora)
        self.max_rank = max_rank or lora_ops.rank_of(initial)
        self.factors = {}
        for layer in self.layers:
            a, b = initial[lora_ops.a_key(layer)], initial[lora_ops.b_key(layer)]
            if a.shape[0] < self.max_rank:
                raise ValueError(f"hetlora: the initial adapter has rank {a.shape[0]}, below max rank {self.max_rank}.")
            self.factors[layer] = (np.array(a[: self.max_rank], np.float32), np.array(b[:, : self.max_rank], np.float32))

    def _make_dispatch(self, rank: int) -> Dispatch:
        """Return the first `rank` rows of A and columns of B."""
        if not 1 <= rank <= self.max_rank:
            raise RankMismatchError(f"hetlora: rank {rank} is outside 1..{self.max_rank} (max-rank).")
        arrays: dict[str, np.ndarray] = {k: v.copy() for k, v in self.dense.items()}
        for layer, (a, b) in self.factors.items():
            arrays[lora_ops.a_key(layer)] = a[:rank].copy()
            arrays[lora_ops.b_key(layer)] = b[:, :rank].copy()
        return Dispatch(rank=rank, version=self.version, arrays=arrays)

    def weights(self, updates: Sequence[ClientUpdate]) -> Weights:
        """Norm weights for LoRA factors, example weights for dense parameters."""
        norms = []
        for u in updates:
            s = self.lora.scale(u.rank)
            sq = sum(float(np.sum(lora_ops.delta(u.arrays[lora_ops.a_key(k)], u.arrays[lora_ops.b_key(k)], s) ** 2))
                     for k in self.layers)
            norms.append(np.sqrt(sq))
        return Weights(lora=norm_weights(norms), dense=example_weights(updates))

    def state(self) -> dict[str, np.ndarray]:
        """Global zero-padded A and B of every layer plus the dense parameters."""
        return lora_ops.factor_state(self.factors, self.dense)

    def apply(self, updates: Sequence[ClientUpdate], weights: Weights, server_lr: float = 1.0) -> None:
        """Replace the global factors by the weighted sum of zero-padded client factors."""
        lr = np.float32(server_lr)
        for layer, (a, b) in self.factors.items():
            pads = [lora_ops.pad_rank(u.arrays[lora_ops.a_key(layer)], u.arrays[lora_ops.b_key(layer)], self.max_rank)
                    for u in updates]
            a += lr * (lora_ops.weighted_sum([p[0] for p in pads], weights.lora) - a)
            b += lr * (lora_ops.weighted_sum([p[1] for p in pads], weights.lora) - b)
        self._apply_dense(updates, weights.dense, server_lr)
        self.version += 1

    def merged(self) -> MergedModel:
        """ΔW of the full r_max adapter, at r_max's scale."""
        s = self.lora.scale(self.max_rank)
        return MergedModel(deltas={k: lora_ops.delta(a, b, s) for k, (a, b) in self.factors.items()},
                           dense={k: v.copy() for k, v in self.dense.items()})
