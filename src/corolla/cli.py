"""The `corolla` command: sim, server, superlink, run, nodes, keys, client, trainer, report, status, options, make-silos."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from corolla.config import PRESETS, ConfigError, RunConfig, parse_overrides, preset
from corolla.data.source import normalize_location
from corolla.security import SecurityError


def _config(args: argparse.Namespace) -> RunConfig:
    values = {**(preset(args.preset) if getattr(args, "preset", None) else {}), **parse_overrides(args.set or [])}
    values["out-dir"] = str(Path(args.out).resolve())
    if getattr(args, "clock", None):
        values["clock"] = args.clock
    for key, attr in _SIM_DATA_FLAGS:  # `corolla sim --data ...`: the keys the Ray actors read
        value = getattr(args, attr, None)
        if value is not None:
            values[key] = normalize_location(value) if key == "sim-data" else value
    if getattr(args, "resume", False) or getattr(args, "overwrite", False):
        values["existing-run"] = "resume" if args.resume else "overwrite"
    cfg = RunConfig.from_mapping(values)
    _check_run_dir(Path(cfg.out_dir), cfg.existing_run)
    return cfg


_SIM_DATA_FLAGS = (("sim-data", "data"), ("partition-by", "partition_by"), ("partitioner", "partitioner"),
                   ("dirichlet-alpha", "alpha"), ("classes-per-node", "classes_per_node"), ("sim-table", "table"),
                   ("sim-query", "query"), ("sim-split", "split"), ("sim-password-file", "db_password_file"))


def _check_run_dir(out: Path, existing: str) -> None:
    """Refuse before starting any process: an earlier run is never overwritten or continued silently."""
    from corolla.server.records import RECORDS

    earlier = any((out / n).exists() for n in (*RECORDS, "summary.json", "checkpoint.json"))
    if earlier and existing == "refuse":
        raise ConfigError(f"{out} holds an earlier run; continue it with --resume or replace it with --overwrite")
    if existing == "resume" and not (out / "checkpoint.json").exists():
        raise ConfigError(f"{out} holds no checkpoint to resume (a run writes one after each aggregation); "
                          "start it without --resume")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (config.json, metrics.jsonl, report.md, curves.png)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a run-configuration key (repeatable); `corolla options` lists them")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="start from a named configuration (llm: SmolLM2 instruction tuning); --set overrides its keys")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint (same configuration; num-rounds may grow)")
    how.add_argument("--overwrite", action="store_true", help="replace the run in --out")


def cmd_sim(args: argparse.Namespace) -> int:
    """Run a simulated federation: Ray on the real clock, or in-process on the virtual clock."""
    cfg = _config(args)
    if cfg.clock == "virtual" and (args.ray_address or args.gpus_per_client):
        raise ConfigError("--ray-address and --gpus-per-client place Ray actors; the virtual clock runs in this "
                          "process without Ray: drop them or use --clock real.")
    args.nodes = _plan_sim(cfg, args.nodes)
    if cfg.clock == "virtual":
        summary = _run_virtual(cfg, args)
    else:
        from corolla.launch.simulate import run_simulation

        summary = run_simulation(cfg, num_supernodes=args.nodes, cpus_per_client=args.cpus_per_client,
                                 total_cpus=args.cpus, ray_address=args.ray_address,
                                 gpus_per_client=args.gpus_per_client)
    print(json.dumps(summary, indent=2))
    print(f"report: {Path(cfg.out_dir) / 'report.md'}")
    return 0


def _plan_sim(cfg: RunConfig, nodes: int | None) -> int:
    """Check the simulated silos before anything starts; return the node count (one line per problem otherwise).

    Every silo is loaded by the reader the Ray actors use and every partition is drawn,
    so a split that leaves a node without rows, a bad file or a label outside the label
    set stops here instead of inside the run (where it cost a round-timeout).
    """
    from corolla.data.simulated import DEFAULT_NODES, SimData, node_count, plan
    from corolla.learning.tasks import build_task
    from corolla.logs import quiet_libraries

    quiet_libraries()
    sim_data = SimData.from_config(cfg)
    n = node_count(sim_data, nodes) if sim_data else (nodes or DEFAULT_NODES)
    if n < 1:
        raise ConfigError(f"--nodes {n}: a simulation needs at least one node.")
    if cfg.min_nodes > n:
        raise ConfigError(f"`min-nodes` = {cfg.min_nodes} but the simulation has {n} node(s), so no round would "
                          f"start; lower it (--set min-nodes={n}) or add silos.")
    task = build_task(cfg.task_spec())
    the_plan = plan(task, sim_data, n, 0.0 if cfg.partitioner == "iid" else cfg.dirichlet_alpha)
    if cfg.test_data:
        from corolla.data.registry import open_source

        task.load_silo(open_source(cfg.test_data), cfg.text_column, cfg.label_column)
    print(the_plan.summary(), flush=True)
    if sim_data:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "silos.json").write_text(the_plan.to_json())
    return n


def _run_virtual(cfg: RunConfig, args: argparse.Namespace) -> dict:
    """The discrete-event simulator: the server and the real ClientApp in this process, one job at a time."""
    import logging

    import torch

    from corolla.client.app import app as client_app
    from corolla.launch.virtual import run_virtual
    from corolla.logs import setup_logging

    setup_logging()
    for name in ("corolla.client",):  # one line per evaluation, not one per job
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.cpus_per_client)
    return run_virtual(cfg, args.nodes, client_app)


def _tls(args: argparse.Namespace) -> dict[str, str | None]:
    return {"ca": args.ssl_ca, "cert": args.ssl_cert, "key": args.ssl_key}


def cmd_server(args: argparse.Namespace) -> int:
    """Run a federation over real SuperNodes: a SuperLink for one run."""
    from corolla.launch.deployment import run_server

    cfg = _config(args)
    summary = run_server(cfg, args.fleet_address, flwr_home=Path(args.home) if args.home else None, tls=_tls(args),
                         insecure=args.insecure, auth=args.auth, register=[Path(k) for k in args.register or []],
                         control_port=args.control_port)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_superlink(args: argparse.Namespace) -> int:
    """Run a long-lived SuperLink in a home folder until signalled."""
    import threading

    from corolla.launch import superlink

    home = superlink.Home(Path(args.home).resolve())
    saved = home.saved()
    fleet = args.fleet_address or saved.get("fleet_address") or "0.0.0.0:9092"
    tls: dict[str, str | None] = _tls(args)
    insecure, auth = args.insecure, args.auth
    if saved and not any(tls.values()) and not insecure:  # a restart keeps the home's transport unless told otherwise
        tls, insecure = dict(saved.get("tls") or {}), not saved.get("tls")
        auth = saved.get("auth") if auth is None else auth
    files, auth_on = superlink.transport(fleet, tls=tls, insecure=insecure, auth=auth)
    port = args.control_port or saved.get("control_port") or superlink.DEFAULT_CONTROL_PORT
    settings = superlink.LinkSettings(fleet_address=fleet, control_port=int(port), tls=files, auth=auth_on)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return superlink.serve(home, settings, stop)


def cmd_run(args: argparse.Namespace) -> int:
    """Submit one run to the SuperLink of a home folder and stream its progress."""
    from corolla.launch import superlink

    cfg = _config(args)
    cfg.check_deployment()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    code = superlink.submit_run(superlink.Home(Path(args.home).resolve()), cfg.to_mapping(), out,
                                timeout=args.timeout or None)
    summary = out / "summary.json"
    if code != 0 or not summary.exists():
        raise RuntimeError(f"the run failed (flwr run exited {code}); see {Path(args.home) / 'superlink.log'}")
    print(summary.read_text())
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    """Register, unregister or list SuperNode keys of a home's SuperLink."""
    from corolla.launch import superlink

    home = superlink.Home(Path(args.home).resolve())
    if args.action == "register":
        for key in args.keys:
            name, node_id = superlink.register(home, Path(key), args.name if len(args.keys) == 1 else None)
            print(f"registered {name} as node {node_id}")
    elif args.action == "unregister":
        for who in args.nodes:
            name, node_id = superlink.unregister(home, who)
            print(f"unregistered {name or 'node'} {node_id}: a SuperNode with that key is dropped and exits")
    else:
        listing = superlink.list_nodes(home)
        print(json.dumps(listing, indent=2) if args.json else superlink.format_nodes(listing))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Make TLS certificates (`keys ca`) or a SuperNode key pair (`keys node`)."""
    from corolla import security

    out = Path(args.out)
    if args.kind == "ca":
        paths = security.make_ca(out, args.host, days=args.days)
        print(f"CA {paths['ca']} (kept if it existed), server certificate {paths['cert']} for "
              f"{', '.join(dict.fromkeys([*args.host, *security.LOOPBACK_NAMES]))}, key {paths['key']}")
        print(f"server: corolla superlink --ssl-ca {paths['ca']} --ssl-cert {paths['cert']} --ssl-key {paths['key']} ...")
        print(f"nodes:  copy {paths['ca']} to every node: corolla client --root-certificates ca.crt ...")
    else:
        for name in args.names:
            private, public = security.make_node_key(out, name, force=args.force)
            _, fp = security.read_public_key(public)
            print(f"{name}: private key {private} (stays on the node: --auth-key), public key {public} ({fp}) "
                  "for the server: corolla nodes register --home DIR " + public.name)
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    """Run a silo: trainer + SuperNode."""
    from corolla.launch.node import run_client

    return run_client(args)


def cmd_trainer(args: argparse.Namespace) -> int:
    """Run only the trainer process."""
    from corolla.client.trainer_process import run_trainer

    return run_trainer(args, args.host, args.port)


def cmd_report(args: argparse.Namespace) -> int:
    """(Re)write report.md and curves.png of a run directory."""
    from corolla.server.report import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a run's global model as a peft adapter folder at a chosen rank."""
    from corolla.learning.export import export_adapter

    report = export_adapter(args.run_dir, args.out, args.rank, "best" if args.best else "final")
    print(json.dumps(report, indent=2))
    print(f"load it with: PeftModel.from_pretrained(base_model, {args.out!r})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Answer prompts with a causal-LM run's global model."""
    from corolla.learning.export import generate

    for prompt, answer in zip(args.prompts, generate(args.run_dir, args.prompts, args.rank, args.max_new_tokens)):
        print(f"> {prompt}\n{answer.strip()}\n")
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


def cmd_options(args: argparse.Namespace) -> int:
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


def cmd_cache(args: argparse.Namespace) -> int:
    """List or remove the site's cached silo copies (Arrow files of large or database silos)."""
    from corolla.data.cache import cached_silos, clear_cache, silo_cache_dir

    folder = silo_cache_dir(args.cache_dir)
    if args.action == "clear":
        n, size = clear_cache(args.cache_dir)
        print(f"removed {n} cached silo cop{'y' if n == 1 else 'ies'} ({size / 2**20:.1f} MiB) from {folder}")
        return 0
    files = cached_silos(args.cache_dir)
    for f in files:
        print(f"{f.stat().st_size / 2**20:10.1f} MiB  {f.name}")
    print(f"{len(files)} cached silo cop{'y' if len(files) == 1 else 'ies'} in {folder}")
    return 0


def cmd_make_silos(args: argparse.Namespace) -> int:
    """Write the built-in corpus's Dirichlet partitions as silo files."""
    from corolla.data.silo import write_silos

    for p in write_silos(args.out, args.num, args.alpha, args.seed, args.format):
        print(p)
    return 0


def _add_link_args(s: argparse.ArgumentParser) -> None:
    """TLS, plaintext and node-authentication options of a SuperLink."""
    s.add_argument("--ssl-ca", help="CA certificate (TLS, with --ssl-cert/--ssl-key; `corolla keys ca` makes them)")
    s.add_argument("--ssl-cert", help="server certificate naming the fleet address's host and 127.0.0.1")
    s.add_argument("--ssl-key", help="server private key")
    s.add_argument("--insecure", action="store_true",
                   help="plaintext on a non-loopback fleet address (anyone reaching the port can join and read)")
    s.add_argument("--auth", action=argparse.BooleanOptionalAction, default=None,
                   help="node authentication: only registered keys join (needs TLS; default: on with TLS off loopback)")
    s.add_argument("--control-port", type=int, default=0,
                   help="port of the Control/Runtime API on 127.0.0.1 (kept in the home; default 9093 for a new home)")


def build_parser() -> argparse.ArgumentParser:
    """Return the `corolla` argument parser."""
    from corolla.client.args import add_source_args, add_trainer_args

    p = argparse.ArgumentParser(prog="corolla", description="Federated LoRA fine-tuning on Flower.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sim", help="run a simulated federation (Ray, or the virtual-clock simulator)")
    _add_config_args(s)
    s.add_argument("--nodes", type=int, default=None,
                   help="simulated SuperNodes (default 20; with --data DIR or --partition-by: one per file / value)")
    s.add_argument("--data", metavar="DIR|FILE|URL",
                   help="simulate your own data: a folder (one silo per CSV/JSONL/Parquet file), a database URL with "
                   "--table a,b,c (one silo per table), or one source (a file, a saved Hugging Face dataset, one "
                   "table or --query) cut by --partition-by or --partitioner (sets `sim-data`; the task's columns: "
                   "text/label, prompt/response)")
    add_source_args(s, tables="the table(s); several, comma-separated, are one simulated silo each")
    s.add_argument("--partition-by", metavar="COLUMN", help="one silo per value of this column of the --data file "
                   "(a site id)")
    s.add_argument("--partitioner", choices=["dirichlet", "iid", "pathological"], default=None,
                   help="how one --data file (or the built-in corpus: dirichlet, iid) is cut into --nodes silos")
    s.add_argument("--alpha", type=float, default=None, help="Dirichlet α of the label skew (sets `dirichlet-alpha`)")
    s.add_argument("--classes-per-node", type=int, default=None, help="classes per node with --partitioner pathological")
    s.add_argument("--ray-address", metavar="auto|HOST:PORT",
                   help="attach to this existing Ray cluster (`ray start --head`) instead of starting a private one")
    s.add_argument("--gpus-per-client", type=float, default=0.0, metavar="FRACTION",
                   help="GPU share of each Ray actor (0.25: four clients per GPU); actors spread over the visible GPUs")
    s.add_argument("--clock", choices=["real", "virtual"], default=None,
                   help="real (default): Ray actors on the wall clock, slow clients sleep; virtual: a discrete-event "
                   "simulation in this process where each job takes local-steps × virtual-step-s × its slowdown "
                   "simulated seconds, independent of the host (sets the `clock` key)")
    s.add_argument("--cpus-per-client", type=int, default=1,
                   help="CPUs per Ray actor (virtual clock: torch threads of the one job running at a time)")
    s.add_argument("--cpus", type=int, default=None,
                   help="logical CPUs Ray may use = concurrent actors (default: all cores); raise it when simulated "
                   "clients mostly wait (speed profiles)")
    s.set_defaults(fn=cmd_sim)

    s = sub.add_parser("server", help="start a SuperLink for one run over real SuperNodes, then stop it")
    _add_config_args(s)
    s.add_argument("--fleet-address", default="0.0.0.0:9092", help="where SuperNodes connect (gRPC Fleet API)")
    _add_link_args(s)
    s.add_argument("--home", help="keep the SuperLink's state (registered keys) in this folder (default: OUT/.flwr)")
    s.add_argument("--register", action="append", metavar="KEY.pub",
                   help="register this node public key once the SuperLink listens (repeatable)")
    s.set_defaults(fn=cmd_server)

    s = sub.add_parser("superlink", help="run a long-lived SuperLink in a home folder; submit runs with `corolla run`")
    s.add_argument("--home", required=True, help="folder of its state database, log, settings and `flwr` connection")
    s.add_argument("--fleet-address", default=None,
                   help="where SuperNodes connect (gRPC Fleet API; default: the home's, else 0.0.0.0:9092)")
    _add_link_args(s)
    s.set_defaults(fn=cmd_superlink)

    s = sub.add_parser("run", help="submit one run to the SuperLink of a home folder and stream its progress")
    s.add_argument("--home", required=True, help="the home folder of a running `corolla superlink`")
    _add_config_args(s)
    s.add_argument("--timeout", type=float, default=0.0, help="stop the run after this many seconds (0: no limit)")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("nodes", help="register, unregister or list SuperNode keys (run on the server host)")
    nodes = s.add_subparsers(dest="action", required=True)
    n = nodes.add_parser("register", help="allow the nodes holding these keys' private halves to join")
    n.add_argument("keys", nargs="+", metavar="KEY.pub", help="node public keys (`corolla keys node`)")
    n.add_argument("--name", help="name of the node (default: the key file's name without .pub)")
    n.add_argument("--home", required=True)
    n = nodes.add_parser("unregister", help="revoke nodes: a running SuperNode with that key is dropped and exits")
    n.add_argument("nodes", nargs="+", metavar="NAME|NODE_ID")
    n.add_argument("--home", required=True)
    n = nodes.add_parser("list", help="registered nodes, their status, and refused join attempts")
    n.add_argument("--home", required=True)
    n.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=cmd_nodes)

    s = sub.add_parser("keys", help="make TLS certificates (`keys ca`) or SuperNode key pairs (`keys node`)")
    keys = s.add_subparsers(dest="kind", required=True)
    k = keys.add_parser("ca", help="a CA (kept if OUT/ca.key exists) and a server certificate for --host")
    k.add_argument("out", help="folder to write ca.crt, ca.key, server.crt, server.key")
    k.add_argument("--host", action="append", required=True,
                   help="IP address or DNS name the SuperNodes dial (repeatable); 127.0.0.1 and localhost are added")
    k.add_argument("--days", type=int, default=825, help="validity of the server certificate")
    k = keys.add_parser("node", help="a SuperNode's ECDSA P-384 key pair: OUT/NAME (private) and OUT/NAME.pub")
    k.add_argument("out")
    k.add_argument("names", nargs="+", metavar="NAME")
    k.add_argument("--force", action="store_true", help="replace an existing key pair")
    s.set_defaults(fn=cmd_keys)

    s = sub.add_parser("client", help="start a silo: its trainer and a SuperNode connected to the server")
    s.add_argument("--superlink", required=True, help="server's Fleet API address, e.g. 10.0.0.5:9092")
    add_trainer_args(s)
    s.add_argument("--node-port", type=int, default=0, help="the SuperNode's local API port (0: free port)")
    s.add_argument("--root-certificates", help="the server's ca.crt: TLS to the SuperLink (required off loopback unless "
                   "--insecure)")
    s.add_argument("--insecure", action="store_true", help="plaintext to a SuperLink that is not on loopback")
    s.add_argument("--auth-key", help="this node's private key (`corolla keys node`; its .pub registered on the server)")
    s.add_argument("--allow-any-app", action="store_true",
                   help="run whatever app bundle a run brings (default: only corolla's own, which carries no code: "
                        "what runs here is the corolla installed here); the site's decision, see docs/guide/security.md")
    s.add_argument("--max-wait-time", type=float, default=0.0,
                   help="give up after this many seconds without the SuperLink (0: keep reconnecting)")
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

    s = sub.add_parser("export", help="save a run's global model as a peft adapter (adapter_config.json + safetensors)")
    s.add_argument("run_dir")
    s.add_argument("--out", required=True, help="folder to write the adapter into")
    s.add_argument("--rank", type=int, default=None,
                   help="adapter rank; FedHL's full-rank update is cut to it by SVD (default: the run's max-rank)")
    s.add_argument("--best", action="store_true",
                   help="export the best version (best.npz: chosen on the sites' held-out data, else the server's) "
                        "instead of the final one")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("generate", help="answer prompts with a causal-LM run's global model")
    s.add_argument("run_dir")
    s.add_argument("prompts", nargs="+")
    s.add_argument("--rank", type=int, default=None, help="rank the global update is cut to (default: max-rank)")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("status", help="show what a running or finished federation is doing (from its run directory)")
    s.add_argument("run_dir")
    s.add_argument("--watch", type=float, default=0.0, metavar="SECONDS", help="repeat every SECONDS until the run ends")
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("options", help="list run-configuration keys and component choices")
    s.set_defaults(fn=cmd_options)

    s = sub.add_parser("cache", help="list or clear this site's cached silo copies (Arrow files, private to the user)")
    s.add_argument("action", choices=["list", "clear"])
    s.add_argument("--cache-dir", default=None, help="the cache folder a trainer was given (default: $COROLLA_CACHE_DIR, "
                   "else the Hugging Face datasets cache's corolla-silos)")
    s.set_defaults(fn=cmd_cache)

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
    except SecurityError as e:  # a certificate, key or transport choice, with its fix
        sys.stderr.write(f"corolla: {e}\n")
        return 2
    except (RuntimeError, TimeoutError, FileNotFoundError) as e:  # StatusError, LinkError and silo errors included
        sys.stderr.write(f"corolla: {e}\n")
        return 1
    except ValueError as e:  # corolla's own (ModelError, SiloError, ExportError) carry their fix; others are bugs
        if not type(e).__module__.startswith("corolla."):
            raise
        sys.stderr.write(f"corolla: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
