"""FedHL: heterogeneous-rank LoRA with a full-rank global update and unbiased aggregation."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from corolla.strategies import lora_ops
from corolla.strategies.base import Aggregator, Arrays, ClientUpdate, Dispatch, LoraSpec, MergedModel, Weights, example_weights
from corolla.strategies.exceptions import AggregationError
from corolla.strategies.options import option

if TYPE_CHECKING:
    import torch

FedHLWeighting = Literal["truncation", "uniform", "examples", "relative", "relative-examples"]
FEDHL_WEIGHTINGS = ("truncation", "uniform", "examples", "relative", "relative-examples")
SVD_METHODS = lora_ops.SVD_METHODS  # the routes lora_ops.top_svd implements
#: when FedHL folds an aggregated change into its dense W: `background` (after the next version's SVD, in a
#: thread, while clients train) or `inline` (before apply returns)
FOLDS = ("background", "inline")
#: where each version's randomized SVD starts: `random` (Gaussian test matrix, 2 power iterations: 6 products
#: with W) or `warm` (the previous version's singular subspace plus 8 Gaussian columns, no power iteration: 2)
SVD_STARTS = ("random", "warm")
#: power iterations of the randomized SVD from each start
NITER = {"random": 2, "warm": 0}
EPSILON = 1e-6
#: ε of the scale-free rule, on relative errors ê = e/‖W‖² ∈ [0, 1]: ê below √ε = 0.1 counts as exact
EPSILON_RELATIVE = 1e-2


def _max_rank() -> int:
    return option(32, key="max-rank", low=1, help="largest rank any client may train (heterogeneous-rank methods)")


def _svd() -> str:
    return option("auto", key="svd", choices=SVD_METHODS,
                  help="SVD of the global update: auto (randomized top-r when r << d), exact, randomized")


@dataclass(frozen=True, kw_only=True)
class FedHLConfig:
    """FedHL's options."""

    # default `relative` (bench/results/fedhl_weighting.md): best final accuracy on both corpora over 3 seeds
    # (beats `examples` in all 6 paired seeds), and no one-class collapse in the 3-site ranks-2/4/8 label-skew case,
    # where the paper's `truncation` rule collapsed onto the rank-8 silo before the weight-share guard existed
    weighting: str = option("relative", key="fedhl-weighting", choices=FEDHL_WEIGHTINGS,
                            help="FedHL weights: truncation (the paper's 1/(e²+ε)), uniform, examples, relative "
                                 "(1/(ê²+ε), ê = e/‖W‖²: scale-free), relative-examples (n_i/(ê²+ε))")
    svd: str = _svd()
    max_rank: int = _max_rank()
    fold: str = option("background", key="fedhl-fold", choices=FOLDS,
                       help="FedHL: fold each change into the dense W in the background while clients train, taking "
                            "the next version's SVD matrix-free from W_t and the returned factors (background), or "
                            "before the next dispatch (inline); the two give the same model to float rounding")
    device: str = option("cpu", key="aggregation-device",
                         help="where FedHL keeps its dense W and runs its SVDs and folds: cpu, auto (the server's GPU "
                              "when it has one), cuda or cuda:N")
    # default `warm` (bench/results/fedhl_svd_start.md): on real federations (MiniLM, WordNet and BBC, 3 seeds)
    # the same accuracy and truncation errors within 1 % of `random`'s, at a third of the SVD's products (7B layout:
    # 19.3 → 7.3 s before the next dispatch); it tracks W's subspace (one subspace-iteration step per version) and
    # loses only where W's spectrum is flat (a synthetic case: aggregation_speed.md)
    svd_start: str = option("warm", key="fedhl-svd-start", choices=SVD_STARTS,
                            help="FedHL's randomized SVD of each version: warm (from the previous version's subspace, "
                                 "2 products with W) or random (Gaussian start, 2 power iterations, 6 products: better "
                                 "when W's spectrum is flat)")


    def __post_init__(self) -> None:
        lora_ops.check_device_name(self.device)  # its availability is checked where W is built: on the server


@dataclass(frozen=True, kw_only=True)
class FlexLoRAConfig:
    """FlexLoRA's options (its weights are example counts)."""

    svd: str = _svd()
    max_rank: int = _max_rank()


@dataclass(frozen=True, kw_only=True)
class MaxRankConfig:
    """Options of the methods whose only knob is the largest client rank (HetLoRA, FLoRA)."""

    max_rank: int = _max_rank()


