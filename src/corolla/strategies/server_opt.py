"""Server optimizers: what the server does with each aggregated change Δ (FedAvg, FedAvgM, FedAdam, FedYogi).

FLSim's split: the aggregator computes Δ (the weighted client change, on its own
state: LoRA factors or FedHL's dense W), the server optimizer turns Δ into a step,
mirroring `torch.optim`. Plain FedAvg is SGD at learning rate 1. The adaptive rules
follow Reddi et al., "Adaptive Federated Optimization", ICLR 2021
(https://arxiv.org/abs/2003.00295), Algorithm 2, with Δ used as the pseudo-gradient's
negative (a step *along* Δ):

- FedAvgM: m ← β m + Δ;  x ← x + η m
- FedAdam: m ← β₁ m + (1 − β₁) Δ;  v ← β₂ v + (1 − β₂) Δ²;  x ← x + η m / (√v + τ)
- FedYogi: as FedAdam but v ← v − (1 − β₂) Δ² sign(v − Δ²)

v starts at τ² (the paper's v₋₁ ≥ τ²) and m at 0; no bias correction (the paper
uses none). State is kept per array name, so it follows each aggregator's own state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from corolla.strategies.options import option


@dataclass(frozen=True, kw_only=True)
class ServerSGDConfig:
    """Plain server SGD: x ← x + η Δ (η = 1 is FedAvg)."""

    lr: float = option(1.0, key="server-lr", low=0.0,
                       help="server learning rate η_g (FedAvg: 1; FedAdam/FedYogi want about 0.01-0.1)")

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"`server-lr` must be > 0, got {self.lr!r}")


@dataclass(frozen=True, kw_only=True)
class FedAvgMConfig(ServerSGDConfig):
    """Heavy-ball server momentum (FedAvgM, Hsu et al. 2019)."""

    momentum: float = option(0.9, key="server-momentum", low=0.0, help="FedAvgM momentum β in [0, 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"`server-momentum` must be in [0, 1), got {self.momentum!r}")


@dataclass(frozen=True, kw_only=True)
class FedAdamConfig(ServerSGDConfig):
    """FedAdam / FedYogi moments (defaults: Reddi et al.'s β₁ = 0.9, β₂ = 0.99, τ = 1e-3)."""

    beta1: float = option(0.9, key="server-beta1", low=0.0, help="FedAdam/FedYogi first-moment decay β₁ in [0, 1)")
    beta2: float = option(0.99, key="server-beta2", low=0.0, help="FedAdam/FedYogi second-moment decay β₂ in [0, 1)")
    tau: float = option(1e-3, key="server-tau", low=0.0, help="FedAdam/FedYogi adaptivity τ > 0 (v starts at τ²)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"`server-{name}` must be in [0, 1), got {getattr(self, name)!r}")
        if not self.tau > 0:
            raise ValueError(f"`server-tau` must be > 0, got {self.tau!r}")


class ServerOptimizer(ABC):
    """Turns the aggregated change Δ of one array into the step added to it."""

    name: ClassVar[str]

    def __init__(self, config: Any) -> None:
        self.config = config
        self.slots: dict[str, dict[str, np.ndarray]] = {}

    @abstractmethod
    def update(self, key: str, delta: np.ndarray) -> np.ndarray:
        """Return the step for array `key` given this aggregation's change `delta` (updates the optimizer state)."""

    def summary(self) -> dict[str, Any]:
        """Hyper-parameters, logged once at start."""
        return {"server_optimizer": self.name, **{f"server_{k}": v for k, v in asdict(self.config).items()}}


class ServerSGD(ServerOptimizer):
    """x ← x + η Δ. The aggregator applies this one directly (no copy of the state)."""

    name = "sgd"

    def __init__(self, config: ServerSGDConfig | None = None) -> None:
        super().__init__(config or ServerSGDConfig())

    def update(self, key: str, delta: np.ndarray) -> np.ndarray:
        """η Δ."""
        return np.float32(self.config.lr) * delta


class FedAvgM(ServerOptimizer):
    """Heavy ball: m ← β m + Δ, x ← x + η m (β = 0 is plain SGD)."""

    name = "fedavgm"

    def __init__(self, config: FedAvgMConfig | None = None) -> None:
        super().__init__(config or FedAvgMConfig())

    def update(self, key: str, delta: np.ndarray) -> np.ndarray:
        """η (β m + Δ)."""
        slot = self.slots.setdefault(key, {"m": np.zeros_like(delta)})
        slot["m"] = np.float32(self.config.momentum) * slot["m"] + delta
        return np.float32(self.config.lr) * slot["m"]


class FedAdam(ServerOptimizer):
    """Adam on the aggregated change (Reddi et al., Algorithm 2)."""

    name = "fedadam"

    def __init__(self, config: FedAdamConfig | None = None) -> None:
        super().__init__(config or FedAdamConfig())

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        b2 = np.float32(self.config.beta2)
        return b2 * v + (1 - b2) * d2

    def update(self, key: str, delta: np.ndarray) -> np.ndarray:
        """η m / (√v + τ)."""
        c = self.config
        tau = np.float32(c.tau)
        slot = self.slots.setdefault(key, {"m": np.zeros_like(delta), "v": np.full_like(delta, tau * tau)})
        b1 = np.float32(c.beta1)
        slot["m"] = b1 * slot["m"] + (1 - b1) * delta
        slot["v"] = self._second_moment(slot["v"], delta * delta)
        return np.float32(c.lr) * slot["m"] / (np.sqrt(slot["v"]) + tau)


class FedYogi(FedAdam):
    """Yogi's additive second moment: v ← v − (1 − β₂) Δ² sign(v − Δ²) (Reddi et al., Algorithm 2)."""

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v - (1 - np.float32(self.config.beta2)) * d2 * np.sign(v - d2)
