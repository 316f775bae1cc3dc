"""Name → class registries, so the server builds strategies from configuration strings."""

from __future__ import annotations

from strategies.base import Aggregator, Selector
from strategies.fedavg import FedAvg
from strategies.fedhl import FedHL
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.hetero_select import HeteRoSelect
from strategies.hetlora import HetLoRA
from strategies.oort import Oort
from strategies.uniform import UniformSelector

AGGREGATORS: dict[str, type[Aggregator]] = {cls.name: cls for cls in (FedAvg, FedHL, FlexLoRA, FLoRA, HetLoRA)}
SELECTORS: dict[str, type[Selector]] = {cls.name: cls for cls in (UniformSelector, Oort, HeteRoSelect)}
