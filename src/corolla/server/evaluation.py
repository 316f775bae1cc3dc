"""Server-side evaluation of the exact global model, behind a small interface the drivers see.

The drivers and `Federation` know only `Evaluator` (a Protocol: a fingerprint, an
initial adapter, an evaluation of a `MergedModel`), so they run without torch and
tests inject a fake. `TaskEvaluator` is the real one: it loads the task's base model
through the client's shared training code (the one place that knows how to build
and run a model) and evaluates base + ΔW on the server's test split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from corolla.config import RunConfig
from corolla.spec import LoraSpec
from corolla.strategies import MergedModel

if TYPE_CHECKING:
    import torch

BASE_PREFIX = "base_model.model."
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    """Accuracy and mean loss of the global model on the server's test split."""

    accuracy: float
    loss: float
    num_examples: int
    #: the task's further metrics (a causal LM: perplexity, ROUGE-L of generated answers)
    extra: dict[str, float] = field(default_factory=dict)


class Evaluator(Protocol):
    """What the server needs from a model: its fingerprint, a first adapter, and evaluations."""

    fingerprint: str

    def initial_adapter(self, rank: int, lora: LoraSpec, seed: int) -> dict[str, np.ndarray]:
        """The adapter every client starts from at version 0 (seeded: identical on every host)."""

    def evaluate(self, merged: MergedModel) -> EvalResult:
        """Evaluate base + ΔW with the dense parameters set."""


class TaskEvaluator:
    """Evaluates a strategy's exact global model: base weights + ΔW per layer, dense params set.

    Works for every aggregator, whatever its internal form (factors, a full-rank W,
    a merged base), because it consumes `MergedModel`.
    """

    def __init__(self, cfg: RunConfig, device: str = "auto") -> None:
        from corolla.data.registry import open_source
        from corolla.learning.tasks import build_task
        from corolla.learning.train_loop import load_base, select_device, stored_transposed

        self.task = build_task(cfg.task_spec())
        self.device = select_device(device)
        self.model = load_base(self.task).to(self.device)
        self.fingerprint = self.task.fingerprint(self.model)
        self.params: dict[str, Any] = dict(self.model.state_dict(keep_vars=True))  # buffers too (full-model tasks)
        self.original = {k: p.detach().clone() for k, p in self.params.items()}
        self.transposed = stored_transposed(self.model)
        test = (self.task.load_silo(open_source(cfg.test_data), cfg.text_column, cfg.label_column) if cfg.test_data
                else self.task.builtin_test())
        if cfg.eval_examples:
            test = test.select(range(min(cfg.eval_examples, len(test))))
        self.test_raw = test
        self.test_data = self.task.encode(test)

    def initial_adapter(self, rank: int, lora: LoraSpec, seed: int) -> dict[str, np.ndarray]:
        """Peft's freshly initialised adapter at `rank` under the run's LoRA specification."""
        from corolla.learning.train_loop import initial_adapter

        return initial_adapter(self.task, rank, lora, seed)

    def _param(self, peft_key: str) -> torch.Tensor:
        name = peft_key.removeprefix(BASE_PREFIX)
        if name not in self.params:
            raise KeyError(f"global model key {peft_key!r} matches no parameter of the base model")
        return self.params[name]

    def evaluate(self, merged: MergedModel) -> EvalResult:
        """Load W0 + ΔW and the dense parameters, then evaluate."""
        import torch

        from corolla.learning.train_loop import as_stored, evaluate_model

        with torch.no_grad():
            for layer, dw in merged.deltas.items():
                name = layer.removeprefix(BASE_PREFIX) + ".weight"
                delta = as_stored(name, torch.from_numpy(np.asarray(dw)).to(self.device), self.transposed)
                self.params[name].copy_(self.original[name] + delta)
            for key, value in merged.dense.items():
                self._param(key).copy_(torch.from_numpy(np.asarray(value)).to(self.device))
        s = evaluate_model(self.model, self.test_data, self.device, self.task)
        extra = self.task.extra_metrics(s.loss, self.model, self.test_raw, self.device)
        return EvalResult(accuracy=s.accuracy, loss=s.loss, num_examples=s.num_examples, extra=extra)


class ModelCard:
    """What a coordinator that does not evaluate needs of the model: its fingerprint and a first adapter.

    Used when only the sites evaluate (`evaluation=sites`): the server then never holds the
    base model's weights in memory (`corolla.learning.base_files` reads the weight files'
    headers and streams their bytes through a hash).
    """

    def __init__(self, cfg: RunConfig) -> None:
        from corolla.learning.base_files import BaseFiles, NeedsModel

        self.spec = cfg.task_spec()
        try:
            self._files: BaseFiles | None = BaseFiles(self.spec)
            self.fingerprint = self._files.fingerprint
        except NeedsModel as e:  # a model built in code (the tiny test models, the CNN): small, so loaded once here
            log.info("the coordinator loads the model once for its fingerprint: %s", e)
            from corolla.learning.tasks import build_task
            from corolla.learning.train_loop import load_base

            self._files = None
            self._task = build_task(self.spec)
            self.fingerprint = self._task.fingerprint(load_base(self._task))

    def initial_adapter(self, rank: int, lora: LoraSpec, seed: int) -> dict[str, np.ndarray]:
        """The seeded first adapter, built from the model's shapes alone (or peft's, for a model built in code)."""
        if self._files is not None:
            return self._files.initial_adapter(rank, lora, seed)
        from corolla.learning.train_loop import initial_adapter

        return initial_adapter(self._task, rank, lora, seed)

    def evaluate(self, merged: MergedModel) -> EvalResult:
        """Never called: this run evaluates on the sites (`EvalRounds` asks only them)."""
        raise RuntimeError("this coordinator holds no model to evaluate: the run evaluates on the sites")


def run_evaluator(cfg: RunConfig, device: str = "auto") -> Evaluator:
    """The server's evaluator: the model and test data when it evaluates, else only the model's card."""
    return TaskEvaluator(cfg, device) if cfg.evaluates_on_server() else ModelCard(cfg)


def merged_from_npz(arrays: Mapping[str, np.ndarray]) -> MergedModel:
    """Inverse of the run directory's global.npz layout (`delta/…`, `dense/…`)."""
    return MergedModel(deltas={k.removeprefix("delta/"): v for k, v in arrays.items() if k.startswith("delta/")},
                       dense={k.removeprefix("dense/"): v for k, v in arrays.items() if k.startswith("dense/")})
