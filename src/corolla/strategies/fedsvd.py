"""Aggregators whose sites train only B on a shared A: FFA-LoRA (A frozen for good) and FedSVD (A re-fitted by SVD).

Both exist for private federations: noise added to both factors of a LoRA update is
amplified through their product B·A, while with A fixed the aggregate Σ w_i ΔB_i · A is
linear in what sites send, so DP noise on B stays noise of the same size on ΔW.

- **FFA-LoRA** (Sun et al., "Improving LoRA in privacy-preserving federated learning",
  ICLR 2024): A keeps its random initialisation for the whole run; B is averaged.
- **FedSVD** (Lee et al., "FedSVD: Adaptive orthogonalization for private federated
  learning with LoRA", 2025): after B is averaged, the server re-factorizes the product
  with the A the sites trained against, B̄·A = U Σ Vᵀ, and sends A ← Vᵀ (orthonormal rows,
  the product's principal input directions) and B ← U Σ. The product, and so the model,
  is unchanged by the re-factorization; only the basis the next round trains B in moves.
  The SVD is of an r × r-sized problem: with Aᵀ = Q R (QR of the d_in × r factor),
  B̄·A = (B̄ Rᵀ) Qᵀ, and the small SVD B̄ Rᵀ = U Σ Wᵀ gives B̄·A = U Σ (Q W)ᵀ.

One rank for every site: A is shared, so a site at another rank would train B against
another A, and their B's could not be averaged (the mixed-rank methods, FedHL and its
baselines, need both factors trained). Sites return A exactly as they were sent it; a
reply whose A moved is rejected. Synchronous only: a stale B was trained against an A
FedSVD has since replaced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import ClassVar

import numpy as np

from corolla.strategies import lora_ops
from corolla.strategies.base import ClientUpdate, Weights
from corolla.strategies.exceptions import InvalidUpdateError
from corolla.strategies.fedavg import FedAvg

#: relative rounding of a bfloat16 value (2⁻⁸): what a bfloat16 trainer's untouched A may differ by
BF16_ROUNDOFF = 2.0**-8


class FrozenA(FedAvg):
    """FFA-LoRA: FedAvg where sites train only B; A stays the seeded initial one."""

    name = "ffa"
    #: sites keep every lora_A frozen (the train message says so)
    trains_a: ClassVar[bool] = False
    supports_async = False

    def check(self, update: ClientUpdate) -> None:
        """Also reject a reply whose A is not the A it was sent (its site trained A).

        A trainer holding LoRA in bfloat16 (`lora-dtype`) returns A rounded to it: a relative
        change up to bfloat16's unit roundoff is that rounding, anything more is training.
        """
        super().check(update)
        for layer in self.layers:
            key = lora_ops.a_key(layer)
            sent = update.sent.arrays[key]
            if not np.allclose(np.asarray(update.arrays[key], np.float32), sent, rtol=BF16_ROUNDOFF, atol=0.0):
                raise InvalidUpdateError(
                    f"{self.name}: node {update.node_id} changed `{key}`, which its sites must keep frozen (they train "
                    "only B); the update is rejected. Its trainer ignored the job's freeze-a flag: install the same "
                    "corolla version there.")


    def apply(self, updates: Sequence[ClientUpdate], weights: Weights, server_lr: float = 1.0) -> None:
        """FedAvg on B and the dense parameters; A stays exactly what it was (a returned A's rounding is dropped)."""
        kept = [replace(u, arrays={**u.arrays, **{lora_ops.a_key(layer): u.sent.arrays[lora_ops.a_key(layer)]
                                                  for layer in self.layers}}) for u in updates]
        super().apply(kept, weights, server_lr)


class FedSVD(FrozenA):
    """FedSVD: FFA's B-only training, then B̄·A re-factorized by SVD into an orthonormal A and B = U Σ."""

    name = "fedsvd"

    def step(self, updates: Sequence[ClientUpdate], weights: Weights) -> Weights:
        """Average B (A is unchanged by construction) through the guard and server SGD, then re-factorize B·A.

        The re-factorization changes the basis B lives in every version, so a server optimizer
        with memory (momentum, Adam) would mix bases: the configuration allows only server SGD.
        """
        applied = super().step(updates, weights)
        for layer, (a, b) in self.factors.items():
            self.factors[layer] = refactorize(a, b)
        return applied


def refactorize(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A', B') with B'·A' = B·A, A' = Vᵀ (orthonormal rows) and B' = U Σ from the SVD of B·A (rank r = A's rows).

    Computed through the QR of Aᵀ (d_in × r) and the SVD of the r-column matrix B Rᵀ, never
    the d_out × d_in product. A rank-deficient product keeps orthonormal rows in A' (the
    directions of zero singular value are arbitrary orthonormal completions, B' is 0 there).
    """
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    q, r = np.linalg.qr(a64.T)  # a64 = rᵀ qᵀ
    u, s, wt = np.linalg.svd(b64 @ r.T, full_matrices=False)
    a_new = (q @ wt.T).T  # (Q W)ᵀ
    b_new = u * s
    return a_new.astype(np.float32), b_new.astype(np.float32)
