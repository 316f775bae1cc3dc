"""The specifications both sides share: what model and data a task uses, and how LoRA adapters are built.

Torch-free on purpose: the server's configuration layer, the ClientApp shim and
the CLI's light commands import this without loading a model library.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from corolla.precision import WIRE_DTYPES

#: adapter compute dtypes a job may ask for; `auto` = bf16 autocast on CUDA, float32 on CPU
LORA_DTYPES = ("auto", "float32", "bfloat16")
#: the task a run or a node trains when none is named (`task`, TaskSpec, `corolla client --task`)
DEFAULT_TASK = "text-classification"
#: `model` / `dataset` value meaning the task's first built-in one (resolved by TaskSpec)
AUTO = "auto"


def parse_labels(text: str) -> tuple[str, ...]:
    """'a, b,c' → ('a', 'b', 'c'): the comma-separated class names of `labels` / `--labels` (empty: none)."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_modules(text: str) -> tuple[str, ...]:
    """'q_proj, v_proj' → ('q_proj', 'v_proj'); `all-linear` stays one name (peft's shorthand)."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


@dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """How every adapter of a run is built: owned by the server and sent with every job.

    The server computes ΔW = s·B·A with s = alpha / r (rsLoRA: alpha / √r); a trainer
    that built its adapter with another alpha, scaling, target set or dtype would
    return factors whose ΔW the server misreads, so none of these is a trainer flag.
    A trainer that cannot honour a spec refuses the job with the reason.

    Parameters
    ----------
    alpha : float (default: 16.0)
        LoRA alpha.
    rslora : bool (default: False)
        Rank-stabilised scaling alpha / √r.
    target_modules : tuple[str, ...] (default: ())
        Module names LoRA wraps; empty means the task's default for its model.
    dtype : str (default: "auto")
        Compute dtype of local training: `auto` (bf16 autocast on CUDA, float32 on
        CPU), `float32`, or `bfloat16` (CUDA only).
    wire_dtype : str (default: "float32")
        Dtype the adapter travels in between server and node, both ways: `float32`
        (exact), `float16` or `bfloat16` (half the bytes). The server rounds what it
        sends before it keeps it, so every update is still measured against exactly
        what its client received.

    """

    alpha: float = 16.0
    rslora: bool = False
    target_modules: tuple[str, ...] = field(default=())
    dtype: str = "auto"
    wire_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"`lora-alpha` must be a finite number > 0, got {self.alpha!r}")
        if self.dtype not in LORA_DTYPES:
            raise ValueError(f"`lora-dtype` = {self.dtype!r} is not one of {list(LORA_DTYPES)}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"`wire-dtype` = {self.wire_dtype!r} is not one of {list(WIRE_DTYPES)}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def scale(self, rank: int) -> float:
        """Return peft's scaling for an adapter of this rank."""
        if rank < 1:
            raise ValueError(f"`rank` must be >= 1, got {rank!r}")
        return self.alpha / math.sqrt(rank) if self.rslora else self.alpha / rank

    def to_record(self) -> dict[str, Any]:
        """Flat kebab-case fields for a Flower ConfigRecord (the wire form)."""
        return {"lora-alpha": float(self.alpha), "lora-rslora": bool(self.rslora),
                "lora-target-modules": ",".join(self.target_modules), "lora-dtype": self.dtype,
                "wire-dtype": self.wire_dtype}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> LoraSpec:
        """Inverse of `to_record`; raise ValueError naming a missing or bad field."""
        try:
            return cls(alpha=float(record["lora-alpha"]), rslora=bool(record["lora-rslora"]),
                       target_modules=parse_modules(str(record["lora-target-modules"])),
                       dtype=str(record["lora-dtype"]), wire_dtype=str(record.get("wire-dtype", "float32")))
        except KeyError as e:
            raise ValueError(f"the job carries no LoRA specification field {e}; the server and this client run "
                             "different corolla versions") from None


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """The run-configuration values a task needs to build its model and read data (parsed once, passed down)."""

    task: str = DEFAULT_TASK
    model: str = AUTO
    dataset: str = AUTO
    #: the class names of the user's own data; empty: the built-in corpus's classes
    labels: tuple[str, ...] = ()
    max_length: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        """Resolve `auto` model and dataset to the task's first built-in ones."""
        info = TASKS.get(self.task)
        if info is not None and self.model == AUTO:
            object.__setattr__(self, "model", info.models[0])
        if info is not None and self.dataset == AUTO:
            object.__setattr__(self, "dataset", info.datasets[0])


@dataclass(frozen=True, kw_only=True)
class TaskInfo:
    """What the configuration layer knows of a task without importing it (the one catalogue of tasks).

    The capability flags are what callers ask of a task; code outside the task
    definitions reads these instead of comparing task names, so a new task states
    what it can do here once (tests/test_config.py keeps names out of comparisons).
    """

    name: str
    target: str  # "module:Class", imported by the client's task registry
    #: built-in model names; any Hugging Face model folder path is accepted too (`corolla.modelinfo`)
    models: tuple[str, ...]
    datasets: tuple[str, ...]
    #: trains LoRA adapters on a frozen base (False: trains and exchanges the whole model at rank 0, so there is no
    #: peft adapter to export and no Hugging Face model folder to load)
    uses_lora: bool
    #: produces text (`corolla generate`); its model must be a causal decoder
    generates: bool
    #: every example carries a class label the model predicts (`labels` names the classes; a silo file's label
    #: column is read and checked against them)
    has_labels: bool
    #: the rows of one user data file can be cut by label (`partitioner` = dirichlet or pathological); otherwise only iid
    #: or `partition-by` apply
    splits_by_label: bool
    help: str


#: Every task corolla can run. `corolla.learning.tasks.registry` resolves `target`; config validation
#: and `corolla keys` read names and help from here, so this is the only list of tasks and models.
TASKS: dict[str, TaskInfo] = {t.name: t for t in (
    TaskInfo(name="text-classification", target="corolla.learning.tasks.text:TextClassification",
             models=("minilm", "tiny-bert", "smollm2"), datasets=("bbc", "wordnet"), uses_lora=True,
             generates=False, has_labels=True, splits_by_label=True,
             help="an encoder or decoder + LoRA + a trained classification head"),
    TaskInfo(name="causal-lm", target="corolla.learning.tasks.causal_lm:CausalLM",
             models=("smollm2", "tiny-llama"), datasets=("wordnet",), uses_lora=True,
             generates=True, has_labels=False, splits_by_label=False,
             help="instruction tuning of a decoder (loss on response tokens only)"),
    TaskInfo(name="image-classification", target="corolla.learning.tasks.image:ImageClassification",
             models=("cnn",), datasets=("fashion-mnist",), uses_lora=False,
             generates=False, has_labels=True, splits_by_label=False,  # reads no data files (built-in corpus only)
             help="a small CNN trained in full (selection studies at CPU scale)"),
)}
