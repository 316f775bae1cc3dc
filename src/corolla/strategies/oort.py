"""Oort: utility-guided client selection with exploration, a duration penalty and a pacer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from corolla.strategies.base import Candidate, ClientUpdate, Selection, Selector
from corolla.strategies.selection_utils import clean_telemetry, sample_without_replacement


@dataclass(frozen=True, kw_only=True)
class OortConfig:
    """Oort's knobs (defaults: FedScale's reference implementation, algorithms.md §4)."""

    exploration: float = 0.9
    exploration_decay: float = 0.98
    exploration_min: float = 0.3
    round_threshold: float = 30.0
    round_penalty: float = 2.0
    clip_bound: float = 0.95
    cut_off: float = 0.95
    sample_window: float = 5.0
    pacer_step: int = 20
    pacer_delta: float = 5.0
    #: picks that make one round, for ε's decay and the exploration share (0: each `select` call is a
    #: round, the synchronous cohort; an asynchronous driver asking for one free slot at a time passes
    #: its concurrency)
    round_size: int = 0

    def __post_init__(self) -> None:
        if self.round_size < 0:
            raise ValueError(f"`round-size` must be >= 0 (0: one round per select call), got {self.round_size}")


@dataclass
class Arm:
    """What Oort knows of one client."""

    utility: float = 0.0
    duration: float = 0.0
    last: int = 0
    count: int = 0
    size: int = 0


@dataclass
class _Pacer:
    history: list[float] = field(default_factory=list)
    last_change: int = 0


class Oort(Selector):
    """Oort (algorithms.md §4).

    Implementation based on Lai et al., OSDI 2021
    (https://www.usenix.org/conference/osdi21/presentation/lai) and FedScale's selector.
    Statistical utility U_i = |B_i| · sqrt(mean over the *whole* local pass of loss²)
    (FedScale issue 249: not the last batch). Score of an explored client =
    (min(U, clip) − min) / range + sqrt(0.1 ln t / t_last), times
    (T_pref / t_i)^2 when its duration t_i exceeds T_pref, the `round_threshold`
    percentile of all known durations. A share ε of the slots (0.9, × 0.98 per
    round, floor 0.3) goes to unexplored clients (largest first, ∝ size within a
    window); the rest is sampled ∝ score among the top of the ranking. The pacer
    raises the threshold by 5 points when the summed utility of the last
    `pacer_step` rounds stalls (within 10 %). Deviation: when unexplored clients
    run out, their slots are filled by exploitation (FedScale leaves them empty).
    Clients with missing or nonsensical telemetry keep their last good values.

    Rounds: a round is `round_size` picks (0: one `select` call, the synchronous
    cohort). ε decays once per round and a round of R picks has FedScale's
    int(R · ε) exploration picks, handed out first across the calls that make up the
    round. An asynchronous driver asks for one free slot at a time; counted per call,
    int(1 · ε) = 0 and it never explored (measured: 4 of 20 nodes ever picked in 152
    one-slot picks, ε at its floor after 60 picks). With round_size = concurrency C it
    explores int(C · ε) of every C picks (C = 1 still gives 0, as FedScale would).
    """

    name = "oort"

    def __init__(self, config: OortConfig | None = None, *, seed: int = 0) -> None:
        self.config = config or OortConfig()
        self.rng = np.random.default_rng(seed)
        self.arms: dict[int, Arm] = {}
        self.explored: set[int] = set()
        self.epsilon = self.config.exploration
        self.round_threshold = self.config.round_threshold
        self.pacer = _Pacer()
        self._problems: dict[int, list[str]] = {}
        self._round_left = 0  # picks left in the current round
        self._explore_left = 0  # exploration picks left in the current round

    def preferred_duration(self) -> float:
        """T_pref: the `round_threshold` percentile of known durations (inf when ≥ 100 or none known)."""
        durations = sorted(a.duration for a in self.arms.values() if a.duration > 0)
        if self.round_threshold >= 100 or not durations:
            return math.inf
        return durations[min(int(len(durations) * self.round_threshold / 100), len(durations) - 1)]

    def _penalty(self, arm: Arm, t_pref: float) -> float:
        if arm.duration > t_pref:
            return (t_pref / max(arm.duration, 1e-4)) ** self.config.round_penalty
        return 1.0

    def select(self, candidates: Sequence[Candidate], k: int, step: int) -> Selection:
        """Pick up to k clients: exploration share to unexplored ones, the rest by score."""
        if k < 0:
            raise ValueError(f"`k` must be >= 0, got {k}")
        t = max(step, 1)
        for c in candidates:
            arm = self.arms.setdefault(c.node_id, Arm(size=c.num_examples))
            arm.size = c.num_examples or arm.size
            clean, problems = clean_telemetry(c.telemetry)
            if problems:
                self._problems.setdefault(c.node_id, []).extend(problems)
        self._pace(t)
        t_pref = self.preferred_duration()
        ids = [c.node_id for c in candidates]
        explored = [i for i in ids if i in self.explored]
        unexplored = [i for i in ids if i not in self.explored]
        scores: dict[int, dict[str, float]] = {}
        if explored:
            util = sorted(self.arms[i].utility for i in explored)
            clip = util[min(int(len(util) * self.config.clip_bound), len(util) - 1)]
            lo, rng = util[0] * 0.999, max(util[-1] - util[0] * 0.999, 1e-4)
            for i in explored:
                a = self.arms[i]
                stat = (min(a.utility, clip) - lo) / rng
                bonus = math.sqrt(0.1 * math.log(t) / max(a.last, 1))
                pen = self._penalty(a, t_pref)
                scores[i] = {"utility": stat, "uncertainty": bonus, "penalty": pen, "score": abs((stat + bonus) * pen)}
        quota = self._exploration_quota(k)
        explore_n = min(len(unexplored), quota) if explored else min(len(unexplored), k)
        exploit_n = min(k - explore_n, len(explored))
        explore_n = min(len(unexplored), k - exploit_n)  # unused exploitation slots go back to exploration
        picked = self._exploit(scores, exploit_n) + self._explore(unexplored, explore_n, t_pref)
        for i in unexplored:
            scores.setdefault(i, {"score": float(self.arms[i].size), "unexplored": 1.0})
        problems, self._problems = self._problems, {}  # this selection's and the last observe's
        return Selection(picked=picked, scores=scores, problems=problems)

    def _exploration_quota(self, k: int) -> int:
        """How many of the next `k` picks explore: int(R · ε) per round of R picks, ε decayed as each round starts."""
        quota = 0
        while k > 0:
            if self._round_left == 0:
                self.epsilon = max(self.epsilon * self.config.exploration_decay, self.config.exploration_min)
                self._round_left = self.config.round_size or k
                self._explore_left = int(self._round_left * self.epsilon)
            take = min(k, self._round_left)
            explore = min(take, self._explore_left)
            quota += explore
            self._explore_left -= explore
            self._round_left -= take
            k -= take
        return quota

    def _exploit(self, scores: dict[int, dict[str, float]], n: int) -> list[int]:
        if n <= 0:
            return []
        ranked = sorted(scores, key=lambda i: scores[i]["score"], reverse=True)
        cut = scores[ranked[min(n, len(ranked) - 1)]]["score"] * self.config.cut_off
        pool = [i for j, i in enumerate(ranked) if scores[i]["score"] >= cut or j < 10 * n]
        return sample_without_replacement(self.rng, pool, np.array([scores[i]["score"] for i in pool]), n)

    def _explore(self, unexplored: list[int], n: int, t_pref: float) -> list[int]:
        if n <= 0:
            return []
        prio = {i: max(self.arms[i].size, 1) * self._penalty(self.arms[i], t_pref) for i in unexplored}
        window = sorted(prio, key=prio.get, reverse=True)[: max(n, int(self.config.sample_window * n))]
        return sample_without_replacement(self.rng, window, np.array([prio[i] for i in window]), n)

    def _pace(self, t: int) -> None:
        c = self.config
        if t - self.pacer.last_change < 2 * c.pacer_step or len(self.pacer.history) < 2 * c.pacer_step:
            return
        last = sum(self.pacer.history[-2 * c.pacer_step: -c.pacer_step])
        cur = sum(self.pacer.history[-c.pacer_step:])
        if abs(cur - last) <= 0.1 * abs(last):
            self.round_threshold = min(100.0, self.round_threshold + c.pacer_delta)
            self.pacer.last_change = t
        elif abs(cur - last) >= 5 * abs(last):
            self.round_threshold = max(c.pacer_delta, self.round_threshold - c.pacer_delta)
            self.pacer.last_change = t

    def observe(self, updates: Sequence[ClientUpdate], step: int) -> None:
        """Record utility (whole local pass) and duration of each client that returned."""
        total = 0.0
        for u in updates:
            arm = self.arms.setdefault(u.node_id, Arm(size=u.num_examples))
            clean, problems = clean_telemetry(u.metrics)
            if problems:
                self._problems[u.node_id] = problems
            samples = float(u.metrics.get("samples", 0) or 0)
            if "loss-sq-mean" in clean and samples > 0:
                arm.utility = samples * math.sqrt(clean["loss-sq-mean"])
            if "duration-s" in clean:
                arm.duration = clean["duration-s"]
            arm.last = max(step, 1)
            arm.count += 1
            self.explored.add(u.node_id)
            total += arm.utility
        self.pacer.history.append(total)

    def summary(self) -> dict:
        """Hyper-parameters."""
        return {"selector": self.name, **self.config.__dict__}
