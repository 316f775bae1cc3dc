"""The task interface: build the base model, encode a silo, name what is trained and exchanged.

A task knows its model family and data kind; the trainer, the server's evaluator
and the strategies know neither. New tasks (an image CNN, a causal LM) implement
this class and register a name in `corolla.learning.tasks.registry`; the server is untouched.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import datasets
import numpy as np
import torch
from peft import LoraConfig
from torch import nn

from corolla.data.source import DataSource
from corolla.learning import weight_files
from corolla.modelinfo import ModelError
from corolla.spec import TASKS, LoraSpec, TaskInfo, TaskSpec


def trim_padding(inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Drop the trailing columns that are padding in every row of a batch (rows are padded to max-length).

    Those positions are masked out of attention and loss, so the result is the same; a
    batch of short rows then costs its longest row, not max-length (on the WordNet
    instructions, about a quarter of max-length=256). Left-padded batches are untouched.
    """
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return inputs, labels
    width = mask.shape[1]
    used = mask.any(0).nonzero()
    keep = int(used.max()) + 1 if used.numel() else 1
    if keep == width:
        return inputs, labels
    inputs = {k: v[:, :keep] if v.dim() >= 2 and v.shape[1] == width else v for k, v in inputs.items()}
    if labels.dim() == 2 and labels.shape[1] == width:
        labels = labels[:, :keep]
    return inputs, labels


@dataclass(frozen=True)
class Encoded:
    """A silo or test set as model-ready tensors, all in memory (encoded once, reused every round)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    #: the rows it was encoded from, when a task needs them again (a causal LM generates answers to held-out prompts)
    source: datasets.Dataset | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def source_rows(self, n: int) -> datasets.Dataset | None:
        """The first `n` source rows (None: not kept)."""
        return None if self.source is None else self.source.select(range(min(n, len(self.source))))

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Return the rows `idx` on `device`, without the columns that are padding in all of them."""
        inputs, labels = trim_padding({k: v[idx] for k, v in self.inputs.items()}, self.labels[idx])
        return {k: v.to(device) for k, v in inputs.items()}, labels.to(device)

    def head(self, n: int) -> dict[str, torch.Tensor]:
        """The inputs of the first `n` rows (on the CPU)."""
        return {k: v[:n] for k, v in self.inputs.items()}

    def label_blocks(self) -> Iterator[np.ndarray]:
        """Every label as int64, in row order, in consecutive blocks (here: one)."""
        yield self.labels.numpy().astype(np.int64, copy=False)


