"""Federated evaluation: what a site's evaluation reply may say, and what the server makes of all of them.

Each site evaluates the global model on its own held-out rows and answers with
accuracy, loss and a count. Nothing in such a reply is trusted: a count weights the
site in the means, so it is capped at what the node declared when it joined (a
site that claims a billion held-out rows counts as its silo, never as the
federation); an accuracy outside [0, 1], a loss that is negative, not finite or
absurd, another base model or another version is rejected with the reason.

`site_summary` turns the accepted results into the row the run records per
version: the example-weighted mean, the worst and the best site, the spread, the
standard deviation and Jain's fairness index, plus every site's own numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message

from corolla.proto import wire
from corolla.server.codec import RejectedReply

#: a loss above this (nats per example or token) is no evaluation of a model this run trains: the reply is rejected
MAX_LOSS = 1e4
#: the further metrics a site may report, with their valid range (a causal LM's perplexity and ROUGE-L)
EXTRA_RANGES = {"perplexity": (1.0, math.exp(50.0)), "rouge_l": (0.0, 1.0)}


@dataclass(frozen=True)
class SiteEval:
    """One site's evaluation of one global version, as the server accepted it."""

    node_id: int
    accuracy: float
    loss: float
    num_examples: int
    #: the examples it counts for in the means: its count, capped at the node's declared silo size
    weight: int
    extra: dict[str, float] = field(default_factory=dict)
    #: the site's own fine-tuned copy of the model on the same rows (`personalize-steps`); None: not asked
    personal_accuracy: float | None = None
    personal_loss: float | None = None


def decode_site_eval(reply: Message, node_id: int, version: int, fingerprint: str, declared: int) -> SiteEval:
    """Validate one evaluation reply of node `node_id` for global `version`; raise RejectedReply with the reason."""
    if reply.has_error():
        raise RejectedReply(f"node {node_id}: evaluation failed: {reply.error.reason}")
    content = reply.content
    for key in (wire.METRICS, wire.CONFIG):
        if key not in content:
            raise RejectedReply(f"node {node_id}: evaluation reply has no `{key}` record")
    m, cfg = content[wire.METRICS], content[wire.CONFIG]
    fp = str(cfg.get(wire.FINGERPRINT, ""))
    if fp != fingerprint:
        raise RejectedReply(f"node {node_id}: evaluated base model {fp}, the server's is {fingerprint}")
    if _number(m, wire.MODEL_VERSION, node_id) != version:
        raise RejectedReply(f"node {node_id}: evaluation is of version {m.get(wire.MODEL_VERSION)}, it was sent "
                            f"version {version}")
    n = _number(m, wire.NUM_EXAMPLES, node_id)
    if n != int(n) or n < 1:
        raise RejectedReply(f"node {node_id}: evaluated on {m.get(wire.NUM_EXAMPLES)!r} examples; a count >= 1 is "
                            "required")
    accuracy, loss = _number(m, wire.ACCURACY, node_id), _number(m, wire.LOSS, node_id)
    if not 0.0 <= accuracy <= 1.0:
        raise RejectedReply(f"node {node_id}: accuracy {accuracy!r} is outside [0, 1]; the evaluation is rejected")
    if not 0.0 <= loss <= MAX_LOSS:
        raise RejectedReply(f"node {node_id}: loss {loss!r} is outside [0, {MAX_LOSS:g}]; the evaluation is rejected")
    extra = {}
    for key, (low, high) in EXTRA_RANGES.items():
        if key in m:
            v = _number(m, key, node_id)
            if not low <= v <= high:
                raise RejectedReply(f"node {node_id}: `{key}` = {v!r} is outside [{low:g}, {high:g}]; the evaluation "
                                    "is rejected")
            extra[key] = v
    personal: dict[str, float] = {}
    if wire.PERSONAL_ACCURACY in m or wire.PERSONAL_LOSS in m:
        personal = {"personal_accuracy": _number(m, wire.PERSONAL_ACCURACY, node_id),
                    "personal_loss": _number(m, wire.PERSONAL_LOSS, node_id)}
        if not 0.0 <= personal["personal_accuracy"] <= 1.0 or not 0.0 <= personal["personal_loss"] <= MAX_LOSS:
            raise RejectedReply(f"node {node_id}: its personalized accuracy/loss {personal} is out of range; the "
                                "evaluation is rejected")
    count = int(n)
    return SiteEval(node_id=node_id, accuracy=accuracy, loss=loss, num_examples=count,
                    weight=max(1, min(count, declared)), extra=extra, **personal)


def _number(m: Mapping[str, Any], key: str, node_id: int) -> float:
    v = m.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RejectedReply(f"node {node_id}: evaluation reply's `{key}` = {v!r} is not a finite number")
    return float(v)


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index (Σx)² / (n Σx²): 1 when every site does equally well, 1/n when one does all."""
    sq = sum(x * x for x in values)
    return 1.0 if sq == 0 else sum(values) ** 2 / (len(values) * sq)


def site_summary(results: Sequence[SiteEval]) -> dict[str, Any]:
    """The per-version row of site evaluations (keys `site_…` and `sites`); {} when no site answered.

    `site_accuracy`/`site_loss` weight each site by its (capped) count: the federation's
    accuracy on all held-out rows together. The worst site, the spread (best − worst),
    the standard deviation across sites and Jain's index are over sites, unweighted:
    they say how evenly the one global model serves them.
    """
    if not results:
        return {}
    total = sum(r.weight for r in results)
    accs = [r.accuracy for r in results]
    mean_unweighted = sum(accs) / len(accs)
    worst = min(results, key=lambda r: (r.accuracy, r.node_id))
    row: dict[str, Any] = {
        "site_accuracy": sum(r.accuracy * r.weight for r in results) / total,
        "site_loss": sum(r.loss * r.weight for r in results) / total,
        "site_worst_accuracy": worst.accuracy,
        "site_worst_node": worst.node_id,
        "site_best_accuracy": max(accs),
        "site_spread": max(accs) - min(accs),
        "site_std": math.sqrt(sum((a - mean_unweighted) ** 2 for a in accs) / len(accs)),
        "site_jain": jain_index(accs),
        "site_examples": total,
        "sites": {str(r.node_id): {"accuracy": r.accuracy, "loss": r.loss, "examples": r.num_examples,
                                   **({"weight": r.weight} if r.weight != r.num_examples else {}), **r.extra,
                                   **({"personal_accuracy": r.personal_accuracy, "personal_loss": r.personal_loss}
                                      if r.personal_accuracy is not None else {})}
                  for r in sorted(results, key=lambda r: r.node_id)},
    }
    personal = [r for r in results if r.personal_accuracy is not None]
    if personal:  # the same sites' global and own-copy accuracies, example-weighted
        w = sum(r.weight for r in personal)
        row["site_personal_accuracy"] = sum(r.personal_accuracy * r.weight for r in personal) / w  # type: ignore[operator]
        row["personalization_gap"] = row["site_personal_accuracy"] - sum(r.accuracy * r.weight for r in personal) / w
    for key in EXTRA_RANGES:
        have = [r for r in results if key in r.extra]
        if have:
            row[f"site_{key}"] = sum(r.extra[key] * r.weight for r in have) / sum(r.weight for r in have)
    return row
