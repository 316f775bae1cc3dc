"""Rank-independent sketches of client updates, for comparing update directions cheaply.

HeteRo-Select's data-variety term needs cos(Δ_k, mean server update). Updates of
different LoRA ranks have different shapes, and forming ΔW densely would cost
d_out × d_in per layer per client, so each update is sketched instead:
- a LoRA layer's change ΔW = s(B A − B⁰ A⁰) is projected on m rank-1 Gaussian
  probes u_j v_jᵀ without forming ΔW: ⟨u_j v_jᵀ, B A⟩ = (u_jᵀ B)(A v_j);
- a dense array's change is count-sketched (a seeded random bucket and sign per entry).
Both are unbiased inner-product estimators, so cosines of sketches approximate
cosines of the updates. Probes are seeded per key: every server process agrees.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np

from corolla.strategies import lora_ops
from corolla.strategies.base import ClientUpdate, LoraSpec


@lru_cache(maxsize=4096)
def _probes(key: str, d_out: int, d_in: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return (rng.standard_normal((d_out, dim)).astype(np.float32) / np.sqrt(dim),
            rng.standard_normal((d_in, dim)).astype(np.float32))


@lru_cache(maxsize=4096)
def _buckets(key: str, size: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, zlib.crc32(key.encode()), 1])
    return rng.integers(0, dim, size=size), rng.choice(np.array([-1.0, 1.0], np.float32), size=size)


def sketch_update(update: ClientUpdate, lora: LoraSpec, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Return a `2·dim` sketch of update.arrays − update.sent.arrays (LoRA part, dense part)."""
    layers, dense = lora_ops.split_keys(update.arrays)
    lora_part = np.zeros(dim, np.float32)
    s = lora.scale(update.rank) if layers else 0.0
    for layer, shape in layers.items():
        u, v = _probes(layer, shape.d_out, shape.d_in, dim, seed)
        ka, kb = lora_ops.a_key(layer), lora_ops.b_key(layer)
        for sign, arrays in ((1.0, update.arrays), (-1.0, update.sent.arrays)):
            b, a = np.asarray(arrays[kb], np.float32), np.asarray(arrays[ka], np.float32)
            lora_part += sign * s * np.einsum("jr,rj->j", u.T @ b, a @ v)
    dense_part = np.zeros(dim, np.float32)
    for key in dense:
        diff = (np.asarray(update.arrays[key], np.float32) - update.sent.arrays[key]).ravel()
        idx, sign = _buckets(key, diff.size, dim, seed)
        np.add.at(dense_part, idx, sign * diff)
    return np.concatenate([lora_part, dense_part])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity (0 when either vector is zero)."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0
