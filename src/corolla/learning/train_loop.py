"""The one training/evaluation path, shared by the trainer process, Ray actors and the server's evaluator.

`AdapterModel` owns one frozen base model and any number of LoRA adapters, one
per rank (peft's named adapters), so a Ray actor that serves clients of several
ranks loads the base model once. Adapter weights cross the boundary only through
peft's `get_/set_peft_model_state_dict`, keyed by peft's names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from corolla.learning.tasks.base import EncodedData, Task
from corolla.spec import LoraSpec

BASE_PREFIX = "base_model.model."

# Base-model loads in this process: reported to the server, which proves the model stays warm.
MODEL_LOADS = 0


def stored_transposed(model: nn.Module) -> frozenset[str]:
    """Names of the weights stored (in, out), not torch's (out, in): transformers' Conv1D (GPT-2).

    A LoRA layer's ΔW = s·B·A is (out, in) whatever the module (peft's factors have the
    same shapes for both), so adding ΔW to such a weight takes its transpose.
    """
    from transformers.pytorch_utils import Conv1D

    return frozenset(f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Conv1D))


def as_stored(name: str, delta: torch.Tensor, transposed: frozenset[str]) -> torch.Tensor:
    """ΔW (out, in) in the layout the weight `name` is stored in (see `stored_transposed`)."""
    return delta.T if name in transposed else delta


def load_base(task: Task, **from_pretrained: Any) -> nn.Module:
    """Load the task's base model, counting the load (`from_pretrained`: extra loading options, e.g. 4-bit)."""
    global MODEL_LOADS
    MODEL_LOADS += 1
    return task.load_base_model(**from_pretrained)


#: how a trainer may hold its frozen base model (`--quantize`)
QUANTIZE = ("none", "4bit")


@dataclass(frozen=True, kw_only=True)
class ComputeOptions:
    """How this trainer computes: its own choice, invisible to the server (the adapter exchanged is the same).

    Parameters
    ----------
    gradient_checkpointing : bool (default: False)
        Recompute activations in the backward pass instead of keeping them: less memory for
        long sequences and deep models, about a third more compute. The result is the same.
    quantize : str (default: "none")
        `4bit`: hold the frozen base in 4-bit NF4 with bf16 compute (QLoRA, bitsandbytes, CUDA
        only). The adapter then learns against the quantized base; the server applies it to
        the full-precision one, as QLoRA adapters are used.

    """

    gradient_checkpointing: bool = False
    quantize: str = "none"

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE:
            raise ValueError(f"--quantize {self.quantize!r} is not one of {list(QUANTIZE)}")


