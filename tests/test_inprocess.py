"""The whole server stack (Federation, drivers, validation, selectors) on the in-process Grid."""

from __future__ import annotations

import pytest

from bench.harness import read_run, run_inprocess
from corolla.server.records import read_jsonl


@pytest.mark.parametrize("selector", ["heteroselect", "oort"])
def test_image_task_with_selectors_records_scores(tmp_path, selector):
    cfg = {"task": "image-classification", "model": "cnn", "dataset": "fashion-mnist", "selector": selector,
           "num-rounds": 3, "clients-per-round": 3, "local-steps": 5, "batch-size": 32, "lr": 3e-3, "prox-mu": 0.1,
           "dirichlet-alpha": 0.1}
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
