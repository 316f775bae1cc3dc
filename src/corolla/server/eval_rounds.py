"""Evaluation rounds: the global model evaluated on the server, on the sites, or both, without stalling training.

`begin` evaluates on the server at once (when it does) and pushes one evaluate
message per site; `collect` pulls the sites' answers and writes one metrics row per
version, in version order, once every asked site answered or `round-timeout` passed.
The synchronous driver waits for the row (`wait=True`); the asynchronous one keeps
polling while clients train, so a site busy with a job answers after it and nobody
waits. A site's failure is recorded in its row (`site_failures`) and never stops
the run.

The version each row's primary `accuracy` comes from: the server's test data when the
server evaluates, else the example-weighted mean over the sites. The best version is
chosen on the sites' held-out data when sites evaluate (else on the server's), and
its global model is written to `best.npz` beside `global.npz` as soon as it is best.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from corolla.config import RunConfig
from corolla.server import codec
from corolla.server.clock import Clock
from corolla.server.codec import JobConfig, RejectedReply
from corolla.server.evaluation import Evaluator
from corolla.server.nodes import NodeRegistry
from corolla.server.records import RunRecorder
from corolla.server.site_eval import SiteEval, decode_site_eval, site_summary
from corolla.spec import TASKS
from corolla.strategies import Aggregator, Dispatch, MergedModel, lora_ops

log = logging.getLogger(__name__)

#: seconds between pulls while the synchronous driver waits for the sites' evaluations
POLL_S = 0.05


@dataclass
class PendingEval:
    """One version's evaluation while sites are still answering."""

    version: int
    row: dict[str, Any]
    merged: MergedModel | None
    deadline: float
    #: what the sites were sent (the model they score): best.npz is written from it when the server built no ΔW
    dispatch: Dispatch | None = None
    waiting: dict[str, int] = field(default_factory=dict)  # message id → node
    results: list[SiteEval] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # node → why its evaluation is missing


def write_global(path: Path, merged: MergedModel) -> None:
    """A global model as `delta/<layer>` and `dense/<key>` arrays in one .npz (global.npz, best.npz)."""
    write_npz(path, [*((f"delta/{k}", v) for k, v in merged.deltas.items()),
                     *((f"dense/{k}", v) for k, v in merged.dense.items())])


