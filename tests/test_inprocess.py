"""The whole server stack (Federation, drivers, validation, selectors) on the in-process Grid."""

from __future__ import annotations

import pytest

from bench.harness import read_run, run_inprocess
from corolla.server.records import read_jsonl


@pytest.mark.parametrize("selector", ["heteroselect", "oort"])
def test_image_task_with_selectors_records_scores(tmp_path, selector):
    cfg = {"task": "image-classification", "model": "cnn", "dataset": "fashion-mnist", "selector": selector,
           "num-rounds": 3, "clients-per-round": 3, "local-steps": 5, "batch-size": 32, "lr": 3e-3, "prox-mu": 0.1,
           "dirichlet-alpha": 0.5}  # at 0.1, Oort's duration-driven picks under CI load once ended 3 rounds on one class
    run_inprocess(cfg, nodes=8, out_dir=tmp_path)
    summary, metrics = read_run(tmp_path)
    assert summary["versions"] == 3 and summary["rejected_updates"] == 0
    assert metrics[-1]["accuracy"] > metrics[0]["accuracy"]  # CNN from scratch: round 0 is chance
    sel = read_jsonl(tmp_path / "selection.jsonl")
    assert len(sel) == 3 and all(len(set(s["picked"])) == 3 and s["candidates"] == 8 for s in sel)
    assert all(len(s["scores"]) >= 3 and all("score" in v for v in s["scores"].values()) for s in sel)
    updates = read_jsonl(tmp_path / "updates.jsonl")
    assert all(u["rank"] == 0 for u in updates)  # full-model task: no adapter rank


def test_async_fedfix_in_process(tmp_path):
    cfg = {"task": "image-classification", "model": "cnn", "dataset": "fashion-mnist", "mode": "async",
           "async-rule": "fedfix", "interval": 0.05, "concurrency": 3, "num-rounds": 3, "local-steps": 2,
           "batch-size": 16}
    run_inprocess(cfg, nodes=4, out_dir=tmp_path)
    summary, _ = read_run(tmp_path)
    assert summary["versions"] == 3 and summary["mode"] == "async"
    accepted = [u for u in read_jsonl(tmp_path / "updates.jsonl") if u["status"] == "accepted"]
    assert accepted and all(u["weight"] > 0 for u in accepted)


def test_a_lora_spec_the_trainers_cannot_honour_is_recorded_with_the_reason(tmp_path):
    """The server owns the LoRA spec; CPU trainers asked for bf16 refuse each job, and the run records why."""
    cfg = {"model": "tiny-bert", "max-length": 32, "num-rounds": 1, "clients-per-round": 2, "local-steps": 1,
           "lora-dtype": "bfloat16", "lora-rank": 4}
    run_inprocess(cfg, nodes=2, out_dir=tmp_path)
    updates = read_jsonl(tmp_path / "updates.jsonl")
    assert len(updates) == 2 and all(u["status"] == "failed" for u in updates)
    assert all("lora-dtype=bfloat16, which needs a CUDA device" in u["reason"] for u in updates)
    summary, _ = read_run(tmp_path)
    assert summary["versions"] == 0 and summary["failed_replies"] == 2


def test_a_lora_spec_the_model_cannot_take_stops_the_server_with_the_fix(tmp_path):
    from corolla.config import ConfigError

    cfg = {"model": "tiny-bert", "max-length": 32, "num-rounds": 1, "lora-target-modules": "q_proj,v_proj"}
    with pytest.raises(ConfigError, match=r"lora-target-modules \['q_proj', 'v_proj'\] cannot be applied to this "
                                          r"model .* set lora-target-modules to module names the model has"):
        run_inprocess(cfg, nodes=2, out_dir=tmp_path)
