"""Tokens/s and peak GPU memory of one corolla client on CUDA: bf16, gradient checkpointing, a 4-bit base.

Each measurement is one `AdapterModel` (the trainer's own training path) fine-tuning
LoRA (rank 16, q_proj/v_proj) on an instruction silo for `--steps` timed steps after
warm-up. Models:

- `smollm2`: SmolLM2-135M-Instruct — its real weights when the converted folder is
  on this machine, else the same architecture with random weights (`--random`): a
  step's cost does not depend on the weights' values;
- `llama-1b`: a randomly initialised Llama of 1.2 B parameters (2048 wide, 22 layers,
  SmolLM2's 49k vocabulary), built from a config and saved as a model folder.

Modes: `bf16` (autocast, the default GPU client), `bf16+ckpt` (gradient
checkpointing), `4bit+ckpt` (QLoRA: NF4 base, bf16 compute; needs bitsandbytes),
and `fp32` (no autocast). For each it prints tokens/s (response and prompt
tokens, padding excluded), peak allocated memory, the ratio to the `bf16` mode,
and the model FLOP rate against this GPU's bf16 matrix-product rate measured in
the same run (the physical ceiling): FLOPs/token ≈ 4·N for LoRA (forward and the
input gradient; no weight gradient for the frozen base), + 2·N with checkpointing.

    python bench/gpu_clients.py [--models smollm2,llama-1b] [--modes bf16,bf16+ckpt,4bit+ckpt,fp32]
                                [--silo FILE.jsonl] [--steps 20] [--batches 16,64] [--max-length 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

MODES = {"bf16": ("auto", False, "none"), "bf16+ckpt": ("auto", True, "none"),
         "4bit+ckpt": ("auto", True, "4bit"), "fp32": ("float32", False, "none")}


def matmul_tflops(torch) -> float:  # noqa: ANN001 - the torch module, imported late
    """This GPU's bf16 matrix-product rate (8192³, mean of 10 after 3 warm-ups): the ceiling for the model's FLOPs."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12


def model_folder(name: str, work: Path, random: bool, smollm2_dir: str | None = None) -> Path:
    """A Hugging Face folder for `name` (saved once under `work`); `smollm2_dir`: SmolLM2's config + tokenizer."""
    import torch
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    from corolla.learning import models

    src = Path(smollm2_dir or models.smollm2_path())
    tok = models.load_tokenizer(str(src))
    if name == "smollm2" and not random:
        return src
    out = work / name
    if (out / "config.json").is_file():
        return out
    if name == "smollm2":
        cfg = AutoConfig.from_pretrained(src)
    elif name == "llama-1b":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                          num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                          tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    else:
        raise SystemExit(f"unknown model {name!r}: smollm2 or llama-1b")
    with torch.device("cuda"):  # initialise on the GPU: a 1.2 B model's CPU init takes minutes
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def silo(path: str | None, rows: int):  # noqa: ANN201 - a datasets.Dataset
    """The instruction silo: a JSONL/CSV/Parquet file, else the built-in WordNet definitions."""
    import datasets

    if path:
        return datasets.load_dataset("json", data_files=path, split="train").select(range(rows))
    from corolla.data.silo import read_wordnet_definitions
    from corolla.learning.tasks.causal_lm import instruction

    defs = read_wordnet_definitions()[:rows]
    return datasets.Dataset.from_dict({"prompt": [instruction(w) for w, _, _ in defs], "response": [d for _, d, _ in defs]})


