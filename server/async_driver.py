"""Asynchronous federation over Flower's Grid: keep C clients busy, aggregate when the rule says.

Push/pull never blocks: a freed client gets the newest model at once, replies are
keyed by the id of the message they answer, error replies (TTL expiry, a node
gone) free the slot and are recorded, and the node list is re-read regularly so
nodes may join or leave mid-run. The driver owns the clock and hands it to the
rule (FedBuff / FedFix / FedAsync in strategies/), which never sleeps.

Server memory per in-flight client: its `Dispatch` (one adapter at its rank, plus
FLoRA's frozen W) until it replies or times out — at most `concurrency` of them;
FedHL additionally keeps the top-r_max SVD of the last few versions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from server.config import RunConfig
from server.federation import Federation, RejectedReply
from strategies import Aggregator, Dispatch, FedHL
from strategies.exceptions import StrategyError
from strategies.fedbuff import AsyncRule, FedAsync, FedBuff
from strategies.fedfix import FedFix
from strategies.staleness import STALENESS, PolynomialStaleness

log = logging.getLogger(f"corolla.{__name__}")

POLL_S = 0.05
NODE_REFRESH_S = 5.0


@dataclass
class Job:
    """One in-flight training job."""

    node_id: int
    dispatch: Dispatch
    pushed_at: float


def build_rule(cfg: RunConfig, aggregator: Aggregator, now: float) -> AsyncRule:
    """Build the configured asynchronous rule around the aggregator."""
    if cfg.staleness == "polynomial":
        weight = PolynomialStaleness(cfg.staleness_exponent)
    else:
        weight = STALENESS[cfg.staleness]()
    max_st = None if cfg.max_staleness < 0 else cfg.max_staleness
    if cfg.async_rule == "fedbuff":
        return FedBuff(aggregator, weight, buffer_size=cfg.buffer_size, max_staleness=max_st, server_lr=cfg.server_lr)
    if cfg.async_rule == "fedasync":
        return FedAsync(aggregator, weight, max_staleness=max_st, server_lr=cfg.server_lr)
    return FedFix(aggregator, interval=cfg.interval, start=now, max_staleness=max_st, server_lr=cfg.server_lr)


def run_async(fed: Federation) -> dict:
    """Produce `num-rounds` global versions asynchronously; return the run summary."""
    cfg = fed.cfg
    usable = fed.start()
    if isinstance(fed.aggregator, FedHL):
        fed.aggregator.keep_versions = max(2, cfg.max_staleness + 1 if cfg.max_staleness >= 0 else cfg.concurrency)
    rule = build_rule(cfg, fed.aggregator, time.monotonic())
    log.info("async: %s, concurrency %d", rule.summary(), cfg.concurrency)
    in_flight: dict[str, Job] = {}
    last_refresh = time.monotonic()
    seq = 0
    last_eval = 0.0
    while fed.aggregator.version < cfg.num_rounds and not fed.out_of_time():
        now = time.monotonic()
        if now - last_refresh > NODE_REFRESH_S:
            usable = fed.refresh_nodes()
            last_refresh = now
        if isinstance(rule, FedFix):
            for n in usable:
                rule.register(n, fed.nodes[n].num_examples)
        busy = {j.node_id for j in in_flight.values()}
        idle = [n for n in usable if n not in busy]
        free = cfg.concurrency - len(in_flight)
        if free > 0 and idle:
            picked = fed.select(idle, free, fed.aggregator.version)
            jobs = []
            for n in picked:
                seq += 1
                d = fed.aggregator.dispatch(fed.nodes[n].rank)
                jobs.append((fed.train_message(n, d, seed=cfg.seed * 100_003 + seq, ttl=cfg.round_timeout),
                             Job(n, d, now)))
            for mid, (_, job) in zip(fed.grid.push_messages([m for m, _ in jobs]), jobs):
                in_flight[mid] = job
        for reply in fed.grid.pull_messages(list(in_flight)):
            job = in_flight.pop(reply.metadata.reply_to_message_id, None)
            nid = reply.metadata.src_node_id
            if job is None:
                fed.record_update(None, nid, "rejected", f"node {nid}: reply to an unknown or already answered job")
                continue
            try:
                update = fed.to_update(reply, job.dispatch, fed.aggregator.version)
                if isinstance(rule, FedFix):
                    rule.observe_duration(nid, time.monotonic() - job.pushed_at)
                rule.admit(update)
            except RejectedReply as e:
                fed.record_update(None, nid, "failed" if reply.has_error() else "rejected", str(e))
                log.warning("async: %s", e)
            except StrategyError as e:
                fed.record_update(None, nid, "rejected", e.reason)
                log.warning("async: %s", e.reason)
        for mid, job in list(in_flight.items()):  # a job that outlived its TTL frees its slot
            if now - job.pushed_at > cfg.round_timeout + 10:
                del in_flight[mid]
                fed.record_update(None, job.node_id, "failed",
                                  f"node {job.node_id} did not reply within {cfg.round_timeout:.0f}s")
        while fed.aggregator.version < cfg.num_rounds:  # a full buffer may hold several versions' worth
            for u, why in rule.expire():
                fed.record_update(u, u.node_id, "rejected", why)
                log.warning("async: %s", why)
            step = rule.step(time.monotonic())
            if step is None:
                break
            buffered = step.updates
            for u, w in zip(buffered, step.lora_weights):
                fed.record_update(u, u.node_id, "accepted", weight=w, applied_version=step.version)
            fed.selector.observe(buffered, step.version)
            log.info("async: version %d from %d updates (staleness %s)", step.version, len(buffered), step.staleness)
            due = step.version % cfg.eval_every == 0 and time.monotonic() - last_eval >= cfg.eval_interval
            if due or step.version >= cfg.num_rounds:
                last_eval = time.monotonic()
                fed.evaluate(clients=len(buffered), in_flight=len(in_flight),
                             mean_staleness=sum(step.staleness) / len(step.staleness))
        time.sleep(POLL_S)
    if fed.recorder.evals[-1]["version"] != fed.aggregator.version:
        fed.evaluate(clients=0, in_flight=len(in_flight))  # the final version is always evaluated
    return fed.finish()
