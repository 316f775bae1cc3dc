"""Asynchronous federation over Flower's Grid: keep C clients busy, aggregate when the rule says.

Push/pull never blocks: a freed client gets the newest model as soon as the rule
allows (`may_dispatch`), replies are keyed by the id of the message they answer,
error replies (TTL expiry, a node gone, its trainer down) free the slot, are recorded
and hold the node out until it answers a profile query again (asked at the next node
refresh), and the node list is re-read regularly so nodes may join or leave mid-run. The driver owns
the clock and hands it to the rule (FedBuff / FedFix / FedAsync in strategies/),
which never sleeps; it talks to every rule through the same hooks.

Server memory per in-flight client: its `Dispatch` (one adapter at its rank, plus
FLoRA's frozen W) until it replies or times out — at most `concurrency` of them;
FedHL additionally keeps the top-r_max SVD of the last few versions.
"""

from __future__ import annotations

import logging

from corolla.server import codec
from corolla.server.factory import build_rule
from corolla.server.federation import Federation, Job, RejectedReply
from corolla.server.nodes import NODE_REFRESH_S
from corolla.server.records import RoundTimer
from corolla.strategies import AsyncRule, FedHL
from corolla.strategies.exceptions import StrategyError
from corolla.strategies.guard import guard_notes

log = logging.getLogger(__name__)

POLL_S = 0.05
#: grace beyond the message TTL before a silent job's slot is freed (Flower reports expiry itself)
TTL_GRACE_S = 10.0


def register(rule: AsyncRule, fed: Federation, usable: list[int]) -> None:
    """Tell the rule the usable nodes and their declared example counts (after the node list was re-read)."""
    for n in usable:
        rule.register(n, fed.nodes[n].num_examples)


