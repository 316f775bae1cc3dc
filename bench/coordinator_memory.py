"""Peak memory of a coordinator: its start (fingerprint, initial adapter: files vs loaded model) and a real federation.

A server that does not evaluate needs the base model's fingerprint and the seeded
initial adapter. `files` computes both with `corolla.learning.base_files.BaseFiles`
(safetensors headers and the first values of each tensor, the architecture on the meta
device); `full` is the path a server takes when it loads the model, as `TaskEvaluator`
does: load the base (float32), fingerprint it, and build the initial adapter with
`train_loop.initial_adapter` (which loads a second copy while the first is held).

Each case runs in a fresh subprocess; its peak RSS is the kernel's high-water mark
(VmHWM, which `ru_maxrss` reports too for a process not started by a larger one:
anonymous memory plus the resident pages of mapped files). `imports` is
the RSS after importing torch, transformers, peft and corolla's learning layer, before
any model is touched. Models: the built-in SmolLM2-135M (causal LM, float32 folder),
MiniLM (text classification) and a randomly initialised 1.1B-parameter Llama written
here in bfloat16, in two shards with an index (hidden 2048, 22 layers, intermediate
5632, vocabulary 32000, untied embeddings: TinyLlama's layout), deleted at the end.

The `federation` part measures the real coordinator of a real federation: `corolla
server` (SuperLink, SuperExec, the ServerApp process `flwr-serverapp`, `flwr run`) with
`task=causal-lm evaluation=sites` and no test data, and two `corolla client` processes
(trainer + SuperNode) on loopback, each with a small JSONL prompt/response silo of
chat-bot small talk, at rank 4. Every process of the server's tree and of each client's
tree is sampled from /proc (VmHWM, VmRSS, command line) every 0.2 s until it exits; a
process's peak is the last VmHWM read. Cases: SmolLM2-135M (2 rounds, 1 local step,
batch 2, max-length 96: every answer whole) and a randomly initialised 1.17B-parameter
Llama (TinyLlama's layout with SmolLM2's 49,152-token vocabulary and tokenizer, so the
sites can tokenize; bf16, 3 shards; 1 round, 1 local step, batch 1, max-length the
longest templated prompt + 1, the smallest that scores answer tokens of every row; the
second client starts once the first has loaded the model). A run whose sites did not
score answers (a site's evaluation failed, or a loss of 0) stops the script with an error.

    .venv/bin/python bench/coordinator_memory.py [--only component|federation] [--skip-full-big]
        [--skip-federation-big] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
GIB = 2**30
#: the coordinator's memory target (plus the strategy's dense update state, which neither path holds here)
TARGET_GB = 1.2
RANK = 16


def write_random_llama(folder: Path, *, hidden: int = 2048, layers: int = 22, intermediate: int = 5632,
                       vocab: int = 32000, heads: int = 32, kv_heads: int = 4, shard_gb: float = 1.0,
                       seed: int = 0) -> int:
    """Write a randomly initialised Llama folder (bfloat16 safetensors shards + index + config); return its parameter count.

    The architecture is built on the meta device for its names and shapes only, and
    tensors are drawn and written one shard at a time, so writing needs about one
    shard of memory, not the model's.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      tie_word_embeddings=False, pad_token_id=0, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        if size and size + 2 * numel > shard_gb * GIB:
            shards.append({})
            size = 0
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
        shards[-1][name] = t.to(torch.bfloat16)
        size += 2 * numel
        if size >= shard_gb * GIB:
            shards.append({})
            size = 0
    shards = [s for s in shards if s]
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        total += sum(2 * t.numel() for t in shard.values())
        shards[i] = {}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return sum(math.prod(s) for s in shapes.values())


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM, else `ru_maxrss`.

    VmHWM belongs to the process's own address space; `ru_maxrss` survives fork and
    exec on Linux, so a fresh interpreter started by a large parent would report the
    parent's peak as its own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_gb() -> float:
    return peak_rss_bytes() / GIB


