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

from flwr.app import Message

from corolla.server import codec
from corolla.server.factory import build_rule
from corolla.server.federation import Federation, Job, RejectedReply
from corolla.server.nodes import NODE_REFRESH_S
from corolla.server.records import RoundTimer
from corolla.strategies import AsyncRule, AsyncStep, FedHL
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
    return AsyncLoop(fed).run()


class AsyncLoop:
    """One asynchronous run: the rule, the jobs in flight and the clock marks, with one method per step of a poll.

    A poll refreshes the node list (every NODE_REFRESH_S), fills free slots, pulls and
    admits replies, frees the slots of silent jobs, lets the rule produce every version
    it is ready for (each recorded, maybe evaluated, checkpointed), then sleeps POLL_S.
    `timer` charges the host seconds of each step to its phase in rounds.jsonl.
    """

    def __init__(self, fed: Federation) -> None:
        self.fed, self.cfg, self.clock = fed, fed.cfg, fed.clock
        self.usable = fed.start()
        if isinstance(fed.aggregator, FedHL):  # keep the SVDs of every version a reply may still start from
            cfg = self.cfg
            fed.aggregator.keep_versions = max(2, cfg.max_staleness + 1 if cfg.max_staleness >= 0 else cfg.concurrency)
        self.rule = self._rule()
        log.info("async: %s, concurrency %d", self.rule.summary(), self.cfg.concurrency)
        register(self.rule, fed, self.usable)
        self.in_flight: dict[str, Job] = {}
        self.answered: set[str] = set()
        self.last_refresh = self.clock.monotonic()
        self.last_eval = -float("inf")
        # host seconds per phase since the last version, one rounds.jsonl row per version (`wait_s`: polling, asleep)
        self.timer = RoundTimer(registered=len(fed.nodes.nodes))

    def _rule(self) -> AsyncRule:
        """The checkpointed rule (its buffer of received, unapplied updates survives a restart), else a new one."""
        fed, resumed = self.fed, self.fed.resumed
        if not resumed or resumed.get("rule") is None:
            return build_rule(self.cfg, fed.aggregator, self.clock.monotonic())
        rule = resumed["rule"]
        rule.shift_clock(self.clock.monotonic() - float(resumed["clock"]))
        for job in resumed.get("in_flight", []):
            fed.record_update(None, job["node"], "failed", f"node {job['node']}: its job from version "
                              f"{job['version']} was in flight when the server stopped; the reply is lost")
        return rule

    def run(self) -> dict:
        """Poll until `num-rounds` versions exist or the time budget is spent; evaluate the last version; summarize."""
        fed = self.fed
        while fed.aggregator.version < self.cfg.num_rounds and not fed.out_of_time():
            now = self.clock.monotonic()
            self.refresh_nodes(now)
            self.dispatch(now)
            self.timer.lap("select_s")  # the node refresh and the idle scan
            self.pull_replies()
            self.expire_silent_jobs(now)
            self.timer.lap("validate_s")
            self.aggregate_ready()
            fed.evals.collect()  # the sites' evaluations that came in (a row per version, in order)
            self.wait()
        fed.evals.collect(wait=True)
        if fed.recorder.evals[-1]["version"] != fed.aggregator.version:
            fed.evaluate(clients=0, in_flight=len(self.in_flight))  # the final version is always evaluated
        return fed.finish()

    # ---- the steps of one poll ----------------------------------------------------------------
    def refresh_nodes(self, now: float) -> None:
        """Re-read the node list every NODE_REFRESH_S (nodes join and leave mid-run) and tell the rule."""
        if now - self.last_refresh > NODE_REFRESH_S:
            self.usable = self.fed.refresh_nodes()
            self.last_refresh = now
            register(self.rule, self.fed, self.usable)

    def dispatch(self, now: float) -> None:
        """Fill the free slots with nodes the rule lets train now, each sent the newest model."""
        fed = self.fed
        busy = {j.node_id for j in self.in_flight.values()}
        idle = [n for n in self.usable if n not in busy and n in fed.nodes and self.rule.may_dispatch(n, now)]
        free = self.cfg.concurrency - len(self.in_flight)
        if free <= 0 or not idle:
            return
        picked = fed.select(idle, free, fed.aggregator.version)
        self.timer.lap("select_s")
        jobs = [(n, fed.aggregator.dispatch(fed.nodes[n].rank)) for n in picked]
        msgs = [fed.train_message(n, d, ttl=self.cfg.round_timeout) for n, d in jobs]
        for mid, (n, d) in zip(fed.grid.push_messages(msgs), jobs):
            self.in_flight[mid] = Job(n, d, now)
        self.timer.lap("dispatch_s")

    def pull_replies(self) -> None:
        """Take every reply that arrived and admit it (or record why not)."""
        for reply in self.fed.grid.pull_messages(list(self.in_flight)):
            self._admit(reply)

    def _admit(self, reply: Message) -> None:
        fed = self.fed
        mid = str(reply.metadata.reply_to_message_id)
        job = self.in_flight.pop(mid, None)
        nid = codec.reply_node(reply, {mid: job.node_id} if job else {})
        if job is None:
            why = "a second reply to one job" if mid in self.answered else "a reply to an unknown job"
            fed.record_update(None, nid, "rejected", f"node {nid}: {why}; it is dropped")
            log.warning("async: node %d: %s", nid, why)
            return
        self.answered.add(mid)
        try:
            update = fed.to_update(reply, job.dispatch, fed.aggregator.version, job_id=mid, node_id=nid)
            self.rule.observe(nid, self.clock.monotonic() - job.pushed_at)
            self.rule.admit(update)
        except RejectedReply as e:
            log.warning("async: %s", e)
            if reply.has_error():  # the node sits out until it answers a profile query again
                fed.job_failed(nid, str(e))
            else:
                fed.record_update(None, nid, "rejected", str(e))
        except StrategyError as e:
            fed.record_update(None, nid, "rejected", e.reason)
            log.warning("async: %s", e.reason)

    def expire_silent_jobs(self, now: float) -> None:
        """A job that outlived its TTL (plus grace) frees its slot and is recorded as failed."""
        timeout = self.cfg.round_timeout
        for mid, job in list(self.in_flight.items()):
            if now - job.pushed_at > timeout + TTL_GRACE_S:
                del self.in_flight[mid]
                self.fed.record_update(None, job.node_id, "failed", f"node {job.node_id} did not reply within {timeout:.0f}s")

    def aggregate_ready(self) -> None:
        """Produce every version the rule is ready for (a full buffer may hold several versions' worth)."""
        while self.fed.aggregator.version < self.cfg.num_rounds:
            step = self._step()
            if step is None:
                break
            self.timer.lap("aggregate_s")
            self._record_version(step)

    def _step(self) -> AsyncStep | None:
        """Expire what the rule refuses to apply, then ask it for a version (None: not ready, or the step failed)."""
        fed = self.fed
        for u, why in self.rule.expire():
            fed.record_update(u, u.node_id, "rejected", why)
            log.warning("async: %s", why)
        try:
            return self.rule.step(self.clock.monotonic())
        except StrategyError as e:  # the updates of the failed step are dropped, each recorded; the rest wait
            log.warning("async: %s", e.reason)
            for u in e.dropped:
                fed.record_update(u, u.node_id, "rejected", e.reason)
            return None

    def _record_version(self, step: AsyncStep) -> None:
        """Record the applied updates, evaluate when due, checkpoint, and close this version's timing row."""
        fed, timer = self.fed, self.timer
        for u, w, note in zip(step.updates, step.lora_weights, guard_notes(fed.aggregator, len(step.updates))):
            fed.record_update(u, u.node_id, "accepted", weight=w, applied_version=step.version, guard=note)
        fed.selector.observe(step.updates, step.version)
        timer.lap("record_s")
        log.info("async: version %d from %d updates (staleness %s)", step.version, len(step.updates), step.staleness)
        self._evaluate_if_due(step)
        fed.checkpoint(rule=self.rule, in_flight=[{"node": j.node_id, "version": j.dispatch.version}
                                                  for j in self.in_flight.values()])
        timer.lap("checkpoint_s")
        fed.recorder.round_timing({"version": step.version, **timer.done(updates=len(step.updates),
                                                                        in_flight=len(self.in_flight))})
        self.timer = RoundTimer(registered=len(fed.nodes.nodes))

    def _evaluate_if_due(self, step: AsyncStep) -> None:
        """Start evaluating every `eval-every` versions, at most every `eval-interval` s, and always the last version.

        Sites answer while clients train (`EvalRounds.collect` at every poll): nobody waits for an evaluation.
        """
        now = self.clock.monotonic()
        due = step.version % self.cfg.eval_every == 0 and now - self.last_eval >= self.cfg.eval_interval
        if due or step.version >= self.cfg.num_rounds:
            self.last_eval = now
            self.fed.begin_evaluation(clients=len(step.updates), in_flight=len(self.in_flight),
                                      mean_staleness=sum(step.staleness) / len(step.staleness))
            self.timer.lap("evaluate_s")

    def wait(self) -> None:
        """Sleep one poll, waking at the rule's next deadline (a virtual clock must stop there, not jump past it)."""
        deadline = self.rule.next_deadline()
        if deadline is not None:  # e.g. FedFix's next boundary
            self.clock.wake_at(deadline)
        self.timer.lap("validate_s")  # a failed step's records, the rule's expiries
        self.clock.sleep(POLL_S)
        self.timer.lap("wait_s")
