"""Client-level differential privacy (DP-FedAvg) with a privacy accountant.

The server is the trusted aggregator (central DP, as Flower's server-side fixed and
adaptive clipping wrappers): every update's change ‖returned − sent‖ over all the arrays
it exchanges (LoRA factors and dense parameters) is clipped to norm C, the clipped
changes are averaged with equal weights 1/m, and Gaussian noise N(0, (z·C/m)²) is added
to every coordinate of the average (McMahan et al., "Learning differentially private
recurrent language models", ICLR 2018). One site's whole contribution to a version is
then bounded by C, whatever its data: the guarantee is per site (user level).

Adaptive clipping (Andrew et al., "Differentially private learning with adaptive
clipping", NeurIPS 2021) moves C towards the `dp-target-quantile` of the update norms:
C ← C · exp(−η (b̃ − γ)), where b̃ is the noised fraction of updates with norm ≤ C
(noise σ_b = m/20 on the count). The count costs privacy too: the paper shows that
noising the clipped sum at z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) and the count at σ_b is as
private as one Gaussian step at z, so the accountant charges the configured z and the
updates get the larger z_Δ. That needs z < 2σ_b = m/10; a step with fewer sites releases
no count (C stays) and noises the updates at z.

The noise must be added to what the aggregator applies. For the FedAvg family the step
is linear in the updates' changes (Σ w_i (returned_i − sent_i)), so adding m·ξ to one
update's change with weight 1/m adds exactly ξ to the step; the aggregators whose step
is not linear in what a site sends (FedHL's products, FlexLoRA, medians) are refused.

The accountant is Opacus's RDP accountant. Each version charges one Gaussian step with
sampling rate q = picked/usable of that round: the RDP analysis assumes Poisson
subsampling, while a uniform random selector draws a fixed-size subset; the standard
practice (and Flower's) treats the two alike — an approximation stated in the docs.
A selector whose picks depend on what sites sent (Oort, HeteRo-Select) is refused: its
sampling is neither uniform nor independent of the data.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from corolla.strategies.base import ClientUpdate, Weights
from corolla.strategies.guard import GuardNote, clip_update, update_norm
from corolla.strategies.options import option

DP_MODES = ("off", "central")
#: the aggregators whose step is linear in what sites send (FFA and FedSVD: in B, A being fixed; FedSVD's SVD is
#: post-processing of the averaged state), so the noise on the average is noise on the step
DP_AGGREGATIONS = ("fedavg", "ffa", "fedsvd")


@dataclass(frozen=True)
class PrivacyConfig:
    """The run's differential-privacy settings; each field is one run-configuration key."""

    dp: str = option("off", key="dp", choices=DP_MODES, help=(
        "client-level differential privacy: off, or central (the server clips each site's change to dp-clip, "
        "averages with equal weights and adds Gaussian noise; FedAvg family, sync, random selector)"))
    noise_multiplier: float = option(1.0, key="dp-noise-multiplier", low=0.0, help=(
        "z: the Gaussian noise's standard deviation per coordinate is z · dp-clip / (sites in the step)"))
    clip: float = option(0.1, key="dp-clip", help=(
        "C: the norm each site's change (all its arrays) is clipped to; with dp-adaptive-clip, the starting value"))
    adaptive_clip: bool = option(False, key="dp-adaptive-clip", help=(
        "move dp-clip towards the dp-target-quantile of the update norms (Andrew et al. 2021)"))
    target_quantile: float = option(0.5, key="dp-target-quantile", help=(
        "γ: the share of updates adaptive clipping aims to leave unclipped"))
    clip_lr: float = option(0.2, key="dp-clip-lr", help="η: the step of adaptive clipping's geometric update")
    delta: float = option(1e-5, key="dp-delta", help="δ at which ε is reported (central DP and DP-SGD)")
    sgd_clip: float = option(0.0, key="dp-sgd-clip", low=0.0, help=(
        "sample-level DP-SGD at every site: each example's gradient (LoRA and head) clipped to this norm, Gaussian "
        "noise dp-sgd-noise-multiplier × it on the sum; each site reports its own ε (0: off)"))
    sgd_noise: float = option(1.0, key="dp-sgd-noise-multiplier", low=0.0, help="DP-SGD's noise multiplier z")
    target_epsilon: float = option(0.0, key="target-epsilon", low=0.0, help=(
        "the privacy budget: a run whose planned rounds would exceed it is refused, and a run stops before the "
        "version that would (0: no budget)"))

    def __post_init__(self) -> None:
        if self.dp == "off":
            return
        if not self.clip > 0 or not math.isfinite(self.clip):
            raise ValueError(f"`dp-clip` must be a finite number > 0, got {self.clip}")
        if not 0 < self.delta < 1:
            raise ValueError(f"`dp-delta` must be in (0, 1), got {self.delta}")
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"`dp-target-quantile` must be in (0, 1), got {self.target_quantile}")

    @property
    def enabled(self) -> bool:
        """True when the run is differentially private."""
        return self.dp != "off"

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> PrivacyConfig:
        """Build from kebab-case run-configuration values (missing keys: defaults)."""
        import dataclasses

        kwargs = {f.name: values[f.metadata["key"]] for f in dataclasses.fields(cls) if f.metadata["key"] in values}
        return cls(**kwargs)