def write_npz(path: Path, items: Iterable[tuple[str, np.ndarray]]) -> None:
    """An .npz (np.load reads it) written one array at a time: `items` may build each array only when it is written.

    A layer's ΔW then exists only while it is written, never the whole model's at once. The
    file is written beside `path` and renamed into place.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, array in items:
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)
    tmp.replace(path)


def dispatch_model(dispatch: Dispatch, scale: float) -> Iterator[tuple[str, np.ndarray]]:
    """The global.npz items of what a site was sent: ΔW = frozen base delta + s·B·A per layer, built one at a time."""
    layers, dense = lora_ops.split_keys(dispatch.arrays)
    for layer in layers:
        dw = lora_ops.delta(dispatch.arrays[layer + lora_ops.A_SUFFIX], dispatch.arrays[layer + lora_ops.B_SUFFIX], scale)
        base = dispatch.frozen.get(layer + ".base_delta")
        yield f"delta/{layer}", dw if base is None else dw + np.asarray(base, np.float32)
    for k in dense:
        yield f"dense/{k}", dispatch.arrays[k]


class EvalRounds:
    """The run's evaluations: server and/or site, pending ones, and the best version so far."""

    def __init__(self, cfg: RunConfig, grid: Grid, clock: Clock, recorder: RunRecorder, nodes: NodeRegistry,
                 evaluator: Evaluator, job_config: Callable[[int], JobConfig]) -> None:
        self.cfg, self.grid, self.clock, self.recorder, self.nodes = cfg, grid, clock, recorder, nodes
        self.evaluator = evaluator
        self.job_config = job_config
        self.on_server = cfg.evaluates_on_server()
        self.on_sites = cfg.evaluates_on_sites()
        self.pending: list[PendingEval] = []

    # ---- starting one -------------------------------------------------------------------
    def begin(self, aggregator: Aggregator, clients: int, **extra: float) -> None:
        """Evaluate the current global version on the server (now) and ask the sites (answers come later)."""
        version = aggregator.version
        row: dict[str, Any] = {"clients": clients, **extra}
        merged = None  # the dense ΔW is built only for the server's own evaluation: sites get the factors
        if self.on_server:
            merged = aggregator.merged()
            r = self.evaluator.evaluate(merged)
            row.update(accuracy=r.accuracy, loss=r.loss, **r.extra)
        pending = PendingEval(version, row, merged, self.clock.monotonic() + self.cfg.round_timeout)
        if self.on_sites:
            self._ask_sites(pending, aggregator)
        self.pending.append(pending)

    def personalize(self, aggregator: Aggregator) -> dict[str, Any]:
        """The personalization gap of the current version (`personalize-steps`): wait for every site's two numbers.

        Each site evaluates the global model and its own copy fine-tuned on its training rows,
        on the same held-out rows; the row is returned (and not added to metrics.jsonl).
        """
        self.collect(wait=True)
        pending = PendingEval(aggregator.version, {}, None, self.clock.monotonic() + self.cfg.round_timeout)
        self._ask_sites(pending, aggregator, personalize_steps=self.cfg.personalize_steps)
        self.pending.append(pending)
        while pending.waiting and self.clock.monotonic() <= pending.deadline:
            self._pull()
            if pending.waiting:
                self.clock.sleep(POLL_S)
        self.pending.remove(pending)
        for nid in pending.waiting.values():
            pending.failures[str(nid)] = f"no evaluation within {self.cfg.round_timeout:.0f}s"
        row = {"version": pending.version, "personalize_steps": self.cfg.personalize_steps,
               **site_summary(pending.results)}
        if pending.failures:
            row["site_failures"] = pending.failures
        if "personalization_gap" in row:
            log.info("version %d personalized on the sites (%d steps): global %.4f, own copies %.4f, gap %+.4f",
                     pending.version, self.cfg.personalize_steps, row["site_accuracy"], row["site_personal_accuracy"],
                     row["personalization_gap"])
        return row

    def _ask_sites(self, pending: PendingEval, aggregator: Aggregator, personalize_steps: int = 0) -> None:
        sites = self._sites(pending.version)
        if not sites:
            return
        dispatch = aggregator.dispatch(eval_rank(aggregator, self.cfg))
        job = self.job_config(pending.version)
        seed = self.cfg.seed * 100_003 + pending.version * 1_009 + 1
        msgs = [codec.evaluate_message(n, dispatch, job, ttl=self.cfg.round_timeout,
                                       personalize_steps=personalize_steps, seed=seed) for n in sites]
        dtype = self.cfg.wire_dtype
        self.recorder.bytes_down += len(sites) * (codec.nbytes(dispatch.arrays, dtype) + codec.nbytes(dispatch.frozen, dtype))
        pending.waiting = dict(zip(self.grid.push_messages(msgs), sites))
        pending.dispatch = dispatch
        if dispatch.truncation_error:
            pending.row["site_eval_truncation"] = dispatch.truncation_error

    def _sites(self, version: int) -> list[int]:
        """The usable sites asked this time: all, or `eval-sites` of them drawn with a seed of the version."""
        sites = sorted(n for n in self.nodes.nodes if n in self.nodes)
        k = self.cfg.eval_sites
        if k and k < len(sites):
            rng = np.random.default_rng([self.cfg.seed, version])
            sites = sorted(int(n) for n in rng.choice(sites, size=k, replace=False))
        return sites

    # ---- finishing them -----------------------------------------------------------------
    def collect(self, wait: bool = False) -> list[dict[str, Any]]:
        """Pull the sites' answers; record every version whose sites all answered (or timed out), in order.

        `wait`: poll until every pending version is recorded (the synchronous driver, and the end of a run).
        """
        rows = []
        while self.pending:
            self._pull()
            head = self.pending[0]
            if head.waiting and self.clock.monotonic() <= head.deadline:
                if not wait:
                    break
                self.clock.sleep(POLL_S)
                continue
            for nid in head.waiting.values():
                head.failures[str(nid)] = f"no evaluation within {self.cfg.round_timeout:.0f}s"
            self.pending.pop(0)
            rows.append(self._record(head))
        return rows

    def _pull(self) -> None:
        ids = [mid for p in self.pending for mid in p.waiting]
        if not ids:
            return
        by_id = {mid: p for p in self.pending for mid in p.waiting}
        for reply in self.grid.pull_messages(ids):
            mid = str(reply.metadata.reply_to_message_id)
            p = by_id.get(mid)
            if p is None or mid not in p.waiting:
                continue  # a second answer to one evaluation: the first counted
            nid = p.waiting.pop(mid)
            info = self.nodes.nodes.get(nid)
            try:
                if reply.metadata.src_node_id != nid and not reply.has_error():
                    raise RejectedReply(f"an evaluation answer for node {nid} came from node "
                                        f"{reply.metadata.src_node_id}")
                p.results.append(decode_site_eval(reply, nid, p.version, self.evaluator.fingerprint,
                                                  info.num_examples if info else 1))
            except RejectedReply as e:
                log.warning("version %d: %s", p.version, e)
                p.failures[str(nid)] = str(e)

    def _record(self, p: PendingEval) -> dict[str, Any]:
        row = dict(p.row)
        sites = site_summary(p.results)
        row.update(sites)
        if sites and TASKS[self.cfg.task].generates:
            row["site_perplexity"] = float(np.exp(min(sites["site_loss"], 50.0)))
        if p.failures:
            row["site_failures"] = p.failures
        if not self.on_server:  # the sites' weighted mean is the run's accuracy (None: no site answered)
            row["accuracy"], row["loss"] = sites.get("site_accuracy"), sites.get("site_loss")
        accuracy, loss = row.pop("accuracy", None), row.pop("loss", None)
        out = self.recorder.evaluation(p.version, accuracy, loss, **row)
        self._keep_if_best(p, out)
        log.info("version %d: %s", p.version, describe(out))
        return out

    def _keep_if_best(self, p: PendingEval, row: dict[str, Any]) -> None:
        score = row.get("site_accuracy") if self.on_sites else row.get("accuracy")
        if score is None or (p.merged is None and p.dispatch is None):
            return
        best = self.recorder.best
        if best is None or score > best["score"]:
            path = self.recorder.dir / "best.npz"
            if self.on_sites and p.dispatch is not None:  # exactly the model the sites scored
                write_npz(path, dispatch_model(p.dispatch, self.cfg.lora_spec().scale(p.dispatch.rank)))
            else:
                write_global(path, p.merged)  # type: ignore[arg-type]
            self.recorder.best = {"version": p.version, "score": score,
                                  "on": "sites" if self.on_sites else "server"}


def eval_rank(aggregator: Aggregator, cfg: RunConfig) -> int:
    """The rank the global model travels at to be evaluated: its own (FedAvg family) or max-rank (mixed ranks)."""
    rank = getattr(aggregator, "rank", None)
    if isinstance(rank, int):
        return rank
    return int(getattr(aggregator, "max_rank", cfg.max_rank))


def describe(row: dict[str, Any]) -> str:
    """One log line of an evaluation row: accuracy and loss, and the sites' mean and worst when they evaluated."""
    acc, loss = row.get("accuracy"), row.get("loss")
    text = "no evaluation answered" if acc is None else f"accuracy {acc:.4f}, loss {loss:.4f}"
    if "site_accuracy" in row:
        text += (f"; sites {row['site_accuracy']:.4f} (worst {row['site_worst_accuracy']:.4f} at node "
                 f"{row['site_worst_node']}, Jain {row['site_jain']:.3f}, {len(row['sites'])} sites)")
    if row.get("site_failures"):
        text += f"; {len(row['site_failures'])} sites did not evaluate"
    return f"{text} ({row['wall_s']:.1f}s)"
