"""Peak memory of a coordinator's start: the fingerprint and the initial adapter, from the files vs from the loaded model.

A server that does not evaluate needs the base model's fingerprint and the seeded
initial adapter. `files` computes both with `corolla.learning.base_files.BaseFiles`
(safetensors headers and the first values of each tensor, the architecture on the meta
device); `full` is the path a server takes when it loads the model, as `TaskEvaluator`
does: load the base (float32), fingerprint it, and build the initial adapter with
`train_loop.initial_adapter` (which loads a second copy while the first is held).

Each case runs in a fresh subprocess; its peak RSS is the kernel's high-water mark
(VmHWM, which `ru_maxrss` reports too for a process not started by a larger one:
anonymous memory plus the resident pages of mapped files). `imports` is
the RSS after importing torch, transformers, peft and corolla's learning layer, before
any model is touched. Models: the built-in SmolLM2-135M (causal LM, float32 folder),
MiniLM (text classification) and a randomly initialised 1.1B-parameter Llama written
here in bfloat16, in two shards with an index (hidden 2048, 22 layers, intermediate
5632, vocabulary 32000, untied embeddings: TinyLlama's layout), deleted at the end.

    .venv/bin/python bench/coordinator_memory.py [--skip-full-big] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
GIB = 2**30
#: the coordinator's memory target (plus the strategy's dense update state, which neither path holds here)
TARGET_GB = 1.2
RANK = 16


def write_random_llama(folder: Path, *, hidden: int = 2048, layers: int = 22, intermediate: int = 5632,
                       vocab: int = 32000, heads: int = 32, kv_heads: int = 4, shard_gb: float = 1.0,
                       seed: int = 0) -> int:
    """Write a randomly initialised Llama folder (bfloat16 safetensors shards + index + config); return its parameter count.

    The architecture is built on the meta device for its names and shapes only, and
    tensors are drawn and written one shard at a time, so writing needs about one
    shard of memory, not the model's.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      tie_word_embeddings=False, pad_token_id=0, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        if size and size + 2 * numel > shard_gb * GIB:
            shards.append({})
            size = 0
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
        shards[-1][name] = t.to(torch.bfloat16)
        size += 2 * numel
        if size >= shard_gb * GIB:
            shards.append({})
            size = 0
    shards = [s for s in shards if s]
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        total += sum(2 * t.numel() for t in shard.values())
        shards[i] = {}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return sum(math.prod(s) for s in shapes.values())


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM, else `ru_maxrss`.

    VmHWM belongs to the process's own address space; `ru_maxrss` survives fork and
    exec on Linux, so a fresh interpreter started by a large parent would report the
    parent's peak as its own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_gb() -> float:
    return peak_rss_bytes() / GIB


def run_case(path: str, task: str, model: str, rank: int) -> dict:
    """One measurement, in this process (call it in a fresh one): peak RSS before and after."""
    import torch  # noqa: F401 - counted in the import baseline

    from corolla.learning.base_files import BaseFiles
    from corolla.learning.tasks import build_task
    from corolla.learning.train_loop import initial_adapter, load_base
    from corolla.spec import LoraSpec, TaskSpec

    spec = TaskSpec(task=task, model=model, dataset="bbc" if task == "text-classification" else "auto")
    lora = LoraSpec()
    imports = _rss_gb()
    t0 = time.perf_counter()
    if path == "files":
        base = BaseFiles(spec)
        fingerprint, adapter = base.fingerprint, base.initial_adapter(rank, lora, seed=0)
    else:
        t = build_task(spec)
        held = load_base(t)  # TaskEvaluator holds the model ...
        fingerprint = t.fingerprint(held)
        adapter = initial_adapter(t, rank, lora, seed=0)  # ... while initial_adapter loads another copy
    seconds = time.perf_counter() - t0
    return {"path": path, "task": task, "imports_gb": imports, "peak_gb": _rss_gb(), "seconds": seconds,
            "fingerprint": fingerprint, "adapter_tensors": len(adapter),
            "adapter_mb": sum(a.nbytes for a in adapter.values()) / 2**20}


