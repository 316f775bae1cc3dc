"""Shared LoRA math: key pairing, ΔW = s·B·A, rank truncation/padding and SVD re-splits.

ΔW is computed in exactly one place (`delta`), as peft's `get_delta_weight` does.
Array keys are peft's `get_peft_model_state_dict` names: a LoRA layer `L` has
`L.lora_A.weight` (r × d_in) and `L.lora_B.weight` (d_out × r); every other key is a
dense trained parameter (e.g. the classification head).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from corolla.strategies.exceptions import InvalidUpdateError, RankMismatchError

if TYPE_CHECKING:  # torch is imported where FedHL/FlexLoRA need it, so `corolla.strategies` loads without it
    import torch

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


@dataclass(frozen=True)
class LayerShape:
    """Shape of one LoRA-adapted linear layer: ΔW is d_out × d_in."""

    d_out: int
    d_in: int


def a_key(layer: str) -> str:
    """Return the peft state-dict key of layer's A factor."""
    return layer + A_SUFFIX


def b_key(layer: str) -> str:
    """Return the peft state-dict key of layer's B factor."""
    return layer + B_SUFFIX


def split_keys(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, LayerShape], list[str]]:
    """Pair LoRA A/B keys into layers; return ({layer: shape}, sorted dense keys).

    Raises
    ------
    InvalidUpdateError
        When an A factor has no B factor (or vice versa) or their ranks disagree.

    """
    layers: dict[str, LayerShape] = {}
    dense: list[str] = []
    for key in sorted(arrays):
        if key.endswith(A_SUFFIX):
            layer = key[: -len(A_SUFFIX)]
            if b_key(layer) not in arrays:
                raise InvalidUpdateError(f"LoRA layer `{layer}` has an A factor but no `{b_key(layer)}`.")
            a, b = arrays[key], arrays[b_key(layer)]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise InvalidUpdateError(
                    f"LoRA layer `{layer}`: A {tuple(a.shape)} and B {tuple(b.shape)} do not form B·A "
                    "(need A: r × d_in, B: d_out × r)."
                )
            layers[layer] = LayerShape(d_out=int(b.shape[0]), d_in=int(a.shape[1]))
        elif key.endswith(B_SUFFIX):
            if a_key(key[: -len(B_SUFFIX)]) not in arrays:
                raise InvalidUpdateError(f"LoRA key `{key}` has a B factor but no A factor.")
        else:
            dense.append(key)
    return layers, dense


def rank_of(arrays: Mapping[str, np.ndarray]) -> int:
    """Return the common LoRA rank of an adapter (0 when it has no LoRA layers).

    Raises
    ------
    RankMismatchError
        When layers have different ranks.

    """
    ranks = {int(v.shape[0]) for k, v in arrays.items() if k.endswith(A_SUFFIX)}
    if len(ranks) > 1:
        raise RankMismatchError(f"adapter mixes LoRA ranks {sorted(ranks)}; one rank per adapter is expected.")
    return ranks.pop() if ranks else 0


def check_same_layout(got: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], node_id: int) -> None:
    """Raise InvalidUpdateError unless `got` has the keys, shapes and finiteness of `sent`."""
    missing, extra = sorted(set(sent) - set(got)), sorted(set(got) - set(sent))
    if missing or extra:
        raise InvalidUpdateError(
            f"node {node_id}: update keys differ from what it was sent (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); the update is rejected."
        )
    for k, ref in sent.items():
        v = got[k]
        if tuple(v.shape) != tuple(ref.shape):
            what = "rank" if k.endswith((A_SUFFIX, B_SUFFIX)) else "shape"
            raise InvalidUpdateError(
                f"node {node_id}: `{k}` has shape {tuple(v.shape)}, expected {tuple(ref.shape)} "
                f"(wrong {what}); the update is rejected."
            )
        if not np.issubdtype(v.dtype, np.floating):
            raise InvalidUpdateError(f"node {node_id}: `{k}` has dtype {v.dtype}, expected a float type.")
        if not np.all(np.isfinite(v)):
            raise InvalidUpdateError(f"node {node_id}: `{k}` holds NaN or infinite values; the update is rejected.")


