"""What a coordinator needs of the base model, read from its folder without loading it.

A server that does not evaluate needs two things from the model: the fingerprint that
trainers must match, and the seeded adapter every client starts from at version 0.
Loading the model for them costs its whole size (16 GB for an 8B model in float32) on
a host that never runs it. Here both come from the folder instead:

- the fingerprint from the safetensors files (`corolla.learning.weight_files`), the
  one definition trainers compute too (`Task.fingerprint`);
- the initial adapter from the architecture built on the meta device (config.json and
  the files' headers; no weight is read), with peft adding its LoRA layers as on a
  real model. Only what the adapter holds is materialised: the LoRA factors, which peft
  initialises itself, and the trained head, initialised by transformers (or read from
  the folder when it has one of the right shape). The random draws happen in the same
  order as `train_loop.initial_adapter`'s, so the result is bit-identical to it for
  the same seed.

A model built in code (`tiny-bert`, `tiny-llama`, `cnn`), a folder without safetensors
weights, and a task that trains the whole model have no such shortcut: `NeedsModel`
says so, and the server then loads the model (`TaskEvaluator`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from peft import get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from torch import nn

from corolla.learning import weight_files
from corolla.learning.tasks import build_task
from corolla.learning.tasks.base import Task
from corolla.learning.train_loop import explained_targets
from corolla.modelinfo import ModelError
from corolla.spec import LoraSpec, TaskSpec


class NeedsModel(ValueError):
    """The base model cannot be described from its files alone; the message says why and that the server needs it."""


def needs_model(task: Task) -> str | None:
    """Why a server must load this task's model to fingerprint it and build the initial adapter; None when it need not."""
    if not task.uses_lora:
        return (f"task {task.name} trains and exchanges the whole model, so its initial model is the model itself: "
                "the server needs the model")
    if task.weight_folder is None:
        return (f"model {task.spec.model!r} is built in code or its folder holds no safetensors weights "
                f"({weight_files.SAFE_WEIGHTS} or {weight_files.SAFE_WEIGHTS_INDEX}), so its fingerprint is taken "
                "from the loaded model: the server needs the model (save the folder with safetensors to avoid it)")
    return None


def _require_files(task: Task) -> str:
    reason = needs_model(task)
    if reason is not None:
        raise NeedsModel(reason)
    assert task.weight_folder is not None
    return task.weight_folder


def weight_fingerprint(task: Task) -> str:
    """The task's base-model fingerprint from its folder's safetensors files (`Task.fingerprint`'s value), no model built."""
    _require_files(task)
    return task.fingerprint()


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor of `t`'s shape and dtype holding one value (a base weight's stand-in).

    peft reads a base weight's device and dtype (and puts the LoRA factors beside it), never its values.
    """
    return torch.zeros((), dtype=t.dtype).expand(t.shape)


def _file_tensor(folder: str, names: list[str]) -> torch.Tensor | None:
    """The first of `names` the folder's safetensors files hold, read in full (a head: small); None if none does."""
    files = weight_files.tensor_files(folder) or {}
    for name in names:
        if name in files:
            with safe_open(str(files[name]), framework="pt") as f:
                return f.get_tensor(name)
    return None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-load report (a model-free build would print it once per rank)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _meta_base(task: Task, folder: str) -> nn.Module:
    """The task's base model with its frozen weights as storage-less CPU stand-ins and its trained modules real.

    `load_base_model(device_map="meta")` builds exactly the model a trainer builds
    (head, label count, dtype) while transformers maps the files' names and shapes onto
    it and reads no tensor data. Parameters transformers marked as loaded carry
    `_is_hf_initialized`; a trained-module parameter without it was missing from the
    folder (a fresh head) and is left for transformers' own initialisation, which the
    caller runs under its seed. A trained-module parameter that was loaded (a folder
    fine-tuned for the same classes) is read from the files.
    """
    with _quiet_transformers():
        model = task.load_base_model(device_map="meta")
    trained = task.trained_modules
    prefix = getattr(model, "base_model_prefix", "")
    strays = []
    for module_name, module in model.named_modules():
        in_head = weight_files.is_excluded(module_name, trained) if module_name else False
        for pname, p in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{pname}" if module_name else pname
            loaded = bool(getattr(p, "_is_hf_initialized", False))
            if not in_head:
                if not loaded:
                    strays.append(full)
                module.register_parameter(pname, nn.Parameter(_stand_in(p), requires_grad=False))
                continue
            if loaded:
                value = _file_tensor(folder, [full, full.removeprefix(prefix + "."), f"{prefix}.{full}"])
                if value is None or tuple(value.shape) != tuple(p.shape):
                    raise ModelError(f"cannot find the loaded head weight {full!r} in {folder}'s safetensors files")
                new = nn.Parameter(value.to(p.dtype), requires_grad=False)
                new._is_hf_initialized = True
            else:  # a fresh head: transformers initialises it (`initialize_weights`), drawing from the caller's seed
                new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False)
                module._is_hf_initialized = False
            module.register_parameter(pname, new)
        for bname, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.device.type == "meta":
                module.register_buffer(bname, _stand_in(b), persistent=bname not in module._non_persistent_buffers_set)
    if strays:
        raise ModelError(f"the model folder {folder} lacks weights the model needs ({', '.join(strays[:3])}"
                         f"{', ...' if len(strays) > 3 else ''}): transformers would draw them at random on every "
                         "host, so no two hosts would share a base model. Save the complete model into the folder.")
    model.initialize_weights()  # only the unmarked modules: the fresh head, as from_pretrained initialises it
    return model


def shape_initial_adapter(task: Task, rank: int, lora: LoraSpec, seed: int) -> dict[str, np.ndarray]:
    """Peft's freshly initialised adapter at `rank` under `lora`, built without reading the base weights.

    Same keys, shapes, float32 dtype and values as `train_loop.initial_adapter(task,
    rank, lora, seed)`: under the same seed, the fresh head and then peft's LoRA layers
    (each factor created as an `nn.Linear`, A re-drawn kaiming-uniform with a = √5, B
    zero, as `init_lora_weights=True` does) draw from torch's generator in the same
    order. Raises NeedsModel when the task's model cannot be described from its files.
    """
    folder = _require_files(task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = _meta_base(task, folder)
        with explained_targets(lora):
            model = get_peft_model(base, task.lora_config(rank, lora), adapter_name="init")
    sd = get_peft_model_state_dict(model, adapter_name="init")
    out = {}
    for k, v in sd.items():
        if v.device.type == "meta" or (v.numel() > 1 and 0 in v.stride()):  # a stand-in of a base weight
            raise ModelError(f"adapter tensor {k!r} would come from the base weights, which a model-free server does "
                             "not read; the server needs the model for this LoRA configuration")
        out[k] = v.detach().float().cpu().numpy().copy()
    return out


class BaseFiles:
    """The model-free half of the server's `Evaluator`: the fingerprint and the initial adapter, from the folder's files.

    Build it where the server does not evaluate; its two members are exactly
    `Evaluator.fingerprint` and `Evaluator.initial_adapter`. Raises NeedsModel (a
    ValueError naming the reason) when the task's model cannot be described from its
    files; the server then needs the model (`TaskEvaluator`).
    """

    def __init__(self, spec: TaskSpec) -> None:
        self.task = build_task(spec)
        _require_files(self.task)
        self.fingerprint: str = weight_fingerprint(self.task)

    def initial_adapter(self, rank: int, lora: LoraSpec, seed: int) -> dict[str, np.ndarray]:
        """The adapter every client starts from at version 0 (seeded: identical on every host)."""
        return shape_initial_adapter(self.task, rank, lora, seed)