def run_case(path: str, task: str, model: str, rank: int) -> dict:
    """One measurement, in this process (call it in a fresh one): peak RSS before and after."""
    import torch  # noqa: F401 - counted in the import baseline

    from corolla.learning.base_files import BaseFiles
    from corolla.learning.tasks import build_task
    from corolla.learning.train_loop import initial_adapter, load_base
    from corolla.spec import LoraSpec, TaskSpec

    spec = TaskSpec(task=task, model=model, dataset="bbc" if task == "text-classification" else "auto")
    lora = LoraSpec()
    imports = _rss_gb()
    t0 = time.perf_counter()
    if path == "files":
        base = BaseFiles(spec)
        fingerprint, adapter = base.fingerprint, base.initial_adapter(rank, lora, seed=0)
    else:
        t = build_task(spec)
        held = load_base(t)  # TaskEvaluator holds the model ...
        fingerprint = t.fingerprint(held)
        adapter = initial_adapter(t, rank, lora, seed=0)  # ... while initial_adapter loads another copy
    seconds = time.perf_counter() - t0
    return {"path": path, "task": task, "imports_gb": imports, "peak_gb": _rss_gb(), "seconds": seconds,
            "fingerprint": fingerprint, "adapter_tensors": len(adapter),
            "adapter_mb": sum(a.nbytes for a in adapter.values()) / 2**20}


def measure(path: str, task: str, model: str, rank: int = RANK) -> dict:
    """`run_case` in a fresh interpreter."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from bench.coordinator_memory import run_case; "
            f"print('RESULT', json.dumps(run_case({path!r}, {task!r}, {model!r}, {rank})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{path} {model}: {out.stderr[-3000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def weights_gb(folder: str) -> float:
    """Bytes of the folder's safetensors weights, GiB."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / GIB


# ---- the federation part: a real `corolla server` and two `corolla client` processes --------------------------------

#: small talk in the shape of the chatterbot corpora: (prompt, response) pairs, two silos of 36 rows
TOPICS = ["the weather", "music", "football", "cooking", "books", "films", "travel", "gardening", "coffee",
          "the sea", "trains", "chess", "painting", "running", "birds", "computers", "history", "cats"]
ASKS = [("What do you think about {t}?", "I like talking about {t}; what do you enjoy most about it?"),
        ("Tell me something about {t}.", "People have loved {t} for a long time, and there is always more to learn."),
        ("Do you know much about {t}?", "A little. {T} is a big subject, but I am happy to chat about it."),
        ("Hello! Can we talk about {t}?", "Hello! Of course, {t} sounds like a fine topic.")]


def write_silos(folder: Path, num: int = 2, rows: int = 36) -> list[Path]:
    """`num` JSONL prompt/response silos of `rows` rows each, no row shared."""
    pairs = [(q.format(t=t), a.format(t=t, T=t[0].upper() + t[1:])) for t in TOPICS for q, a in ASKS]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num):
        path = folder / f"chat{i}.jsonl"
        with path.open("w") as f:
            for prompt, response in pairs[i::num][:rows]:
                f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
        paths.append(path)
    return paths


def answer_tokens(folder: str, silos: list[Path] | None = None) -> dict[str, int]:
    """Token counts of the silos' rows as the causal-LM task encodes them (chat template, the folder's tokenizer).

    `prompt`: the templated prompt, up to where the answer starts; `full`: prompt + answer + end
    of turn. A row's answer is scored from position `prompt` on (the next-token targets), so a
    max-length of at least max(prompt) + 1 scores some answer tokens of every row and one of at
    least max(full) scores every answer whole.
    """
    from corolla.learning.tasks import build_task
    from corolla.spec import TaskSpec

    task = build_task(TaskSpec(task="causal-lm", model=folder))
    if silos:
        rows = [json.loads(x) for p in silos for x in p.read_text().splitlines() if x.strip()]
        pairs = [(r["prompt"], r["response"]) for r in rows]
    else:
        pairs = [(q.format(t=t), a.format(t=t, T=t[0].upper() + t[1:])) for t in TOPICS for q, a in ASKS]
    heads, fulls = zip(*((len(h), len(f)) for h, f in (task._render(q, a) for q, a in pairs)))
    return {"prompt_min": min(heads), "prompt_max": max(heads), "full_min": min(fulls), "full_max": max(fulls)}


