"""A model folder's safetensors files read without loading the model: which tensors they hold and the fingerprint.

The fingerprint proves that the server and every trainer share one base model. It is
computed from the folder's files (headers and the first FINGERPRINT_VALUES values of
each tensor), never from a loaded model, so a coordinator that never builds the model,
a trainer that holds it in 4-bit and one that holds it in float32 agree by
construction. Tensors are taken in name order across all shards, so a sharded and a
single-file copy of the same weights give the same value, and every value is read as
float32, so a bfloat16 and a float32 copy do too.

This module sits below the tasks (it knows no `Task`), so `Task.fingerprint` and
`corolla.learning.base_files` share it without an import circle.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from corolla.modelinfo import ModelError

#: transformers' names for a folder's weights: one file, or shards listed by an index (the single file wins, as
#: transformers' own loading prefers it)
SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
#: values of each tensor that enter the fingerprint: enough to tell two checkpoints apart, cheap to read
FINGERPRINT_VALUES = 4096
#: changes when the fingerprint's definition does, so two definitions never agree by accident
_FINGERPRINT_FORMAT = b"corolla-weight-files-v1"


def tensor_files(folder: str | Path) -> dict[str, Path] | None:
    """Tensor name → the safetensors file holding it, from the folder's index or its single file; None without either."""
    folder = Path(folder)
    single = folder / SAFE_WEIGHTS
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    index = folder / SAFE_WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError):
            raise ModelError(f"{index} holds no `weight_map`; it is not a safetensors index.") from None
        files = {name: folder / shard for name, shard in weight_map.items()}
        for shard in set(files.values()):
            if not shard.is_file():
                raise ModelError(f"{index} lists the shard {shard.name}, which is missing from {folder}.")
        return files
    return None


def has_weight_files(folder: str | Path) -> bool:
    """True when the folder holds its weights as safetensors (one file or an index of shards)."""
    folder = Path(folder)
    return (folder / SAFE_WEIGHTS).is_file() or (folder / SAFE_WEIGHTS_INDEX).is_file()


def is_excluded(name: str, exclude: Iterable[str]) -> bool:
    """True when tensor `name` belongs to one of the top-level modules `exclude` (a classification head)."""
    return any(name == m or name.startswith(m + ".") for m in exclude)


def head_values(tensor: torch.Tensor) -> torch.Tensor:
    """The first FINGERPRINT_VALUES values of a tensor, flattened, as float32 on the CPU (the bytes that are hashed)."""
    return tensor.detach().reshape(-1)[:FINGERPRINT_VALUES].float().cpu()


def _read_head(f, name: str) -> tuple[str, tuple[int, ...], torch.Tensor]:  # noqa: ANN001 - safetensors' handle
    """(dtype, shape, first values) of one tensor, reading only the leading rows that hold those values."""
    view = f.get_slice(name)
    shape = tuple(int(d) for d in view.get_shape())
    dtype = str(view.get_dtype())
    if len(shape) == 0:
        return dtype, shape, head_values(f.get_tensor(name))
    row = math.prod(shape[1:])
    rows = shape[0] if row == 0 else min(shape[0], -(-FINGERPRINT_VALUES // row))
    return dtype, shape, head_values(view[:rows])


#: safetensors dtype names of floating tensors (the only ones fingerprinted, as the state-dict fingerprint did)
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def tensor_heads(folder: str | Path, exclude: Iterable[str] = ()) -> Iterator[tuple[str, tuple[int, ...], torch.Tensor]]:
    """(name, shape, first values as float32) of every floating tensor not in `exclude`, in name order over all shards.

    Each file is opened once and only the leading rows of each tensor are touched
    (safetensors maps the file; the rest of it is never read).
    """
    files = tensor_files(folder)
    if files is None:
        raise ModelError(f"{folder} holds no safetensors weights ({SAFE_WEIGHTS} or {SAFE_WEIGHTS_INDEX}).")
    exclude = tuple(exclude)
    wanted = sorted(n for n in files if not is_excluded(n, exclude))
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    heads: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                dtype, shape, values = _read_head(f, name)
                if dtype in FLOAT_DTYPES:
                    heads[name] = (shape, values)
    for name in wanted:
        if name in heads:
            yield name, *heads[name]


def files_fingerprint(folder: str | Path, label_names: Iterable[str], exclude: Iterable[str] = ()) -> str:
    """The base-model fingerprint of a folder's safetensors weights and the task's label names.

    The label names are part of it (a silo labelled with another class set would
    train a head the server cannot use); the modules in `exclude` (the task's
    classification heads, trained and exchanged) are not, so two folders that differ
    only in their head agree.
    """
    h = hashlib.sha256(_FINGERPRINT_FORMAT)
    h.update("|".join(label_names).encode())
    for name, shape, values in tensor_heads(folder, exclude):
        h.update(name.encode())
        h.update(repr(shape).encode())
        h.update(values.numpy().tobytes())
    return h.hexdigest()[:16]


def tensor_digest(shape: tuple[int, ...], values: torch.Tensor) -> bytes:
    """A name-free identity of a tensor: its shape and first values (how a loaded weight is matched to a file tensor)."""
    return hashlib.sha256(repr(tuple(shape)).encode() + values.numpy().tobytes()).digest()


def weights_not_in_files(model: torch.nn.Module, folder: str | Path, exclude: Iterable[str] = ()) -> list[str]:
    """Floating weights of a loaded `model` (outside `exclude`) whose values no tensor of the folder's files has.

    The fingerprint is read from the files, so it cannot see a weight transformers
    drew at random because the folder lacks it: such a base differs on every host
    while every host reports the same fingerprint. Matching by shape and first values
    needs no name mapping (transformers adds or drops a base-model prefix, and tied
    weights share one file tensor).
    """
    exclude = tuple(exclude)
    known = {tensor_digest(shape, values) for _, shape, values in tensor_heads(folder, exclude)}
    missing = []
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not is_excluded(name, exclude) and t.device.type != "meta":
            if tensor_digest(tuple(t.shape), head_values(t)) not in known:
                missing.append(name)
    return missing