def delta(a: np.ndarray, b: np.ndarray, scale: float) -> NDArray[np.float32]:
    """Return ΔW = scale · B · A (d_out × d_in): the one place ΔW is formed."""
    return (np.float32(scale) * (np.asarray(b, np.float32) @ np.asarray(a, np.float32))).astype(np.float32)


def weighted_sum(arrays: list[np.ndarray], weights: np.ndarray) -> NDArray[np.float32]:
    """Return Σ w_i x_i in float32, accumulated in float64.

    Why float64: replies arrive in whatever order the network delivers them, and a float32 running sum depends on
    that order; in float64 the result rounds to the same float32 whatever the order, so a resumed run (or a rerun)
    aggregates to the same model.
    """
    out = np.zeros(np.shape(arrays[0]), np.float64)
    for w, x in zip(weights, arrays):
        out += float(w) * np.asarray(x, np.float64)
    return out.astype(np.float32)


def pad_rank(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad A's rows and B's columns up to `rank` (HetLoRA)."""
    r = a.shape[0]
    if r > rank:
        raise RankMismatchError(f"cannot pad a rank-{r} adapter down to rank {rank}.")
    a_p = np.zeros((rank, a.shape[1]), np.float32)
    b_p = np.zeros((b.shape[0], rank), np.float32)
    a_p[:r], b_p[:, :r] = a, b
    return a_p, b_p


@dataclass(frozen=True)
class TopSVD:
    """The leading singular triplets of a matrix, plus its squared Frobenius norm."""

    u: torch.Tensor  # d_out × k
    s: torch.Tensor  # k
    vh: torch.Tensor  # k × d_in
    frob2: float

    def tail_energy(self, rank: int) -> float:
        """Return Σ_{j>rank} σ_j² = ‖W‖_F² − Σ_{j≤rank} σ_j² (exact from the norm)."""
        head = float((self.s[:rank].double() ** 2).sum())
        return max(self.frob2 - head, 0.0)


#: the SVD routes `top_svd` takes (the run configuration's `svd` choices)
SVD_METHODS = ("auto", "exact", "randomized")


def svd_route(w: torch.Tensor, k: int, method: str = "auto") -> str:
    """`exact` or `randomized`: what `top_svd(w, k, method)` runs (auto: randomized when k is small against w)."""
    k = min(k, *w.shape)
    if method == "auto":
        return "randomized" if 4 * (k + 8) < min(w.shape) else "exact"
    return method


def top_svd(w: torch.Tensor, k: int, method: str = "auto", seed: int = 0, start: torch.Tensor | None = None,
            niter: int = 2) -> TopSVD:
    """Return the top-k SVD of `w`.

    `exact` runs a full LAPACK SVD (O(d³)); `randomized` runs torch.svd_lowrank with
    oversampling and `niter` power iterations (O(d² k)); `auto` picks randomized when
    k is small against the matrix. With `start` (a warm start, `warm_start`), the
    randomized route's test matrix is those columns plus random ones (`range_svd`). The
    tail energy is always exact because it is taken from the Frobenius norm, not from the
    truncated spectrum.
    """
    import torch

    k = min(k, *w.shape)
    frob2 = float((w.double() ** 2).sum())
    method = svd_route(w, k, method)
    if method == "exact":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return TopSVD(u[:, :k], s[:k], vh[:k], frob2)
    if method == "randomized":
        if start is not None or w.device.type != "cpu":  # a GPU draws its own randn: keep the CPU's test matrix
            u, s, vh = range_svd(lambda x: w @ x, lambda x: w.T @ x, tuple(w.shape), k, seed, niter, start,
                                 dtype=w.dtype, device=w.device)
            return TopSVD(u, s, vh, frob2)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            u, s, v = torch.svd_lowrank(w, q=min(k + 8, *w.shape), niter=niter)
        finally:
            torch.random.set_rng_state(gen_state)
        return TopSVD(u[:, :k], s[:k], v[:, :k].T, frob2)
    raise ValueError(f"`svd` must be one of {', '.join(SVD_METHODS)}; got {method!r}")


#: values of `aggregation-device` besides cuda:N
DEVICES = ("cpu", "auto", "cuda")


def check_device_name(name: str) -> None:
    """Refuse an `aggregation-device` that is not cpu, auto, cuda or cuda:N (no torch needed: config time)."""
    head, _, index = name.partition(":")
    if name in DEVICES or (head == "cuda" and index.isdigit()):
        return
    raise ValueError(f"`aggregation-device` = {name!r} is not a device; use cpu, auto (the GPU when the server has "
                     "one), cuda or cuda:N.")


def resolve_device(name: str) -> torch.device:
    """The torch device of `aggregation-device` on this machine; a GPU it does not have is an error naming the fix."""
    import torch

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"`aggregation-device` = {name!r}, but this server has no CUDA GPU (torch.cuda.is_available() "
                         "is False); use aggregation-device=cpu, or auto to take the GPU only when there is one.")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"`aggregation-device` = {name!r}, but this server has {torch.cuda.device_count()} CUDA "
                         f"GPU(s) (cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of those.")
    return device


def warm_start(svd: TopSVD, shape: tuple[int, int]) -> torch.Tensor | None:
    """The previous version's top singular subspace as a test matrix for this version's SVD, or None.

    Tall layers (m ≥ n) are sketched from the right (the start is V, n × k), wide ones from
    the left (U, m × k), as `range_svd` does. None when the previous SVD had a dead direction
    (σ = 0, e.g. the all-zero W of version 0): its vectors carry nothing to start from.
    """
    if svd.s.numel() == 0 or live_count(svd, svd.s.shape[0]) < svd.s.shape[0]:
        return None
    m, n = shape
    return svd.vh.T if m >= n else svd.u


def range_svd(fwd_w: Callable[[torch.Tensor], torch.Tensor], back_w: Callable[[torch.Tensor], torch.Tensor],
              shape: tuple[int, int], k: int, seed: int, niter: int, start: torch.Tensor | None = None,
              dtype: torch.dtype | None = None,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (U, S, Vᴴ) of a matrix known only by its products X ↦ WX (`fwd_w`) and X ↦ WᵀX (`back_w`).

    Halko et al. 2009, Alg. 5.1 with `niter` power iterations on the tall orientation (as
    torch.svd_lowrank). The test matrix has q = k + 8 columns: Gaussian (torch's draw after
    manual_seed(seed), the same as svd_lowrank's), or `start`'s columns followed by Gaussian
    ones. From a warm start (the previous version's subspace, which W_{t+1} = W_t + ΔW
    mostly keeps) no power iteration is needed: 2 products instead of 2(niter+1). The
    Gaussian draw is always made on the CPU, so a GPU run starts from the same test matrix.
    """
    import torch

    m, n = shape
    q = min(k + 8, m, n)
    tall = m >= n
    fwd, back = (fwd_w, back_w) if tall else (back_w, fwd_w)
    rows = n if tall else m
    if start is not None:
        dtype = start.dtype
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        omega = torch.randn(rows, q, dtype=dtype or torch.float32)
    finally:
        torch.random.set_rng_state(gen_state)
    omega = omega.to(device if device is not None else (start.device if start is not None else "cpu"))
    if start is not None:
        cols = min(start.shape[1], q)
        omega[:, :cols] = start[:, :cols]
    basis = torch.linalg.qr(fwd(omega)).Q
    for _ in range(niter):
        basis = torch.linalg.qr(back(basis)).Q
        basis = torch.linalg.qr(fwd(basis)).Q
    u, s, vh = torch.linalg.svd(back(basis).T, full_matrices=False)
    u = basis @ u
    if not tall:
        u, vh = vh.T, u.T
    return u[:, :k], s[:k], vh[:k]


#: one low-rank term of a pending change: coef · left @ right, left d_out × k and right k × d_in (numpy or torch)
LowRankTerm = tuple[float, "np.ndarray | torch.Tensor", "np.ndarray | torch.Tensor"]


def _as_tensor(x: np.ndarray | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """A factor as a float32 tensor on `device`, sharing a numpy factor's memory where it can (no copy on the CPU).

    Dispatches are read-only numpy arrays; torch warns that a tensor over one is writable, but
    every caller only reads it.
    """
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.as_tensor(np.asarray(x, np.float32) if isinstance(x, np.ndarray) else x)
    return t.to(device, non_blocking=True) if device is not None else t


def _stacked(terms: Sequence[LowRankTerm], max_cols: int,
             device: torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The terms as stacked factors (left, right, coef) with Σ c_i B_i A_i = left · diag(coef) · right, on `device`.

    At most `max_cols` columns per chunk. The factors are concatenated as they are (one
    copy each); the coefficients stay a vector, so the caller scales whichever side it
    owns (`add_products` scales its fresh copy of the right factor in place, no temporary).
    """
    import torch

    start = 0
    while start < len(terms):
        stop, cols = start, 0
        while stop < len(terms) and (stop == start or cols + terms[stop][1].shape[1] <= max_cols):
            cols += terms[stop][1].shape[1]
            stop += 1
        chunk = terms[start:stop]
        left = torch.cat([_as_tensor(b, device) for _, b, _ in chunk], dim=1)  # cat copies: the views are only read
        right = torch.cat([_as_tensor(a, device) for _, _, a in chunk], dim=0)
        coef = torch.cat([torch.full((b.shape[1],), float(c), dtype=left.dtype) for c, b, _ in chunk]).to(left.device)
        yield left, right, coef
        start = stop


def add_products(w: torch.Tensor, terms: Sequence[LowRankTerm], max_cols: int = 4096) -> None:
    """W += Σ c_i B_i A_i as few GEMMs as possible (stacked factors, at most `max_cols` wide)."""
    for left, right, coef in _stacked(terms, max_cols, w.device):
        w.addmm_(left, right.mul_(coef[:, None]))  # `right` is a fresh concatenation: scaled in place


def matrix_free_pays(shape: tuple[int, int], k: int, niter: int = 2) -> bool:
    """True when `top_svd_of_sum` costs less than folding first: 2(niter+1) products × 2(m+n)Kq < the fold's 2mnK.

    Per returned column (K = Σ r_i), the matrix-free SVD pays 2(niter+1)·2(m+n)q flops,
    the fold 2mn: for a 4096² layer at q = 72 that is 3.5 M against 33.6 M (matrix-free, 9.5×
    cheaper); for a 512² layer 0.44 M against 0.52 M (about even; small layers fold first).
    """
    m, n = shape
    q = min(k + 8, m, n)
    return 2 * (niter + 1) * 2 * (m + n) * q < 2 * m * n


def top_svd_of_sum(w: torch.Tensor, terms: Sequence[LowRankTerm], k: int, seed: int = 0, niter: int = 2,
                   start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (U, S, Vᴴ) of W + Σ c_i B_i A_i without forming the sum: `top_svd`'s randomized route, matrix-free.

    The same algorithm and random draw as torch.svd_lowrank(W', q=k+8, niter) (Halko et al.
    2009, Alg. 5.1, which `top_svd` runs on a dense W'), with every product W'X and W'ᵀX
    taken as W X + Σ B_i (A_i X): O(d²q + d·Σr_i·q) per product instead of the O(d²·Σr_i)
    fold. Equal to `top_svd(W + Σ ..., k, "randomized", seed, start, niter)` up to float
    rounding (tested); `start` as in `range_svd`.
    """
    # term by term, on the factors as they are (no copy): for the 2 products of a warm start, stacking first
    # (one d × Σr copy per side) costs more than it saves (measured: 52 ms against 89 ms per 4096² layer, Σr = 3,455)
    factors = [(float(c), _as_tensor(b, w.device), _as_tensor(a, w.device)) for c, b, a in terms]

    def mv(x: torch.Tensor) -> torch.Tensor:
        y = w @ x
        for c, b, a in factors:
            y.addmm_(b, a @ x, alpha=c)
        return y

    def rmv(x: torch.Tensor) -> torch.Tensor:
        y = w.T @ x
        for c, b, a in factors:
            y.addmm_(a.T, b.T @ x, alpha=c)
        return y

    return range_svd(mv, rmv, tuple(w.shape), k, seed, niter, start, dtype=w.dtype, device=w.device)


def live_count(svd: TopSVD, rank: int, tol: float = 1e-7) -> int:
    """Number of leading singular values (within `rank`) that carry information (σ > tol·σ_max)."""
    k = min(rank, svd.s.shape[0])
    smax = float(svd.s[0]) if svd.s.numel() else 0.0
    return int((svd.s[:k] > tol * smax).sum()) if smax > 0 else 0


@dataclass(frozen=True)
class HostFactors:
    """One version's top SVD of a layer as numpy on the host — Vᴴ (k × n) and UΣ (m × k) — which every dispatch slices.

    Built once per version and layer, so a dispatch at rank r costs one pass over its B
    (UΣ's first r columns over the scale) and none over its A (Vᴴ's first r rows, a view):
    at a 7B layout with ~50 distinct ranks that is ~1.8 GB of copies instead of ~10 GB of
    traffic (`split_factors`' old per-rank conversions).
    """

    vh: NDArray[np.float32]
    us: NDArray[np.float32]
    live: int  # leading directions that carry information (σ > tol·σ_max)

    @classmethod
    def of(cls, svd: TopSVD, tol: float = 1e-7) -> HostFactors:
        """Copy `svd`'s factors to the host (from any device), Σ folded into U."""
        vh = np.ascontiguousarray(svd.vh.cpu().numpy(), dtype=np.float32)
        us = np.ascontiguousarray((svd.u * svd.s).cpu().numpy(), dtype=np.float32)
        return cls(vh, us, live_count(svd, svd.s.shape[0], tol))


def split_factors(
    host: HostFactors, rank: int, scale: float, init_a: np.ndarray
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Return (A, B) of `rank` with scale·B·A = the rank-`rank` truncation of W.

    A = V_rᵀ and B = U_r Σ_r / scale (algorithms.md §1, step 1; Σ is put on B).
    Directions whose singular value is zero carry no information; their A rows
    are taken from `init_a` (peft's random A initialisation) and their B columns
    are zero, so a fresh adapter starts exactly as peft would start it. When every
    direction up to `rank` is live, A is a read-only view of the host Vᴴ (no copy).
    """
    live = min(host.live, rank)
    if live == rank:
        return host.vh[:rank], host.us[:, :rank] / np.float32(scale)
    a = np.array(init_a[:rank], dtype=np.float32, copy=True)
    b = np.zeros((host.us.shape[0], rank), np.float32)
    if live:
        a[:live] = host.vh[:live]
        b[:, :live] = host.us[:, :live] / np.float32(scale)
    return a, b


def factor_state(factors: Mapping[str, tuple[np.ndarray, np.ndarray]], dense: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Name → live array for an aggregator that keeps (A, B) per layer: what server momentum updates in place."""
    out = dict(dense)
    for layer, (a, b) in factors.items():
        out[a_key(layer)], out[b_key(layer)] = a, b
    return out
