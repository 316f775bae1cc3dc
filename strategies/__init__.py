"""corolla's algorithms: aggregation, client selection and staleness rules (no Flower, no network)."""

from strategies.base import (
    Aggregator,
    Candidate,
    ClientUpdate,
    Dispatch,
    LoraSpec,
    MergedModel,
    Selector,
    StalenessWeight,
    Weights,
)
from strategies.exceptions import AggregationError, InvalidUpdateError, RankMismatchError, StrategyError
from strategies.fedavg import FedAvg
from strategies.fedhl import FedHL
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.hetero_select import HeteRoSelect, HeteRoSelectConfig
from strategies.hetlora import HetLoRA
from strategies.oort import Oort, OortConfig
from strategies.registry import AGGREGATORS, SELECTORS
from strategies.uniform import UniformSelector

__all__ = [
    "AGGREGATORS",
    "SELECTORS",
    "AggregationError",
    "Aggregator",
    "Candidate",
    "ClientUpdate",
    "Dispatch",
    "FedAvg",
    "FLoRA",
    "FedHL",
    "FlexLoRA",
    "HetLoRA",
    "HeteRoSelect",
    "HeteRoSelectConfig",
    "Oort",
    "OortConfig",
    "InvalidUpdateError",
    "LoraSpec",
    "MergedModel",
    "RankMismatchError",
    "Selector",
    "StalenessWeight",
    "StrategyError",
    "UniformSelector",
    "Weights",
]
