"""The virtual-clock simulator: the real drivers, strategies and ClientApp on a discrete-event clock.

Jobs run for real (the image task's small CNN, in-process, through corolla.client.app.app; every test but
the last shares one 4-node partition, so the silos are encoded once),
but each takes local-steps × virtual-step-s × its slowdown in simulated seconds, whatever
the host does; the same seed gives the same run directory.
"""

from __future__ import annotations

import math
import time

import pytest
from flwr.app import MessageType

from corolla.client.app import app as client_app
from corolla.config import ConfigError, RunConfig
from corolla.launch.virtual import FIRST_NODE_ID, NominalDurations, VirtualGrid, run_virtual
from corolla.server.async_driver import run_async
from corolla.server.clock import FakeClock, SystemClock, VirtualClock
from corolla.server.evaluation import TaskEvaluator
from corolla.server.federation import Federation
from corolla.server.records import read_jsonl
from corolla.server.sync_driver import run_sync

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

IMAGE = {"task": "image-classification", "model": "cnn", "dataset": "fashion-mnist", "local-steps": 2,
         "batch-size": 16, "eval-examples": 200, "lr-decay": 1.0, "clock": "virtual"}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One job runs at a time: one thread, as `corolla sim --clock virtual` uses by default (--cpus-per-client 1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(tmp_path, nodes: int, **overrides) -> RunConfig:
    """The tiny image configuration on the virtual clock (`overrides`: kebab-case keys)."""
    return RunConfig.from_mapping({**IMAGE, "min-nodes": nodes, "out-dir": str(tmp_path), **overrides})


class SpyGrid(VirtualGrid):
    """A VirtualGrid that remembers when (virtual and real time) each train job was pushed and answered."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pushed: dict[str, tuple[int, float]] = {}  # message id -> (node id, virtual push time)
        self.answered: dict[str, float] = {}  # message id -> virtual time the driver got the reply

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for mid, m in zip(ids, messages):
            if m.metadata.message_type == MessageType.TRAIN:
                self.pushed[mid] = (m.metadata.dst_node_id, self.clock.monotonic())
        return ids

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        for r in replies:
            if str(r.metadata.reply_to_message_id) in self.pushed:
                self.answered[str(r.metadata.reply_to_message_id)] = self.clock.monotonic()
        return replies


def run_spied(cfg: RunConfig, nodes: int, app=client_app) -> tuple[SpyGrid, dict]:
    clock = VirtualClock()
    grid = SpyGrid(nodes, cfg, app, clock)
    fed = Federation(cfg, grid, TaskEvaluator(cfg), clock=clock)
    return grid, (run_async if cfg.mode == "async" else run_sync)(fed)


# ---- the clock ----------------------------------------------------------------------------
def test_virtual_clock_jumps_to_the_next_wake_up_then_settles_once_at_that_instant():
    clock = VirtualClock()
    clock.sleep(0.05)
    assert clock.monotonic() == 0.05  # nothing scheduled: it advances by dt
    clock.wake_at(5.0)
    clock.wake_at(3.0)
    clock.wake_at(3.0)  # duplicates merge
    clock.wake_at(0.01)  # the past is ignored
    clock.sleep(0.05)
    assert clock.monotonic() == clock.time() == 3.0  # the earliest wake-up, however far
    clock.sleep(0.05)
    assert clock.monotonic() == 3.0  # one more pass at the event's instant (dispatch the freed node)
    clock.sleep(0.05)
    assert clock.monotonic() == 5.0
    clock.sleep(0.05)
    clock.sleep(0.05)
    assert clock.monotonic() == pytest.approx(5.05)


def test_advance_to_passes_wake_ups_and_never_goes_back():
    clock = VirtualClock(start=10.0)
    clock.wake_at(11.0)
    clock.wake_at(12.0)
    clock.advance_to(11.5)
    assert clock.next_wake() == 12.0
    clock.advance_to(1.0)
    assert clock.monotonic() == 11.5


def test_real_and_fake_clocks_ignore_wake_ups():
    fake = FakeClock(start=1.0)
    fake.wake_at(5.0)
    fake.sleep(0.5)
    assert fake.monotonic() == 1.5
    t0 = time.monotonic()
    SystemClock().wake_at(t0 + 100)  # a no-op: real time gets there by itself
    assert time.monotonic() - t0 < 1


def test_nominal_durations_are_steps_times_step_times_slowdown_with_seeded_jitter(tmp_path):
    cfg = config(tmp_path, 4, **{"speed-profile": "tiers", "speed-tiers": "1,2,5,10", "virtual-step-s": 0.25})
    d = NominalDurations(cfg)
    assert [d(p, 0, 4) for p in range(4)] == [1.0, 2.0, 5.0, 10.0]
    jittered = NominalDurations(config(tmp_path, 4, **{"virtual-jitter": 0.5, "seed": 3}))
    again = NominalDurations(config(tmp_path, 4, **{"virtual-jitter": 0.5, "seed": 3}))
    draws = [jittered(1, j, 10) for j in range(5)]
    assert draws == [again(1, j, 10) for j in range(5)] and len(set(draws)) == 5


# ---- configuration and command line --------------------------------------------------------
def test_virtual_keys_are_refused_on_the_real_clock_and_in_deployment(tmp_path):
    with pytest.raises(ConfigError, match=r"`virtual-step-s` = 0.2 would be ignored: it applies only with "
                                          r"clock=virtual \(this run has clock=real\)"):
        RunConfig.from_mapping({"virtual-step-s": 0.2})
    with pytest.raises(ConfigError, match=r"\['clock'\] describe a simulated fleet"):
        config(tmp_path, 2).check_deployment()


def test_sim_clock_option_sets_the_clock_key(tmp_path):
    from corolla.cli import _config, build_parser

    args = build_parser().parse_args(["sim", "--clock", "virtual", "--out", str(tmp_path), "--set", "virtual-step-s=0.2"])
    cfg = _config(args)
    assert (cfg.clock, cfg.virtual_step_s) == ("virtual", 0.2)
    assert _config(build_parser().parse_args(["sim", "--out", str(tmp_path)])).clock == "real"


# ---- (a) a job lasts its nominal duration, whatever the host does ---------------------------------
def test_a_slow_clients_job_takes_exactly_its_nominal_virtual_duration(tmp_path):
    """Push → reply is local-steps × virtual-step-s × slowdown on the clock, even when the host is slowest for the
    fastest clients (here: a real 0.2 s stall on every 1× job), and the trainers never sleep."""
    from corolla.client.local import trainer_for

    def stalling_app(msg, ctx):
        if msg.metadata.message_type == MessageType.TRAIN and ctx.node_id % 2 == 0:
            time.sleep(0.2)  # the host is slow for the 1× nodes: the virtual clock must not notice
        return client_app(msg, ctx)

    cfg = config(tmp_path, 4, **{"mode": "async", "async-rule": "fedasync", "concurrency": 4, "num-rounds": 12,
                                 "speed-profile": "tiers", "speed-tiers": "1,4", "local-steps": 3,
                                 "virtual-step-s": 0.25})
    grid, summary = run_spied(cfg, 4, stalling_app)
    nominal = {FIRST_NODE_ID + p: 3 * 0.25 * s for p, s in enumerate((1, 4, 1, 4))}
    assert grid.answered
    for mid, at in grid.answered.items():
        node, pushed = grid.pushed[mid]
        assert at - pushed == pytest.approx(nominal[node], abs=1e-9)
    slow_jobs = [m for m in grid.answered if grid.pushed[m][0] % 2 == 1]
    assert slow_jobs, "no 4× job finished"
    assert all(trainer_for(grid.contexts[n]).slowdown == 1.0 for n in grid.contexts)  # no real stretching
    accepted = [u for u in read_jsonl(tmp_path / "updates.jsonl") if u["status"] == "accepted"]
    assert {u["duration_s"] for u in accepted} == {0.75, 3.0}  # telemetry (Oort's t_i) is the simulated duration
    assert all(u["queue_s"] == 0.0 for u in accepted)


def test_a_synchronous_round_lasts_exactly_as_long_as_its_slowest_client(tmp_path):
    cfg = config(tmp_path, 4, **{"clients-per-round": 4, "num-rounds": 3, "speed-profile": "tiers",
                                 "speed-tiers": "1,2,5,10", "virtual-step-s": 0.5})
    summary = run_virtual(cfg, 4, client_app)
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert [m["wall_s"] for m in metrics] == [0.0, 10.0, 20.0, 30.0]  # 2 steps × 0.5 s × 10 per round
    assert summary["versions"] == 3 and summary["wall_s"] == 30.0


def test_a_job_longer_than_its_ttl_expires_on_the_virtual_clock(tmp_path):
    cfg = config(tmp_path, 4, **{"mode": "async", "async-rule": "fedasync", "concurrency": 4, "num-rounds": 12,
                                 "speed-profile": "tiers", "speed-tiers": "1,10", "virtual-step-s": 0.5,
                                 "round-timeout": 5.0})
    grid, summary = run_spied(cfg, 4)
    failed = [u for u in read_jsonl(tmp_path / "updates.jsonl") if u["status"] == "failed"]
    assert summary["versions"] == 12 and failed
    assert all(u["node"] % 2 == 1 and "exceeds its TTL 5s" in u["reason"] and u["wall_s"] == 5.0
               for u in failed)


def test_a_time_budget_stops_the_run_at_the_budget_in_simulated_seconds(tmp_path):
    cfg = config(tmp_path, 4, **{"mode": "async", "async-rule": "fedasync", "concurrency": 4, "num-rounds": 1000,
                                 "speed-profile": "tiers", "virtual-step-s": 0.25, "time-budget": 3.0})
    summary = run_virtual(cfg, 4, client_app)
    assert summary["wall_s"] == 3.0 and summary["versions"] >= 3  # rounded to ms: just past the budget
    assert all(u["wall_s"] <= 3.0 for u in read_jsonl(tmp_path / "updates.jsonl"))


def test_step_time_zero_is_measured_once_from_the_first_job(tmp_path):
    cfg = config(tmp_path, 4, **{"mode": "async", "async-rule": "fedasync", "concurrency": 4, "num-rounds": 3,
                                 "speed-profile": "tiers", "speed-tiers": "1,3", "virtual-step-s": 0.0})
    grid, summary = run_spied(cfg, 4)
    step = grid.durations.step_s
    assert summary["versions"] == 3 and 0 < step < 5  # a CNN step on a CPU
    for mid, at in grid.answered.items():
        node, pushed = grid.pushed[mid]
        assert at - pushed == pytest.approx(2 * step * (1, 3)[(node - FIRST_NODE_ID) % 2], rel=1e-12)


# ---- (b) every driver and rule completes on the virtual clock -------------------------------------
@pytest.mark.parametrize("method", [
    {"mode": "sync", "clients-per-round": 3},
    {"mode": "async", "async-rule": "fedbuff", "concurrency": 3, "buffer-size": 2},
    {"mode": "async", "async-rule": "fedasync", "concurrency": 3},
    {"mode": "async", "async-rule": "fedfix", "concurrency": 3, "interval": 1.0},
], ids=["sync", "fedbuff", "fedasync", "fedfix"])
def test_every_driver_completes_on_the_virtual_clock(tmp_path, method):
    cfg = config(tmp_path, 4, **{"num-rounds": 3, "speed-profile": "tiers", "virtual-step-s": 0.1, **method})
    summary = run_virtual(cfg, 4, client_app)
    assert summary["versions"] == 3 and summary["clock"] == "virtual" and summary["real_s"] > 0
    assert summary["rejected_updates"] == 0 and summary["failed_replies"] == 0
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert [m["version"] for m in metrics] == [0, 1, 2, 3]
    assert all(a["wall_s"] <= b["wall_s"] for a, b in zip(metrics, metrics[1:]))
    assert metrics[-1]["accuracy"] > metrics[0]["accuracy"]  # a CNN from scratch learns something


# ---- (c) determinism ---------------------------------------------------------------------------
def test_the_same_seed_gives_the_same_run(tmp_path):
    """Versions, weights, accuracies and every (virtual) time stamp repeat; only the host's fields differ."""
    method = {"mode": "async", "async-rule": "fedbuff", "concurrency": 3, "buffer-size": 2, "num-rounds": 5,
              "speed-profile": "lognormal", "virtual-jitter": 0.3, "selector": "oort"}
    runs = []
    for name in ("a", "b"):
        run_virtual(config(tmp_path / name, 4, **method), 4, client_app)
        runs.append(tmp_path / name)
    a, b = (read_jsonl(r / "metrics.jsonl") for r in runs)
    assert a == b and len(a) == 6
    host = ("trainer_pid", "model_loads")
    ua, ub = ([{k: v for k, v in u.items() if k not in host} for u in read_jsonl(r / "updates.jsonl")] for r in runs)
    assert ua == ub and any(u["staleness"] > 0 for u in ua)
    assert read_jsonl(runs[0] / "selection.jsonl") == read_jsonl(runs[1] / "selection.jsonl")


# ---- (d) FedFix on exact boundaries ---------------------------------------------------------------
def test_fedfix_aggregates_and_redispatches_at_exact_multiples_of_its_interval(tmp_path):
    interval = 2.0
    cfg = config(tmp_path, 4, **{"mode": "async", "async-rule": "fedfix", "concurrency": 4, "num-rounds": 4,
                                 "interval": interval, "speed-profile": "tiers", "speed-tiers": "1,2,5,10",
                                 "virtual-step-s": 0.3})
    grid, summary = run_spied(cfg, 4)
    assert summary["versions"] == 4

    def on_boundary(t: float) -> bool:
        return math.isclose(t / interval, round(t / interval), abs_tol=1e-9) and t > 0

    accepted = [u for u in read_jsonl(tmp_path / "updates.jsonl") if u["status"] == "accepted"]
    assert accepted and all(on_boundary(u["wall_s"]) for u in accepted)
    assert all(on_boundary(m["wall_s"]) for m in read_jsonl(tmp_path / "metrics.jsonl")[1:])
    # a client that returned restarts at the next boundary, not at its next poll or the next reply
    restarts = [t for node in grid.contexts for t in sorted(t for n, t in grid.pushed.values() if n == node)[1:]]
    assert restarts and all(on_boundary(t) for t in restarts)


# ---- (e) 1,000 clients ------------------------------------------------------------------------------
@pytest.mark.timeout(400)
def test_a_thousand_client_asynchronous_run_takes_well_under_minutes(tmp_path):
    nodes = 1000
    cfg = config(tmp_path, nodes, **{"mode": "async", "async-rule": "fedbuff", "concurrency": 50,
                                     "buffer-size": 10, "num-rounds": 5, "speed-profile": "tiers",
                                     "local-steps": 5, "batch-size": 32})
    t0 = time.perf_counter()
    summary = run_virtual(cfg, nodes, client_app)
    real = time.perf_counter() - t0
    print(f"1,000 clients, FedBuff, 5 versions: {real:.1f}s real, {summary['wall_s']:.2f}s simulated")
    assert summary["versions"] == 5 and summary["failed_replies"] == 0
    assert sum(n["status"] == "ok" for n in read_jsonl(tmp_path / "nodes.jsonl")) == nodes
    assert real < 180
