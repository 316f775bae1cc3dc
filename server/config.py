"""The run configuration: one typed, validated object parsed once and passed down.

Its fields are the `[tool.flwr.app.config]` table of pyproject.toml with
kebab-case keys (tests/test_config.py keeps the two identical). Every bad key or
value raises `ConfigError` naming the key, the problem and the valid choices.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from client.tasks import TaskSpec, parse_labels

MODES = ("sync", "async")
ASYNC_RULES = ("fedbuff", "fedfix", "fedasync")
STALENESS = ("polynomial", "constant", "hinge")
SPEED_PROFILES = ("none", "tiers", "lognormal")
AGGREGATIONS = ("auto", "fedavg", "fedhl", "hetlora", "flexlora", "flora")
SELECTORS = ("random", "oort", "heteroselect")
MODELS = ("minilm", "tiny-bert", "cnn")
TASKS = ("text-classification", "image-classification")
DATASETS = ("bbc", "wordnet", "fashion-mnist")
FEDHL_WEIGHTINGS = ("truncation", "uniform", "examples")
SVD_METHODS = ("auto", "exact", "randomized")
RANK_ASSIGNMENTS = ("tier", "random")


class ConfigError(ValueError):
    """A run-configuration key or value is invalid; the message lists what is valid."""


def _h(text: str, choices: tuple[str, ...] | None = None, low: float | None = None) -> dict[str, Any]:
    return {"help": text, "choices": choices, "low": low}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Every knob of a run. Field names are the kebab-case keys with `_` for `-`."""

    task: str = field(default="text-classification", metadata=_h("what is learned", TASKS))
    model: str = field(default="minilm", metadata=_h("base model", MODELS))
    dataset: str = field(default="bbc", metadata=_h("built-in corpus for simulation and the test split", DATASETS))
    labels: str = field(default="", metadata=_h("comma-separated class names of your own data (empty: the dataset's)"))
    test_data: str = field(default="", metadata=_h("server-side test file, CSV/JSONL/Parquet (empty: built-in test split)"))
    text_column: str = field(default="text", metadata=_h("text column of test-data"))
    label_column: str = field(default="label", metadata=_h("label column of test-data"))
    max_length: int = field(default=64, metadata=_h("tokens per example", low=8))
    out_dir: str = field(default="runs/latest", metadata=_h("run directory (metrics, report, plots)"))
    mode: str = field(default="sync", metadata=_h("driver loop", MODES))
    aggregation: str = field(default="auto", metadata=_h("aggregation rule (auto: fedavg at one rank, fedhl for mixed)",
                                                          AGGREGATIONS))
    selector: str = field(default="random", metadata=_h("client selection", SELECTORS))
    num_rounds: int = field(default=12, metadata=_h("global versions to produce", low=1))
    clients_per_round: int = field(default=6, metadata=_h("clients trained per round", low=1))
    min_nodes: int = field(default=2, metadata=_h("nodes to wait for before the first round", low=1))
    local_steps: int = field(default=10, metadata=_h("optimizer steps per local job", low=1))
    batch_size: int = field(default=16, metadata=_h("examples per local step", low=1))
    lr: float = field(default=3e-3, metadata=_h("client AdamW learning rate", low=0.0))
    lr_decay: float = field(default=0.9, metadata=_h("client lr × lr-decay^version (1: constant); per *version*, so "
                                                                 "async runs, with many more versions, want 1.0", low=0.0))
    prox_mu: float = field(default=0.0, metadata=_h("FedProx proximal weight (0: off)", low=0.0))
    lora_rank: int = field(default=8, metadata=_h("LoRA rank of simulated clients without `ranks`", low=1))
    ranks: str = field(default="", metadata=_h("simulated rank mix, e.g. '2,4,8,16,32' (deployment: each node's --rank)"))
    rank_assignment: str = field(default="tier", metadata=_h("how `ranks` map to simulated nodes", RANK_ASSIGNMENTS))
    lora_alpha: float = field(default=16.0, metadata=_h("LoRA alpha; scale = alpha / rank", low=0.0))
    rslora: bool = field(default=False, metadata=_h("scale = alpha / sqrt(rank)"))
    max_rank: int = field(default=32, metadata=_h("largest rank any client may train (fedhl)", low=1))
    fedhl_weighting: str = field(default="truncation", metadata=_h("FedHL weights", FEDHL_WEIGHTINGS))
    svd: str = field(default="auto", metadata=_h("FedHL SVD method", SVD_METHODS))
    server_lr: float = field(default=1.0, metadata=_h("server learning rate η_g", low=0.0))
    server_momentum: float = field(default=0.0, metadata=_h("server heavy-ball momentum β in [0, 1) (0: off)", low=0.0))
    dirichlet_alpha: float = field(default=0.5, metadata=_h("label skew of simulated silos (<= 0: IID)"))
    async_rule: str = field(default="fedbuff", metadata=_h("asynchronous rule (mode=async)", ASYNC_RULES))
    concurrency: int = field(default=4, metadata=_h("clients training at once (mode=async)", low=1))
    buffer_size: int = field(default=2, metadata=_h("FedBuff: updates per new version (K)", low=1))
    staleness: str = field(default="polynomial", metadata=_h("staleness weight s(τ)", STALENESS))
    staleness_exponent: float = field(default=0.5, metadata=_h("polynomial s(τ) = (1+τ)^-a", low=0.0))
    max_staleness: int = field(default=-1, metadata=_h("drop updates staler than this (-1: never)", low=-1))
    interval: float = field(default=20.0, metadata=_h("FedFix: seconds between aggregations (Δt)", low=0.001))
    speed_profile: str = field(default="none", metadata=_h("simulated client speeds", SPEED_PROFILES))
    speed_tiers: str = field(default="1,2,5,10", metadata=_h("slowdown factors of the `tiers` profile"))
    speed_sigma: float = field(default=1.0, metadata=_h("σ of the `lognormal` slowdown profile", low=0.0))
    eval_every: int = field(default=1, metadata=_h("evaluate the global model every N versions", low=1))
    eval_examples: int = field(default=0, metadata=_h("evaluate on the first N test examples (0: all)", low=0))
    eval_interval: float = field(default=0.0, metadata=_h("async: evaluate at most every N seconds (0: every eval-every)",
                                                          low=0.0))
    time_budget: float = field(default=0.0, metadata=_h("stop after this many seconds of training (0: no limit)",
                                                        low=0.0))
    round_timeout: float = field(default=600.0, metadata=_h("seconds to wait for a round's replies", low=1.0))
    seed: int = field(default=0, metadata=_h("seed of every random choice the server makes"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            key = to_key(f.name)
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(f"`{key}` = {value!r} is not valid; choose one of {list(meta['choices'])}.")
            if meta.get("low") is not None and value < meta["low"]:
                raise ConfigError(f"`{key}` = {value!r} is too small; it must be >= {meta['low']}.")
        if self.lr <= 0:
            raise ConfigError(f"`lr` = {self.lr!r} must be > 0.")
        if self.labels and not self.test_data:
            raise ConfigError("`labels` names your own classes, which have no built-in test split; set `test-data` to "
                              "a CSV/JSONL/Parquet file the server evaluates on.")
        if len(self.label_tuple()) == 1:
            raise ConfigError(f"`labels` = {self.labels!r} holds one class; a classifier needs at least two.")
        if not self.server_momentum < 1.0:
            raise ConfigError(f"`server-momentum` = {self.server_momentum!r} must be below 1 (0 turns momentum off).")
        if self.lora_rank > self.max_rank:
            raise ConfigError(f"`lora-rank` = {self.lora_rank} exceeds `max-rank` = {self.max_rank}; raise `max-rank`.")
        for r in self.rank_list():
            if not 1 <= r <= self.max_rank:
                raise ConfigError(f"`ranks` holds {r}, outside 1..{self.max_rank} (`max-rank`).")

    def label_tuple(self) -> tuple[str, ...]:
        """`labels` as a tuple of names (empty: the dataset's own)."""
        return parse_labels(self.labels)

    def rank_list(self) -> list[int]:
        """The simulated rank mix (empty: every node at `lora-rank`)."""
        try:
            return [int(x) for x in self.ranks.replace(" ", "").split(",") if x]
        except ValueError:
            raise ConfigError(f"`ranks` = {self.ranks!r} is not a comma-separated list of integers.") from None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from kebab-case keys (Flower's run_config or `--set` pairs); strings are coerced."""
        known = {to_key(f.name): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown configuration key(s) {unknown}; valid keys are: {', '.join(sorted(known))}.")
        kwargs = {known[k].name: _coerce(k, v, known[k].type) for k, v in values.items()}
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """Return kebab-case keys → values (what config.json and `--run-config` hold)."""
        return {to_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        """Return the resolved configuration as pretty JSON."""
        return json.dumps(self.to_mapping(), indent=2, sort_keys=True)

    def task_spec(self) -> TaskSpec:
        """The part of the configuration the task needs."""
        return TaskSpec(task=self.task, model=self.model, dataset=self.dataset, labels=self.label_tuple(),
                        max_length=self.max_length,
                        lora_alpha=self.lora_alpha, rslora=self.rslora, seed=self.seed)


def to_key(name: str) -> str:
    """Field name → kebab-case configuration key."""
    return name.replace("_", "-")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ) if isinstance(typ, str) else typ
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"`{key}` = {value!r} is not a valid {typ.__name__}.") from None


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """Parse `KEY=VALUE` strings from the command line."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not KEY=VALUE (e.g. --set num-rounds=5).")
        k, v = pair.split("=", 1)
        out[k.strip()] = v.strip()
    return out
