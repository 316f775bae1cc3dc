"""A run's global model as a peft adapter folder, and answers from it: `corolla export` and `corolla generate`.

The server keeps the global change exactly (`global.npz`: ΔW per LoRA layer — full
rank under FedHL — plus the trained dense modules such as a classifier head). peft
stores an adapter as factors of one rank, so each ΔW is cut to rank R by SVD
(Eckart–Young: the best rank-R approximation in Frobenius norm) and the relative
truncation error ‖ΔW − ΔW_R‖_F / ‖ΔW‖_F is reported per layer and overall. peft
itself writes the folder (`save_pretrained`), so `PeftModel.from_pretrained(base,
folder)` loads it like any adapter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict

from corolla.config import RunConfig
from corolla.learning.tasks import build_task
from corolla.learning.tasks.base import Task
from corolla.spec import TASKS, LoraSpec

BASE_PREFIX = "base_model.model."


class ExportError(ValueError):
    """A run cannot be exported; the message names the problem and the fix."""


def run_config(run_dir: str | Path) -> RunConfig:
    """The configuration of a finished run directory (its global model is checked for, not read)."""
    d = Path(run_dir)
    if not (d / "config.json").is_file():
        raise ExportError(f"{d} is not a corolla run directory (no config.json); pass the --out folder of a run.")
    if not (d / "global.npz").is_file():
        raise ExportError(f"{d} has no global.npz: the run has not finished; resume it (--resume) or wait for it.")
    values = json.loads((d / "config.json").read_text())
    values["existing-run"] = "refuse"
    return RunConfig.from_mapping(values)


#: the global models a run directory keeps: the last version, and the best one on held-out data
MODELS = {"final": "global.npz", "best": "best.npz"}


def load_run(run_dir: str | Path, cfg: RunConfig | None = None, which: str = "final",
             ) -> tuple[RunConfig, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(configuration, ΔW per layer, dense parameters) of a finished run's `which` model (final or best)."""
    d = Path(run_dir)
    cfg = cfg or run_config(d)
    if not (d / MODELS[which]).is_file():
        raise ExportError(f"{d} has no {MODELS[which]}: no version of this run was evaluated with a score; export "
                          "the final model instead (drop --best).")
    with np.load(d / MODELS[which]) as g:
        deltas = {k.removeprefix("delta/"): g[k] for k in g.files if k.startswith("delta/")}
        dense = {k.removeprefix("dense/"): g[k] for k in g.files if k.startswith("dense/")}
    return cfg, deltas, dense


