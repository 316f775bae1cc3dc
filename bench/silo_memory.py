"""Peak memory of a trainer on a large silo file, against the file's size.

Writes a CSV silo of BBC-like text (the built-in articles repeated, valid labels),
starts `python -m corolla.client.trainer_process --data big.csv --model tiny-bert` in a
subprocess, sends it one Train call, and samples the subprocess's memory from
/proc/<pid>/status the whole time:

- peak RSS (VmHWM, the kernel's high-water mark: anonymous memory plus the
  resident pages of memory-mapped files, which the kernel reclaims under pressure);
- peak anonymous RSS (RssAnon, sampled every 50 ms): what the process really holds.

It then starts the trainer a second time, which reuses the Arrow cache.

    .venv/bin/python bench/silo_memory.py [--sizes-mb 50,300,1000] [--model tiny-bert]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from corolla.launch import processes as launch  # noqa: E402

MIB = 2**20


def write_big_csv(path: Path, size_mb: float, seed: int = 0) -> int:
    """Write a CSV silo of about `size_mb` MiB (BBC articles repeated, class-name labels); return its row count.

    One block of 2,000 rows is rendered once and written repeatedly: ≈ 1 s per 300 MiB.
    """
    import pandas as pd

    from corolla.data.silo import BBC_LABELS, builtin_split

    train, _ = builtin_split(seed=seed)
    n = min(2000, len(train))
    block = pd.DataFrame({"text": train["text"][:n], "label": [BBC_LABELS[i] for i in train["label"][:n]]})
    header, body = block.to_csv(index=False).split("\n", 1)
    data = body.encode()
    repeats = max(1, round(size_mb * MIB / len(data)))
    with path.open("wb") as f:
        f.write((header + "\n").encode())
        for _ in range(repeats):
            f.write(data)
    return repeats * n


def _status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of `pid` in bytes (empty once the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


@dataclass
class Measurement:
    """One trainer run on one silo."""

    file_bytes: int
    rows: int
    peak_rss: int
    peak_anon: int
    ready_s: float
    train_s: float
    num_examples: int
    loss: float


class _Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_anon, self.hwm = pid, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            s = _status(self.pid)
            self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0))
            self.hwm = max(self.hwm, s.get("VmHWM", 0))
            self.stop.wait(0.05)


def measure_trainer(silo: Path, cache_dir: Path, *, model: str = "tiny-bert", max_length: int = 32,
                    steps: int = 5, timeout: float = 300, rows: int = 0) -> Measurement:
    """Start a trainer on `silo`, run one Train call, return its peak memory and timings."""
    import grpc

    from corolla.client.trainer_service import lora_to_proto
    from corolla.learning.tasks import TaskSpec, build_task
    from corolla.learning.train_loop import initial_adapter
    from corolla.proto import trainer_pb2, trainer_pb2_grpc, wire
    from corolla.spec import LoraSpec

    cmd = [sys.executable, "-m", "corolla.client.trainer_process", "--data", str(silo), "--model", model, "--max-length",
           str(max_length), "--rank", "4", "--device", "cpu", "--threads", "1", "--port", "0",
           "--cache-dir", str(cache_dir)]
    env = launch.flower_env(cache_dir / "flwr")
    cache_dir.mkdir(parents=True, exist_ok=True)
    errors = (cache_dir / "trainer.log").open("wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, env=env, start_new_session=True)
    sampler = _Sampler(proc.pid)
    sampler.start()
    try:
        line = _read_line(proc, "corolla-trainer listening on", timeout, cache_dir / "trainer.log")
        ready_s = time.perf_counter() - t0
        address = line.rsplit(" ", 1)[1]
        lora = LoraSpec()
        init = initial_adapter(build_task(TaskSpec(model=model, max_length=max_length)), 4, lora, seed=0)
        req = trainer_pb2.TrainRequest(base_version=0, rank=4, local_steps=steps, batch_size=16, lr=1e-3, seed=1,
                                       software_version=wire.SOFTWARE_VERSION, arrays=wire.encode_tensors(init),
                                       lora=lora_to_proto(lora))
        with grpc.insecure_channel(address, options=wire.GRPC_OPTIONS) as channel:
            stub = trainer_pb2_grpc.TrainerStub(channel)
            profile = stub.Describe(trainer_pb2.DescribeRequest(), timeout=60)
            t1 = time.perf_counter()
            reply = stub.Train(req, timeout=timeout)
            train_s = time.perf_counter() - t1
        final = _status(proc.pid)
    finally:
        sampler.stop.set()
        sampler.join()
        launch.stop(proc)
        errors.close()
    return Measurement(file_bytes=silo.stat().st_size, rows=rows, peak_rss=max(final.get("VmHWM", 0), sampler.hwm),
                       peak_anon=sampler.peak_anon, ready_s=ready_s, train_s=train_s,
                       num_examples=profile.num_examples, loss=reply.metadata.loss_mean)


def _read_line(proc: subprocess.Popen, prefix: str, timeout: float, log: Path) -> str:
    """The child's first stdout line starting with `prefix`; its stderr in the error when it exits first."""
    box: list[str] = []

    def read() -> None:
        for raw in proc.stdout:
            if raw.decode().startswith(prefix):
                box.append(raw.decode().strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not box:
        proc.kill()
        proc.wait(10)
        err = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the trainer did not print {prefix!r} within {timeout:.0f}s (exit {proc.poll()}): {err}")
    return box[0]


def main() -> None:
    """Measure each size, print peak memory against file size, and a cached restart."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", default="50,300,1000")
    p.add_argument("--model", default="tiny-bert")
    p.add_argument("--max-length", type=int, default=32)
    args = p.parse_args()
    print(f"{'file MiB':>9} {'rows':>9} {'peak RSS MiB':>13} {'peak anon MiB':>14} {'ready s':>8} {'train s':>8} "
          f"{'restart s':>9} {'restart RSS':>11}")
    for size in (float(s) for s in args.sizes_mb.split(",")):
        with tempfile.TemporaryDirectory(prefix="corolla-silo-") as tmp:
            silo = Path(tmp) / "big.csv"
            rows = write_big_csv(silo, size)
            m = measure_trainer(silo, Path(tmp) / "cache", model=args.model, max_length=args.max_length, rows=rows)
            again = measure_trainer(silo, Path(tmp) / "cache", model=args.model, max_length=args.max_length, rows=rows)
            print(f"{m.file_bytes / MIB:9.0f} {m.rows:9d} {m.peak_rss / MIB:13.0f} {m.peak_anon / MIB:14.0f} "
                  f"{m.ready_s:8.1f} {m.train_s:8.2f} {again.ready_s:9.1f} {again.peak_rss / MIB:11.0f}", flush=True)


if __name__ == "__main__":
    main()
