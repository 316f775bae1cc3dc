"""The `corolla` command refuses bad input with one clear line and a non-zero exit."""

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from corolla.launch import processes as launch


def corolla(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corolla.cli", *args], capture_output=True, text=True, timeout=120,
                          env=launch.flower_env(Path(tempfile.gettempdir()) / "corolla-flwr-test"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["trainer", "--host", "0.0.0.0"], "corolla trainer: --host 0.0.0.0 is not a loopback address; the trainer's "
                                           "service has no TLS and no authentication"),
        (["sim", "--out", "/tmp/x", "--set", "num-round=3"], "unknown configuration key(s) ['num-round']; valid keys"),
        (["sim", "--out", "/tmp/x", "--set", "selector=best"], "`selector` = 'best' is not valid"),
        (["client", "--superlink", "127.0.0.1:1", "--data", "/nope.csv"], "silo file '/nope.csv' does not exist"),
        (["trainer", "--data", "/nope.csv"], "silo file '/nope.csv' does not exist"),
        (["client", "--superlink", "127.0.0.1:1", "--rank", "big", "--model", "tiny-bert"], "--rank 'big' is neither"),
        (["report", "/tmp"], "is not a run directory"),
        (["status", "/tmp"], "'/tmp' is not a corolla run directory (no config.json)"),
    ],
)
def test_bad_input_exits_with_a_clear_message(args, message):
    out = corolla(*args)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]


def test_status_of_a_running_async_run(tmp_path):
    """A run directory written by hand as the server writes it: the status names versions, refusals and staleness."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({"mode": "async", "async-rule": "fedbuff", "aggregation": "fedhl",
                                                      "selector": "random", "num-rounds": 10}))
    rows = {
        "metrics.jsonl": [{"version": 0, "accuracy": 0.2, "loss": 1.6, "wall_s": 3.0, "bytes_down": 0, "bytes_up": 0},
                          {"version": 4, "accuracy": 0.61, "loss": 1.1, "wall_s": 41.2, "bytes_down": 2_500_000,
                           "bytes_up": 2_000_000, "in_flight": 3},
                          {"version": 6, "accuracy": 0.55, "loss": 1.2, "wall_s": 60.0, "bytes_down": 3_000_000,
                           "bytes_up": 2_500_000, "in_flight": 2}],
        "nodes.jsonl": [{"node": 1, "status": "ok", "rank": 2}, {"node": 2, "status": "ok", "rank": 8},
                        {"node": 3, "status": "error", "rank": None}],
        "updates.jsonl": [{"node": 1, "status": "accepted", "staleness": 0, "reason": ""},
                          {"node": 2, "status": "accepted", "staleness": 3, "reason": ""},
                          {"node": 2, "status": "rejected", "reason": "node 2: reply has rank 4, it was sent rank 8"}],
    }
    for name, lines in rows.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = corolla("status", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"run {tmp_path}: running · async (fedbuff) · aggregation fedhl · selector random",
        "version 6 of 10 · accuracy 0.5500 (best 0.6100 at version 4) · loss 1.2000 · 60s",
        "traffic: 3.0 MB to clients, 2.5 MB back · 2 jobs in flight",
        "nodes: 2 profiled, ranks {2: 1, 8: 1}, 1 unusable",
        "updates: 2 accepted, 1 rejected, 0 failed",
        "staleness of applied updates: mean 1.50, max 3",
        "  rejected (node 2): node 2: reply has rank 4, it was sent rank 8",
    ]
    (tmp_path / "summary.json").write_text("{}")
    assert "finished" in corolla("status", str(tmp_path), "--watch", "5").stdout.splitlines()[0]


def test_status_counts_each_node_by_its_latest_row(tmp_path):
    """A node's rows in nodes.jsonl change with it (ok → unavailable → ok): the status counts where each stands now."""
    import json

    from corolla.server.status import run_status

    (tmp_path / "config.json").write_text(json.dumps({"mode": "sync", "aggregation": "fedavg", "selector": "random"}))
    rows = [{"node": 1, "status": "ok", "rank": 4}, {"node": 2, "status": "ok", "rank": 4},
            {"node": 2, "status": "unavailable", "reason": "node 2 replied with error 2: the trainer at ..."},
            {"node": 3, "status": "unavailable", "reason": "profile failed: the trainer at ..."},
            {"node": 2, "status": "ok", "rank": 4}, {"node": 4, "status": "refused", "reason": "runs corolla 0.1"},
            {"node": 1, "status": "unavailable", "reason": "node 1 replied with error 5: ..."}]
    (tmp_path / "nodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = run_status(tmp_path).splitlines()
    assert "nodes: 1 profiled, ranks {4: 1}, 2 unavailable (no work until a profile query answers), 1 unusable" in lines