def factorize(dw: np.ndarray, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(A, B, relative error) with scale·B·A the best rank-`rank` approximation of `dw` (split as U√S, √S Vᵀ)."""
    u, s, vt = np.linalg.svd(dw.astype(np.float64), full_matrices=False)
    r = min(rank, s.size)
    root = np.sqrt(s[:r] / scale)
    b = np.zeros((dw.shape[0], rank))
    a = np.zeros((rank, dw.shape[1]))
    b[:, :r], a[:r] = u[:, :r] * root, root[:, None] * vt[:r]
    total = float(np.sum(s**2))
    err = math.sqrt(float(np.sum(s[r:] ** 2)) / total) if total > 0 else 0.0
    return a.astype(np.float32), b.astype(np.float32), err


def refuse_foreign(out: Path) -> None:
    """Raise ExportError when `out` exists, holds something and is not an earlier export.

    An export replaces only its own folders; an empty folder (a fresh temporary one) is taken.
    """
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not (out / "corolla_export.json").is_file():
        raise ExportError(f"{out} exists and was not written by `corolla export` (it holds no corolla_export.json); "
                          "choose another --out, or move that folder away yourself.")


def export_adapter(run_dir: str | Path, out: str | Path, rank: int | None = None, which: str = "final") -> dict:
    """Write the run's `which` global model (final, best) as a peft adapter folder at `rank`; return a report."""
    refuse_foreign(Path(out))
    cfg, deltas, dense = load_run(run_dir, which=which)
    return write_adapter(cfg, deltas, dense, out, rank)


def write_adapter(cfg: RunConfig, deltas: dict[str, np.ndarray], dense: dict[str, np.ndarray], out: str | Path,
                  rank: int | None = None) -> dict:
    """Write ΔW per layer + dense parameters as a peft adapter folder at `rank`, atomically; return a report.

    The folder is written beside `out` and renamed into place, so a reader (a user
    loading the latest adapter of a running federation) never sees half of one.
    """
    import os
    import shutil
    import tempfile

    task = build_task(cfg.task_spec())
    if not task.uses_lora:
        raise ExportError(f"task {cfg.task} trains the whole model, not an adapter; its weights are in global.npz.")
    rank = rank or cfg.max_rank
    if rank < 1:
        raise ExportError(f"--rank must be >= 1, got {rank}.")
    lora = cfg.lora_spec()
    targets = sorted({k.rsplit(".", 1)[-1] for k in deltas})
    spec = LoraSpec(alpha=lora.alpha, rslora=lora.rslora, target_modules=tuple(targets), dtype=lora.dtype)
    model = get_peft_model(task.load_base_model(), task.lora_config(rank, spec))
    state, errors, num, den = {}, {}, 0.0, 0.0
    scale = spec.scale(rank)
    for layer, dw in deltas.items():
        a, b, err = factorize(np.asarray(dw), rank, scale)
        state[f"{layer}.lora_A.weight"], state[f"{layer}.lora_B.weight"] = torch.from_numpy(a), torch.from_numpy(b)
        errors[layer.removeprefix(BASE_PREFIX)] = err
        sq = float(np.sum(np.asarray(dw, np.float64) ** 2))
        num, den = num + err**2 * sq, den + sq
    state.update({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in dense.items()})
    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise ExportError(f"global.npz holds arrays this model lacks ({result.unexpected_keys[:3]}); was the run "
                          "made with another model?")
    out = Path(out)
    refuse_foreign(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"rank": rank, "layers": len(deltas), "relative_error": math.sqrt(num / den) if den else 0.0,
              "max_layer_error": max(errors.values(), default=0.0), "model": cfg.task_spec().model, "task": cfg.task,
              "out": str(out)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if hasattr(task, "tokenizer"):
            task.tokenizer.save_pretrained(tmp)
        (tmp / "corolla_export.json").write_text(json.dumps({**report, "layer_errors": errors}, indent=2))
        if out.exists():  # replace an older export of the same name (rename cannot replace a non-empty folder)
            old = out.with_name(f".{out.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def load_exported(run: str | Path | RunConfig, adapter_dir: str | Path) -> tuple[Task, PeftModel]:
    """The run's base model with an exported adapter loaded by peft (what a user's own code does).

    `run`: the run directory, or its configuration when the caller has read it already.
    """
    cfg = run if isinstance(run, RunConfig) else run_config(run)
    task = build_task(cfg.task_spec())
    model = PeftModel.from_pretrained(task.load_base_model(), str(adapter_dir))
    return task, model.eval()


def generate(run_dir: str | Path, prompts: list[str], rank: int | None = None, max_new_tokens: int = 64) -> list[str]:
    """Answer `prompts` with the run's global model (exported at `rank` into a temporary folder, loaded by peft)."""
    import tempfile

    cfg = run_config(run_dir)
    if not TASKS[cfg.task].generates:
        generating = " or ".join(f"task={t.name}" for t in TASKS.values() if t.generates)
        raise ExportError(f"the run trained a {cfg.task} model, which does not generate; `corolla generate` needs a "
                          f"{generating} run.")
    with tempfile.TemporaryDirectory() as tmp:  # the configuration read above serves the export and the load
        write_adapter(*load_run(run_dir, cfg), tmp, rank)
        task, model = load_exported(cfg, tmp)
        return task.generate(model, prompts, torch.device("cpu"), max_new_tokens=max_new_tokens)
