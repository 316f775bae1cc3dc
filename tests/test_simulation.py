"""A real Ray simulation through Flower's engine (`corolla sim`), on a tiny BERT built from a config."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from corolla.server.records import read_jsonl
from tests.conftest import COROLLA, run_sim

pytestmark = pytest.mark.slow  # starts real processes (SuperLink, SuperNodes, trainers, Ray)


def test_simulation_trains_and_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    sets = {"model": "tiny-bert", "num-rounds": 2, "clients-per-round": 3, "local-steps": 3, "lr": 0.01,
            "min-nodes": 4, "max-length": 32, "checkpoint-every": 1}
    code, log = run_sim(tmp_path, out, 4, sets)
    assert code == 0, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"] == 2 and summary["rejected_updates"] == 0 and summary["failed_replies"] == 0
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["version"] for m in metrics] == [0, 1, 2]
    for key in ("version", "wall_s", "accuracy", "loss", "bytes_up", "bytes_down", "clients"):
        assert key in metrics[-1]
    assert metrics[-1]["bytes_up"] > 0 and metrics[-1]["clients"] == 3
    updates = read_jsonl(out / "updates.jsonl")
    assert len(updates) == 6 and all(u["status"] == "accepted" for u in updates)
    assert all(u["model_loads"] == 1 for u in updates)  # one base-model load per Ray actor, ever
    nodes = read_jsonl(out / "nodes.jsonl")
    assert len(nodes) == 4 and all(n["status"] == "ok" for n in nodes)
    check_export(out, tmp_path, metrics[-1])
    check_periodic_adapters(out, tmp_path)
    # FedAvg starts from peft's B = 0, so ΔW = 0: a non-zero global ΔW proves the adapter was trained and aggregated
    g = np.load(out / "global.npz")
    deltas = [g[k] for k in g.files if k.startswith("delta/")]
    assert len(deltas) == 4 and all(np.linalg.norm(d) > 0 for d in deltas)
    assert (out / "report.md").read_text().startswith("# corolla run report")
    assert (out / "curves.png").stat().st_size > 10_000
    assert (out / "config.json").exists() and json.loads((out / "config.json").read_text())["model"] == "tiny-bert"


def check_periodic_adapters(run, tmp_path):
    """`checkpoint-every=1`: a peft folder per version and one at the end, equal to `corolla export` of the run."""
    from safetensors.numpy import load_file

    for d in (run / "adapters" / "v1", run / "adapters" / "v2", run / "adapter"):
        assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file(), d
    assert not [p for p in run.rglob(".adapter*")]  # written beside and renamed into place: no leftovers
    rank = json.loads((run / "adapter" / "corolla_export.json").read_text())["rank"]
    ref = tmp_path / "ref"
    res = subprocess.run([*COROLLA, "export", str(run), "--out", str(ref), "--rank", str(rank)], capture_output=True)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    final, exported = (load_file(str(d / "adapter_model.safetensors")) for d in (run / "adapter", ref))
    assert final.keys() == exported.keys() and len(final) > 0
    for k in final:
        np.testing.assert_allclose(final[k], exported[k], rtol=0, atol=1e-6, err_msg=k)
    v1 = load_file(str(run / "adapters" / "v1" / "adapter_model.safetensors"))
    assert any(not np.allclose(v1[k], final[k]) for k in final)  # version 1's adapter is not the final one


def check_export(run, tmp_path, final):
    """`corolla export` at full rank writes a peft adapter that reproduces the server's final evaluation exactly."""
    import torch

    from corolla.learning.export import load_exported, run_config
    from corolla.learning.train_loop import evaluate_model

    out = tmp_path / "adapter"
    res = subprocess.run([*COROLLA, "export", str(run), "--out", str(out), "--rank", "64"], capture_output=True)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    report = json.loads((out / "corolla_export.json").read_text())
    assert report["rank"] == 64 and report["relative_error"] < 1e-6  # rank 64 = the tiny BERT's width: exact
    task, model = load_exported(run, out)  # plain peft: PeftModel.from_pretrained(base, folder)
    cfg = run_config(run)
    test = task.builtin_test()
    if cfg.eval_examples:
        test = test.select(range(min(cfg.eval_examples, len(test))))
    got = evaluate_model(model, task.encode(test), torch.device("cpu"), task)
    assert got.accuracy == final["accuracy"] and abs(got.loss - final["loss"]) < 1e-4
    low = subprocess.run([*COROLLA, "export", str(run), "--out", str(tmp_path / "r1"), "--rank", "1"],
                         capture_output=True)
    assert low.returncode == 0 and json.loads((tmp_path / "r1" / "corolla_export.json").read_text())["rank"] == 1
    assert json.loads((tmp_path / "r1" / "corolla_export.json").read_text())["relative_error"] > 0
    bad = subprocess.run([*COROLLA, "export", str(tmp_path), "--out", str(tmp_path / "x")], capture_output=True)
    assert bad.returncode == 1 and b"not a corolla run directory" in bad.stderr


def test_async_simulation_with_slow_clients(tmp_path):
    out = tmp_path / "run"
    # Every node is kept busy (concurrency = nodes) and a slow job lasts ten fast ones, while two fast
    # nodes make at most one version per fast job: a slow job pushed at version 0 must come back
    # before version 12 (so some update is stale and the slow nodes are measured) whatever the timing.
    sets = {"model": "tiny-bert", "mode": "async", "async-rule": "fedbuff", "num-rounds": 12, "concurrency": 4,
            "buffer-size": 2, "local-steps": 2, "max-length": 32, "speed-profile": "tiers", "speed-tiers": "1,10",
            "min-nodes": 4, "lr": 0.01}
    code, log = run_sim(tmp_path, out, 4, sets, "--cpus", "3")
    assert code == 0, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"] == 12 and summary["mode"] == "async"
    accepted = [u for u in read_jsonl(out / "updates.jsonl") if u["status"] == "accepted"]
    assert len(accepted) == 24  # K = 2 updates per version, exactly
    # staleness is measured against the version the update was applied to
    assert all(u["staleness"] == u["applied_version"] - 1 - u["base_version"] for u in accepted)
    assert any(u["staleness"] > 0 for u in accepted)
    # tiers 1x and 10x: the slow nodes' jobs are stretched to about ten times the fast nodes'
    by_node = {}
    for u in accepted:
        by_node.setdefault(u["node"], []).append(u["duration_s"])
    medians = sorted(sorted(v)[len(v) // 2] for v in by_node.values())
    assert medians[-1] > 5 * medians[0]
    weights = {round(u["weight"], 6) for u in accepted}
    assert len(weights) > 1
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["version"] for m in metrics] == list(range(13))
    assert all("mean_staleness" in m for m in metrics[1:])
