"""corolla's algorithms: aggregation, client selection, asynchronous rules, staleness weights and server optimizers.

Pure NumPy (torch only inside FedHL's dense update and SVDs, imported on use): no
Flower, no network, no files. The server converts messages into these types.
"""

from corolla.strategies.base import (
    Aggregator,
    Candidate,
    ClientUpdate,
    Dispatch,
    LoraSpec,
    MergedModel,
    Selection,
    Selector,
    StalenessWeight,
    Weights,
)
from corolla.strategies.exceptions import AggregationError, InvalidUpdateError, RankMismatchError, StrategyError
from corolla.strategies.fedavg import FedAvg
from corolla.strategies.fedbuff import AsyncRule, AsyncStep, FedAsync, FedBuff
from corolla.strategies.fedfix import FedFix
from corolla.strategies.fedhl import FedHL
from corolla.strategies.flexlora import FlexLoRA
from corolla.strategies.flora import FLoRA
from corolla.strategies.hetero_select import HeteRoSelect, HeteRoSelectConfig
from corolla.strategies.hetlora import HetLoRA
from corolla.strategies.oort import Oort, OortConfig
from corolla.strategies.registry import AGGREGATORS, ASYNC_RULES, SELECTORS, SERVER_OPTIMIZERS, STALENESS
from corolla.strategies.server_opt import FedAdam, FedAvgM, FedYogi, ServerOptimizer, ServerSGD
from corolla.strategies.uniform import UniformSelector

__all__ = [
    "AGGREGATORS",
    "ASYNC_RULES",
    "SELECTORS",
    "SERVER_OPTIMIZERS",
    "STALENESS",
    "AggregationError",
    "Aggregator",
    "AsyncRule",
    "AsyncStep",
    "Candidate",
    "ClientUpdate",
    "Dispatch",
    "FLoRA",
    "FedAdam",
    "FedAsync",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedFix",
    "FedHL",
    "FedYogi",
    "FlexLoRA",
    "HetLoRA",
    "HeteRoSelect",
    "HeteRoSelectConfig",
    "InvalidUpdateError",
    "LoraSpec",
    "MergedModel",
    "Oort",
    "OortConfig",
    "RankMismatchError",
    "Selection",
    "Selector",
    "ServerOptimizer",
    "ServerSGD",
    "StalenessWeight",
    "StrategyError",
    "UniformSelector",
    "Weights",
]
