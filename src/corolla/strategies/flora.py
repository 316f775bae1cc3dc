"""FLoRA: stacking-based aggregation merged into the base weights every round."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from corolla.strategies import lora_ops
from corolla.strategies.base import Arrays, ClientUpdate, Dispatch, LoraSpec, Weights, example_weights
from corolla.strategies.fedhl import FedHL

FROZEN_SUFFIX = ".base_delta"


class FLoRA(FedHL):
    """FLoRA (algorithms.md §2), a baseline for FedHL.

    Implementation based on Wang et al., NeurIPS 2024 (https://arxiv.org/abs/2409.05976).
    Stacking p_i A_i along the rank dimension and B_i along columns gives
    B_stack A_stack = Σ p_i B_i A_i exactly, which is merged into the base; every
    round each client receives the merged base update W (frozen, as
    `<layer>.base_delta` in `Dispatch.frozen`) and a freshly initialised LoRA at its
    rank (peft's random A, B = 0). Because the fresh start has s·B⁰·A⁰ = 0, the
    merge W ← W + lr Σ p_i s_i B_i A_i is FedHL's application rule with example
    weights, so only `dispatch` and `weights` differ. The stacked factors are never
    materialised: the sum is the same single GEMM. Cost: W travels dense to every
    client every round (d_out × d_in per layer), as in the paper's full-merge form.
    """

    name = "flora"

    def __init__(self, initial: Arrays, lora: LoraSpec, *, max_rank: int | None = None) -> None:
        super().__init__(initial, lora, weighting="examples", max_rank=max_rank)

    def _make_dispatch(self, rank: int) -> Dispatch:
        """Fresh LoRA at `rank` plus the frozen merged base update per layer."""
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"flora: rank {rank} is outside 1..{self.max_rank} (max-rank).")
        arrays: dict[str, np.ndarray] = {k: v.copy() for k, v in self.dense.items()}
        frozen: dict[str, np.ndarray] = {}
        for layer, w in self.w.items():
            arrays[lora_ops.a_key(layer)] = self.init_a[layer][:rank].copy()
            arrays[lora_ops.b_key(layer)] = np.zeros((w.shape[0], rank), np.float32)
            frozen[layer + FROZEN_SUFFIX] = w.cpu().numpy().copy()
        return Dispatch(rank=rank, version=self.version, arrays=arrays, frozen=frozen)

    def weights(self, updates: Sequence[ClientUpdate]) -> Weights:
        """p_i = n_i / Σ n for everything."""
        w = example_weights(updates)
        return Weights(lora=w, dense=w)

    def summary(self) -> dict:
        """Hyper-parameters (the weighting is fixed to examples)."""
        out = super().summary()
        out.pop("weighting", None)
        return out
