"""Start a silo's trainer process: `python -m corolla.client.trainer_process --data silo.csv --rank 8 --port 0`.

Prints `corolla-trainer listening on HOST:PORT` once the model is loaded and the
service is bound (tests and `corolla client` read that line), then serves until
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
import threading
from typing import Any

import grpc

from corolla.client.args import add_trainer_args, source_options
from corolla.client.trainer import Trainer, TrainerError, auto_rank, memory_bytes
from corolla.client.trainer_service import serve
from corolla.data.errors import SiloError
from corolla.data.registry import open_source
from corolla.logs import setup_logging
from corolla.spec import TaskSpec, parse_labels

log = logging.getLogger("corolla.trainer")


def build_trainer(args: argparse.Namespace) -> Trainer:
    """Load the base model once and the silo; raise SiloError/TrainerError with a clear message.

    With `--follow-run` the trainer keeps a loader for its silo, so a run of another TaskSpec
    reloads it (`Trainer.ensure`); by default it is pinned to what it was started with.
    """
    import torch

    from corolla.learning.train_loop import ComputeOptions, select_device

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = TaskSpec(task=args.task, model=args.model, dataset=args.dataset, labels=parse_labels(args.labels),
                    max_length=args.max_length, seed=args.seed)
    device = select_device(args.device)
    compute = ComputeOptions(gradient_checkpointing=getattr(args, "gradient_checkpointing", False),
                             quantize=getattr(args, "quantize", "none"))
    loader = functools.partial(load_silo, args, device, compute)
    model, data = loader(spec)
    pinned = not getattr(args, "follow_run", False)
    eval_loader = functools.partial(load_eval_set, args) if getattr(args, "eval_data", "") else None
    return Trainer(model, data, parse_rank(args.rank, str(device)), args.slowdown, spec=spec,
                   loader=None if pinned else loader, pinned=pinned, eval_loader=eval_loader)


def load_eval_set(args: argparse.Namespace, task: Any) -> Any:
    """Encode this site's own evaluation set (`--eval-data`, the columns of --data) for `task`."""
    source = open_source(args.eval_data)
    print(f"corolla-trainer evaluation set: {source.describe()}", file=sys.stderr, flush=True)
    return task.encode(task.load_silo(source, args.text_column, args.label_column))


def load_silo(args: argparse.Namespace, device: Any, compute: Any, spec: TaskSpec) -> tuple[Any, Any]:
    """Build `spec`'s model and encode this site's silo (`--data`, else its built-in partition) for it."""
    from corolla.learning.tasks import build_task
    from corolla.learning.train_loop import AdapterModel

    task = build_task(spec)
    if args.data:
        cache = {"cache_dir": args.cache_dir} if getattr(args, "cache_dir", None) else {}
        source = open_source(args.data, source_options(args))
        # always shown, whatever the log level: the one line telling a site's operator what the trainer reads
        print(f"corolla-trainer silo: {source.describe()}", file=sys.stderr, flush=True)
        ds = task.load_silo(source, args.text_column, args.label_column, **cache)
    else:
        ds = task.builtin_partition(args.partition_id, args.num_partitions, args.dirichlet_alpha)
    model = AdapterModel(task, device, compute)
    return model, task.encode(ds)


def parse_rank(value: str, device: str) -> int:
    """`--rank N` or `--rank auto` (from the device's memory, server.ranks.auto_rank)."""
    if str(value) == "auto":
        return auto_rank(device, memory_bytes(device))
    try:
        return int(value)
    except ValueError:
        raise TrainerError(f"--rank {value!r} is neither an integer nor `auto`.") from None


def start_trainer(args: argparse.Namespace, address: str, prog: str) -> tuple[grpc.Server, int] | None:
    """Load the model and silo, serve the trainer on `address`; None (reason on stderr) when it cannot start."""
    setup_logging()
    try:
        trainer = build_trainer(args)
    except (SiloError, TrainerError, ValueError) as e:
        sys.stderr.write(f"{prog}: {e}\n")
        return None
    server, bound = serve(trainer, address)
    p = trainer.describe()
    log.info("trainer ready: %d examples, rank %d, device %s, model %s", p["num_examples"], p["rank"], p["device"],
             p["model_fingerprint"])
    return server, bound


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: addresses only this machine reaches."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run_trainer(args: argparse.Namespace, host: str, port: int) -> int:
    """Build the trainer, serve it, block until a signal; return an exit code.

    The trainer's service trains on the whole silo and evaluates any adapter on it, over
    plaintext without authentication, so it binds loopback only: beside the site's
    SuperNode, as `corolla client` starts it.
    """
    if not is_loopback(host):
        sys.stderr.write(f"corolla trainer: --host {host} is not a loopback address; the trainer's service has no TLS "
                         "and no authentication, and anyone who reaches it can train or evaluate on the whole silo. "
                         "Keep it on 127.0.0.1 beside the site's SuperNode (`corolla client` does).\n")
        return 2
    started = start_trainer(args, f"{host}:{port}", "corolla trainer")
    if started is None:
        return 2
    server, bound = started
    print(f"corolla-trainer listening on {host}:{bound}", flush=True)
    serve_until_signalled(server)
    return 0


def serve_until_signalled(server: grpc.Server, grace: float = 2.0) -> None:
    """Block until SIGTERM or SIGINT, then stop `server` within `grace` seconds."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=grace).wait()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m corolla.client.trainer_process`."""
    p = argparse.ArgumentParser(prog="corolla trainer", description=__doc__)
    add_trainer_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    args = p.parse_args(argv)
    return run_trainer(args, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