#: σ_b / m of adaptive clipping's noised count (Andrew et al. use m/20)
COUNT_NOISE = 0.05


def update_noise(z: float, sites: int) -> float | None:
    """z_Δ for the clipped updates when adaptive clipping also releases a noised count of `sites`; None: it cannot.

    Charged together they cost one Gaussian step at z (Andrew et al., Theorem 1), which needs z < 2σ_b.
    """
    sigma_b = COUNT_NOISE * sites
    if z == 0:
        return 0.0
    if z >= 2 * sigma_b:
        return None
    return (z**-2 - (2 * sigma_b) ** -2) ** -0.5


class Accountant:
    """ε at δ of the run so far: Opacus's RDP accountant, one Gaussian step per version."""

    def __init__(self, delta: float) -> None:
        from opacus.accountants import RDPAccountant

        self.delta = delta
        self._rdp = RDPAccountant()

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """(noise multiplier, sampling rate, steps) as Opacus keeps it."""
        return list(self._rdp.history)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Charge one version: a Gaussian mechanism at `noise_multiplier`, sites sampled at `sample_rate`."""
        self._rdp.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self) -> float:
        """ε at δ so far (0 before any step; inf for a step without noise)."""
        if not self._rdp.history:
            return 0.0
        if any(z == 0 for z, _, _ in self._rdp.history):
            return math.inf
        return float(self._rdp.get_epsilon(self.delta))

    def epsilon_after(self, steps: int, noise_multiplier: float, sample_rate: float) -> float:
        """ε if `steps` more versions were charged at these settings (the budget check; nothing is charged)."""
        trial = copy.deepcopy(self)
        for _ in range(steps):
            trial.step(noise_multiplier, sample_rate)
        return trial.epsilon()


@dataclass
class DPNote:
    """What the mechanism did to one step (the `dp_…` keys of rounds.jsonl)."""

    clip: float
    sigma: float
    clipped: int
    sites: int


class GaussianMechanism:
    """The step guard of a DP run: clip every change to C, equal weights, Gaussian noise on the average.

    Installed as the aggregator's guard, so it runs inside `Aggregator.step`, before the
    server optimizer (post-processing, which cannot weaken the guarantee).
    """

    def __init__(self, config: PrivacyConfig, seed: int) -> None:
        self.config = config
        self.clip = config.clip
        self.rng = np.random.default_rng([seed, 0xD1FF])
        self.last: list[GuardNote] = []
        self.note: DPNote | None = None

    def __call__(self, updates: Sequence[ClientUpdate], weights: Weights) -> tuple[list[ClientUpdate], Weights]:
        """Clip, weight equally and noise one step's updates; remember what was done in `last` and `note`."""
        m = len(updates)
        c = self.clip
        norms = [update_norm(u) for u in updates]
        factors = [min(1.0, c / n) if n > 0 else 1.0 for n in norms]
        out = [clip_update(u, f) if f < 1.0 else u for u, f in zip(updates, factors)]
        z = self.config.noise_multiplier
        adapt = update_noise(z, m) if self.config.adaptive_clip else None
        sigma = (z if adapt is None else adapt) * c / m  # per coordinate of the average
        if sigma > 0:
            out[0] = _with_noise(out[0], self.rng, sigma * m)  # weight 1/m: the average gets N(0, sigma²)
        equal = np.full(m, 1.0 / m)
        self.last = [GuardNote(norm=n, bound=c, clipped=f if f < 1.0 else None, weight=1.0 / m,
                               dense_weight=1.0 / m, weight_before_cap=None) for n, f in zip(norms, factors)]
        self.note = DPNote(clip=c, sigma=sigma, clipped=sum(f < 1.0 for f in factors), sites=m)
        if adapt is not None:
            self._adapt(norms, noisy=z > 0)
        return out, Weights(lora=equal, dense=equal.copy())

    def _adapt(self, norms: list[float], noisy: bool) -> None:
        """C ← C · exp(−η (b̃ − γ)) with b̃ the (noised) share of norms ≤ C."""
        m = len(norms)
        unclipped = sum(n <= self.clip for n in norms)
        noised = (unclipped + (self.rng.normal(0.0, COUNT_NOISE * m) if noisy else 0.0)) / m
        self.clip *= math.exp(-self.config.clip_lr * (noised - self.config.target_quantile))

    def summary(self) -> dict[str, Any]:
        """The mechanism's settings, logged once at start."""
        c = self.config
        return {"dp": c.dp, "dp_clip": self.clip, "dp_noise_multiplier": c.noise_multiplier,
                "dp_adaptive_clip": c.adaptive_clip, "dp_delta": c.delta}


def _with_noise(u: ClientUpdate, rng: np.random.Generator, std: float) -> ClientUpdate:
    """`u` with N(0, std²) added to every coordinate of every array it returns."""
    arrays = {k: (np.asarray(v, np.float32) + rng.normal(0.0, std, size=np.shape(v))).astype(np.float32)
              for k, v in u.arrays.items()}
    return replace(u, arrays=arrays)