def write_federation_llama(folder: Path, smollm2: str) -> int:
    """A random bf16 Llama of 1.17 B parameters with SmolLM2's tokenizer (vocabulary 49152); its parameter count."""
    n = write_random_llama(folder, vocab=49152)
    for f in Path(smollm2).iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja") or f.name == "special_tokens_map.json":
            shutil.copy(f, folder / f.name)
    return n


def _status(pid: int) -> tuple[int, int] | None:
    """(VmHWM, VmRSS) in bytes, None once the process is gone (or a zombie, which has neither)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    vals = {}
    for line in text.splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            vals[line[:5]] = int(line.split()[1]) * 1024
    return (vals["VmHWM"], vals["VmRSS"]) if len(vals) == 2 else None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def role(cmd: str) -> str:
    """What a process of the federation is, from its command line."""
    for needle, name in (("flwr-serverapp", "ServerApp (flwr-serverapp)"), ("flwr-clientapp", "ClientApp (flwr-clientapp)"),
                         ("superexec", "SuperExec"), ("superlink_guard", "SuperLink"), ("flower-superlink", "SuperLink"),
                         ("corolla.launch.supernode", "SuperNode"), ("flower-supernode", "SuperNode"),
                         ("flwr run", "flwr run (CLI)"), ("/flwr run", "flwr run (CLI)"),
                         ("corolla.cli server", "corolla server"), ("corolla.cli client", "corolla client (trainer)")):
        if needle in cmd:
            return name
    return cmd.split(" ")[0].rsplit("/", 1)[-1] or "?"


class TreeSampler:
    """Samples every process under some roots from /proc until stopped: per (pid, command) its last VmHWM and peak VmRSS.

    A process's peak RSS is its VmHWM (the kernel's high-water mark, monotone): the last value read
    before it exited. `tree_peak` is the largest sum of VmRSS over a tree at one sample.
    """

    def __init__(self, roots: dict[str, int], interval: float = 0.2) -> None:
        import threading

        self.roots, self.interval = dict(roots), interval
        self.procs: dict[tuple[int, str], dict] = {}
        self.tree_peak: dict[str, int] = dict.fromkeys(roots, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, tree: str, pid: int) -> None:
        self.roots[tree] = pid
        self.tree_peak.setdefault(tree, 0)

    def _run(self) -> None:
        from corolla.launch.processes import descendants

        known: dict[str, set[int]] = {}
        while not self._stop.is_set():
            for tree, root in list(self.roots.items()):
                # a re-parented child (SuperExec's flwr-serverapp once its parent is gone) is followed by its pid
                pids = {root, *descendants(root), *(p for p in known.get(tree, ()) if Path(f"/proc/{p}").exists())}
                known[tree] = pids
                total = 0
                for pid in pids:
                    st, cmd = _status(pid), _cmdline(pid)
                    if st is None or not cmd:
                        continue
                    hwm, rss = st
                    total += rss
                    rec = self.procs.setdefault((pid, cmd), {"tree": tree, "pid": pid, "cmd": cmd, "role": role(cmd),
                                                             "peak_bytes": 0, "max_rss_bytes": 0,
                                                             "first_s": time.monotonic()})
                    rec["peak_bytes"] = max(rec["peak_bytes"], hwm)
                    rec["max_rss_bytes"] = max(rec["max_rss_bytes"], rss)
                    rec["last_s"] = time.monotonic()
                self.tree_peak[tree] = max(self.tree_peak[tree], total)
            self._stop.wait(self.interval)

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join()
        return sorted(self.procs.values(), key=lambda r: (r["tree"], r["first_s"]))


def _wait_line(path: Path, needle: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{path.name}: exited {proc.returncode} before {needle!r}:\n"
                               f"{path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"{needle!r} not in {path} within {timeout:.0f}s")


def run_federation(label: str, folder: str, work: Path, *, rounds: int, steps: int, batch: int, max_length: int,
                   rank: int = 4, stagger: bool = False, timeout: float = 1500) -> dict:
    """One real federation: `corolla server` + 2 `corolla client`; the peak RSS of every process of both trees."""
    from corolla.launch import processes as launch

    shutil.rmtree(work, ignore_errors=True)  # a kept folder's earlier run, silos and node homes
    work.mkdir(parents=True)
    out = work / "run"
    silos = write_silos(work / "silos")
    fleet = f"127.0.0.1:{launch.free_port()}"
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    corolla = [sys.executable, "-m", "corolla.cli"]
    sets = {"task": "causal-lm", "model": folder, "evaluation": "sites", "num-rounds": rounds, "local-steps": steps,
            "batch-size": batch, "max-length": max_length, "eval-every": 1, "min-nodes": 2, "clients-per-round": 2,
            "round-timeout": timeout, "seed": 0}
    cmd = [*corolla, "server", "--out", str(out), "--fleet-address", fleet]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    t0 = time.monotonic()
    procs: list[subprocess.Popen] = []
    with launch.running(procs):
        server_log = work / "server.log"
        server = launch.start(cmd, launch.flower_env(work / "server-home", threads), log_path=server_log)
        procs.append(server)
        sampler = TreeSampler({"server": server.pid})
        try:
            _wait_line(server_log, "corolla-server fleet API on", 120, server)
            for i, silo in enumerate(silos):
                log = work / f"client{i}.log"
                c = launch.start([*corolla, "client", "--superlink", fleet, "--data", str(silo), "--task", "causal-lm",
                                  "--model", folder, "--rank", str(rank), "--max-length", str(max_length),
                                  "--threads", "1", "--flwr-home", str(work / f"node{i}")],
                                 launch.flower_env(work / f"node{i}", threads), log_path=log)
                procs.append(c)
                sampler.add(f"client{i}", c.pid)
                if stagger:  # the next trainer loads its model once this one holds its own
                    _wait_line(log, "corolla-client trainer on", 900, c)
            server.wait(timeout)
        finally:
            seconds = time.monotonic() - t0
            rows = sampler.stop()
    if server.returncode != 0:
        raise RuntimeError(f"{label}: corolla server exited {server.returncode}:\n"
                           f"{server_log.read_text(errors='replace')[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    import numpy as np

    with np.load(out / "global.npz") as z:
        delta_bytes = sum(z[k].nbytes for k in z.files if k.startswith("delta/"))
        dense_bytes = sum(z[k].nbytes for k in z.files if k.startswith("dense/"))
        factor_bytes = sum(rank * (z[k].shape[0] + z[k].shape[1]) * 4 for k in z.files if k.startswith("delta/"))
        largest = max(z[k].nbytes for k in z.files if k.startswith("delta/"))
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    site_losses = [{n: s["loss"] for n, s in (e.get("sites") or {}).items()} for e in evals]
    failures = [e["site_failures"] for e in evals if e.get("site_failures")]
    scored = bool(evals) and not failures and all(len(s) == 2 and all(x > 0 for x in s.values()) for s in site_losses)
    if not scored:  # a site whose held-out answers are all cut away fails its evaluation: the run did not learn
        raise RuntimeError(f"{label}: the sites' answers were not scored at max-length {max_length}: "
                           f"site losses {site_losses}, failures {failures}")
    return {"part": "federation", "model": label, "folder_weights_gb": weights_gb(folder), "rounds": rounds,
            "local_steps": steps, "batch_size": batch, "max_length": max_length, "rank": rank,
            "aggregation": summary.get("aggregation"), "evaluation": summary.get("evaluation"),
            "versions": summary.get("versions"), "site_accuracy": [e.get("site_accuracy") for e in evals],
            "site_loss": [e.get("site_loss") for e in evals], "site_losses": site_losses,
            "site_failures": failures, "answers_scored": scored, "tokens": answer_tokens(folder, silos),
            "largest_layer_delta_mb": largest / 2**20,
            "factor_state_mb": factor_bytes / 2**20, "delta_state_mb": delta_bytes / 2**20,
            "dense_params_mb": dense_bytes / 2**20, "seconds": seconds, "processes": rows,
            "tree_peak_gb": {k: v / GIB for k, v in sampler.tree_peak.items()}}


def federation(tmp: Path, *, big: bool) -> list[dict]:
    from corolla.learning import models

    smol = models.smollm2_path()
    # 96 tokens: every answer whole (the chat template's system line and user turn alone take 36-39 tokens)
    rows = [run_federation("SmolLM2-135M", smol, tmp / "fed-smollm2", rounds=2, steps=1, batch=2, max_length=96)]
    print_federation(rows[-1])
    if big:
        folder = tmp / "llama-1.17b-smollm2-vocab"
        if not (folder / "model.safetensors.index.json").is_file():
            t0 = time.perf_counter()
            code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.coordinator_memory import "
                    f"write_federation_llama; print(write_federation_llama(__import__('pathlib').Path({str(folder)!r}), "
                    f"{smol!r}))")
            n = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout)
            print(f"wrote a random Llama of {n / 1e9:.2f} B parameters into {folder} in {time.perf_counter() - t0:.0f} s")
        # the smallest max-length that scores answer tokens of every row (the longest templated prompt + 1): the
        # trainers' activations stay small on 2 CPU cores, while the sites' losses are over real answer tokens
        shortest = answer_tokens(str(folder))["prompt_max"] + 1
        rows.append(run_federation("Llama 1.17B (random, bf16, SmolLM2 vocabulary)", str(folder), tmp / "fed-llama",
                                   rounds=1, steps=1, batch=1, max_length=shortest, stagger=True))
        print_federation(rows[-1])
    return rows


def print_federation(r: dict) -> None:
    print(f"{r['model']}: {r['seconds']:.0f} s, aggregation {r['aggregation']}, evaluation {r['evaluation']}, "
          f"factors {r['factor_state_mb']:.2f} MB, ΔW {r['delta_state_mb']:.1f} MB")
    for p in r["processes"]:
        print(f"  {p['tree']:8} {p['pid']:>7} {p['role']:28} peak {p['peak_bytes'] / GIB:.2f} GB  {p['cmd'][:90]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("component", "federation"), help="run one part (default: both)")
    ap.add_argument("--skip-full-big", action="store_true", help="skip the full-model path on the 1.1B model")
    ap.add_argument("--skip-federation-big", action="store_true", help="skip the federation of the 1.17B model")
    ap.add_argument("--keep", default="", help="write (or reuse) the big folders here and keep them")
    args = ap.parse_args()

    previous = json.loads((RESULTS / "coordinator_memory.json").read_text()) if (
        RESULTS / "coordinator_memory.json").is_file() else []
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="coordinator-memory-"))
    try:
        rows = component(tmp, args) if args.only != "federation" else \
            [r for r in previous if r.get("part", "component") == "component"]
        fed = federation(tmp, big=not args.skip_federation_big) if args.only != "component" else \
            [r for r in previous if r.get("part") == "federation"]
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    write_results(rows, fed)


def component(tmp: Path, args: argparse.Namespace) -> list[dict]:
    """The component part: BaseFiles vs loading the model, one fresh process per row."""
    from corolla.learning import models

    big = tmp / "llama-1.1b"
    if not (big / "model.safetensors.index.json").is_file():  # in a child: this process stays small
        t0 = time.perf_counter()
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.coordinator_memory import "
                f"write_random_llama; print(write_random_llama(__import__('pathlib').Path({str(big)!r})))")
        n = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
        print(f"wrote a random Llama of {n / 1e9:.2f} B parameters into {big} in {time.perf_counter() - t0:.0f} s")
    cases = [("SmolLM2-135M", "causal-lm", models.smollm2_path()),
             ("MiniLM-L6", "text-classification", models.minilm_path()),
             ("Llama 1.1B (random, bf16, 2 shards)", "causal-lm", str(big))]
    rows = []
    for label, task, folder in cases:
        for path in ("files", "full"):
            if path == "full" and args.skip_full_big and folder == str(big):
                continue
            r = measure(path, task, folder)
            r.update(model=label, weights_gb=weights_gb(folder), part="component")
            rows.append(r)
            print(f"{label:38} {path:5} peak {r['peak_gb']:.2f} GB (imports {r['imports_gb']:.2f}) "
                  f"in {r['seconds']:.1f} s, fingerprint {r['fingerprint']}")
    for r in rows:
        twin = next((x for x in rows if x["model"] == r["model"] and x["path"] != r["path"]), None)
        r["same_as_full"] = None if twin is None else twin["fingerprint"] == r["fingerprint"]
    return rows


def write_results(rows: list[dict], fed: list[dict]) -> None:
    """bench/results/coordinator_memory.{json,md} and the tables on stdout."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "coordinator_memory.json").write_text(json.dumps(rows + fed, indent=1))
    head = ("| model | path | weights GB | peak RSS GB | imports GB | peak − imports GB | peak / weights | "
            f"≤ {TARGET_GB} GB | seconds | adapter tensors |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['path']} | {r['weights_gb']:.2f} | {r['peak_gb']:.2f} | {r['imports_gb']:.2f} "
                     f"| {r['peak_gb'] - r['imports_gb']:.2f} | {r['peak_gb'] / r['weights_gb']:.2f} | "
                     f"{'met' if r['peak_gb'] <= TARGET_GB else 'no'} | {r['seconds']:.1f} | {r['adapter_tensors']} |")
    table = "\n".join(lines)
    print(table)
    same = all(r["same_as_full"] in (True, None) for r in rows)
    files = [r for r in rows if r["path"] == "files"]
    worst = max(files, key=lambda r: r["peak_gb"] - r["imports_gb"])
    reading = [
        f"- `files`: peak RSS at most {max(r['peak_gb'] for r in files):.2f} GB, at most "
        f"{worst['peak_gb'] - worst['imports_gb']:.2f} GB above the imports ({worst['model']}), whatever the "
        "model's size: no weight is read beyond the first 4096 values of each tensor, and only the LoRA factors "
        f"and a fresh head are materialised. Target ≤ {TARGET_GB} GB (plus the strategy's dense update state, "
        f"which neither path holds here): {'met by every row' if all(r['peak_gb'] <= TARGET_GB for r in files) else 'NOT met'}.",
    ]
    for r in rows:
        if r["path"] == "full" and r["weights_gb"] > 1:
            twin = next(x for x in files if x["model"] == r["model"])
            reading.append(f"- `full` on {r['model']}: {r['peak_gb']:.2f} GB, {r['peak_gb'] / r['weights_gb']:.1f}× "
                           f"the bfloat16 weights (float32 copies: the evaluator's and `initial_adapter`'s), "
                           f"{r['peak_gb'] / twin['peak_gb']:.0f}× the `files` path; {r['seconds']:.0f} s against "
                           f"{twin['seconds']:.1f} s.")
    reading.append("- `full` on the small float32 folders stays near the imports: transformers maps a float32 "
                   "safetensors file and the fingerprint and adapter touch few of its pages. That changes once the "
                   "model runs (evaluation reads every weight) or whenever the folder is bfloat16/float16, as "
                   "large models ship: then each loaded copy is converted into anonymous float32 memory.")
    text = f"""# Coordinator memory

Peak RSS of a coordinator computing the base-model fingerprint and the rank-{RANK} initial
adapter: `files` reads them from the model folder (`corolla.learning.base_files.BaseFiles`:
safetensors headers, the first 4096 values of each tensor, the architecture on the meta
device); `full` loads the model as `TaskEvaluator` does (float32, plus the second copy
`initial_adapter` loads). One fresh process per row; peak RSS is its VmHWM; `imports` is the
RSS after importing torch, transformers, peft and corolla's learning layer. Weights: the
folder's safetensors bytes. 2-core CPU machine, no GPU.

{table}

Fingerprints of the two paths agree for every model: {'yes' if same else 'NO'}. The initial
adapters are bit-identical (tests/test_base_files.py checks it for MiniLM, SmolLM2 and
tiny BERT and Llama folders).

## Reading

""" + "\n".join(reading) + "\n" + federation_text(fed)
    (RESULTS / "coordinator_memory.md").write_text(text)


