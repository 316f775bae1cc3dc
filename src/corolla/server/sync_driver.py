"""Synchronous rounds over Flower's Grid: select, send, wait, validate, aggregate, evaluate."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Message

from corolla.server import codec
from corolla.server.federation import Federation, RejectedReply
from corolla.server.records import RoundTimer
from corolla.strategies import ClientUpdate, Dispatch
from corolla.strategies.exceptions import StrategyError
from corolla.strategies.guard import guard_notes

log = logging.getLogger(__name__)


def run_sync(fed: Federation) -> dict:
    """Run `num-rounds` synchronous rounds (continuing a checkpointed run where it stopped); return the summary."""
    cfg = fed.cfg
    fed.start()
    first = int(fed.resumed["round"]) + 1 if fed.resumed else 1
    for rnd in range(first, cfg.num_rounds + 1):
        if fed.out_of_time():
            log.info("time budget of %.0fs spent after %d rounds", cfg.time_budget, rnd - 1)
            break
        timer = play_round(fed, rnd)
        if fed.stopped:
            break
        fed.checkpoint(round=rnd)
        timer.lap("checkpoint_s")
        fed.recorder.round_timing({"round": rnd, "version": fed.aggregator.version, **timer.done()})
    if fed.recorder.evals[-1]["version"] != fed.aggregator.version:
        fed.evaluate(clients=0)  # the final version is always evaluated
    return fed.finish()


def play_round(fed: Federation, rnd: int) -> RoundTimer:
    """One round: select, send, wait, validate, aggregate, evaluate (a failed round leaves the model unchanged).

    Returns where the server's time went (host seconds per phase), for rounds.jsonl.
    """
    cfg = fed.cfg
    timer = RoundTimer(registered=len(fed.nodes.nodes))
    usable = _usable_nodes(fed, rnd)
    if usable is None:
        timer.lap("wait_s")  # waiting for a node, not the server's work
        return timer
    timer.row["usable"] = len(usable)
    if fed.over_budget(min(cfg.clients_per_round, len(usable)), len(usable)):
        return timer
    picked = fed.select(usable, cfg.clients_per_round, rnd)
    timer.lap("select_s")
    sent = {n: fed.aggregator.dispatch(fed.nodes[n].rank) for n in picked}
    msgs = [fed.train_message(n, d) for n, d in sent.items()]
    timer.lap("dispatch_s")
    replies = fed.grid.send_and_receive(msgs, timeout=cfg.round_timeout)
    timer.lap("exchange_s")
    sent_to = {str(m.metadata.message_id): n for m, n in zip(msgs, sent)}  # ids given when pushed
    updates = _validate(fed, rnd, replies, sent, sent_to)
    timer.lap("validate_s")
    if not updates:
        log.warning("round %d: no usable updates; the global model is unchanged", rnd)
        return timer
    if not _aggregate(fed, rnd, updates, timer):
        return timer
    timer.row.update(fed.charge_privacy(len(picked), len(usable)))
    log.info("round %d: aggregated %d of %d updates", rnd, len(updates), len(picked))
    if fed.aggregator.version % cfg.eval_every == 0 or rnd == cfg.num_rounds:
        fed.evaluate(clients=len(updates))
        timer.lap("evaluate_s")
    timer.row["updates"] = len(updates)
    return timer


def _usable_nodes(fed: Federation, rnd: int) -> list[int] | None:
    """The usable nodes now; with none, wait for one (at most round-timeout) rather than spin through rounds.

    None: no node came within the wait (the round is skipped and the model unchanged).
    """
    usable = fed.refresh_nodes()
    if usable:
        return usable
    try:
        return fed.nodes.refresh(wait_for=1)
    except TimeoutError:
        log.warning("round %d: no usable node within %.0fs (reasons in nodes.jsonl); the global model is unchanged",
                    rnd, fed.cfg.round_timeout)
        return None


def _validate(fed: Federation, rnd: int, replies: Iterable[Message], sent: dict[int, Dispatch],
              sent_to: dict[str, int]) -> list[ClientUpdate]:
    """The round's valid updates; every other reply, and every node that sent none, is recorded with the reason."""
    updates: list[ClientUpdate] = []
    answered: set[int] = set()
    for reply in replies:
        nid = codec.reply_node(reply, sent_to)
        if nid not in sent or nid in answered:
            why = "a second reply" if nid in answered else "a reply from a node that was sent no job"
            log.warning("round %d: node %d: %s; it is dropped", rnd, nid, why)
            fed.record_update(None, nid, "rejected", f"node {nid}: {why} this round; it is dropped")
            continue
        answered.add(nid)
        try:
            updates.append(fed.to_update(reply, sent[nid], fed.aggregator.version,
                                         job_id=str(reply.metadata.reply_to_message_id), node_id=nid))
        except RejectedReply as e:
            log.warning("round %d: %s", rnd, e)
            if reply.has_error():  # the node sits out until it answers a profile query again
                fed.job_failed(nid, str(e))
            else:
                fed.record_update(None, nid, "rejected", str(e))
    for nid in sorted(set(sent) - answered):
        fed.record_update(None, nid, "failed", f"node {nid} did not reply within {fed.cfg.round_timeout:.0f}s")
    return updates


def _aggregate(fed: Federation, rnd: int, updates: list[ClientUpdate], timer: RoundTimer) -> bool:
    """Aggregate and record each update's weight; a failed step rejects them all and leaves the model (False)."""
    try:
        weights = fed.aggregator.aggregate(updates)
    except StrategyError as e:
        log.warning("round %d: %s", rnd, e.reason)
        for u in updates:
            fed.record_update(u, u.node_id, "rejected", e.reason)
        timer.lap("aggregate_s")  # the failed step and its rejections
        return False
    timer.lap("aggregate_s")
    for u, w, note in zip(updates, weights.lora, guard_notes(fed.aggregator, len(updates))):
        fed.record_update(u, u.node_id, "accepted", weight=float(w), applied_version=fed.aggregator.version,
                          guard=note)
    fed.selector.observe(updates, rnd)
    timer.lap("record_s")
    return True