class LazyEncoded:
    """A silo kept as a (memory-mapped) Dataset and encoded per batch: memory independent of its size.

    Same interface as `Encoded` for the training loop (`len`, `batch`, `head`,
    `label_blocks`). `encode_rows` turns a dict of column lists (`text`, ...) into the
    model's input tensors; rows are encoded exactly as `Encoded` would hold them, so a
    job trains alike on either.
    """

    def __init__(self, ds: datasets.Dataset, encode_rows: Callable[[dict[str, list]], dict[str, torch.Tensor]]) -> None:
        self.ds = ds
        self.encode_rows = encode_rows
        self._lock = threading.Lock()  # fast tokenizers refuse concurrent calls ("Already borrowed")

    def __len__(self) -> int:
        return len(self.ds)

    def __getstate__(self) -> dict:
        return {"ds": self.ds, "encode_rows": self.encode_rows}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["ds"], state["encode_rows"])

    def _rows(self, idx: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        rows = self.ds[idx]
        with self._lock:
            inputs = self.encode_rows(rows)
        if "labels" in inputs:  # token-level targets (causal LM) come from the encoding, not a column
            return inputs, inputs.pop("labels")
        return inputs, torch.tensor(rows["label"], dtype=torch.long)

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Read and encode the rows `idx`, return them on `device` (trailing all-padding columns dropped)."""
        inputs, labels = trim_padding(*self._rows(idx.tolist()))
        return {k: v.to(device) for k, v in inputs.items()}, labels.to(device)

    def head(self, n: int) -> dict[str, torch.Tensor]:
        """The inputs of the first `n` rows (on the CPU)."""
        return self._rows(list(range(min(n, len(self)))))[0]

    def source_rows(self, n: int) -> datasets.Dataset:
        """The first `n` rows of the Dataset it reads."""
        return self.ds.select(range(min(n, len(self.ds))))

    def label_blocks(self, block: int = 1 << 16) -> Iterator[np.ndarray]:
        """Every label as int64, in row order, read `block` rows at a time from the Arrow column (none: nothing)."""
        if "label" not in self.ds.column_names:
            return
        for t in self.ds.select_columns(["label"]).with_format("arrow").iter(batch_size=block):
            yield t.column(0).to_numpy().astype(np.int64, copy=False)


class Rows:
    """A view of some rows of an `Encoded`/`LazyEncoded` set, in their order: a site's training or held-out share.

    Nothing is copied: `batch` maps positions in the view to rows of the whole set, so
    holding out part of a memory-mapped silo costs one index array.
    """

    def __init__(self, data: Encoded | LazyEncoded | Rows, rows: np.ndarray) -> None:
        rows = np.asarray(rows, np.int64)
        if isinstance(data, Rows):  # a view of a view reads the whole set directly
            data, rows = data.data, data.rows.numpy()[rows]
        self.data: Encoded | LazyEncoded = data
        self.rows = torch.as_tensor(rows)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The view's rows `idx` (positions in the view), as the whole set returns them."""
        return self.data.batch(self.rows[idx], device)

    def head(self, n: int) -> dict[str, torch.Tensor]:
        """The inputs of the view's first `n` rows."""
        idx = self.rows[:n]
        return {k: v.cpu() for k, v in self.data.batch(idx, torch.device("cpu"))[0].items()}

    def source_rows(self, n: int) -> datasets.Dataset | None:
        """The source rows of the view's first `n` rows (None: the set keeps no source rows)."""
        if isinstance(self.data, LazyEncoded):
            return self.data.ds.select(self.rows[:n].tolist())
        if self.data.source is None:
            return None
        return self.data.source.select(self.rows[:n].tolist())

    def label_blocks(self) -> Iterator[np.ndarray]:
        """The view's labels, in view order (one block)."""
        labels = np.concatenate(list(self.data.label_blocks()) or [np.zeros(0, np.int64)])
        yield labels[self.rows.numpy()] if labels.size else labels


#: what the training loop reads: a set held as tensors, one encoded per batch, or a view of some rows of either
EncodedData = Encoded | LazyEncoded | Rows


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of a set of `n` rows: a seeded `fraction` held out, both in row order.

    The seed is the silo's content digest, so a site holds out the same rows in every
    round, in every process and after a restart, and never trains on what it evaluates
    on. At least one row is held out when `fraction` > 0 and at least one is left to
    train on (a one-row silo holds out nothing).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval-fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or n < 2:
        return np.arange(n), np.arange(0)
    k = min(n - 1, max(1, round(fraction * n)))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


class Task(ABC):
    """A model family plus a data kind."""

    name: ClassVar[str]

    @property
    def info(self) -> TaskInfo:
        """The task's entry in the one catalogue (`corolla.spec.TASKS`): what it can do, declared once."""
        return TASKS[self.name]

    @property
    def uses_lora(self) -> bool:
        """False for tasks that train and exchange the whole model (no adapter, rank 0); read from the catalogue."""
        return self.info.uses_lora

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec

    def _no_load_options(self, from_pretrained: dict[str, Any], what: str) -> None:
        """Refuse loading options (4-bit) for a model built in code rather than read from a folder."""
        if from_pretrained:
            raise ValueError(f"{what} is built in code, so it cannot be loaded in 4-bit; --quantize 4bit needs a "
                             "model folder (`--model /path/to/model`).")

    @property
    @abstractmethod
    def label_names(self) -> tuple[str, ...]:
        """Class names, in label-id order."""

    @abstractmethod
    def load_base_model(self, **from_pretrained: Any) -> nn.Module:
        """Load the frozen pretrained model (called once per process).

        `from_pretrained` are extra loading options for a model folder (a 4-bit
        `quantization_config` and its `device_map`); a model built in code refuses them.
        """

    @abstractmethod
    def lora_config(self, rank: int, lora: LoraSpec) -> LoraConfig:
        """Return the peft config of an adapter at `rank` under the server's LoRA specification."""

    def logits(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the model; transformers models return an output object with `.logits`."""
        return model(**inputs).logits

    def per_example_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of each example of a batch (classification: cross-entropy)."""
        return nn.functional.cross_entropy(logits, labels, reduction="none")

    def eval_sums(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
        """(summed loss, correct predictions, units scored) of a batch; loss and accuracy are the ratios to units.

        Classification scores examples; a causal LM scores response tokens.
        """
        loss = float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        return loss, int((logits.argmax(-1) == labels).sum()), int(labels.shape[0])

    def extra_metrics(self, loss: float, model: nn.Module, ds: datasets.Dataset, device: torch.device) -> dict[str, float]:
        """Task-specific evaluation beyond loss and accuracy (a causal LM: perplexity and a generation metric)."""
        return {}

    @abstractmethod
    def encode(self, ds: datasets.Dataset) -> Encoded | LazyEncoded:
        """Turn a Dataset with `text`/`label` columns into tensors (`Encoded`), or a `LazyEncoded` for a large one."""

    @abstractmethod
    def builtin_partition(self, partition_id: int, num_partitions: int, alpha: float) -> datasets.Dataset:
        """Return a simulated client's silo from the task's built-in corpus."""

    @abstractmethod
    def builtin_test(self) -> datasets.Dataset:
        """Return the held-out global test split used for server-side evaluation."""

    @abstractmethod
    def load_silo(self, source: DataSource, text_column: str, label_column: str,
                  cache_dir: str | None = None) -> datasets.Dataset:
        """Read a user's silo from `source` (a file, folder, saved dataset or database: `corolla.data.registry`).

        The task says which columns it needs and how they are validated; the source
        says where the rows are. A large source is streamed into `cache_dir` and
        memory-mapped (`corolla.data.cache`).
        """

    #: modules trained in full and exchanged (not part of the frozen base, so not fingerprinted); a task may set
    #: its own per instance once it knows the model's layout
    trained_modules: tuple[str, ...] = ()

    @property
    def excluded_from_fingerprint(self) -> tuple[str, ...]:
        """Top-level modules the fingerprint leaves out: the trained modules and every head the task may train.

        Read before the model is built (a model-free server never builds it), so it
        names every head the task could pick (`HEADS`), not only the one it picked.
        """
        return tuple(dict.fromkeys((*self.trained_modules, *getattr(self, "HEADS", ()))))

    @property
    def weight_folder(self) -> str | None:
        """The model folder whose safetensors files the fingerprint is read from.

        None for a model built in code (the tiny test models, the CNN) or a folder
        without safetensors weights (`.bin` only): their fingerprint needs the loaded model.
        """
        source = getattr(self, "source", None)  # the tasks that read a model folder resolve it as `source`
        if source is None:
            return None
        return source.path if weight_files.has_weight_files(source.path) else None

    def fingerprint(self, model: nn.Module | None = None) -> str:
        """Hash the frozen base weights and the label set, so server and clients prove they share one model.

        The label names are part of it: a silo labelled with another class set would
        train a head the server cannot use, so it is refused when it joins. A model
        read from safetensors files is fingerprinted from the files
        (`corolla.learning.weight_files`), so a coordinator that never loads the model
        and a trainer that holds it in 4-bit compute the same value; a loaded `model`
        given with it is checked to hold the files' weights (none drawn at random for
        a weight the folder lacks). A model built in code is fingerprinted from its
        state dict, so `model` is required.
        """
        folder = self.weight_folder
        if folder is not None:
            if model is not None:
                strays = weight_files.weights_not_in_files(model, folder, self.excluded_from_fingerprint)
                if strays:
                    raise ModelError(
                        f"the model folder {folder} lacks weights the model needs ({', '.join(strays[:3])}"
                        f"{', ...' if len(strays) > 3 else ''}): transformers draws them at random, so every host "
                        "would train a different base model. Save the complete model into the folder.")
            return weight_files.files_fingerprint(folder, self.label_names, self.excluded_from_fingerprint)
        if model is None:
            raise ValueError(f"the {self.name} model {self.spec.model!r} is built in code or has no safetensors "
                             "weights, so its fingerprint needs the loaded model")
        h = hashlib.sha256("|".join(self.label_names).encode())
        for name, p in sorted(model.state_dict().items()):
            if p.is_floating_point() and not name.startswith(self.trained_modules):
                h.update(name.encode())
                h.update(p.detach().float().flatten()[:4096].cpu().numpy().tobytes())
        return h.hexdigest()[:16]
