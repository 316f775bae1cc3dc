"""Helpers the selectors share: normalisation, telemetry hygiene, sampling without replacement."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

TELEMETRY_KEYS = {"loss-mean": (0.0, math.inf), "loss-sq-mean": (0.0, math.inf), "duration-s": (0.0, math.inf)}


def minmax(values: Sequence[float], neutral: float = 0.5) -> np.ndarray:
    """Scale to [0, 1]; all-equal (or empty) input gives `neutral` everywhere."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x
    lo, hi = float(x.min()), float(x.max())
    return np.full(x.size, neutral) if hi - lo <= 1e-12 else (x - lo) / (hi - lo)


def clean_telemetry(telemetry: Mapping[str, float]) -> tuple[dict[str, float], list[str]]:
    """Keep the known telemetry values that are finite and in range; list the problems with the rest.

    A client that sends nothing, NaN losses or a negative duration stays
    schedulable: the selector treats the missing value as neutral, and the driver
    records the problem.
    """
    clean, problems = {}, []
    for key, (lo, hi) in TELEMETRY_KEYS.items():
        if key not in telemetry:
            continue
        v = telemetry[key]
        if not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            problems.append(f"`{key}` = {v!r} is not a finite value in [{lo}, {hi}]")
            continue
        clean[key] = float(v)
    return clean, problems


def sample_without_replacement(rng: np.random.Generator, ids: Sequence[int], weights: np.ndarray, k: int) -> list[int]:
    """Draw k distinct ids with probability ∝ weights (positions are drawn: ids may be 64-bit)."""
    k = min(k, len(ids))
    if k <= 0:
        return []
    w = np.clip(np.asarray(weights, dtype=np.float64), 0, None)
    p = w / w.sum() if w.sum() > 0 and np.count_nonzero(w) >= k else None
    return [ids[i] for i in rng.choice(len(ids), size=k, replace=False, p=p)]