def measure(folder: Path, mode: str, ds, steps: int, batch: int, max_length: int) -> dict:  # noqa: ANN001
    """Train `steps` timed steps (after 3 warm-up steps) in `mode`; tokens/s and peak memory."""
    import torch

    from corolla.learning.tasks import build_task
    from corolla.learning.train_loop import AdapterModel, ComputeOptions, initial_adapter
    from corolla.spec import LoraSpec, TaskSpec

    dtype, ckpt, quant = MODES[mode]
    task = build_task(TaskSpec(task="causal-lm", model=str(folder), max_length=max_length))
    data = task.encode(ds)
    lora = LoraSpec(dtype=dtype)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = AdapterModel(task, torch.device("cuda"), ComputeOptions(gradient_checkpointing=ckpt, quantize=quant))
    load_s = time.perf_counter() - t0
    weights = torch.cuda.memory_allocated()
    start = initial_adapter(task, 16, lora, seed=0)
    arrays, _ = model.train(start, 16, data, lora=lora, steps=3, batch_size=batch, lr=1e-4, seed=0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    arrays, stats = model.train(arrays, 16, data, lora=lora, steps=steps, batch_size=batch, lr=1e-4, seed=1)
    torch.cuda.synchronize()
    tokens_per_row = float(data.inputs["attention_mask"].sum()) / len(data)
    n_params = sum(p.numel() for p in model.base.parameters())
    if quant == "4bit":  # bitsandbytes packs two 4-bit weights per stored element
        n_params = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.base.parameters())
    tps = steps * batch * tokens_per_row / stats.duration_s
    row = {"mode": mode, "params": n_params, "tokens_per_s": tps, "step_s": stats.duration_s / steps,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "weights_gib": weights / 2**30,
           "load_s": load_s, "loss": stats.loss_mean, "model_tflops": (6 if ckpt else 4) * n_params * tps / 1e12}
    del model
    torch.cuda.empty_cache()
    return row


def report(name: str, batch: int, r: dict) -> None:
    """One result line."""
    print(f"{name:9s} batch {batch:3d} {r['mode']:10s} {r['params'] / 1e9:5.2f} B params {r['tokens_per_s']:8.0f} "
          f"tokens/s ({r['vs_bf16']:.2f}x bf16)  peak {r['peak_gib']:6.2f} GiB (weights {r['weights_gib']:.2f})  "
          f"{r['step_s'] * 1e3:6.1f} ms/step  {r['model_tflops']:6.1f} TFLOP/s = {r['mfu']:.1%} of matmul  "
          f"loss {r['loss']:.3f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="smollm2,llama-1b")
    p.add_argument("--modes", default="bf16,bf16+ckpt,4bit+ckpt,fp32")
    p.add_argument("--silo", help="instruction silo (prompt/response JSONL); default: the built-in WordNet corpus")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batches", default="16,64", help="batch sizes (rows per step)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--random", action="store_true", help="SmolLM2's architecture with random weights")
    p.add_argument("--smollm2-dir", help="config + tokenizer of SmolLM2 (with --random, where the weights are absent)")
    p.add_argument("--out", default=str(RESULTS / "gpu_clients"))
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_clients.py measures CUDA clients; this machine has no CUDA device.")
    ceiling = matmul_tflops(torch)
    print(f"{torch.cuda.get_device_name()}: bf16 matrix products at {ceiling:.0f} TFLOP/s", flush=True)
    ds = silo(args.silo, args.rows)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.models.split(","):
            folder = model_folder(name, Path(work), args.random, args.smollm2_dir)
            for batch in (int(b) for b in args.batches.split(",")):
                base = None
                for mode in args.modes.split(","):
                    try:
                        r = measure(folder, mode, ds, args.steps, batch, args.max_length)
                    except (ValueError, RuntimeError) as e:
                        print(f"{name} {mode}: not measured: {e}", flush=True)
                        continue
                    base = base or (r if mode == "bf16" else None)
                    r.update(model=name, batch=batch, mfu=r["model_tflops"] / ceiling,
                             vs_bf16=r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan"))
                    rows.append(r)
                    report(name, batch, r)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "matmul_tflops": ceiling, "steps": args.steps,
            "batches": args.batches, "max_length": args.max_length, "random_weights": args.random,
            "torch": torch.__version__}
    (out / "gpu_clients.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
