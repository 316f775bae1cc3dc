"""FlexLoRA: example-weighted average of full ΔW, redistributed by SVD at each client's rank."""

from __future__ import annotations

from collections.abc import Sequence

from corolla.strategies import lora_ops
from corolla.strategies.base import Arrays, ClientUpdate, LoraSpec, Weights, example_weights
from corolla.strategies.fedhl import FedHL


class FlexLoRA(FedHL):
    """FlexLoRA (algorithms.md §2), a baseline for FedHL.

    Implementation based on Bai et al., NeurIPS 2024 (https://arxiv.org/abs/2402.11505).
    ΔW = Σ_i (n_i / Σn) s_i B_i A_i *replaces* the global update (FedHL instead adds
    each client's change against its own truncated start, which is what removes
    the truncation bias); a client of rank r receives the rank-r SVD split of ΔW,
    exactly as FedHL distributes. `server_lr` interpolates: W ← W + lr (ΔW − W).
    Not for asynchronous rules (`supports_async` False): replacing W by Σ w_i s_i B_i A_i
    under weights that do not sum to 1 (staleness, FedFix) shrinks it even when nobody
    changed it (FedHL's delta form, which FlexLoRA inherits from, would not).
    """

    name = "flexlora"
    supports_async = False

    def __init__(self, initial: Arrays, lora: LoraSpec, *, svd: str = "auto", max_rank: int | None = None) -> None:
        super().__init__(initial, lora, weighting="examples", svd=svd, max_rank=max_rank)

    def weights(self, updates: Sequence[ClientUpdate]) -> Weights:
        """Example weights for everything."""
        w = example_weights(updates)
        return Weights(lora=w, dense=w)

    def apply(self, updates: Sequence[ClientUpdate], weights: Weights, server_lr: float = 1.0) -> None:
        """W ← W + lr (Σ p_i s_i B_i A_i − W), one GEMM over stacked factors per layer."""
        for layer, w in self.w.items():
            w.mul_(1.0 - server_lr)
            self._add_products(w, [(float(p) * server_lr * self.lora.scale(u.rank), u.arrays[lora_ops.b_key(layer)],
                                    u.arrays[lora_ops.a_key(layer)]) for p, u in zip(weights.lora, updates)])
        self._apply_dense(updates, weights.dense, server_lr)
        self.version += 1

    def summary(self) -> dict:
        """Hyper-parameters (the weighting is fixed to examples)."""
        out = super().summary()
        out.pop("weighting", None)
        return out