def _by_role(r: dict) -> list[tuple[str, str, int, float]]:
    """(tree, role, processes, largest peak GB) per role of each tree, in order of first appearance."""
    groups: dict[tuple[str, str], list[float]] = {}
    for p in r["processes"]:
        if p["role"] in ("uname", "?"):  # `uname -p` run by platform.processor(): a few kB
            continue
        groups.setdefault((p["tree"], p["role"]), []).append(p["peak_bytes"] / GIB)
    return [(tree, name, len(v), max(v)) for (tree, name), v in groups.items()]


def serverapp_peak(r: dict) -> float:
    """The ServerApp process's peak RSS, GB (the largest, should a run have more than one)."""
    return max(p["peak_bytes"] for p in r["processes"] if p["tree"] == "server" and p["role"].startswith("ServerApp")) / GIB


def scored_text(r: dict) -> str:
    """How much of each answer a run scored, from its max-length and the rows' token counts."""
    t, n = r.get("tokens"), r["max_length"]
    if not t:
        return ""
    if n >= t["full_max"]:
        return (f"every answer scored whole (templated prompts {t['prompt_min']}-{t['prompt_max']} tokens, "
                f"whole rows {t['full_min']}-{t['full_max']})")
    return (f"the first {max(n - t['prompt_max'], 0)}-{n - t['prompt_min']} answer tokens of each row scored "
            f"(templated prompts {t['prompt_min']}-{t['prompt_max']} tokens, whole rows {t['full_min']}-{t['full_max']})")


