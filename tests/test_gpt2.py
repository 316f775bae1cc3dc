"""GPT-2-style models: Conv1D projections whose weights are stored (in, out), the transpose of torch's Linear.

peft's LoRA factors have the same shapes for both (A: r × in, B: out × r), so every
exchanged array is unchanged; what differs is where the server or a trainer adds a
dense ΔW = s·B·A to a base weight (the evaluator, FLoRA's merged base) — it takes ΔWᵀ
there — and `fan_in_fan_out` in the adapter config, so plain peft reloads an export.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.harness import read_run, run_inprocess
from corolla.config import RunConfig
from corolla.learning import models
from corolla.learning.tasks import build_task
from corolla.learning.train_loop import AdapterModel, evaluate_model, initial_adapter
from corolla.server.evaluation import TaskEvaluator
from corolla.server.records import read_jsonl
from corolla.spec import LoraSpec, TaskSpec
from corolla.strategies import MergedModel
from corolla.strategies.lora_ops import delta

TARGETS = ("c_attn", "c_proj")  # c_attn (32 → 96) and the square attn.c_proj (32 → 32): a missed transpose of a
# square weight would be silent, of a non-square one a shape error


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny seeded GPT-2 saved as a user's folder, with SmolLM2's tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = models.load_tokenizer(models.smollm2_path())
    d = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _random_adapter(task, rank: int, lora: LoraSpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.normal(0, 0.2, v.shape).astype(np.float32) for k, v in initial_adapter(task, rank, lora, 0).items()}


def test_gpt2_folder_gets_conv1d_lora_with_fan_in_fan_out(gpt2_dir):
    RunConfig(task="causal-lm", model=str(gpt2_dir))  # accepted (it used to be refused by name)
    task = build_task(TaskSpec(task="causal-lm", model=str(gpt2_dir)))
    assert task.lora_config(4, LoraSpec()).fan_in_fan_out is True
    start = initial_adapter(task, 4, LoraSpec(), seed=0)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in start} == {"c_attn"}  # peft's default for gpt2
    a = start["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    b = start["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert a.shape == (4, 32) and b.shape == (96, 4)  # ΔW = s·B·A is (out, in), like a Linear's


def test_a_dense_delta_on_conv1d_weights_equals_the_adapter(gpt2_dir):
    """FLoRA's merged base (trainer) and the server's evaluation both add ΔWᵀ to a Conv1D weight."""
    task = build_task(TaskSpec(task="causal-lm", model=str(gpt2_dir), max_length=96))
    lora = LoraSpec(target_modules=TARGETS)
    arrays = _random_adapter(task, 4, lora)
    layers = sorted({k.split(".lora_")[0] for k in arrays})
    deltas = {layer: delta(arrays[f"{layer}.lora_A.weight"], arrays[f"{layer}.lora_B.weight"], lora.scale(4))
              for layer in layers}
    enc = task.encode(task.builtin_test().select(range(6)))
    with_adapter = AdapterModel(task, torch.device("cpu"))
    want = evaluate_model(with_adapter.load(arrays, 4, lora), enc, torch.device("cpu"), task)

    merged_base = AdapterModel(task, torch.device("cpu"))
    merged_base.set_base_deltas({f"{layer}.base_delta": dw for layer, dw in deltas.items()})
    zero = {k: (np.zeros_like(v) if ".lora_B." in k else v) for k, v in arrays.items()}  # the adapter adds nothing
    got = evaluate_model(merged_base.load(zero, 4, lora), enc, torch.device("cpu"), task)
    assert got.loss == pytest.approx(want.loss, abs=1e-5) and got.accuracy == want.accuracy

    evaluator = TaskEvaluator(RunConfig(task="causal-lm", model=str(gpt2_dir), max_length=96, eval_examples=6),
                              device="cpu")
    server = evaluator.evaluate(MergedModel(deltas=deltas, dense={}))
    assert server.loss == pytest.approx(want.loss, abs=1e-5) and server.accuracy == want.accuracy
    bare = evaluate_model(build_task(task.spec).load_base_model(), enc, torch.device("cpu"), task)
    assert abs(want.loss - bare.loss) > 1e-3  # the adapter changes the loss, so the equalities above can fail


@pytest.mark.parametrize("aggregation", ["fedhl", "flora"])
def test_gpt2_causal_lm_federation_with_mixed_ranks_and_export(gpt2_dir, tmp_path, aggregation):
    """In-process federation of real trainers on the GPT-2 folder; the exported adapter reloads in plain peft."""
    from corolla.learning.export import export_adapter, load_exported

    cfg = {"task": "causal-lm", "model": str(gpt2_dir), "max-length": 96, "num-rounds": 2, "clients-per-round": 3,
           # lr 0.01: at 0.05 FedHL oscillates on this random 2-layer GPT-2 (test loss 10.814 -> 10.776 -> 10.815 over
           # two versions, 10.839 at the third), at 0.01 it descends (10.814 -> 10.758 -> 10.761 -> 10.750)
           "local-steps": 5, "batch-size": 4, "lr": 0.01, "ranks": "2,4,8", "eval-examples": 8,
           "aggregation": aggregation, "lora-target-modules": ",".join(TARGETS)}
    run_inprocess(cfg, nodes=3, out_dir=tmp_path)
    summary, metrics = read_run(tmp_path)
    assert summary["versions"] == 2 and summary["rejected_updates"] == 0 and summary["failed_replies"] == 0
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert {u["rank"] for u in read_jsonl(tmp_path / "updates.jsonl") if u["status"] == "accepted"} == {2, 4, 8}
    if aggregation == "flora":
        return  # FLoRA's global model is its merged base, which an adapter folder cannot hold at full rank
    out = tmp_path / "adapter"
    report = export_adapter(tmp_path, out, rank=32)
    assert report["relative_error"] < 1e-6
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    task, model = load_exported(tmp_path, out)  # PeftModel.from_pretrained(base, folder)
    got = evaluate_model(model, task.encode(task.builtin_test().select(range(8))), torch.device("cpu"), task)
    assert got.loss == pytest.approx(metrics[-1]["loss"], abs=1e-4) and got.accuracy == metrics[-1]["accuracy"]
