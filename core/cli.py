"""The `corolla` command: sim, server, client, trainer, report, status, keys, make-silos."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from corolla.config import ConfigError, RunConfig, parse_overrides


def _config(args: argparse.Namespace) -> RunConfig:
    values = parse_overrides(args.set or [])
    values["out-dir"] = str(Path(args.out).resolve())
    return RunConfig.from_mapping(values)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (config.json, metrics.jsonl, report.md, curves.png)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a run-configuration key (repeatable); `corolla keys` lists them")


def cmd_sim(args: argparse.Namespace) -> int:
    """Run a Ray-simulated federation."""
    from corolla.server.simulate import run_simulation

    cfg = _config(args)
    summary = run_simulation(cfg, num_supernodes=args.nodes, cpus_per_client=args.cpus_per_client,
                             total_cpus=args.cpus)
    print(json.dumps(summary, indent=2))
    print(f"report: {Path(cfg.out_dir) / 'report.md'}")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    """Run a federation over real SuperNodes."""
    from corolla.server.deployment import run_server

    cfg = _config(args)
    tls = {"ca": args.ssl_ca, "cert": args.ssl_cert, "key": args.ssl_key} if args.ssl_ca else None
    summary = run_server(cfg, args.fleet_address, tls=tls)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    """Run a silo: trainer + SuperNode."""
    from corolla.client.node import run_client

    return run_client(args)


def cmd_trainer(args: argparse.Namespace) -> int:
    """Run only the trainer process."""
    from corolla.client.serve import run_trainer

    return run_trainer(args, args.host, args.port)


def cmd_report(args: argparse.Namespace) -> int:
    """(Re)write report.md and curves.png of a run directory."""
    from corolla.server.report import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print what a run is doing; with --watch, again every N seconds until the run finishes."""
    import time

    from corolla.server.status import run_status

    while True:
        print(run_status(args.run_dir), flush=True)
        if not args.watch or (Path(args.run_dir) / "summary.json").is_file():
            return 0
        time.sleep(args.watch)
        print()


def cmd_keys(args: argparse.Namespace) -> int:
    """List every run-configuration key with its default and meaning, then each component choice."""
    import dataclasses

    from corolla.strategies.registry import REGISTRIES

    for f in dataclasses.fields(RunConfig):
        meta = f.metadata
        choices = f" {{{', '.join(meta['choices'])}}}" if meta.get("choices") else ""
        where = f" [{', '.join(meta['owners'])}]" if meta.get("owners") else (f" [{meta['when']}]" if meta.get("when")
                                                                             else "")
        scope = " [simulation only]" if meta.get("scope") else ""
        print(f"{f.name.replace('_', '-'):20} = {f.default!r:14} {meta.get('help', '')}{choices}{where}{scope}")
    for kind, reg in REGISTRIES.items():
        print(f"\n{kind}:\n{reg.summary()}")
    return 0


def cmd_make_silos(args: argparse.Namespace) -> int:
    """Write the built-in corpus's Dirichlet partitions as silo files."""
    from corolla.client.data import write_silos

    for p in write_silos(args.out, args.num, args.alpha, args.seed, args.format):
        print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the `corolla` argument parser."""
    from corolla.client.args import add_trainer_args

    p = argparse.ArgumentParser(prog="corolla", description="Federated LoRA fine-tuning on Flower.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sim", help="run a Ray-simulated federation")
    _add_config_args(s)
    s.add_argument("--nodes", type=int, default=20, help="simulated SuperNodes (silos)")
    s.add_argument("--cpus-per-client", type=int, default=1, help="CPUs per Ray actor")
    s.add_argument("--cpus", type=int, default=None,
                   help="logical CPUs Ray may use = concurrent actors (default: all cores); raise it when simulated "
                   "clients mostly wait (speed profiles)")
    s.set_defaults(fn=cmd_sim)

    s = sub.add_parser("server", help="start a SuperLink and run the federation over real SuperNodes")
    _add_config_args(s)
    s.add_argument("--fleet-address", default="0.0.0.0:9092", help="where SuperNodes connect (gRPC Fleet API)")
    s.add_argument("--ssl-ca", help="CA certificate (enables TLS with --ssl-cert/--ssl-key)")
    s.add_argument("--ssl-cert")
    s.add_argument("--ssl-key")
    s.set_defaults(fn=cmd_server)

    s = sub.add_parser("client", help="start a silo: its trainer and a SuperNode connected to the server")
    s.add_argument("--superlink", required=True, help="server's Fleet API address, e.g. 10.0.0.5:9092")
    add_trainer_args(s)
    s.add_argument("--node-port", type=int, default=0, help="the SuperNode's local API port (0: free port)")
    s.add_argument("--root-certificates", help="CA certificate for TLS to the SuperLink")
    s.add_argument("--auth-key", help="node private key (SuperNode authentication)")
    s.add_argument("--flwr-home", help="Flower's state folder for this node (default ~/.flwr)")
    s.add_argument("--poll-interval", type=float, default=0.5,
                   help="seconds an idle SuperNode waits between polls of the SuperLink (Flower's default: 3)")
    s.set_defaults(fn=cmd_client)

    s = sub.add_parser("trainer", help="start only a silo's trainer process (advanced)")
    add_trainer_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    s.set_defaults(fn=cmd_trainer)

    s = sub.add_parser("report", help="write report.md and curves.png for a run directory")
    s.add_argument("run_dir")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("status", help="show what a running or finished federation is doing (from its run directory)")
    s.add_argument("run_dir")
    s.add_argument("--watch", type=float, default=0.0, metavar="SECONDS", help="repeat every SECONDS until the run ends")
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("keys", help="list run-configuration keys")
    s.set_defaults(fn=cmd_keys)

    s = sub.add_parser("make-silos", help="write built-in Dirichlet partitions as silo files")
    s.add_argument("--out", required=True)
    s.add_argument("--num", type=int, default=3)
    s.add_argument("--alpha", type=float, default=0.5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--format", default="csv", choices=["csv", "jsonl", "parquet"])
    s.set_defaults(fn=cmd_make_silos)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `corolla` command."""
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every `finally` reaps the processes this command started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return int(args.fn(args))
    except ConfigError as e:
        sys.stderr.write(f"corolla: configuration error: {e}\n")
        return 2
    except (RuntimeError, TimeoutError, FileNotFoundError) as e:  # StatusError and silo errors included
        sys.stderr.write(f"corolla: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
