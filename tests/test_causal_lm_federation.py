"""A causal-LM federation with mixed LoRA ranks: Ray simulation and real SuperLink/SuperNodes over gRPC.

The decoder is the tiny seeded Llama (SmolLM2's tokenizer and chat template, a
2-layer 64-wide body): every process builds identical weights, so the tests are
about the plumbing — instruction silos, response-only loss, FedHL over q_proj/v_proj,
perplexity and ROUGE-L at the server, `corolla generate` — not about quality (the
SmolLM2 benchmark and tests/test_models.py cover learning).
"""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from corolla.launch import processes as launch
from corolla.learning.tasks.causal_lm import CausalLM
from corolla.server.records import read_jsonl
from corolla.spec import TaskSpec
from tests.conftest import COROLLA, processes, run_sim
from tests.test_deployment import start_client, start_server

pytestmark = pytest.mark.slow  # starts real processes (SuperLink, SuperNodes, trainers, Ray)

LM = {"task": "causal-lm", "model": "tiny-llama", "max-length": 64, "local-steps": 2, "batch-size": 4,
      "eval-examples": 16, "lr": 0.01}


def check_lm_run(out, versions: int, ranks: set[int]) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"] == versions and summary["rejected_updates"] == 0
    metrics = read_jsonl(out / "metrics.jsonl")
    for m in metrics:
        assert math.isclose(m["perplexity"], math.exp(m["loss"]), rel_tol=1e-6) and 0 <= m["rouge_l"] <= 1
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    accepted = [u for u in read_jsonl(out / "updates.jsonl") if u["status"] == "accepted"]
    assert {u["rank"] for u in accepted} == ranks
    fed = json.loads((out / "config.json").read_text())
    assert fed["task"] == "causal-lm"


def test_causal_lm_simulation_with_mixed_ranks_and_generate(tmp_path):
    out = tmp_path / "run"
    sets = {**LM, "ranks": "2,4,8", "num-rounds": 2, "clients-per-round": 3, "min-nodes": 3, "evaluation": "both"}
    code, log = run_sim(tmp_path, out, 3, sets)
    assert code == 0, log[-3000:]
    check_lm_run(out, 2, {2, 4, 8})
    for m in read_jsonl(out / "metrics.jsonl"):  # the sites too: next-token accuracy, loss, ROUGE-L of their answers
        assert len(m["sites"]) == 3 and all(0 <= r["rouge_l"] <= 1 for r in m["sites"].values())
        assert math.isclose(m["site_perplexity"], math.exp(m["site_loss"]), rel_tol=1e-6)
        assert 0 <= m["site_rouge_l"] <= 1 and 0 <= m["site_accuracy"] <= 1
    gen = subprocess.run([*COROLLA, "generate", str(out), "Define the noun 'dog'.", "--max-new-tokens", "5"],
                         capture_output=True, timeout=300)
    assert gen.returncode == 0, gen.stderr.decode()[-2000:]
    assert gen.stdout.decode().startswith("> Define the noun 'dog'.\n")
    bad = subprocess.run([*COROLLA, "generate", str(tmp_path / "nope"), "hi"], capture_output=True, timeout=120)
    assert bad.returncode == 1 and b"not a corolla run directory" in bad.stderr


def test_causal_lm_over_grpc_with_jsonl_and_chat_silos(tmp_path):
    task = CausalLM(TaskSpec(task="causal-lm", model="tiny-llama"))
    silos = []
    for i in range(3):
        part = task.builtin_partition(i, 3, 0.5).select(range(40))
        path = tmp_path / f"silo{i}.jsonl"
        if i == 2:  # one site keeps chat transcripts instead of prompt/response columns
            rows = [{"messages": [{"role": "user", "content": r["prompt"]},
                                  {"role": "assistant", "content": r["response"]}]} for r in part]
        else:
            rows = [{"prompt": r["prompt"], "response": r["response"]} for r in part]
        path.write_text("\n".join(json.dumps(r) for r in rows))
        silos.append(path)
    out = tmp_path / "run"
    fleet = f"127.0.0.1:{launch.free_port()}"
    sets = {**LM, "aggregation": "fedhl", "max-rank": 8, "num-rounds": 2, "clients-per-round": 3, "min-nodes": 3,
            "round-timeout": 240}
    with processes() as procs:
        server = start_server(procs, tmp_path, out, fleet, sets)
        for i, (silo, rank) in enumerate(zip(silos, (2, 4, 8), strict=True)):
            start_client(procs, tmp_path, i, fleet, silo, rank, "--task", "causal-lm", "--model", "tiny-llama",
                         "--max-length", "64")
        stdout, _ = server.communicate(timeout=420)
        assert server.returncode == 0, stdout.decode()[-3000:]
    check_lm_run(out, 2, {2, 4, 8})