def federation_text(fed: list[dict]) -> str:
    """The federation part's section of the report (empty without rows)."""
    if not fed:
        return ""
    head = ("| model | weights GB | aggregation | factor state MB | ΔW MB | largest layer ΔW MB | ServerApp peak GB | "
            f"target {TARGET_GB} GB + factors | met | ServerApp / weights | server tree Σ RSS peak GB | "
            "trainer peaks GB | seconds |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in fed:
        peak = serverapp_peak(r)
        target = TARGET_GB + r["factor_state_mb"] / 1024
        trainers = ", ".join(f"{m:.2f}" for tree, name, _, m in _by_role(r) if name.startswith("corolla client"))
        largest = r.get("largest_layer_delta_mb")
        lines.append(f"| {r['model']} | {r['folder_weights_gb']:.2f} | {r['aggregation']} (rank {r['rank']}) | "
                     f"{r['factor_state_mb']:.2f} | {r['delta_state_mb']:.1f} | "
                     f"{'' if largest is None else f'{largest:.1f}'} | **{peak:.2f}** | {target:.2f} | "
                     f"{'met' if peak <= target else 'NO'} | {peak / r['folder_weights_gb']:.2f} | "
                     f"{r['tree_peak_gb']['server']:.2f} | {trainers} | {r['seconds']:.0f} |")
    per = ["| model | tree | process | processes | peak RSS GB (largest) |", "|---|---|---|---|---|"]
    for r in fed:
        for tree, name, n, m in _by_role(r):
            per.append(f"| {r['model']} | {tree} | {name} | {n} | {m:.2f} |")

    def losses(r: dict) -> str:
        per_site = r.get("site_losses") or []
        return "; ".join(f"v{v}: " + ", ".join(f"{x:.3f}" for x in s.values()) for v, s in enumerate(per_site))

    runs = "\n".join(
        f"- {r['model']}: {r['rounds']} round(s), {r['local_steps']} local step, batch {r['batch_size']}, "
        f"max-length {r['max_length']}: {scored_text(r)}; rank {r['rank']}, {r['versions']} version(s); evaluation "
        f"`{r['evaluation']}`, aggregation `auto` → `{r['aggregation']}`. Answers scored: "
        f"{'yes' if r.get('answers_scored') else 'NOT CHECKED'} (no `site_failures`; each site's held-out loss per "
        f"version: {losses(r)})." for r in fed)
    reading = []
    for r in fed:
        peak, target = serverapp_peak(r), TARGET_GB + r["factor_state_mb"] / 1024
        reading.append(f"- {r['model']}: the ServerApp peaked at {peak:.2f} GB: {peak / r['folder_weights_gb']:.2f}× the "
                       f"model's {r['folder_weights_gb']:.2f} GB of weights, {target - peak:.2f} GB under the target "
                       f"({TARGET_GB} GB + {r['factor_state_mb']:.2f} MB of factors).")
    if len(fed) > 1:
        small, large = min(fed, key=lambda r: r["folder_weights_gb"]), max(fed, key=lambda r: r["folder_weights_gb"])
        grew = serverapp_peak(large) - serverapp_peak(small)
        dw = (large["delta_state_mb"] - small["delta_state_mb"]) / 1024
        reading.append(f"- From {small['model']} to {large['model']} the ServerApp grew by {grew:.2f} GB, while the "
                       f"weights grew by {large['folder_weights_gb'] - small['folder_weights_gb']:.2f} GB and the "
                       f"whole dense ΔW by {dw:.2f} GB (to {large['delta_state_mb'] / 1024:.2f} GB). With only the "
                       "sites evaluating, the ServerApp holds FedAvg's factors (megabytes) and at most one layer's "
                       f"ΔW at a time ({large.get('largest_layer_delta_mb', 0):.0f} MB at most here), while "
                       "it writes global.npz or best.npz: its peak follows neither the model's weights nor its "
                       "whole ΔW.")
    scored = [r for r in fed if r.get("answers_scored")]
    note = ("" if not scored else
            f"\n\nIn {', '.join(r['model'] for r in scored)} the sites scored response tokens: every site's held-out "
            "loss is above 0 and no site failed its evaluation (a site whose held-out answers are all cut by "
            "max-length fails it; the script stops with an error when a site fails or reports a loss of 0).")
    if any("random" in r["model"] for r in scored):
        note += (" A random model's losses stay near ln(vocabulary) (ln 49152 ≈ 10.8) after one round; they "
                 "measure nothing but that answers were scored.")
    return f"""
## A real federation

`corolla server --set task=causal-lm --set model=FOLDER --set evaluation=sites` (no
`test-data`; each site holds out `eval-fraction` = 0.1 of its silo, 4 rows) on loopback with
two `corolla client --task causal-lm --model FOLDER --rank 4 --threads 1` processes, each with a
36-row JSON Lines prompt/response silo of small talk. `OMP_NUM_THREADS=1` everywhere. Every
process of the server's tree (`corolla server` → SuperLink → SuperExec → `flwr-serverapp`,
and `flwr run`) and of each client's tree (the trainer runs inside `corolla client`; its
SuperNode, SuperExec and one `flwr-clientapp` per message) is sampled from /proc every
0.2 s until it exits; a process's peak is its VmHWM. The ServerApp (`flwr-serverapp`) is the
process that runs corolla's server: the one held to {TARGET_GB} GB + the strategy's update state.
`factor state`: the FedAvg aggregator's global A and B (float32), what it keeps between
versions and what the sites are sent to evaluate; `ΔW`: the size of the dense s·B·A of every
LoRA layer (float32), what global.npz holds. With `evaluation=sites` the server builds no whole
ΔW: global.npz (FedAvg) and best.npz (from the factors the sites scored) are written one layer's
ΔW at a time; `largest layer ΔW` is the largest such array. `server tree Σ RSS peak`: the
largest sum of the server tree's VmRSS at one sample.

{chr(10).join(lines)}

{chr(10).join(reading)}

What ran:

{runs}{note}

Per process (ClientApp: one process per message; the largest shown):

{chr(10).join(per)}
"""

if __name__ == "__main__":
    main()
