"""The registries: configuration name → component, with its typed config and help.

The run configuration's choices (`aggregation`, `selector`, `async-rule`,
`staleness`, `server-optimizer`) and every component option's key, default, bound
and help come from here and from the config dataclasses beside each component.
Adding an aggregator is one `register` line plus its file.
"""

from __future__ import annotations

from collections.abc import Iterable

from corolla.strategies.base import Aggregator, Selector, StalenessWeight
from corolla.strategies.fedavg import FedAvg
from corolla.strategies.fedbuff import AsyncRule, FedAsync, FedAsyncConfig, FedBuff, FedBuffConfig
from corolla.strategies.fedfix import FedFix, FedFixConfig
from corolla.strategies.fedhl import FedHL, FedHLConfig, FlexLoRAConfig, MaxRankConfig
from corolla.strategies.fedsvd import FedSVD, FrozenA
from corolla.strategies.flexlora import FlexLoRA
from corolla.strategies.flora import FLoRA
from corolla.strategies.hetero_select import HeteRoSelect
from corolla.strategies.hetlora import HetLoRA
from corolla.strategies.oort import Oort
from corolla.strategies.options import Option, Registry
from corolla.strategies.robust import FedMedian, FedTrimmedAvg, TrimConfig
from corolla.strategies.server_opt import (
    FedAdam,
    FedAdamConfig,
    FedAvgM,
    FedAvgMConfig,
    FedYogi,
    ServerOptimizer,
    ServerSGD,
    ServerSGDConfig,
)
from corolla.strategies.staleness import (
    ConstantStaleness,
    HingeStaleness,
    PolynomialStaleness,
    PolynomialStalenessConfig,
)
from corolla.strategies.uniform import UniformSelector

AGGREGATORS: Registry[Aggregator] = Registry("aggregation")
AGGREGATORS.register("fedavg", FedAvg, None, "FedAvg on A, B and dense parameters (one rank for all clients)")
AGGREGATORS.register("fedhl", FedHL, FedHLConfig, "FedHL: full-rank global update, unbiased mixed-rank aggregation")
AGGREGATORS.register("ffa", FrozenA, None, "FFA-LoRA: sites train only B on the seeded, frozen A (one rank; sync)")
AGGREGATORS.register("fedsvd", FedSVD, None, "FedSVD: sites train only B; B·A re-factorized by SVD each version (one rank; sync)")
AGGREGATORS.register("hetlora", HetLoRA, MaxRankConfig, "HetLoRA: zero-padded factor averaging (baseline)")
AGGREGATORS.register("flexlora", FlexLoRA, FlexLoRAConfig, "FlexLoRA: averaged ΔW redistributed by SVD (baseline)")
AGGREGATORS.register("flora", FLoRA, MaxRankConfig, "FLoRA: stacked factors merged into the base (baseline)")
AGGREGATORS.register("fedmedian", FedMedian, None,
                      "coordinate-wise median of the client deltas (robust; one rank for all clients)")
AGGREGATORS.register("fedtrimmedavg", FedTrimmedAvg, TrimConfig,
                      "coordinate-wise trimmed mean of the client deltas (robust; one rank for all clients)")

#: `aggregation = auto`: the aggregator chosen once the first nodes' ranks are known — FedAvg when they all train
#: at one rank (nothing to reconcile), FedHL when ranks differ. Config validation, the server's factory and the
#: help text all read these three names, through the two functions below.
AUTO_AGGREGATION = "auto"
AUTO_ONE_RANK = "fedavg"
AUTO_MIXED_RANKS = "fedhl"


def aggregation_candidates(choice: str) -> tuple[str, ...]:
    """The aggregators `choice` may turn out to be before the nodes' ranks are known (config validation)."""
    return (AUTO_ONE_RANK, AUTO_MIXED_RANKS) if choice == AUTO_AGGREGATION else (choice,)


def resolve_aggregation(choice: str, ranks: Iterable[int]) -> str:
    """The aggregator `choice` means for nodes at `ranks`: `auto` is FedAvg at one rank (or none yet), else FedHL."""
    if choice != AUTO_AGGREGATION:
        return choice
    return AUTO_ONE_RANK if len(set(ranks)) <= 1 else AUTO_MIXED_RANKS


SELECTORS: Registry[Selector] = Registry("selector")
SELECTORS.register("random", UniformSelector, None, "uniform random without replacement")
SELECTORS.register("oort", Oort, None, "Oort: statistical utility, exploration and a duration penalty")
SELECTORS.register("heteroselect", HeteRoSelect, None,
                   "HeteRo-Select: usefulness, data variety, fairness and staleness, temperature-annealed")

ASYNC_RULES: Registry[AsyncRule] = Registry("async-rule")
ASYNC_RULES.register("fedbuff", FedBuff, FedBuffConfig, "FedBuff: a new version every K updates, staleness-weighted")
ASYNC_RULES.register("fedfix", FedFix, FedFixConfig, "FedFix: a new version every Δt seconds, weights p_i⌈τ_i/Δt⌉")
ASYNC_RULES.register("fedasync", FedAsync, FedAsyncConfig, "FedAsync: every update applied on arrival")

STALENESS: Registry[StalenessWeight] = Registry("staleness")
STALENESS.register("polynomial", PolynomialStaleness, PolynomialStalenessConfig, "s(τ) = (1+τ)^-a")
STALENESS.register("constant", ConstantStaleness, None, "s(τ) = 1")
STALENESS.register("hinge", HingeStaleness, None, "s(τ) = 1 up to τ = 4, then 1/(10(τ-4)+1) (FedAsync's hinge)")

SERVER_OPTIMIZERS: Registry[ServerOptimizer] = Registry("server-optimizer")
SERVER_OPTIMIZERS.register("sgd", ServerSGD, ServerSGDConfig, "x += η Δ (FedAvg at η = 1)")
SERVER_OPTIMIZERS.register("fedavgm", FedAvgM, FedAvgMConfig, "heavy-ball momentum on Δ (FedAvgM)")
SERVER_OPTIMIZERS.register("fedadam", FedAdam, FedAdamConfig, "Adam on Δ (Reddi et al. 2021)")
SERVER_OPTIMIZERS.register("fedyogi", FedYogi, FedAdamConfig, "Yogi on Δ (Reddi et al. 2021)")

#: every registry, by the run-configuration key that chooses among its components
REGISTRIES: dict[str, Registry] = {r.kind: r for r in (AGGREGATORS, SELECTORS, ASYNC_RULES, STALENESS,
                                                       SERVER_OPTIMIZERS)}


def component_options() -> dict[str, Option]:
    """Every component option key across all registries (shared keys merged; conflicting defaults raise)."""
    out: dict[str, Option] = {}
    for reg in REGISTRIES.values():
        for key, opt in reg.options().items():
            if key in out:
                if out[key].default != opt.default:
                    raise ValueError(f"key `{key}` has two defaults: {out[key].default!r} and {opt.default!r}")
                opt = Option(key, opt.default, opt.help, opt.low, opt.choices, (*out[key].owners, *opt.owners))
            out[key] = opt
    return out