def run_async(fed: Federation) -> dict:
    """Produce `num-rounds` global versions asynchronously; return the run summary."""
    cfg, clock = fed.cfg, fed.clock
    usable = fed.start()
    if isinstance(fed.aggregator, FedHL):  # keep the SVDs of every version a reply may still start from
        fed.aggregator.keep_versions = max(2, cfg.max_staleness + 1 if cfg.max_staleness >= 0 else cfg.concurrency)
    if fed.resumed and fed.resumed.get("rule") is not None:  # the buffer of received, unapplied updates survives
        rule = fed.resumed["rule"]
        rule.shift_clock(clock.monotonic() - float(fed.resumed["clock"]))
        for job in fed.resumed.get("in_flight", []):
            fed.record_update(None, job["node"], "failed", f"node {job['node']}: its job from version "
                              f"{job['version']} was in flight when the server stopped; the reply is lost")
    else:
        rule = build_rule(cfg, fed.aggregator, clock.monotonic())
    log.info("async: %s, concurrency %d", rule.summary(), cfg.concurrency)
    register(rule, fed, usable)
    in_flight: dict[str, Job] = {}
    answered: set[str] = set()
    last_refresh = clock.monotonic()
    last_eval = -float("inf")
    # host seconds per phase since the last version, one rounds.jsonl row per version (`wait_s`: polling, asleep)
    timer = RoundTimer(registered=len(fed.nodes.nodes))
    while fed.aggregator.version < cfg.num_rounds and not fed.out_of_time():
        now = clock.monotonic()
        if now - last_refresh > NODE_REFRESH_S:
            usable = fed.refresh_nodes()
            last_refresh = now
            register(rule, fed, usable)
        busy = {j.node_id for j in in_flight.values()}
        idle = [n for n in usable if n not in busy and n in fed.nodes and rule.may_dispatch(n, now)]
        free = cfg.concurrency - len(in_flight)
        if free > 0 and idle:
            picked = fed.select(idle, free, fed.aggregator.version)
            timer.lap("select_s")
            jobs = [(n, fed.aggregator.dispatch(fed.nodes[n].rank)) for n in picked]
            msgs = [fed.train_message(n, d, ttl=cfg.round_timeout) for n, d in jobs]
            for mid, (n, d) in zip(fed.grid.push_messages(msgs), jobs):
                in_flight[mid] = Job(n, d, now)
            timer.lap("dispatch_s")
        timer.lap("select_s")  # the node refresh and the idle scan
        for reply in fed.grid.pull_messages(list(in_flight)):
            mid = str(reply.metadata.reply_to_message_id)
            job = in_flight.pop(mid, None)
            nid = codec.reply_node(reply, {mid: job.node_id} if job else {})
            if job is None:
                why = "a second reply to one job" if mid in answered else "a reply to an unknown job"
                fed.record_update(None, nid, "rejected", f"node {nid}: {why}; it is dropped")
                log.warning("async: node %d: %s", nid, why)
                continue
            answered.add(mid)
            try:
                update = fed.to_update(reply, job.dispatch, fed.aggregator.version, job_id=mid, node_id=nid)
                rule.observe(nid, clock.monotonic() - job.pushed_at)
                rule.admit(update)
            except RejectedReply as e:
                log.warning("async: %s", e)
                if reply.has_error():  # the node sits out until it answers a profile query again
                    fed.job_failed(nid, str(e))
                else:
                    fed.record_update(None, nid, "rejected", str(e))
            except StrategyError as e:
                fed.record_update(None, nid, "rejected", e.reason)
                log.warning("async: %s", e.reason)
        for mid, job in list(in_flight.items()):  # a job that outlived its TTL frees its slot
            if now - job.pushed_at > cfg.round_timeout + TTL_GRACE_S:
                del in_flight[mid]
                fed.record_update(None, job.node_id, "failed",
                                  f"node {job.node_id} did not reply within {cfg.round_timeout:.0f}s")
        timer.lap("validate_s")
        while fed.aggregator.version < cfg.num_rounds:  # a full buffer may hold several versions' worth
            for u, why in rule.expire():
                fed.record_update(u, u.node_id, "rejected", why)
                log.warning("async: %s", why)
            try:
                step = rule.step(clock.monotonic())
            except StrategyError as e:  # the updates of the failed step are dropped, each recorded; the rest wait
                log.warning("async: %s", e.reason)
                for u in e.dropped:
                    fed.record_update(u, u.node_id, "rejected", e.reason)
                break
            if step is None:
                break
            timer.lap("aggregate_s")
            for u, w, note in zip(step.updates, step.lora_weights, guard_notes(fed.aggregator, len(step.updates))):
                fed.record_update(u, u.node_id, "accepted", weight=w, applied_version=step.version, guard=note)
            fed.selector.observe(step.updates, step.version)
            timer.lap("record_s")
            log.info("async: version %d from %d updates (staleness %s)", step.version, len(step.updates),
                     step.staleness)
            due = step.version % cfg.eval_every == 0 and clock.monotonic() - last_eval >= cfg.eval_interval
            if due or step.version >= cfg.num_rounds:
                last_eval = clock.monotonic()
                fed.evaluate(clients=len(step.updates), in_flight=len(in_flight),
                             mean_staleness=sum(step.staleness) / len(step.staleness))
                timer.lap("evaluate_s")
            fed.checkpoint(rule=rule, in_flight=[{"node": j.node_id, "version": j.dispatch.version}
                                                 for j in in_flight.values()])
            timer.lap("checkpoint_s")
            fed.recorder.round_timing({"version": step.version, **timer.done(updates=len(step.updates),
                                                                            in_flight=len(in_flight))})
            timer = RoundTimer(registered=len(fed.nodes.nodes))
        deadline = rule.next_deadline()
        if deadline is not None:  # e.g. FedFix's next boundary: a virtual clock must stop there, not jump past it
            clock.wake_at(deadline)
        timer.lap("validate_s")  # a failed step's records, the rule's expiries
        clock.sleep(POLL_S)
        timer.lap("wait_s")
    if fed.recorder.evals[-1]["version"] != fed.aggregator.version:
        fed.evaluate(clients=0, in_flight=len(in_flight))  # the final version is always evaluated
    return fed.finish()
