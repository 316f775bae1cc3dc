"""FedAvg over LoRA factors and dense parameters (homogeneous rank)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from numpy.typing import NDArray

from corolla.strategies import lora_ops
from corolla.strategies.base import Aggregator, Arrays, ClientUpdate, Dispatch, LoraSpec, MergedModel, Weights, example_weights
from corolla.strategies.exceptions import RankMismatchError


class FedAvg(Aggregator):
    """Federated averaging of A, B and dense parameters, weighted by example count.

    Implementation based on https://arxiv.org/abs/1602.05629. Every client must
    train at the global rank: averaging A and B separately is only defined for one
    rank (use FedHL, HetLoRA, FlexLoRA or FLoRA for mixed ranks). The update is
    applied in delta form, global += lr · Σ w_i (returned_i − sent_i), which equals
    the plain weighted average when every client started from the current model
    and lr = 1, and is the form FedBuff/FedFix need for stale updates.
    """

    name = "fedavg"

    def __init__(self, initial: Arrays, lora: LoraSpec) -> None:
        super().__init__(initial, lora)
        self.rank = lora_ops.rank_of(initial)
        self.factors = {
            layer: (
                np.array(initial[lora_ops.a_key(layer)], np.float32, copy=True),
                np.array(initial[lora_ops.b_key(layer)], np.float32, copy=True),
            )
            for layer in self.layers
        }

    def _make_dispatch(self, rank: int) -> Dispatch:
        """Return the global factors; `rank` must equal the global rank."""
        if rank != self.rank:
            raise RankMismatchError(
                f"fedavg: a client asked for rank {rank} but the global adapter has rank {self.rank}; "
                "FedAvg needs one rank for all clients (set every client's rank to "
                f"{self.rank}, or use aggregation=fedhl for mixed ranks)."
            )
        arrays: dict[str, np.ndarray] = {k: v.copy() for k, v in self.dense.items()}
        for layer, (a, b) in self.factors.items():
            arrays[lora_ops.a_key(layer)] = a.copy()
            arrays[lora_ops.b_key(layer)] = b.copy()
        return Dispatch(rank=rank, version=self.version, arrays=arrays)

    def weights(self, updates: Sequence[ClientUpdate]) -> Weights:
        """Return example-count weights for both LoRA factors and dense parameters."""
        w = example_weights(updates)
        return Weights(lora=w, dense=w)

    def check(self, update: ClientUpdate) -> None:
        """Also reject an update whose rank is not the global rank."""
        if update.rank != self.rank:
            raise RankMismatchError(
                f"fedavg: node {update.node_id} trained at rank {update.rank}, the global rank is {self.rank}; "
                "the update is rejected."
            )
        super().check(update)

    def state(self) -> dict[str, np.ndarray]:
        """Global A and B of every layer plus the dense parameters."""
        return lora_ops.factor_state(self.factors, self.dense)

    def apply(self, updates: Sequence[ClientUpdate], weights: Weights, server_lr: float = 1.0) -> None:
        """Move A, B and dense parameters by the weighted mean client change."""
        lr = np.float32(server_lr)
        for layer, (a, b) in self.factors.items():
            ka, kb = lora_ops.a_key(layer), lora_ops.b_key(layer)
            a += lr * lora_ops.weighted_sum([u.arrays[ka] - u.sent.arrays[ka] for u in updates], weights.lora)
            b += lr * lora_ops.weighted_sum([u.arrays[kb] - u.sent.arrays[kb] for u in updates], weights.lora)
        self._apply_dense(updates, weights.dense, server_lr)
        self.version += 1

    def merged(self) -> MergedModel:
        """Return ΔW = s·B·A per layer at the global rank."""
        s = self.lora.scale(self.rank) if self.factors else 0.0  # rank 0: a full-model task, no LoRA layers
        return MergedModel(
            deltas={layer: lora_ops.delta(a, b, s) for layer, (a, b) in self.factors.items()},
            dense={k: v.copy() for k, v in self.dense.items()},
        )

    def merged_items(self) -> Iterator[tuple[str, NDArray[np.float32]]]:
        """ΔW = s·B·A one layer at a time (the whole model's ΔW never exists at once), then the dense parameters."""
        s = self.lora.scale(self.rank) if self.factors else 0.0
        for layer, (a, b) in self.factors.items():
            yield f"delta/{layer}", lora_ops.delta(a, b, s)
        for k, v in self.dense.items():
            yield f"dense/{k}", v.copy()

    def summary(self) -> dict:
        """Return hyper-parameters including the global rank."""
        return {**super().summary(), "rank": self.rank}