def _quantized_base(task: Task, device: torch.device, compute: ComputeOptions) -> nn.Module:
    """The task's model folder loaded in 4-bit NF4 on `device` and prepared for k-bit training (QLoRA)."""
    if device.type != "cuda":
        raise ValueError(f"--quantize 4bit needs a CUDA device (bitsandbytes' 4-bit kernels); this trainer runs on "
                         f"{device}. Drop --quantize or start the trainer on a GPU.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--quantize 4bit needs the `bitsandbytes` package; install it with "
                         "`pip install bitsandbytes` on the GPU client, or drop --quantize.")
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16,
                             llm_int8_skip_modules=list(getattr(task, "HEADS", ())) or None)
    model = load_base(task, quantization_config=bnb, device_map={"": device.index or 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=compute.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.requires_grad_(False)
    return model.eval()


def select_device(requested: str = "auto") -> torch.device:
    """Return CUDA when present (or asked for), else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} was asked for but CUDA is not available; use --device cpu.")
    return torch.device(requested)


def autocast(device: torch.device, dtype: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for `auto`/`bfloat16` (weights and the wire stay fp32); nothing for float32 or on CPU."""
    if device.type == "cuda" and dtype in ("auto", "bfloat16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_lora_spec(lora: LoraSpec, device: torch.device) -> None:
    """Raise ValueError when this process cannot train under `lora` (the reason goes back to the server)."""
    if lora.dtype == "bfloat16" and device.type != "cuda":
        raise ValueError(f"the run asks for lora-dtype=bfloat16, which needs a CUDA device; this trainer runs on "
                         f"{device}. Use lora-dtype=auto or float32, or start the trainer on a GPU.")


@contextlib.contextmanager
def explained_targets(lora: LoraSpec) -> Iterator[None]:
    """Turn peft's error for target modules a model lacks into one line naming the key and the fix."""
    try:
        yield
    except ValueError as e:
        if not lora.target_modules:
            raise
        raise ValueError(f"lora-target-modules {list(lora.target_modules)} cannot be applied to this model "
                         f"({str(e)[:120]}); set lora-target-modules to module names the model has, or leave "
                         "it empty for the task's default") from None


@dataclass(frozen=True)
class DPSGD:
    """Sample-level DP-SGD at a site: each example's gradient clipped to `clip`, noise z·clip on the sum."""

    clip: float
    noise_multiplier: float


@dataclass(frozen=True)
class TrainStats:
    """What one local training job measured (the selectors' telemetry)."""

    steps: int
    num_examples: int
    loss_mean: float
    loss_sq_mean: float
    duration_s: float
    started_at: float
    samples: int = 0


@dataclass(frozen=True)
class EvalStats:
    """Loss and accuracy of a model on a data set (a causal LM: per response token)."""

    loss: float
    accuracy: float
    num_examples: int
    #: the task's further metrics (a causal LM: perplexity, ROUGE-L of generated answers)
    extra: dict[str, float] = dataclasses.field(default_factory=dict)
    #: what loss and accuracy average over (examples, or a causal LM's response tokens); 0: nothing was scored
    units: int = -1


def _batches(n: int, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, n, batch_size):
        yield torch.arange(i, min(i + batch_size, n))


@torch.no_grad()
def evaluate_model(model: nn.Module, data: EncodedData, device: torch.device, task: Task, batch_size: int = 64) -> EvalStats:
    """Mean loss and accuracy of `model` on all of `data`, in the task's units (examples, or response tokens)."""
    model.eval()
    total_loss, correct, units = 0.0, 0, 0
    for idx in _batches(len(data), batch_size):
        inputs, labels = data.batch(idx, device)
        with autocast(device):
            logits = task.logits(model, inputs).float()
        loss, right, n = task.eval_sums(logits, labels)
        total_loss, correct, units = total_loss + loss, correct + right, units + n
    scored = units
    units = max(units, 1)
    return EvalStats(loss=total_loss / units, accuracy=correct / units, num_examples=len(data), units=scored)


class AdapterModel:
    """A frozen base model with one LoRA adapter per rank."""

    def __init__(self, task: Task, device: torch.device, compute: ComputeOptions | None = None) -> None:
        self.task = task
        self.device = device
        self.compute = compute or ComputeOptions()
        if self.compute.quantize == "4bit":
            # The fingerprint proves the server and this trainer share one base: it is read from the model folder's
            # full-precision files (a quantized copy differs in every weight), so the 4-bit copy never enters it.
            self.fingerprint = task.fingerprint() if task.weight_folder else task.fingerprint(load_base(task))
            self.base = _quantized_base(task, device, self.compute)
        else:
            self.base = load_base(task).to(device)
            self.fingerprint = task.fingerprint(self.base)
        if self.compute.gradient_checkpointing:
            if not getattr(self.base, "supports_gradient_checkpointing", False):
                raise ValueError(f"--gradient-checkpointing: the {task.name} model does not support gradient "
                                 "checkpointing; drop the flag.")
            # non-reentrant checkpointing needs no input that requires grad (the base is frozen, only LoRA trains)
            no_reentrant = {"use_reentrant": False}
            if hasattr(self.base, "activation_checkpointing_enable"):  # the name from transformers 5.2x on
                self.base.activation_checkpointing_enable(activation_checkpointing_kwargs=no_reentrant)
            else:
                self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=no_reentrant)
            self.base.config.use_cache = False
        self.model: PeftModel | None = None
        self._base_params = dict(self.base.named_parameters())
        self._transposed = stored_transposed(self.base)
        self._originals: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def set_base_deltas(self, frozen: Mapping[str, np.ndarray]) -> None:
        """Set each named base weight to original + ΔW; restore weights not named to their original."""
        if frozen and self.compute.quantize != "none":
            raise ValueError("this trainer holds its base in 4-bit (--quantize 4bit), so it cannot add FLoRA's "
                             "merged update to the base weights; run FLoRA on trainers without --quantize.")
        wanted = {}
        for key, dw in frozen.items():
            if not key.endswith(".base_delta"):
                raise ValueError(f"frozen array `{key}` is not a `<layer>.base_delta`")
            name = key.removesuffix(".base_delta").removeprefix(BASE_PREFIX) + ".weight"
            if name not in self._base_params:
                raise ValueError(f"frozen array `{key}` matches no base weight")
            wanted[name] = dw
        for name in set(self._originals) | set(wanted):
            p = self._base_params[name]
            orig = self._originals.setdefault(name, p.detach().clone())
            if name in wanted:
                dw = torch.from_numpy(np.asarray(wanted[name], np.float32)).to(p.device)
                p.copy_(orig + as_stored(name, dw, self._transposed))
            else:
                p.copy_(orig)

    @staticmethod
    def adapter_name(rank: int, lora: LoraSpec) -> str:
        """One peft adapter per (rank, LoRA specification): a run that changes alpha or targets gets a new one."""
        digest = hashlib.sha256(repr(lora).encode()).hexdigest()[:8]
        return f"r{rank}-{digest}"

    def _activate(self, rank: int, lora: LoraSpec) -> nn.Module:
        check_lora_spec(lora, self.device)
        if not self.task.uses_lora:  # full-model task: the model itself is trained and exchanged
            if rank != 0:
                raise ValueError(f"task {self.task.name} trains the full model: rank must be 0, got {rank}")
            self.base.requires_grad_(True)
            return self.base
        name = self.adapter_name(rank, lora)
        with explained_targets(lora):
            if self.model is None:
                self.model = get_peft_model(self.base, self.task.lora_config(rank, lora), adapter_name=name)
            elif name not in self.model.peft_config:
                self.model.add_adapter(name, self.task.lora_config(rank, lora))
        self.model.set_adapter(name)
        return self.model

    def load(self, arrays: Mapping[str, np.ndarray], rank: int, lora: LoraSpec) -> PeftModel:
        """Set the adapter of (`rank`, `lora`) to `arrays` (peft names); raise ValueError on unknown keys."""
        model = self._activate(rank, lora)
        sd = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in arrays.items()}
        if not self.task.uses_lora:
            result = model.load_state_dict(sd, strict=False)
            if result.missing_keys:
                raise ValueError(f"model arrays miss keys the model has: {result.missing_keys[:3]}")
            if result.unexpected_keys:
                raise ValueError(f"model arrays have keys the model does not know: {result.unexpected_keys[:3]}")
            return model
        result = set_peft_model_state_dict(model, sd, adapter_name=self.adapter_name(rank, lora))
        if result.unexpected_keys:
            raise ValueError(f"adapter arrays have keys the model does not know: {result.unexpected_keys[:3]}")
        return model

    def state(self, rank: int, lora: LoraSpec) -> dict[str, np.ndarray]:
        """Return the adapter of (`rank`, `lora`) as float32 numpy arrays keyed by peft's names."""
        if not self.task.uses_lora:
            return {k: v.detach().float().cpu().numpy().copy() for k, v in self.base.state_dict().items()}
        assert self.model is not None
        sd = get_peft_model_state_dict(self.model, adapter_name=self.adapter_name(rank, lora))
        # copies: the returned arrays must not alias live parameters that the next job overwrites
        return {k: v.detach().float().cpu().numpy().copy() for k, v in sd.items()}

    def train(
        self,
        arrays: Mapping[str, np.ndarray],
        rank: int,
        data: EncodedData,
        *,
        lora: LoraSpec,
        steps: int,
        batch_size: int,
        lr: float,
        seed: int,
        prox_mu: float = 0.0,
        frozen: Mapping[str, np.ndarray] | None = None,
        freeze_a: bool = False,
        dp_sgd: DPSGD | None = None,
    ) -> tuple[dict[str, np.ndarray], TrainStats]:
        """Train the adapter from `arrays` for `steps` AdamW steps; return new arrays and telemetry.

        `frozen` (`<layer>.base_delta` → ΔW) is added to the frozen base weights for
        this job only (FLoRA's merged update); without it the base is the original.
        `dp_sgd`: every step clips each example's gradient and adds Gaussian noise (DP-SGD).
        """
        started = time.time()
        t0 = time.perf_counter()
        self.set_base_deltas(frozen or {})
        model = self.load(arrays, rank, lora)
        model.train()
        if self.task.uses_lora:  # FFA-LoRA / FedSVD train only B; every other job trains both factors
            a_of_this_adapter = f".lora_A.{self.adapter_name(rank, lora)}."
            for name, p in model.named_parameters():
                if a_of_this_adapter in name:
                    p.requires_grad_(not freeze_a)
        params = [p for p in model.parameters() if p.requires_grad]
        anchor = [p.detach().clone() for p in params] if prox_mu > 0 else []
        # fused on CUDA: one kernel for every LoRA tensor instead of several per tensor (a small model's GPU step is
        # bound by kernel launches, bench/gpu_clients.py)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=self.device.type == "cuda" or None)
        gen = torch.Generator().manual_seed(seed)
        losses: list[float] = []
        n = len(data)
        # Dropout draws from torch's global generator: seed it for this job only (fork_rng restores it), so a job is
        # a function of its seed and data wherever it runs — a Ray actor that ran other jobs or a fresh trainer.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for _ in range(steps):
                idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
                inputs, labels = data.batch(idx, self.device)
                opt.zero_grad(set_to_none=True)
                if dp_sgd is not None:
                    per_example = self._private_gradients(model, params, inputs, labels, lora, dp_sgd, gen)
                else:
                    with autocast(self.device, lora.dtype):
                        logits = self.task.logits(model, inputs).float()
                    per_example = self.task.per_example_loss(logits, labels)
                    loss = per_example.mean()
                    if prox_mu > 0:
                        loss = loss + 0.5 * prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
                    loss.backward()
                opt.step()
                losses.extend(per_example.detach().float().cpu().tolist())
        model.eval()
        arr = np.asarray(losses, dtype=np.float64)
        stats = TrainStats(
            steps=steps,
            num_examples=n,
            loss_mean=float(arr.mean()) if arr.size else math.nan,
            loss_sq_mean=float((arr**2).mean()) if arr.size else math.nan,
            duration_s=time.perf_counter() - t0,
            started_at=started,
            samples=len(losses),
        )
        return self.state(rank, lora), stats

    def _private_gradients(self, model: nn.Module, params: list[torch.Tensor], inputs: dict[str, torch.Tensor],
                           labels: torch.Tensor, lora: LoraSpec, dp: DPSGD, gen: torch.Generator) -> torch.Tensor:
        """Set each param's .grad to DP-SGD's (Σ_i clip(g_i, C) + N(0, (zC)²)) / B; return the per-example losses.

        Per-example gradients come from one backward pass per example (only the LoRA and head
        parameters require gradients): exact for any model, B times the cost of a plain step.
        Without noise and with no gradient above C it equals the plain step's mean gradient.
        """
        b = int(labels.shape[0])
        summed = [torch.zeros_like(p) for p in params]
        losses = []
        for i in range(b):
            one = {k: v[i:i + 1] for k, v in inputs.items()}
            with autocast(self.device, lora.dtype):
                logits = self.task.logits(model, one).float()
            loss = self.task.per_example_loss(logits, labels[i:i + 1])
            grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
            factor = min(1.0, dp.clip / (float(norm) + 1e-12))
            for s, g in zip(summed, grads):
                s.add_(g, alpha=factor)
            losses.append(loss.detach())
        for s, p in zip(summed, params):
            if dp.noise_multiplier > 0:
                noise = torch.normal(0.0, dp.noise_multiplier * dp.clip, size=tuple(s.shape), generator=gen)
                s.add_(noise.to(s.device, s.dtype))
            p.grad = s / b
        return torch.cat(losses)

    def evaluate(self, arrays: Mapping[str, np.ndarray], rank: int, data: EncodedData, lora: LoraSpec,
                 frozen: Mapping[str, np.ndarray] | None = None, generate: int = 0) -> EvalStats:
        """Evaluate the adapter `arrays` at `rank` on `data` (`frozen`: FLoRA's merged update on the base).

        `generate`: a task that generates also answers the first `generate` prompts of `data`
        greedily and scores them (`Task.extra_metrics`), when `data` kept its source rows.
        """
        if self.task.uses_lora:
            self.set_base_deltas(frozen or {})
        model = self.load(arrays, rank, lora)
        stats = evaluate_model(model, data, self.device, self.task)
        rows = data.source_rows(generate) if generate and self.task.info.generates else None
        if rows is not None and len(rows):
            stats = dataclasses.replace(stats, extra=self.task.extra_metrics(stats.loss, model, rows, self.device))
        return stats


def initial_adapter(task: Task, rank: int, lora: LoraSpec, seed: int) -> dict[str, np.ndarray]:
    """Return peft's freshly initialised adapter at `rank` under `lora` (seeded: identical on every host)."""
    if not task.uses_lora:
        return {k: v.detach().float().cpu().numpy().copy() for k, v in load_base(task).state_dict().items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with explained_targets(lora):
            model = get_peft_model(load_base(task), task.lora_config(rank, lora), adapter_name="init")
    sd = get_peft_model_state_dict(model, adapter_name="init")
    return {k: v.detach().float().cpu().numpy() for k, v in sd.items()}