def measure(path: str, task: str, model: str, rank: int = RANK) -> dict:
    """`run_case` in a fresh interpreter."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from bench.coordinator_memory import run_case; "
            f"print('RESULT', json.dumps(run_case({path!r}, {task!r}, {model!r}, {rank})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{path} {model}: {out.stderr[-3000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def weights_gb(folder: str) -> float:
    """Bytes of the folder's safetensors weights, GiB."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / GIB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-full-big", action="store_true", help="skip the full-model path on the 1.1B model")
    ap.add_argument("--keep", default="", help="write (or reuse) the 1.1B folder here and keep it")
    args = ap.parse_args()

    from corolla.learning import models

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="coordinator-memory-"))
    big = tmp / "llama-1.1b"
    try:
        if not (big / "model.safetensors.index.json").is_file():  # in a child: this process stays small
            t0 = time.perf_counter()
            code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.coordinator_memory import "
                    f"write_random_llama; print(write_random_llama(__import__('pathlib').Path({str(big)!r})))")
            n = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
            print(f"wrote a random Llama of {n / 1e9:.2f} B parameters into {big} in {time.perf_counter() - t0:.0f} s")
        cases = [("SmolLM2-135M", "causal-lm", models.smollm2_path()),
                 ("MiniLM-L6", "text-classification", models.minilm_path()),
                 ("Llama 1.1B (random, bf16, 2 shards)", "causal-lm", str(big))]
        rows = []
        for label, task, folder in cases:
            for path in ("files", "full"):
                if path == "full" and args.skip_full_big and folder == str(big):
                    continue
                r = measure(path, task, folder)
                r.update(model=label, weights_gb=weights_gb(folder))
                rows.append(r)
                print(f"{label:38} {path:5} peak {r['peak_gb']:.2f} GB (imports {r['imports_gb']:.2f}) "
                      f"in {r['seconds']:.1f} s, fingerprint {r['fingerprint']}")
        for r in rows:
            twin = next((x for x in rows if x["model"] == r["model"] and x["path"] != r["path"]), None)
            r["same_as_full"] = None if twin is None else twin["fingerprint"] == r["fingerprint"]
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    write_results(rows)


def write_results(rows: list[dict]) -> None:
    """bench/results/coordinator_memory.{json,md} and the table on stdout."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "coordinator_memory.json").write_text(json.dumps(rows, indent=1))
    head = ("| model | path | weights GB | peak RSS GB | imports GB | peak − imports GB | peak / weights | "
            f"≤ {TARGET_GB} GB | seconds | adapter tensors |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['path']} | {r['weights_gb']:.2f} | {r['peak_gb']:.2f} | {r['imports_gb']:.2f} "
                     f"| {r['peak_gb'] - r['imports_gb']:.2f} | {r['peak_gb'] / r['weights_gb']:.2f} | "
                     f"{'met' if r['peak_gb'] <= TARGET_GB else 'no'} | {r['seconds']:.1f} | {r['adapter_tensors']} |")
    table = "\n".join(lines)
    print(table)
    same = all(r["same_as_full"] in (True, None) for r in rows)
    files = [r for r in rows if r["path"] == "files"]
    worst = max(files, key=lambda r: r["peak_gb"] - r["imports_gb"])
    reading = [
        f"- `files`: peak RSS at most {max(r['peak_gb'] for r in files):.2f} GB, at most "
        f"{worst['peak_gb'] - worst['imports_gb']:.2f} GB above the imports ({worst['model']}), whatever the "
        "model's size: no weight is read beyond the first 4096 values of each tensor, and only the LoRA factors "
        f"and a fresh head are materialised. Target ≤ {TARGET_GB} GB (plus the strategy's dense update state, "
        f"which neither path holds here): {'met by every row' if all(r['peak_gb'] <= TARGET_GB for r in files) else 'NOT met'}.",
    ]
    for r in rows:
        if r["path"] == "full" and r["weights_gb"] > 1:
            twin = next(x for x in files if x["model"] == r["model"])
            reading.append(f"- `full` on {r['model']}: {r['peak_gb']:.2f} GB, {r['peak_gb'] / r['weights_gb']:.1f}× "
                           f"the bfloat16 weights (float32 copies: the evaluator's and `initial_adapter`'s), "
                           f"{r['peak_gb'] / twin['peak_gb']:.0f}× the `files` path; {r['seconds']:.0f} s against "
                           f"{twin['seconds']:.1f} s.")
    reading.append("- `full` on the small float32 folders stays near the imports: transformers maps a float32 "
                   "safetensors file and the fingerprint and adapter touch few of its pages. That changes once the "
                   "model runs (evaluation reads every weight) or whenever the folder is bfloat16/float16, as "
                   "large models ship: then each loaded copy is converted into anonymous float32 memory.")
    text = f"""# Coordinator memory

Peak RSS of a coordinator computing the base-model fingerprint and the rank-{RANK} initial
adapter: `files` reads them from the model folder (`corolla.learning.base_files.BaseFiles`:
safetensors headers, the first 4096 values of each tensor, the architecture on the meta
device); `full` loads the model as `TaskEvaluator` does (float32, plus the second copy
`initial_adapter` loads). One fresh process per row; peak RSS is its VmHWM; `imports` is the
RSS after importing torch, transformers, peft and corolla's learning layer. Weights: the
folder's safetensors bytes. 2-core CPU machine, no GPU.

{table}

Fingerprints of the two paths agree for every model: {'yes' if same else 'NO'}. The initial
adapters are bit-identical (tests/test_base_files.py checks it for MiniLM, SmolLM2 and
tiny BERT and Llama folders).

## Reading

""" + "\n".join(reading) + "\n"
    (RESULTS / "coordinator_memory.md").write_text(text)


if __name__ == "__main__":
    main()
