"""Typed data and the three small role interfaces every algorithm plugs into.

The roles follow FLSim's split: an *aggregator* owns the global adapter and turns
client updates into a new version, a *selector* picks which clients work next, and
(for asynchronous drivers) a *staleness weight* discounts old updates. None of them
knows about Flower, gRPC or files: the server converts messages into these types.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

import numpy as np
from numpy.typing import NDArray

from corolla import precision
from corolla.spec import LoraSpec
from corolla.strategies import lora_ops
from corolla.strategies.exceptions import AggregationError
from corolla.strategies.options import option
from corolla.strategies.server_opt import ServerOptimizer, ServerSGD

__all__ = ["Aggregator", "Candidate", "ClientUpdate", "Dispatch", "LoraSpec", "MergedModel", "Selection", "Selector",
           "StalenessWeight", "Weights", "example_weights", "option"]

Arrays = Mapping[str, NDArray[np.floating]]


@dataclass(frozen=True, kw_only=True)
class Dispatch:
    """What one client was sent: kept by the server until that client replies.

    Every update is applied as a difference against exactly what its client
    started from (FedHL's unbiased rule, FedBuff/FedFix's stale deltas), so the
    server keeps this record per in-flight client. Aggregators hand out one
    shared, read-only Dispatch per (version, rank), so what the server holds is one
    adapter per distinct (version, rank) in flight — 5 for a synchronous round of
    100 clients at 5 ranks — not one per client.
    """

    rank: int
    version: int
    arrays: Arrays
    truncation_error: float = 0.0
    #: truncation error over the global update's energy, e / ‖W‖_F² in [0, 1] (0 while W = 0): scale-free
    relative_error: float = 0.0
    #: arrays the client applies to its frozen base but does not train or return (FLoRA's merged W)
    frozen: Arrays = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ClientUpdate:
    """One client's reply, converted from a Flower message by the server."""

    node_id: int
    arrays: Arrays
    sent: Dispatch
    num_examples: int
    staleness: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    #: the job this update answers (the driver's message id): how duplicates are told apart from a
    #: node's second job at an unchanged version, which starts from the very same shared Dispatch
    job_id: str = ""
    #: what the server's checks changed in the reply, for updates.jsonl (`examples_capped`: the count it claimed)
    notes: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The LoRA rank this client trained at (the rank it was sent)."""
        return self.sent.rank


@dataclass(frozen=True, kw_only=True)
class Weights:
    """Per-update weights: one vector for LoRA layers, one for dense (non-LoRA) parameters."""

    lora: NDArray[np.float64]
    dense: NDArray[np.float64]


@dataclass(frozen=True, kw_only=True)
class MergedModel:
    """The exact global model as dense pieces: ΔW per LoRA layer and every dense parameter.

    Evaluation adds ΔW to the frozen base weights, so every strategy is evaluated
    on exactly the model it holds, whatever its internal representation.
    """

    deltas: dict[str, NDArray[np.float32]]
    dense: dict[str, NDArray[np.float32]]


def example_weights(updates: Sequence[ClientUpdate]) -> NDArray[np.float64]:
    """Return n_i / Σ n (FedAvg's weights).

    Raises
    ------
    AggregationError
        When there are no updates or the total example count is not positive.

    """
    if not updates:
        raise AggregationError("aggregate: no updates to aggregate; the global model is unchanged.")
    counts = np.array([u.num_examples for u in updates], dtype=np.float64)
    if np.any(counts < 0) or counts.sum() <= 0:
        raise AggregationError(
            f"aggregate: example counts {counts.tolist()} do not sum to a positive number; "
            "the global model is unchanged."
        )
    return counts / counts.sum()


#: the largest value an update may hold when it reaches a step: products of two such LoRA factors summed over a
#: rank up to 65,536 stay below 10³⁵, far inside float32 (3.4·10³⁸); no trainer returns values near it
MAX_STEP_VALUE = 1e15


class NonFiniteModelError(RuntimeError):
    """The global state holds NaN or Inf after a step: the run stops before it is checkpointed."""


def check_finite_step(updates: Sequence[ClientUpdate], weights: Weights) -> None:
    """Refuse a step (AggregationError, nothing changed yet) whose values or weights could overflow float32.

    Replies holding NaN or Inf are rejected earlier; this bounds the finite ones: every
    weight finite and every returned value within MAX_STEP_VALUE, so that no sum or LoRA
    product of the step can leave float32's range.
    """
    for w in (weights.lora, weights.dense):
        if not np.all(np.isfinite(np.asarray(w, np.float64))):
            raise AggregationError("the step's weights are not all finite; the step is refused and the model kept")
    for u in updates:
        for k, a in u.arrays.items():
            peak = float(np.max(np.abs(np.asarray(a, np.float64)))) if np.size(a) else 0.0
            if not peak <= MAX_STEP_VALUE:
                raise AggregationError(
                    f"node {u.node_id}: `{k}` holds values up to {peak:.3g}, beyond {MAX_STEP_VALUE:.0e} where sums and "
                    "LoRA products could leave float32's range; the step is refused and the model kept")


class StepGuard(Protocol):
    """What an aggregation step asks of the server's guard (strategies/guard.py): bounded updates and weights."""

    last: list[Any]

    def __call__(self, updates: Sequence[ClientUpdate], weights: Weights) -> tuple[list[ClientUpdate], Weights]:
        """Return the updates and weights the step may use."""
        ...


class Aggregator(ABC):
    """Owns the global adapter; turns client updates into the next global version.

    Subclasses implement the weighting rule (`weights`), the application rule
    (`apply`), what a client of a given rank is sent (`dispatch`) and the exact
    merged model (`merged`). Drivers call `aggregate` (sync) or combine `weights`
    with staleness factors before `apply` (async).
    """

    name: ClassVar[str]
    #: whether asynchronous rules may drive this aggregator. Async weights do not sum to 1 (staleness
    #: s(τ), FedFix's d_i), which is only safe for an `apply` that adds Σ w_i (returned_i − sent_i):
    #: unchanged replies then change nothing. One that replaces the model by Σ w_i x_i shrinks it.
    supports_async: ClassVar[bool] = True
    #: False: sites keep every lora_A frozen and train only B (FFA-LoRA, FedSVD); the train message says so
    trains_a: ClassVar[bool] = True

    def __init__(self, initial: Arrays, lora: LoraSpec) -> None:
        self.lora = lora
        self.layers, self.dense_keys = lora_ops.split_keys(initial)
        self.dense: dict[str, NDArray[np.float32]] = {
            k: np.array(initial[k], dtype=np.float32, copy=True) for k in self.dense_keys
        }
        self.version = 0
        #: the server optimizer that turns each aggregated change into a step (FedAvg: plain SGD at lr 1)
        self.optimizer: ServerOptimizer = ServerSGD()
        #: the server's bounds on every step (strategies/guard.py: norm clipping, weight shares); None: none
        self.guard: StepGuard | None = None
        self._dispatches: dict[tuple[int, int], Dispatch] = {}

    def dispatch(self, rank: int) -> Dispatch:
        """Return what a client training at `rank` starts from: one shared, read-only Dispatch per (version, rank).

        Every client of one version and rank starts from the same arrays, so they are
        built once; the arrays are made read-only so no consumer can change what
        another in-flight client's update will be measured against.
        """
        key = (self.version, rank)
        d = self._dispatches.get(key)
        if d is None:
            d = self._on_wire(self._make_dispatch(rank))
            for a in (*d.arrays.values(), *d.frozen.values()):
                a.flags.writeable = False
            self._dispatches = {k: v for k, v in self._dispatches.items() if k[0] == self.version}
            self._dispatches[key] = d  # older versions live on only in the jobs that still hold them
        return d

    def _on_wire(self, d: Dispatch) -> Dispatch:
        """`d` with every array rounded to the run's wire dtype: what the client will actually receive.

        The server keeps the rounded values, so an update is measured against exactly the
        start its client trained from, and a client that returns what it got changes nothing.
        """
        dtype = self.lora.wire_dtype
        if dtype == "float32":
            return d
        return replace(d, arrays={k: precision.round_to(v, dtype) for k, v in d.arrays.items()},
                       frozen={k: precision.round_to(v, dtype) for k, v in d.frozen.items()})

    @property
    def exact_wire(self) -> bool:
        """True when dispatches travel unrounded (`wire-dtype` float32)."""
        return self.lora.wire_dtype == "float32"

    @abstractmethod
    def _make_dispatch(self, rank: int) -> Dispatch:
        """Build the arrays a client training at `rank` starts from (called once per version and rank)."""

    @abstractmethod
    def weights(self, updates: Sequence[ClientUpdate]) -> Weights:
        """Return the strategy's weights for these updates (each vector sums to 1)."""

    @abstractmethod
    def apply(self, updates: Sequence[ClientUpdate], weights: Weights, server_lr: float = 1.0) -> None:
        """Add Σ w_i (returned_i − sent_i) · server_lr to the global state; bump the version."""

    @abstractmethod
    def merged(self) -> MergedModel:
        """Return the exact global model as dense ΔW per layer plus dense parameters."""

    def merged_items(self) -> Iterator[tuple[str, NDArray[np.float32]]]:
        """`merged()` as (`delta/<layer>` | `dense/<key>`, array) pairs, each built as late as the aggregator can.

        Writing global.npz from this holds one layer's ΔW at a time where the aggregator keeps
        factors (FedAvg); the default builds them all first.
        """
        m = self.merged()
        yield from ((f"delta/{k}", v) for k, v in m.deltas.items())
        yield from ((f"dense/{k}", v) for k, v in m.dense.items())

    def state(self) -> dict[str, Any]:
        """The arrays `apply` changes in place (numpy or torch); server momentum acts on them."""
        return dict(self.dense)

    def settle(self) -> None:
        """Finish any work `apply` left running (FedHL's background fold); a no-op for most aggregators."""
        return

    def step(self, updates: Sequence[ClientUpdate], weights: Weights) -> Weights:
        """`apply` the weighted change, then let the server optimizer turn it into a step; return the weights applied.

        The guard, when one is installed, first clips the updates and bounds the weight shares
        (its per-update notes land in `guard.last`).

        Plain SGD needs no copy: it is `apply` at the optimizer's learning rate. Any other
        optimizer sees Δ = what `apply` did at η = 1 on the aggregator's own state — LoRA
        factors (FedAvg, HetLoRA) or the dense W (FedHL family) — FLSim's split of
        aggregator and server optimizer. It costs a copy of the state plus the optimizer's own.
        """
        if self.guard is not None:
            updates, weights = self.guard(updates, weights)
        check_finite_step(updates, weights)
        opt = self.optimizer
        if isinstance(opt, ServerSGD):
            self.apply(updates, weights, opt.config.lr)
            return weights
        state = self.state()
        before = {k: v.copy() if isinstance(v, np.ndarray) else v.clone() for k, v in state.items()}
        self.apply(updates, weights, 1.0)
        self.settle()  # the optimizer reads what apply did: it must be in the state, not pending
        for k, v in state.items():
            live = v if isinstance(v, np.ndarray) else v.cpu().numpy()  # torch CPU tensors: a shared view
            old = before[k] if isinstance(before[k], np.ndarray) else before[k].cpu().numpy()
            live[...] = old + opt.update(k, live - old)
            if not isinstance(v, np.ndarray) and v.device.type != "cpu":  # FedHL's W on a GPU: `live` was a host copy
                import torch

                v.copy_(torch.from_numpy(live))
        return weights

    def check_finite_state(self) -> None:
        """Raise NonFiniteModelError when the global state holds NaN or Inf after a step.

        `check_finite_step` makes this unreachable for well-formed steps; it is the last line,
        run before each checkpoint (it settles a pending background fold): the run stops before
        the corrupt version is written, so the run directory keeps the last good version and
        `--resume` continues from it.
        """
        self.settle()
        for k, v in self.state().items():
            finite = bool(np.isfinite(v).all()) if isinstance(v, np.ndarray) else bool(v.isfinite().all())
            if not finite:
                raise NonFiniteModelError(
                    f"the global model's `{k}` became non-finite at version {self.version}; the run stops before "
                    "checkpointing it, so its directory keeps the last good version (resume with --resume)")

    def aggregate(self, updates: Sequence[ClientUpdate]) -> Weights:
        """Validate, weight and apply a set of updates as one synchronous step (through the server optimizer)."""
        for u in updates:
            self.check(u)
        return self.step(updates, self.weights(updates))

    def check(self, update: ClientUpdate) -> None:
        """Raise InvalidUpdateError unless `update` has exactly the keys and shapes it was sent."""
        lora_ops.check_same_layout(update.arrays, update.sent.arrays, node_id=update.node_id)

    def _apply_dense(self, updates: Sequence[ClientUpdate], w: NDArray[np.float64], lr: float) -> None:
        for k in self.dense_keys:
            step = sum(
                wi * (np.asarray(u.arrays[k], np.float32) - u.sent.arrays[k]) for wi, u in zip(w, updates)
            )
            self.dense[k] += np.float32(lr) * step

    def summary(self) -> dict[str, Any]:
        """Return the hyper-parameters, logged once at start."""
        return {"aggregation": self.name, "lora_alpha": self.lora.alpha, "rslora": self.lora.rslora,
                "lora_layers": len(self.layers), "dense_params": len(self.dense_keys), **self.optimizer.summary()}


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """A client the selector may pick, with what the server knows of it."""

    node_id: int
    num_examples: int = 0
    rank: int = 0
    telemetry: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Selection:
    """What a selector decided: the picks, every candidate's score terms, and telemetry it could not use."""

    picked: list[int]
    scores: Mapping[int, Mapping[str, float]] = field(default_factory=dict)
    problems: Mapping[int, list[str]] = field(default_factory=dict)


class Selector(ABC):
    """Picks which idle clients get the next jobs (a sync round, or one async slot)."""

    name: ClassVar[str]

    @abstractmethod
    def select(self, candidates: Sequence[Candidate], k: int, step: int) -> Selection:
        """Pick up to `k` distinct node ids among `candidates` for server step `step`, with their scores."""

    def observe(self, updates: Sequence[ClientUpdate], step: int) -> None:  # noqa: B027
        """Record what the selected clients returned (utility, duration, direction)."""

    def summary(self) -> dict[str, Any]:
        """Return the hyper-parameters, logged once at start."""
        return {"selector": self.name}


class StalenessWeight(ABC):
    """s(τ): how much an update computed τ versions ago still counts."""

    @abstractmethod
    def weight(self, staleness: int) -> float:
        """Return the multiplier for an update of this staleness."""