def _tensors_to(state: dict, device: torch.device | str) -> None:
    """Move FedHL's tensors in `state` (W, the kept SVDs, the pending terms' torch factors) to `device`, in place.

    Numpy factors of pending terms (the replies' own arrays) stay as they are.
    """
    def to(x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        return x if isinstance(x, np.ndarray) else x.to(device)

    state["_w"] = {k: w.to(device) for k, w in state["_w"].items()}
    state["_svds_by_version"] = {
        v: {k: lora_ops.TopSVD(to(svd.u), to(svd.s), to(svd.vh), svd.frob2) for k, svd in svds.items()}
        for v, svds in state["_svds_by_version"].items()}
    state["_pending"] = {k: [(c, to(b), to(a)) for c, b, a in terms] for k, terms in state["_pending"].items()}


def truncation_weights(errors: Sequence[float], eps: float = EPSILON) -> np.ndarray:
    """Return p_i = (1/(e_i² + ε)) / Σ_j 1/(e_j² + ε) (FedHL Eq. 15 / Theorem 3).

    Lower truncation error, more weight; all-zero errors (round 0) give uniform weights.
    """
    e = np.asarray(errors, dtype=np.float64)
    if e.size == 0:
        raise AggregationError("fedhl: no updates to weight; the global model is unchanged.")
    inv = 1.0 / (e**2 + eps)
    return inv / inv.sum()


class FedHL(Aggregator):
    """FedHL aggregation (algorithms.md §1).

    Implementation based on https://arxiv.org/abs/2505.18494. The server keeps a
    dense global update W per LoRA layer, never truncated. A client of rank r is
    sent the rank-r truncation of W (A = V_rᵀ, B = U_r Σ_r / s, Σ on B), and its
    update is applied against *that* truncated start, so components of W above
    rank r are kept rather than erased:
    W ← W + η Σ_i p_i (s_i B_i A_i − s_i B⁰_i A⁰_i).

    Decisions the paper leaves open (documented in docs/design.md): zero singular
    directions start from peft's random A rows (B columns zero), so round 0 is
    exactly peft's initialisation; the truncation error of a dispatch is computed
    when it is sent; `svd="auto"` uses a randomized top-r SVD on large layers —
    unbiasedness does not depend on its accuracy because the update is taken
    against exactly what was sent.
    """

    name = "fedhl"

    def __init__(
        self,
        initial: Arrays,
        lora: LoraSpec,
        *,
        weighting: FedHLWeighting = "relative",
        svd: str = "auto",
        max_rank: int | None = None,
        fold: str = "background",
        svd_start: str = "random",
        device: str = "cpu",
    ) -> None:
        super().__init__(initial, lora)
        if weighting not in FEDHL_WEIGHTINGS:
            raise ValueError(f"`fedhl-weighting` must be one of {list(FEDHL_WEIGHTINGS)}; got {weighting!r}")
        if fold not in FOLDS:
            raise ValueError(f"`fedhl-fold` must be one of {list(FOLDS)}; got {fold!r}")
        if svd_start not in SVD_STARTS:
            raise ValueError(f"`fedhl-svd-start` must be one of {list(SVD_STARTS)}; got {svd_start!r}")
        self.weighting = weighting
        self.fold = fold
        self.svd_start = svd_start
        self.svd_method = svd
        init_rank = lora_ops.rank_of(initial)
        self.max_rank = max_rank or init_rank
        self.init_a = {layer: np.asarray(initial[lora_ops.a_key(layer)], np.float32) for layer in self.layers}
        for a in self.init_a.values():
            if a.shape[0] < self.max_rank:
                raise ValueError(
                    f"fedhl: the initial adapter has rank {a.shape[0]} but clients may ask for rank "
                    f"{self.max_rank}; build the initial adapter at the largest client rank."
                )
        import torch

        self.device_name = device
        self.device = lora_ops.resolve_device(device)
        scale0 = lora.scale(init_rank)
        self._w = {
            layer: torch.from_numpy(
                lora_ops.delta(initial[lora_ops.a_key(layer)], initial[lora_ops.b_key(layer)], scale0)
            ).to(self.device)
            for layer in self.layers
        }
        # version -> top-r_max SVD per layer. Every dispatch of a version is a slice of it, so the
        # server can rebuild any client's starting point W^(r) from it instead of storing it.
        self._svds_by_version: dict[int, dict[str, lora_ops.TopSVD]] = {}
        self.keep_versions = 1
        self._init_fold_state()

    @property
    def w(self) -> dict[str, torch.Tensor]:
        """The dense global W per layer, with every applied change folded in (waits for a running fold)."""
        self.settle()
        return self._w

    # ---- the deferred fold (`fold="background"`) ---------------------------------------------------
    # apply() keeps the change as low-rank terms (`_pending`: references to the returned factors, no
    # copies). The next version's first dispatch takes each layer's top-r_max SVD matrix-free from
    # W_t and those terms (lora_ops.top_svd_of_sum), then a thread folds the terms into W (the
    # O(d²·Σr_i) part) while clients train. ‖W‖² (and with it every truncation error of that
    # version) is known only once the fold is done: dispatches carry NaN errors until the thread
    # fills them in, under `_lock`. Everything that reads W or the errors first waits (`settle`).
    def _init_fold_state(self) -> None:
        self._pending: dict[str, list[lora_ops.LowRankTerm]] = {}
        self._fold_thread: threading.Thread | None = None
        self._fold_error: BaseException | None = None
        # (version, layer → HostFactors): the current version's SVDs as numpy, derived, so never pickled
        self._host: tuple[int, dict[str, lora_ops.HostFactors]] | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        """Pickle (checkpoints) W and the change not yet folded into it (its terms), never a half-folded W.

        A checkpoint is written right after aggregation, when the change is still pending:
        pickling the terms instead of folding first keeps the fold off that path too.
        """
        self._join_fold()
        state = dict(self.__dict__)
        for key in ("_fold_thread", "_fold_error", "_lock", "device", "_host"):  # _host: derived from the SVDs
            state.pop(key, None)
        if self.device.type != "cpu":  # a checkpoint holds CPU tensors: it resumes on a machine without that GPU
            _tensors_to(state, "cpu")
        return state

    def __setstate__(self, state: dict) -> None:
        if "w" in state:  # a checkpoint from before the deferred fold
            state["_w"] = state.pop("w")
        state.setdefault("svd_start", "random")  # a checkpoint from before warm starts
        state.setdefault("device_name", "cpu")  # ... and before aggregation-device
        state.setdefault("_pending", {})
        device = lora_ops.resolve_device(state["device_name"])
        if device.type != "cpu":
            _tensors_to(state, device)
        pending = state.pop("_pending")
        self.__dict__.update(state)
        self._init_fold_state()
        self.device = device
        self._pending = pending

    def _join_fold(self) -> None:
        thread = self._fold_thread
        if thread is not None:
            thread.join()
            self._fold_thread = None

    def settle(self) -> None:
        """Wait until W holds every applied change and every dispatch its truncation error."""
        self._join_fold()
        if self._pending:  # applied, but no dispatch has been made since: fold now
            pending, self._pending = self._pending, {}
            for layer, terms in pending.items():
                self._add_products(self._w[layer], terms)
        if self._fold_error is not None:
            error, self._fold_error = self._fold_error, None
            raise AggregationError(f"fedhl: folding the last change into W failed: {error}") from error

    def dispatch(self, rank: int) -> Dispatch:
        """As Aggregator.dispatch, under the fold's lock (a dispatch made during the fold gets its errors after it)."""
        with self._lock:
            return super().dispatch(rank)

    def _fold_in_background(self, terms: dict[str, list[lora_ops.LowRankTerm]],
                            svds: dict[str, lora_ops.TopSVD]) -> None:
        try:
            for layer, layer_terms in terms.items():
                w = self._w[layer]
                self._add_products(w, layer_terms)
                object.__setattr__(svds[layer], "frob2", float((w.double() ** 2).sum()))
            with self._lock:  # the version's dispatches made so far get their truncation errors
                for d in self._dispatches.values():
                    if math.isnan(d.truncation_error):
                        error, relative = self._errors(svds, d.rank)
                        object.__setattr__(d, "truncation_error", error)
                        object.__setattr__(d, "relative_error", relative)
        except BaseException as e:  # noqa: BLE001 - re-raised by settle() in the caller's thread
            self._fold_error = e

    def _svds_matrix_free(self) -> dict[str, lora_ops.TopSVD]:
        """The current version's SVDs from W_t and the pending terms; the fold of the randomized layers goes to a thread."""
        svds: dict[str, lora_ops.TopSVD] = {}
        deferred: dict[str, list[lora_ops.LowRankTerm]] = {}
        pending, self._pending = self._pending, {}
        for i, (layer, w) in enumerate(self._w.items()):
            start, niter = self._start(layer)
            if (lora_ops.svd_route(w, self.max_rank, self.svd_method) == "randomized"
                    and lora_ops.matrix_free_pays(tuple(w.shape), self.max_rank, niter=niter)):
                u, s, vh = lora_ops.top_svd_of_sum(w, pending[layer], min(self.max_rank, *w.shape), seed=i,
                                                   niter=niter, start=start)
                svds[layer] = lora_ops.TopSVD(u, s, vh, math.nan)  # ‖W‖² once folded
                deferred[layer] = pending[layer]
            else:  # a small layer: its exact SVD needs the dense sum anyway, or folding first is cheaper
                self._add_products(w, pending[layer])
                svds[layer] = self._dense_svd(i, layer)
        if deferred:
            self._fold_thread = threading.Thread(target=self._fold_in_background, args=(deferred, svds),
                                                 name="fedhl-fold", daemon=True)
            self._fold_thread.start()
        return svds

    def _start(self, layer: str) -> tuple[torch.Tensor | None, int]:
        """(test-matrix start, power iterations) of `layer`'s SVD at the current version (`fedhl-svd-start`).

        A warm start is the previous version's subspace (kept in `_svds_by_version`); a layer
        without one (version 0, a resumed run from before, a dead direction) starts at random.
        """
        if self.svd_start == "warm":
            prev = self._svds_by_version.get(self.version - 1, {}).get(layer)
            start = lora_ops.warm_start(prev, tuple(self._w[layer].shape)) if prev is not None else None
            if start is not None:
                return start, NITER["warm"]
        return None, NITER["random"]

    def _dense_svd(self, i: int, layer: str) -> lora_ops.TopSVD:
        """The `i`-th layer's top-r_max SVD from its dense W (every change folded in), from `_start`'s start."""
        start, niter = self._start(layer)
        return lora_ops.top_svd(self._w[layer], self.max_rank, self.svd_method, seed=i, start=start, niter=niter)

    @staticmethod
    def _errors(svds: dict[str, lora_ops.TopSVD], rank: int) -> tuple[float, float]:
        """(e, ê) of a rank-`rank` dispatch: Σ tail energies, and over ‖W‖² (NaN while a fold is running)."""
        error = sum(svd.tail_energy(rank) for svd in svds.values())
        energy = sum(svd.frob2 for svd in svds.values())
        if math.isnan(energy):
            return math.nan, math.nan
        return error, (min(error / energy, 1.0) if energy > 0 else 0.0)

    def _svds(self, rank: int) -> dict[str, lora_ops.TopSVD]:
        """Top-r_max SVD of every layer at the current version (computed once per version)."""
        svds = self._svds_by_version.get(self.version)
        if svds is None:
            if self._pending:
                svds = self._svds_matrix_free()
            else:
                svds = {layer: self._dense_svd(i, layer) for i, layer in enumerate(self._w)}
            self._svds_by_version[self.version] = svds
            for v in sorted(self._svds_by_version)[: -self.keep_versions]:
                del self._svds_by_version[v]  # bounded memory: only versions clients may still reply to
        return svds

    def _make_dispatch(self, rank: int) -> Dispatch:
        """Return the rank-r truncation of W as (A, B) plus its truncation error e."""
        if rank < 1:
            raise ValueError(f"fedhl: rank must be >= 1, got {rank}")
        if rank > self.max_rank:
            raise ValueError(
                f"fedhl: a client asked for rank {rank} above max rank {self.max_rank}; raise `max-rank`."
            )
        s = self.lora.scale(rank)
        arrays: dict[str, np.ndarray] = {k: v.copy() for k, v in self.dense.items()}
        svds = self._svds(rank)
        for layer, host in self._host_factors(svds).items():
            a, b = lora_ops.split_factors(host, rank, s, self.init_a[layer])
            arrays[lora_ops.a_key(layer)], arrays[lora_ops.b_key(layer)] = a, b
        error, relative = self._errors(svds, rank)
        return Dispatch(rank=rank, version=self.version, arrays=arrays, truncation_error=error,
                        relative_error=relative)

    def _host_factors(self, svds: dict[str, lora_ops.TopSVD]) -> dict[str, lora_ops.HostFactors]:
        """The current version's SVDs on the host, built at its first dispatch and sliced by every other one."""
        cached = self._host
        if cached is None or cached[0] != self.version:
            cached = (self.version, {layer: lora_ops.HostFactors.of(svd) for layer, svd in svds.items()})
            self._host = cached
        return cached[1]

    def weights(self, updates: Sequence[ClientUpdate]) -> Weights:
        """Return the configured LoRA weights (see `fedhl-weighting`); example weights for dense parameters.

        `truncation` is the paper's 1/(e²+ε) with a fixed ε: uniform while ‖W‖ is small and
        winner-take-all once it grows. `relative` and `relative-examples` use ê = e/‖W‖_F²,
        which does not change when W is scaled, with ε on that scale.
        """
        self.settle()  # the updates' truncation errors are known once their version's fold is done
        dense = example_weights(updates)
        if self.weighting == "truncation":
            lora = truncation_weights([u.sent.truncation_error for u in updates])
        elif self.weighting == "relative":
            lora = truncation_weights([u.sent.relative_error for u in updates], EPSILON_RELATIVE)
        elif self.weighting == "relative-examples":
            inv = dense / np.array([u.sent.relative_error**2 + EPSILON_RELATIVE for u in updates])
            lora = inv / inv.sum()
        elif self.weighting == "uniform":
            lora = np.full(len(updates), 1.0 / len(updates))
        else:
            lora = dense
        return Weights(lora=lora, dense=dense)

    def state(self) -> dict[str, np.ndarray | torch.Tensor]:
        """The dense global W of every layer plus the dense parameters."""
        self.settle()
        return {**self.dense, **self._w}

    def apply(self, updates: Sequence[ClientUpdate], weights: Weights, server_lr: float = 1.0) -> None:
        """W += lr Σ p_i (s_i B_i A_i − W^(r_i)) per layer.

        The returned products are one GEMM over stacked factors (in chunks that bound
        memory). The starting points are not rebuilt client by client: every client
        of version v started from a slice of v's top-r_max SVD, so
        Σ_i p_i W^(r_i) = U diag(σ_j Σ_{i: r_i > j} p_i) Vᵀ — one rank-r_max product per
        layer. Updates of a version whose SVD is no longer kept, and every update when
        the starts went out rounded (`wire-dtype` float16/bfloat16: the SVD is not what
        the client got), are applied against their stored starting factors instead —
        one product per distinct start (version, rank), however many clients share it.
        """
        import torch

        self.settle()
        coef = [float(p) * server_lr for p in weights.lora]
        # the SVD rebuilds a start only when the start went out unrounded (`wire-dtype` float32)
        compact = [i for i, u in enumerate(updates) if self.exact_wire and u.sent.version in self._svds_by_version]
        stored: dict[int, tuple[Dispatch, float]] = {}  # one product per distinct start, not per client
        for i, u in enumerate(updates):
            if i not in compact:
                start, c = stored.get(id(u.sent), (u.sent, 0.0))
                stored[id(u.sent)] = (start, c + coef[i])
        terms: dict[str, list[lora_ops.LowRankTerm]] = {}
        for layer in self._w:
            ka, kb = lora_ops.a_key(layer), lora_ops.b_key(layer)
            layer_terms: list[lora_ops.LowRankTerm] = [
                (coef[i] * self.lora.scale(u.rank), u.arrays[kb], u.arrays[ka]) for i, u in enumerate(updates)]
            layer_terms += [(-c * self.lora.scale(start.rank), start.arrays[kb], start.arrays[ka])
                            for start, c in stored.values()]
            for version in sorted({updates[i].sent.version for i in compact}):
                svd = self._svds_by_version[version][layer]
                mass = torch.zeros(svd.s.shape[0], dtype=torch.float32, device=svd.s.device)
                for i in compact:
                    if updates[i].sent.version == version:
                        mass[: updates[i].rank] += coef[i]
                live = lora_ops.live_count(svd, svd.s.shape[0])
                mass[live:] = 0.0  # directions sent as zero columns of B contributed nothing
                layer_terms.append((-1.0, svd.u * (svd.s * mass), svd.vh))
            terms[layer] = layer_terms
        if self.fold == "inline":
            for layer, layer_terms in terms.items():
                self._add_products(self._w[layer], layer_terms)
        else:
            self._pending = terms  # folded after the next version's SVD (see `_svds_matrix_free`)
        self._apply_dense(updates, weights.dense, server_lr)
        self.version += 1

    @staticmethod
    def _add_products(w: torch.Tensor, terms: list[lora_ops.LowRankTerm]) -> None:
        """W += Σ c_i B_i A_i (lora_ops.add_products: stacked GEMMs)."""
        lora_ops.add_products(w, terms)

    def merged(self) -> MergedModel:
        """Return the full-rank W per layer."""
        self.settle()
        return MergedModel(
            deltas={layer: w.cpu().numpy().copy() for layer, w in self._w.items()},
            dense={k: v.copy() for k, v in self.dense.items()},
        )

    def summary(self) -> dict:
        """Return hyper-parameters including the weighting rule and SVD method."""
        return {**super().summary(), "weighting": self.weighting, "svd": self.svd_method, "max_rank": self.max_rank,
                "fold": self.fold, "svd_start": self.svd_start, "device": str(self.device)}
