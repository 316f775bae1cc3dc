"""Tiny adapters for strategy tests: two LoRA layers and one dense head."""

from __future__ import annotations

import numpy as np

from corolla.strategies import ClientUpdate, Dispatch

LAYERS = ("m.l0.q", "m.l1.q")
D_OUT, D_IN = 5, 4


def adapter(rank: int, seed: int, b_zero: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for layer in LAYERS:
        out[f"{layer}.lora_A.weight"] = rng.normal(size=(rank, D_IN)).astype(np.float32)
        b = rng.normal(size=(D_OUT, rank)).astype(np.float32)
        out[f"{layer}.lora_B.weight"] = np.zeros_like(b) if b_zero else b
    out["m.head.weight"] = rng.normal(size=(3, D_IN)).astype(np.float32)
    return out


def perturbed(d: Dispatch, seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in d.arrays.items()}


def update(node: int, d: Dispatch, arrays: dict[str, np.ndarray], n: int = 10) -> ClientUpdate:
    return ClientUpdate(node_id=node, arrays=arrays, sent=d, num_examples=n)
