"""Bounds on what one silo can do to the global model: weight shares and update norms.

Reply validation (server/codec.py, `Aggregator.check`) rejects what can be checked against
what a node was sent and declared. What remains is a well-formed update that is far too
large, or a node whose weight dominates a step. `UpdateGuard` bounds both on every
aggregation step, synchronous or asynchronous (`Aggregator.step` applies it when the driver
installs one), and reports what it did per update.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from corolla.strategies.base import Aggregator, ClientUpdate, Weights
from corolla.strategies.options import option

log = logging.getLogger(__name__)

#: relative slack before an update counts as above the norm bound (float32 rounding of honest replies)
NORM_SLACK = 1e-6


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    """The server's bounds on every aggregation step; each field is one run-configuration key."""

    max_weight_share: float = option(0.0, key="max-weight-share", low=0.0, help=(
        "largest share of one aggregation step's total weight a single update may get; the excess goes to the others "
        "in proportion to their weights (0: auto, 1/2 for 2 updates, max(1/2, 2/k) for k >= 3; >= 1: none)"))
    max_update_norm: float = option(0.0, key="max-update-norm", help=(
        "clip each update's change ‖returned − sent‖ over all its arrays (LoRA factors and dense) to this norm "
        "(0: adaptive, update-norm-multiple × the median of the step's and the last 64 accepted norms; < 0: off)"))
    update_norm_multiple: float = option(4.0, key="update-norm-multiple", low=1.0, help=(
        "adaptive max-update-norm: this multiple of the median update norm"))
    norm_window: int = option(64, key=None, help="accepted (clipped) update norms the adaptive bound remembers")
    min_norms: int = option(2, key=None, help=(
        "norms known (the step's and remembered) before the adaptive bound applies; 2, so that a two-site step is "
        "bounded by its lower norm"))

    def __post_init__(self) -> None:
        if not self.max_weight_share >= 0:
            raise ValueError(f"`max-weight-share` must be >= 0 (0: auto), got {self.max_weight_share}")
        if not math.isfinite(self.max_update_norm):
            raise ValueError(f"`max-update-norm` must be a finite number, got {self.max_update_norm}")
        if not self.update_norm_multiple >= 1:
            raise ValueError(f"`update-norm-multiple` must be >= 1, got {self.update_norm_multiple}")
        if self.norm_window < 1 or self.min_norms < 1:
            raise ValueError(f"`norm_window` and `min_norms` must be >= 1, got {self.norm_window}, {self.min_norms}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> GuardConfig:
        """Build from kebab-case run-configuration values (missing keys: defaults)."""
        kwargs = {f.name: values[f.metadata["key"]] for f in dataclasses.fields(cls)
                  if f.metadata.get("key") and f.metadata["key"] in values}
        return cls(**kwargs)


@dataclass(frozen=True)
class GuardNote:
    """What the guard did to one update of a step (a row's `update_norm`, `norm_bound`, `clipped`, weights)."""

    norm: float
    bound: float | None
    #: the factor f < 1 the update's change was multiplied by (None: not clipped)
    clipped: float | None
    weight: float
    dense_weight: float
    #: the LoRA weight before the share bound moved it (None: unchanged)
    weight_before_cap: float | None


def auto_share(k: int) -> float:
    """The default bound on one update's share of a step of k updates: 1/2 for k = 2, max(1/2, 2/k) above, 1 alone.

    Two sites get equal shares at most (a site's example count is its own claim, so in a
    two-site federation the fair share is half); three get at most 2/3 each; from k = 4 on
    it is the majority bound: no single update outweighs all the others together. An
    honest federation of three or more is capped only where one silo holds more examples
    than the rest of the step combined.
    """
    if k <= 1:
        return 1.0
    return 0.5 if k == 2 else max(0.5, 2.0 / k)


def cap_shares(weights: ArrayLike, cap: float) -> NDArray[np.float64]:
    """Bound every weight to `cap` × Σw and hand the excess to the others in proportion to their weights.

    The sum is kept (water-filling: weights pushed to the bound stay there, the rest are rescaled,
    repeated until none exceeds it). A bound below an equal share cannot be met; it then becomes
    the equal share 1/k. Weights that are all zero, negative or a `cap` >= 1 are returned unchanged.
    """
    w0 = np.asarray(weights, dtype=np.float64)
    w = w0.copy()
    k, total = w.size, float(w0.sum())
    if k == 0 or cap >= 1 or total <= 0 or np.any(w0 < 0):
        return w
    limit = max(cap, 1.0 / k) * total
    fixed = np.zeros(k, dtype=bool)
    while True:
        over = ~fixed & (w > limit * (1 + 1e-12))
        if not over.any():
            return w
        fixed |= over
        w[fixed] = limit
        free = ~fixed
        rest, base = total - limit * fixed.sum(), float(w0[free].sum())
        w[free] = w0[free] * (rest / base) if base > 0 else rest / free.sum()


def update_norm(update: ClientUpdate) -> float:
    """‖returned − sent‖ over every array the update carries (LoRA factors and dense parameters), in float64."""
    total = 0.0
    for k, sent in update.sent.arrays.items():
        d = (np.asarray(update.arrays[k], np.float64) - np.asarray(sent, np.float64)).ravel()
        total += float(d @ d)
    return math.sqrt(total)


def clip_update(update: ClientUpdate, factor: float) -> ClientUpdate:
    """The update moved towards what it was sent: sent + factor · (returned − sent), array by array."""
    f = np.float32(factor)
    arrays = {k: (np.asarray(update.sent.arrays[k], np.float32)
                  + f * (np.asarray(v, np.float32) - np.asarray(update.sent.arrays[k], np.float32))).astype(np.float32)
              for k, v in update.arrays.items()}
    return replace(update, arrays=arrays)


def lower_median(values: Sequence[float]) -> float:
    """The median, taking the lower middle value of an even count (so with two norms the smaller sets the bound)."""
    s = sorted(values)
    return float(s[(len(s) - 1) // 2])


class UpdateGuard:
    """Norm clipping and a bound on weight shares, applied to every aggregation step.

    Clipping (the standard norm-bounding defence, Sun et al. 2019, https://arxiv.org/abs/1911.07963):
    each update's change is measured as ‖returned − sent‖ over all its arrays — the LoRA factor
    changes (A − A₀, B − B₀) and the dense parameters, not s·(BA − B₀A₀) — and an update above the
    bound b becomes sent + (b/‖·‖)(returned − sent). For FedAvg-style rules that is exactly
    clipping the delta they average; FedHL then applies s·B'A' − W^(r), whose change shrinks with
    the factor (to first order by it). Adaptive b (`max-update-norm` = 0) is `update-norm-multiple`
    × the lower median of the step's norms and of the last `norm_window` accepted norms (taken after
    clipping, so a repeat offender cannot drag the median up), once `min_norms` are known.

    Weight shares: each of the LoRA and dense weight vectors is bounded to `max-weight-share` × its
    sum (`cap_shares`), the excess redistributed in proportion, so weights sum as before (1 in
    sync, Σ p_i s(τ_i) or Σ d_i asynchronously).
    """

    def __init__(self, config: GuardConfig | None = None) -> None:
        self.config = config or GuardConfig()
        self.norms: deque[float] = deque(maxlen=self.config.norm_window)
        #: one note per update of the last step, in the order the step received them
        self.last: list[GuardNote] = []

    def share_cap(self, k: int) -> float:
        """The bound on one update's share of a step of k updates."""
        c = self.config.max_weight_share
        return auto_share(k) if c == 0 else min(c, 1.0)

    def norm_bound(self, norms: Sequence[float]) -> float | None:
        """The norm bound for a step with these update norms (None: no clipping)."""
        c = self.config
        if c.max_update_norm < 0:
            return None
        if c.max_update_norm > 0:
            return c.max_update_norm
        pool = [*self.norms, *norms]
        if len(pool) < c.min_norms:
            return None
        m = lower_median(pool)
        return c.update_norm_multiple * m if m > 0 else None

    def __call__(self, updates: Sequence[ClientUpdate], weights: Weights) -> tuple[list[ClientUpdate], Weights]:
        """Clip the step's updates and bound its weight shares; remember the notes in `last`."""
        norms = [update_norm(u) for u in updates]
        bound = self.norm_bound(norms)
        out, factors = [], []
        for u, n in zip(updates, norms):
            f = None
            if bound is not None and n > bound * (1 + NORM_SLACK):
                f = bound / n
                u = clip_update(u, f)
                log.warning("guard: node %d: update norm %.4g above the bound %.4g; clipped by %.3g", u.node_id, n,
                            bound, f)
            out.append(u)
            factors.append(f)
        self.norms.extend(n if f is None else n * f for n, f in zip(norms, factors))
        cap = self.share_cap(len(updates))
        lora, dense = cap_shares(weights.lora, cap), cap_shares(weights.dense, cap)
        before = np.asarray(weights.lora, np.float64)
        self.last = [
            GuardNote(norm=n, bound=bound, clipped=f, weight=float(wl), dense_weight=float(wd),
                      weight_before_cap=None if math.isclose(wl, w0, rel_tol=1e-9, abs_tol=1e-15) else float(w0))
            for n, f, wl, wd, w0 in zip(norms, factors, lora, dense, before)
        ]
        for u, note in zip(updates, self.last):
            if note.weight_before_cap is not None:
                log.warning("guard: node %d: weight %.4g bounded to %.4g (max share %.3g)", u.node_id,
                            note.weight_before_cap, note.weight, cap)
        return out, Weights(lora=lora, dense=dense)

    def summary(self) -> dict[str, Any]:
        """The bounds, logged once at start."""
        c = self.config
        share = "auto" if c.max_weight_share == 0 else min(c.max_weight_share, 1.0)
        norm = (f"adaptive ({c.update_norm_multiple:g} × median)" if c.max_update_norm == 0
                else "off" if c.max_update_norm < 0 else c.max_update_norm)
        return {"max_weight_share": share, "max_update_norm": norm}


def guard_notes(aggregator: Aggregator, n: int) -> list[GuardNote | None]:
    """The notes of the aggregator's last guarded step of n updates (None each when no guard ran)."""
    guard = getattr(aggregator, "guard", None)
    if guard is None or len(guard.last) != n:
        return [None] * n
    return list(guard.last)


# ---- what an honest optimizer can do -------------------------------------------------------------------------
#: AdamW's defaults in torch, which every corolla trainer uses (learning/train_loop.py)
ADAM_BETAS = (0.9, 0.999)
#: unit roundoff of each dtype values are stored or travel in: float32, float16, bfloat16
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def adam_change_bound(lr: float, steps: int, betas: tuple[float, float] = ADAM_BETAS) -> float:
    """The most `steps` Adam(W) steps (no weight decay) can move one parameter, whatever the gradients.

    Adam's step is lr · m̂_t / (√v̂_t + ε). By Cauchy–Schwarz over the moving averages,
    |m_t| ≤ (1 − β₁)/√(1 − β₂) · √(Σ_{k<t} (β₁²/β₂)^k) · √v_t, and the bias corrections
    multiply the ratio by √(1 − β₂^t)/(1 − β₁^t); ε only shrinks it. Summed over the steps
    this is a bound no gradient sequence can exceed (Kingma & Ba 2015, §2.1 states the
    asymptote, (1 − β₁)/√(1 − β₂) · 1/√(1 − β₁²/β₂)). At the defaults it is ≈ lr per step
    for the first tens of steps (a constant gradient moves exactly lr per step), so it is
    tight for a federated job: a silo's update is bounded without a crowd to compare with.
    """
    b1, b2 = betas
    if not (0 <= b1 < 1 and 0 < b2 < 1 and b1 * b1 < b2):
        raise ValueError(f"Adam betas {betas} are outside 0 <= β₁ < 1, 0 < β₂ < 1, β₁² < β₂")
    q = b1 * b1 / b2
    total, geometric = 0.0, 0.0
    for t in range(1, steps + 1):
        geometric += q ** (t - 1)
        total += (1 - b1) / math.sqrt(1 - b2) * math.sqrt(geometric) * math.sqrt(1 - b2**t) / (1 - b1**t)
    return lr * total


def excess_change(returned: NDArray[np.floating], sent: NDArray[np.floating], bound: float, *, steps: int,
                  wire_dtype: str, param_dtype: str = "float32") -> float | None:
    """The largest per-value change above `bound` (None: every value within it), with rounding allowed for.

    Both ends are rounded to the wire dtype (2 units of roundoff of each value) and each
    optimizer step rounds the parameter to its own dtype (one unit per step).
    """
    r, s = np.asarray(returned, np.float64), np.asarray(sent, np.float64)
    change = np.abs(r - s)
    slack = (2 * UNIT_ROUNDOFF[wire_dtype] + steps * UNIT_ROUNDOFF[param_dtype]) * np.maximum(np.abs(r), np.abs(s))
    over = change - (bound + slack + 1e-12)
    worst = float(over.max()) if over.size else 0.0
    return None if worst <= 0 else float(change.max())
