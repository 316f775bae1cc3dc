"""Build the run's components from its configuration through the registries (nothing here lists names)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from corolla.config import ConfigError, RunConfig
from corolla.spec import TASKS
from corolla.strategies import AGGREGATORS, ASYNC_RULES, SELECTORS, SERVER_OPTIMIZERS, STALENESS, HeteRoSelectConfig, OortConfig
from corolla.strategies.base import Aggregator, Selector
from corolla.strategies.fedavg import FedAvg
from corolla.strategies.fedbuff import AsyncRule
from corolla.strategies.guard import GuardConfig, UpdateGuard
from corolla.strategies.privacy import DP_AGGREGATIONS, GaussianMechanism
from corolla.strategies.registry import resolve_aggregation as resolve_name


def resolve_aggregation(cfg: RunConfig, ranks: list[int]) -> tuple[str, int]:
    """Return (aggregation, rank of the initial adapter) for the ranks of the nodes that joined.

    `auto` resolves by the one rule in `corolla.strategies.registry.resolve_aggregation`
    (FedAvg at one rank, FedHL for mixed). A one-rank rule named in the configuration
    (FedAvg, FedMedian, FedTrimmedAvg) has the run's `lora-rank`, never a node's
    declaration; `auto` resolved to FedAvg has the rank every joined node agrees on (each
    within max-rank: the federation refuses higher ones). The heterogeneous-rank methods
    start from an adapter at `max-rank`. A task that trains the whole model has rank 0.
    """
    name = resolve_name(cfg.aggregation, ranks)
    if cfg.privacy().enabled and name not in DP_AGGREGATIONS:
        raise ConfigError(f"`dp` = central needs one rank for all sites (fedavg), but the joined nodes declare ranks "
                          f"{sorted(set(ranks))} (aggregation auto → {name}); start every site at the same --rank or "
                          "set aggregation=fedavg.")
    if issubclass(AGGREGATORS[name].cls, FedAvg):  # one rank for all (FedAvg, FedMedian, FedTrimmedAvg)
        if not TASKS[cfg.task].uses_lora:
            return name, 0
        return name, ranks[0] if cfg.aggregation == "auto" and ranks else cfg.lora_rank
    if 0 in ranks:
        raise ConfigError(f"aggregation `{name}` needs LoRA clients; this task trains the full model: use fedavg.")
    return name, cfg.max_rank


def build_aggregator(cfg: RunConfig, name: str, initial: Mapping[str, np.ndarray]) -> Aggregator:
    """The aggregator `name` with its typed config, owning the run's server optimizer."""
    reg = AGGREGATORS[name]
    options = cfg.component_config("aggregation", name)
    kwargs = dataclasses.asdict(options) if options is not None else {}
    aggregator = reg.cls(initial, cfg.lora_spec(), **kwargs)  # type: ignore[call-arg]
    opt = SERVER_OPTIMIZERS[cfg.server_optimizer]
    aggregator.optimizer = opt.cls(cfg.component_config("server-optimizer"))  # type: ignore[call-arg]
    privacy = cfg.privacy()
    if privacy.enabled:  # DP clips every change to its own C and weights equally: it is the step's guard
        aggregator.guard = GaussianMechanism(privacy, cfg.seed)
    else:
        aggregator.guard = UpdateGuard(GuardConfig.from_mapping(cfg.to_mapping()))  # clipping and the weight-share bound
    return aggregator


def build_selector(cfg: RunConfig) -> Selector:
    """The configured selector, seeded from the run's seed."""
    reg = SELECTORS[cfg.selector]
    if cfg.selector == "heteroselect":  # its temperature anneals over the run's length
        return reg.cls(HeteRoSelectConfig(total_steps=cfg.num_rounds), lora=cfg.lora_spec(), seed=cfg.seed)  # type: ignore[call-arg]
    if cfg.selector == "oort":  # asynchronously a round is `concurrency` picks (one freed slot per call)
        return reg.cls(OortConfig(round_size=cfg.concurrency if cfg.mode == "async" else 0), seed=cfg.seed)  # type: ignore[call-arg]
    return reg.cls(None, seed=cfg.seed)  # type: ignore[call-arg]


def build_rule(cfg: RunConfig, aggregator: Aggregator, now: float) -> AsyncRule:
    """The configured asynchronous rule around the aggregator, with its staleness weight when it uses one."""
    reg = ASYNC_RULES[cfg.async_rule]
    staleness = None
    if reg.cls.uses_staleness:
        st = STALENESS[cfg.staleness]
        staleness = st.cls(cfg.component_config("staleness"))  # type: ignore[call-arg]
    return reg.cls(aggregator, cfg.component_config("async-rule"), staleness=staleness, now=now)  # type: ignore[call-arg]
