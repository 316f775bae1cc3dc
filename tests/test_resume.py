"""Checkpoint and resume: a server that dies mid-run continues from its last aggregation, nothing applied twice or lost."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

from corolla.config import ConfigError, RunConfig
from corolla.server import checkpoint, report
from corolla.server.async_driver import run_async
from corolla.server.clock import FakeClock
from corolla.server.federation import Federation
from corolla.server.records import RunDirError, read_jsonl
from corolla.server.sync_driver import run_sync
from tests.fakes import FakeEvaluator, FakeGrid, FakeNode

pytestmark = pytest.mark.slow  # starts real processes (SuperLink, SuperNodes, trainers, Ray)

SYNC = {"num-rounds": 5, "clients-per-round": 3, "min-nodes": 5, "round-timeout": 30, "lr-decay": 1.0,
        "server-optimizer": "fedavgm", "server-momentum": 0.5}
# fast nodes finish three at an instant and K = 2, so checkpoints hold a received, not yet applied update, while
# the slow nodes' jobs are in flight
ASYNC = {"mode": "async", "async-rule": "fedbuff", "buffer-size": 2, "concurrency": 5, "num-rounds": 6, "min-nodes": 5,
         "round-timeout": 30, "lr-decay": 1.0}


@pytest.fixture(autouse=True)
def fast_and_identified(monkeypatch):
    monkeypatch.setattr(report, "plot_curves", lambda *args, **kwargs: None)
    # Messages built outside a running app need a task identity (platform.md).
    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


class Crash(Exception):
    """Stands in for SIGKILL: the server stops between two calls, with whatever it wrote on disk."""


class CrashingGrid(FakeGrid):
    """A FakeGrid that stops the server after `after` train messages have been pushed."""

    def __init__(self, nodes, clock, after: int) -> None:
        super().__init__(nodes, clock)
        self.after = after

    def push_messages(self, messages):
        messages = list(messages)
        if len(self.train_jobs()) + len(messages) > self.after and any(m.metadata.message_type == "train"
                                                                        for m in messages):
            raise Crash
        return super().push_messages(messages)


_ID_BLOCKS = itertools.count(1, 100_000)


def nodes(equal_delays: bool = False) -> list[FakeNode]:
    delays = [2.0, 2.0, 2.0, 7.0, 7.0] if equal_delays else [1.0 + i for i in range(1, 6)]
    return [FakeNode(i, delay=delays[i - 1], step=0.01 * i, num_examples=10 * i) for i in range(1, 6)]


def make(tmp: Path, base: dict, grid_cls=FakeGrid, **kw) -> Federation:
    clock = FakeClock()
    cfg = RunConfig.from_mapping({"out-dir": str(tmp), **base, **kw.pop("keys", {})})
    fleet = nodes(equal_delays=cfg.mode == "async")
    grid = grid_cls(fleet, clock, **kw) if kw else grid_cls(fleet, clock)
    grid._ids = itertools.count(next(_ID_BLOCKS))  # message ids stay unique across server processes, as Flower's are
    return Federation(cfg, grid, FakeEvaluator(), clock=clock)


def play(fed: Federation) -> dict:
    return (run_async if fed.cfg.mode == "async" else run_sync)(fed)


def model(run: Path) -> dict[str, np.ndarray]:
    with np.load(run / "global.npz") as z:
        return {k: z[k] for k in z.files}


def accepted(run: Path) -> list[tuple]:
    return [(u["node"], u["base_version"], u["applied_version"], round(u["weight"], 12))
            for u in read_jsonl(run / "updates.jsonl") if u["status"] == "accepted"]


def test_sync_resume_after_a_crash_equals_the_unbroken_run(tmp_path):
    whole = tmp_path / "whole"
    play(make(whole, SYNC))
    broken = tmp_path / "broken"
    with pytest.raises(Crash):  # dies while pushing round 4's jobs: rounds 1-3 are checkpointed
        play(make(broken, SYNC, CrashingGrid, after=9))
    assert json.loads((broken / "checkpoint.json").read_text())["round"] == 3
    play(make(broken, SYNC, keys={"existing-run": "resume"}))

    for k, v in model(whole).items():  # FedAvgM's velocity was restored too: the momentum steps match
        np.testing.assert_allclose(model(broken)[k], v, rtol=1e-6, atol=1e-9, err_msg=k)
    assert accepted(broken) == accepted(whole)  # every accepted update exactly once, same weights
    assert [m["version"] for m in read_jsonl(broken / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5]
    assert [m["accuracy"] for m in read_jsonl(broken / "metrics.jsonl")] == pytest.approx(
        [m["accuracy"] for m in read_jsonl(whole / "metrics.jsonl")])
    summary = json.loads((broken / "summary.json").read_text())
    assert summary["versions"] == 5 and summary["wall_s"] > 0


def test_async_resume_keeps_buffered_updates_and_records_lost_jobs(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Crash):
        play(make(run, ASYNC, CrashingGrid, after=7))
    saved = checkpoint.load(run)
    buffered = [(u.node_id, u.job_id) for u in saved["rule"].buffer]
    in_flight = saved["in_flight"]
    assert saved["version"] >= 1 and in_flight and buffered  # a crash with work both buffered and in flight
    play(make(run, ASYNC, keys={"existing-run": "resume"}))

    rows = read_jsonl(run / "updates.jsonl")
    acc = [r for r in rows if r["status"] == "accepted"]
    assert Counter(r["job"] for r in acc).most_common(1)[0][1] == 1  # no update applied twice
    assert {j for _, j in buffered} <= {r["job"] for r in acc}  # buffered before the crash, applied after
    lost = [r for r in rows if r["status"] == "failed" and "in flight when the server stopped" in r["reason"]]
    assert sorted(r["node"] for r in lost) == sorted(j["node"] for j in in_flight)
    versions = [m["version"] for m in read_jsonl(run / "metrics.jsonl")]
    assert versions == sorted(set(versions)) and versions[-1] == 6
    assert Counter(r["applied_version"] for r in acc) == dict.fromkeys(range(1, 7), 2)  # K = 2 per version


def test_an_existing_run_is_never_overwritten_silently(tmp_path):
    play(make(tmp_path, {**SYNC, "num-rounds": 1}))
    with pytest.raises(RunDirError, match="holds an earlier run; continue it with --resume .* or replace it with "
                                          "--overwrite"):
        make(tmp_path, SYNC)
    play(make(tmp_path, {**SYNC, "num-rounds": 1}, keys={"existing-run": "overwrite"}))
    assert [m["version"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1]


def test_resume_may_extend_the_run_but_not_change_what_it_computes(tmp_path):
    play(make(tmp_path, {**SYNC, "num-rounds": 2}))
    with pytest.raises(ConfigError, match=r"configured differently \(lr: 0.003 → 0.01\).*only \['num-rounds'"):
        make(tmp_path, {**SYNC, "num-rounds": 2, "lr": 0.01}, keys={"existing-run": "resume"})
    play(make(tmp_path, {**SYNC, "num-rounds": 4}, keys={"existing-run": "resume"}))
    assert [m["version"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("damage,match", [
    (lambda d: (d / "checkpoint.pkl").write_bytes((d / "checkpoint.pkl").read_bytes()[:-10]),
     r"does not match its checksum in checkpoint.json \(truncated or altered: \d+ bytes, \d+ expected\)"),
    (lambda d: (d / "checkpoint.pkl").write_bytes(b"x" + (d / "checkpoint.pkl").read_bytes()[1:]),
     "does not match its checksum"),
    (lambda d: (d / "checkpoint.json").write_text("{"), "is not valid JSON"),
    (lambda d: (d / "checkpoint.json").unlink(), "holds no checkpoint"),
])
def test_a_corrupt_checkpoint_is_refused_and_nothing_half_loads(tmp_path, damage, match):
    play(make(tmp_path, {**SYNC, "num-rounds": 2}))
    before = (tmp_path / "updates.jsonl").read_bytes()
    damage(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match=match):
        make(tmp_path, {**SYNC, "num-rounds": 3}, keys={"existing-run": "resume"})
    assert (tmp_path / "updates.jsonl").read_bytes() == before  # the records were not touched


def test_records_written_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    play(make(tmp_path, {**SYNC, "num-rounds": 2}))
    offsets = json.loads((tmp_path / "checkpoint.json").read_text())["offsets"]
    with open(tmp_path / "updates.jsonl", "a") as f:
        f.write('{"node": 9, "status": "accepted"}\n{"node": 9, "sta')  # a round in progress and a torn line
    assert checkpoint.truncate_records(tmp_path, offsets)["updates.jsonl"] == 2
    assert len(read_jsonl(tmp_path / "updates.jsonl")) == offsets["updates.jsonl"]


# ---- real processes: `corolla sim` killed with SIGKILL, then `corolla sim --resume` -----------------------------
def _kill_everything_of(out: Path) -> None:
    """SIGKILL every process group whose command line names the run directory (sim CLI, SuperLink, flwr run, Ray)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(out) in cmd and int(pid) != os.getpid():
            try:
                os.killpg(os.getpgid(int(pid)), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def test_sigkilled_simulation_resumes_to_the_same_model(tmp_path):
    from corolla.launch import processes as launch
    from tests.conftest import COROLLA, processes

    sets = {"model": "tiny-bert", "max-length": 32, "num-rounds": 4, "clients-per-round": 3, "min-nodes": 3,
            "local-steps": 2, "lr": 0.02, "seed": 3}

    def sim(out: Path, *extra: str) -> subprocess.Popen:
        cmd = [*COROLLA, "sim", "--out", str(out), "--nodes", "3", *extra]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        return launch.start(cmd, launch.flower_env(tmp_path / f"home-{out.name}"), log_path=tmp_path / f"{out.name}.log")

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    with processes() as procs:
        procs.append(p := sim(whole))
        assert p.wait(timeout=400) == 0, (tmp_path / "whole.log").read_text()[-3000:]
        procs.append(p := sim(broken))
        launch.wait_for(lambda: len(read_jsonl(broken / "metrics.jsonl")) >= 3, 300, "two versions", proc=p)
        _kill_everything_of(broken)
        p.wait(timeout=30)
        killed_at = json.loads((broken / "checkpoint.json").read_text())["version"]
        assert killed_at < 4
        procs.append(p := sim(broken, "--resume"))
        assert p.wait(timeout=400) == 0, (tmp_path / "broken.log").read_text()[-3000:]
    # the same model: aggregation accumulates in float64, so the order replies arrive in does not change it
    # (measured bit-identical; the bound leaves one float32 rounding at a float64 tie)
    for k, v in model(whole).items():
        np.testing.assert_allclose(model(broken)[k], v, rtol=1e-6, atol=1e-9, err_msg=k)
    acc = [(u["node"], u["applied_version"]) for u in read_jsonl(broken / "updates.jsonl") if u["status"] == "accepted"]
    assert Counter(v for _, v in acc) == {1: 3, 2: 3, 3: 3, 4: 3} and len(set(acc)) == len(acc)
    assert [m["version"] for m in read_jsonl(broken / "metrics.jsonl")] == [0, 1, 2, 3, 4]


def test_a_run_saved_before_a_key_existed_resumes_at_that_keys_default():
    """A checkpoint from an earlier corolla lacks the keys added since; it ran with their defaults."""
    from corolla.config import RunConfig
    from corolla.server.federation import config_changes

    now = RunConfig(num_rounds=5).to_mapping()
    saved = {k: v for k, v in now.items() if k not in ("wire-dtype", "fedhl-fold")}
    assert config_changes(saved, now) == ""
    changed = RunConfig(num_rounds=5, wire_dtype="bfloat16").to_mapping()
    assert config_changes(saved, changed) == "wire-dtype: 'float32' → 'bfloat16'"
    assert config_changes({**saved, "num-rounds": 3}, now, allowed=("num-rounds",)) == ""
    assert config_changes({**saved, "lr": 0.1}, now) == f"lr: 0.1 → {now['lr']!r}"
