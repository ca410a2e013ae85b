"""Leverage-score row samplers: a small weighted set of keys whose Gram is (1 ± ε) KᵀK.

Goal (docs/architecture.md, note 2.10). Rows k_s with weights w_s such that, with probability ≥ 1 −
δ,

    (1 − ε) KᵀK ⪯ G̃ = Σ_s w_s k_s k_sᵀ ⪯ (1 + ε) KᵀK,

(affine variant: the same for the rows k̃ = [k, 1] of [K, 1], i.e. Σ_s w_s (q·k_s + c)²
= (1 ± ε) Σ_j (q·k_j + c)² for every query q and every offset c). Two methods, both
from one pass, coins keyed by (seed, global row index, level) through SplitMix64
(``keyed_uniform``): no global RNG, so a decision never depends on the worker.

``online`` (Cohen, Musco, Pachocki, "Online Row Sampling", APPROX 2016, Thm 3 with
λ = 0): rows are decided one by one in the order they are folded; row j has score
s_j = k_jᵀ G̃_{<j}⁺ k_j against the *sample so far* (∞ if k_j leaves its range), and is
kept with p_j = min(1, c · min(1, (1 + ε) s_j)), weight 1/p_j. Proof (CMP's frozen
matrix martingale): Y_t = G^{+/2}(G̃_t − G_t)G^{+/2}; while ‖Y_{t−1}‖ < ε we have
G̃_{<t} ⪯ (1 + ε)G, so min(1, (1 + ε)s_t) ≥ k_tᵀG⁺k_t, every increment has norm
≤ R = 1/c and the predictable variation is ⪯ (1/c)·I. Matrix Freedman (Tropp 2011,
Thm 1.1, two-sided) gives P(∃t: ‖Y_t‖ ≥ ε) ≤ 2·dim·exp(−cε²/(2(1 + ε/3))), so
c = 2(1 + ε/3) ln(2·dim/δ)/ε² gives the spectral bound w.p. ≥ 1 − δ. Decisions are
exactly row by row: a block's rows are first scored against the sample at the block
start — an upper bound of their score at their turn (the sample only grows) — and only
rows whose coin falls under that bound are re-scored, in order, against the current
sample. Hence the sample does not depend on the chunking of a sequential pass.
Size: E[kept] = E[Σ p_j]. On the event that every prefix sample is a (1 − ε) lower
approximation of its prefix, Σ_j p_j ≤ c(1 + ε)/(1 − ε) · Σ_j min(1, τ_j^online), and
Σ_j min(1, τ_j^online) ≤ dim + (2/ln 2)·dim·ln(1 + κ), κ = ‖K‖₂² / (smallest non-zero
σ² of any prefix): the log κ is real (i.i.d. keys have τ_j^online ≈ dim/j, so the kept
count grows like dim·c·ln(n/dim)); memory is *not* independent of n.
Parts: the Dask engine folds each leaf task's rows as an independent online run and
merge takes the union (spectral bounds add over disjoint rows). With P > 1 parts the
same argument, with one frozen condition per part, gives δ ≤ 2·dim·(P + 1)·exp(...),
which the certificate reports for the actual P. A merged (P > 1) state takes no more rows.

``merge-reduce``: a fixed tree on *global row indices* — leaves are the row groups
[i·b, (i + 1)·b) (b = ``leaf_rows``), a node of height h merges ``fan_in`` consecutive
nodes of height h − 1. Each node samples its input (raw rows at a leaf, the union of its
children's weighted samples above) by exact leverage within that input,
p_s = min(1, c τ_s), τ_s = w_s r_sᵀ M⁺ r_s, weight w_s/p_s. The final answer merges the
complete nodes left at the end (and the partial last leaf) once more. Because the tree
and the coins depend only on global row indices, **the sample is the same for every
chunking, engine and merge order** (up to float rounding at a coin threshold). Proof
(ours; frozen matrix Freedman over the whole tree, one dimension factor): with the
condition M_v ⪯ (1 + α)G_v at every node (α > 0 a free analysis parameter), each
increment normalised by G_v of any ancestor v has norm ≤ (1 + α)/c and nodes of equal
height have disjoint rows, so the variation over subtree(v) is ⪯ (1 + h_v(1 + α)²)/c.
Freedman per node (for the conditions) and at the root (for ε):

    δ ≤ Σ_{v ≠ root} 2·dim·F(α, 1 + h_v(1 + α)², c) + 2·dim·F(ε, 1 + H(1 + α)², c),
    F(t, V, c) = exp(−(t²/2) / (V/c + (1 + α)t/(3c))),

so the error grows like √H over H levels (not H); the certificate evaluates the bound
for the actual tree, minimised over α. Memory: ≤ 2b raw rows plus ≤ 2(fan_in − 1)
node samples per level, each with E[size] ≤ c·dim: O((b + fan_in·c·dim·log_f(n/b))·d).

Numerics: leverage is computed from Householder QR factors in float64 with the
pseudo-inverse on the numerical range (σ > rtol·σ_max); the affine variant scores
[k, 1] through the exact centred identity τ̃ = w(1/W + (k − μ_w)ᵀS_w⁺(k − μ_w)) (μ_w, S_w
the weighted mean and scatter), never through an appended column (docs/architecture.md, note 2.1).
The guarantees above are in exact arithmetic with independent uniform coins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.linalg import lapack

from streamattn.blas import single_blas_thread
from streamattn.errors import ConfigError, IncompatibleMergeError
from streamattn.operators.candidates import merge_scored
from streamattn.operators.leverage import DEFAULT_RTOL, ScoringMap, map_scores, stack_qr
from streamattn.operators.projection import keyed_uniform
from streamattn.operators.protocol import Operator, State
from streamattn.sources import Block

METHODS = ("online", "merge-reduce")
VARIANTS = ("plain", "affine")
#: Coin streams: online decisions, merge-reduce level h uses LEVEL_STREAM + h, the final
#: merge of the forest FINAL_STREAM (each row meets each stream at most once).
ONLINE_STREAM = 0x5A0
LEVEL_STREAM = 0x5A1
FINAL_STREAM = 0x5FF
#: Online: a row whose component outside the sample's numerical range exceeds this
#: fraction of its norm is a new direction (score ∞, kept with p = 1).
RANGE_TOL = 1e-6
#: Online: triangular solves once the factor's reciprocal condition exceeds this.
FAST_RCOND = 1e-7
#: Online: candidates re-scored per BLAS call while waiting for the next acceptance.
WINDOW = 64
#: A row is a candidate when its coin is below its block-start bound times this margin.
BOUND_MARGIN = 1.0 + 1e-9
ALPHAS = np.concatenate([[0.0], np.geomspace(1e-3, 4.0, 160)])


# ---------------------------------------------------------------------------- bounds
def _tail(t: float, var: np.ndarray, r: np.ndarray) -> np.ndarray:
    """exp(−(t²/2)/(var + r·t/3)): the matrix Freedman tail without its dimension factor."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        return np.exp(-(t * t / 2.0) / (var + r * t / 3.0))


def online_delta_bound(
    c: float, eps: float, dim: int, parts: int = 1, inflation: float | None = None
) -> float:
    """Failure probability of the online spectral bound at ``eps`` for ``parts`` runs.

    ``inflation`` is the ε of the scores' (1 + ε) factor (default: ``eps``); certifying a
    larger ε than it scales R and the variation by (1 + eps)/(1 + inflation).
    """
    events = 1 if parts <= 1 else parts + 1
    grow = 1.0 if inflation is None else max(1.0, (1.0 + eps) / (1.0 + inflation))
    r = np.array(grow / c)
    return min(1.0, 2.0 * dim * events * float(_tail(eps, r, r)))


def online_oversampling(eps: float, delta: float, dim: int, parts: int = 1) -> float:
    """c = 2(1 + ε/3) ln(2·dim·events/δ)/ε², events = 1 (one run) or P + 1 (P parts)."""
    events = 1 if parts <= 1 else parts + 1
    return 2.0 * (1.0 + eps / 3.0) * math.log(2.0 * dim * events / delta) / eps**2


@dataclass(frozen=True)
class TreeShape:
    """A merge-reduce tree: heights of the non-root nodes (as counts) and the root height."""

    counts: tuple[int, ...]  # counts[h] = non-root nodes of height h
    root_height: int

    @property
    def nodes(self) -> int:
        return sum(self.counts) + 1

    @classmethod
    def of_forest(cls, heights: list[int], fan_in: int) -> TreeShape:
        """The tree over complete nodes of the given heights (each a full fan_in-ary tree)."""
        if not heights:
            return cls((), 0)
        top = max(heights)
        counts = [0] * (top + 1)
        for h in heights:
            for k in range(h + 1):
                counts[k] += fan_in ** (h - k)
        if len(heights) == 1:  # that node is the root
            counts[top] -= 1
            return cls(tuple(counts), top)
        return cls(tuple(counts), top + 1)

    @classmethod
    def for_rows(cls, n: int, leaf_rows: int, fan_in: int) -> TreeShape:
        """The tree ``merge-reduce`` builds over rows [0, n)."""
        full, rest = divmod(n, leaf_rows)
        heights = []
        h = 0
        while full:
            full, digit = divmod(full, fan_in)
            heights += [h] * digit
            h += 1
        if rest:
            heights.append(0)
        return cls.of_forest(heights, fan_in)


def merge_reduce_delta_bound(
    c: float, eps: float, dim: int, shape: TreeShape
) -> tuple[float, float]:
    """(δ, α): the tree Freedman bound of the module docstring, minimised over α."""
    a = ALPHAS if sum(shape.counts) else ALPHAS[:1]
    r = (1.0 + a) / c
    total = 2.0 * dim * _tail(eps, (1.0 + shape.root_height * (1.0 + a) ** 2) / c, r)
    for h, count in enumerate(shape.counts):
        if count:
            var = (1.0 + h * (1.0 + a) ** 2) / c
            total = total + count * 2.0 * dim * _tail_alpha(a, var, r)
    best = int(np.nanargmin(total))
    return float(min(1.0, total[best])), float(a[best])


def _tail_alpha(a: np.ndarray, var: np.ndarray, r: np.ndarray) -> np.ndarray:
    """exp(−(α²/2)/(var + rα/3)) elementwise in α (the node-condition tails)."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        out = np.exp(-(a * a / 2.0) / (var + r * a / 3.0))
    return np.where(a > 0, out, 1.0)


def merge_reduce_oversampling(eps: float, delta: float, dim: int, shape: TreeShape) -> float:
    """The smallest c (to 0.1 %) with ``merge_reduce_delta_bound(c) ≤ δ``."""
    lo = online_oversampling(eps, delta, dim)  # a single leaf needs at least this
    hi = lo
    while merge_reduce_delta_bound(hi, eps, dim, shape)[0] > delta:
        hi *= 2.0
    while hi - lo > 1e-3 * hi:
        mid = 0.5 * (lo + hi)
        if merge_reduce_delta_bound(mid, eps, dim, shape)[0] > delta:
            lo = mid
        else:
            hi = mid
    return hi


def eps_at_delta(bound: Any, delta: float) -> float | None:
    """The smallest ε ≤ 1 with ``bound(ε) ≤ δ`` (bisection), or None if even ε = 1 fails."""
    if bound(1.0) > delta:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if bound(mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def size_bound(expected: float, delta: float) -> int:
    """Bernstein: a sum of independent Bernoullis with mean ≤ μ exceeds μ + t w.p. ≤ δ,
    t = (2/3)ln(1/δ) + √(2μ ln(1/δ))."""
    log = math.log(1.0 / delta)
    return math.ceil(expected + 2.0 * log / 3.0 + math.sqrt(2.0 * expected * log))


# ---------------------------------------------------------------------------- leverage
def weighted_leverage(
    rows: np.ndarray, weights: np.ndarray, affine: bool, rtol: float
) -> np.ndarray:
    """τ_s of each weighted row √w_s r_s (affine: of √w_s [r_s, 1]) within the set.

    Plain: τ_s = w_s r_sᵀ M⁺ r_s, M = Σ w r rᵀ. Affine: the centred identity
    τ_s = w_s (1/W + (r_s − μ_w)ᵀ S_w⁺ (r_s − μ_w)), exact for [r, 1] and stable when the
    common offset dwarfs the spread. Householder QR in float64; Σ τ = numerical rank.
    """
    d = rows.shape[1]
    sw = np.sqrt(weights)[:, None]
    if affine:
        total = float(weights.sum())
        mean = weights @ rows / total
        x = sw * (rows - mean)
    else:
        x = sw * rows
    smap = ScoringMap.from_factor(stack_qr(x), rtol, d)
    tau = smap.scores(x)
    return tau + weights / total if affine else tau


def resample(
    idx: np.ndarray,
    rows: np.ndarray,
    weights: np.ndarray,
    spec: SamplerSpec,
    stream: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep row s with p_s = min(1, c τ_s) (coin keyed by (seed, stream, index)), w_s/p_s."""
    order = np.argsort(idx, kind="stable")
    idx, rows, weights = idx[order], rows[order], weights[order]
    if idx.size == 0:
        return idx, rows, weights
    tau = weighted_leverage(rows, weights, spec.variant == "affine", spec.rtol)
    p = np.minimum(1.0, spec.c * tau)
    keep = keyed_uniform(spec.seed, stream, idx) < p
    return idx[keep], rows[keep], weights[keep] / p[keep]


# ---------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class SamplerSpec:
    """A leverage sampler (see the module docstring).

    method: ``online`` or ``merge-reduce``; c: oversampling (p = min(1, c·score));
    eps, delta: the target bound (eps also inflates online scores by 1 + ε, as in CMP);
    variant: ``plain`` (K) or ``affine`` ([K, 1], scored through the centred identity);
    seed: the coins' key; leaf_rows, fan_in: the merge-reduce tree; rtol: numerical rank;
    ridge: λ ≥ 0 (online, plain only): scores against G̃ + λI and the guarantee
    (1 − ε)(G + λI) ⪯ G̃ + λI ⪯ (1 + ε)(G + λI) — additive ελ — with size ∝ ln det(I + G/λ);
    plan_rows: the n the plan was made for (memory projection only; 0: unknown, 2⁴⁰).
    """

    method: str
    c: float
    eps: float
    delta: float
    variant: str = "plain"
    seed: int = 0
    leaf_rows: int = 4096
    fan_in: int = 8
    rtol: float = DEFAULT_RTOL
    ridge: float = 0.0
    plan_rows: int = 0

    def __post_init__(self) -> None:
        if not (self.ridge >= 0):
            raise ConfigError(f"sample ridge must be >= 0, got {self.ridge!r}.")
        if self.ridge > 0 and (self.method, self.variant) != ("online", "plain"):
            raise ConfigError("sample ridge > 0 is offered for method online, variant plain "
                              f"only (got {self.method}, {self.variant}).")
        if self.method not in METHODS:
            raise ConfigError(f"sample method must be one of {list(METHODS)}, got {self.method!r}.")
        if self.variant not in VARIANTS:
            raise ConfigError(f"sample variant must be one of {list(VARIANTS)}, "
                              f"got {self.variant!r}.")
        if not (0 < self.eps < 1):
            raise ConfigError(f"sample eps must be in (0, 1), got {self.eps!r}.")
        if not (0 < self.delta < 1):
            raise ConfigError(f"sample delta must be in (0, 1), got {self.delta!r}.")
        if not (self.c > 0):
            raise ConfigError(f"sample oversampling c must be > 0, got {self.c!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"sample seed must be a non-negative integer, got {self.seed!r}.")
        if self.leaf_rows < 1 or self.fan_in < 2:
            raise ConfigError(
                f"merge-reduce needs leaf_rows >= 1 and fan_in >= 2, got {self.leaf_rows} "
                f"and {self.fan_in}."
            )


# ---------------------------------------------------------------------------- online factor
class _OnlineFactor:
    """The sample so far, for scoring raw rows: plain R (RᵀR = G̃) or affine (W, μ_w, R_c)."""

    def __init__(self, d: int, affine: bool, rtol: float, ridge: float = 0.0) -> None:
        self.affine, self.rtol, self.ridge = affine, rtol, ridge
        self.r = math.sqrt(ridge) * np.eye(d) if ridge > 0 else np.zeros((0, d))
        self.total = 0.0
        self.mean = np.zeros(d)
        self._map: tuple[str, Any] | None = None

    def add(self, row: np.ndarray, weight: float) -> None:
        if self.affine:
            new = self.total + weight
            diff = row - self.mean
            coef = math.sqrt(self.total * weight / new)
            self.mean = self.mean + (weight / new) * diff
            self.total = new
            if coef > 0:
                self.r = stack_qr(self.r, coef * diff[None, :])
        else:
            self.total += weight
            self.r = stack_qr(self.r, math.sqrt(weight) * row[None, :])
        self._map = None

    def _scorer(self) -> tuple[str, Any]:
        if self._map is None:
            r = self.r
            d = r.shape[1]
            if r.shape[0] == d and d:
                rcond, info = lapack.dtrcon(r, norm="1", uplo="U", diag="N")
                if info == 0 and rcond > FAST_RCOND:
                    rinv, info = lapack.dtrtri(r, lower=0)
                    if info == 0:
                        self._map = ("triangular", np.triu(rinv))
                        return self._map
            if r.shape[0] == 0:
                self._map = ("empty", None)
            else:
                _, s, vt = np.linalg.svd(r, full_matrices=False)
                rank = int(np.count_nonzero(s > self.rtol * s[0])) if s[0] > 0 else 0
                self._map = ("range", (vt[:rank].T / s[:rank], vt[:rank].T))
        return self._map

    def scores(self, x: np.ndarray) -> np.ndarray:
        """x G̃⁺ xᵀ per row (affine: the [x, 1] score); ∞ for a new direction."""
        if self.total == 0 and self.ridge == 0:
            return np.full(x.shape[0], np.inf)
        z = x - self.mean if self.affine else x
        kind, data = self._scorer()
        if kind == "triangular":
            y = z @ data
            s = np.einsum("ij,ij->i", y, y)
        elif kind == "range":
            w, v = data
            y = z @ w
            s = np.einsum("ij,ij->i", y, y)
            resid = np.linalg.norm(z - (z @ v) @ v.T, axis=1)
            s[resid > RANGE_TOL * np.linalg.norm(z, axis=1)] = np.inf
        else:  # affine with one distinct point: only that point is in the range
            s = np.where(np.linalg.norm(z, axis=1) > RANGE_TOL * np.linalg.norm(x, axis=1),
                         np.inf, 0.0)
        return s + 1.0 / self.total if self.affine else s


# ---------------------------------------------------------------------------- the operator
class LeverageSampler(Operator):
    """A weighted row sample with (1 ± ε) spectral error (module docstring: methods, proofs).

    Result: ``indices`` (sorted int64), ``weights`` (float64, ≥ 1), ``rows`` (store dtype),
    ``n``, ``d`` and the ``certificate`` (ε, δ, method, c, size bound, failure bound for
    the actual tree or parts, the ε the bound certifies at δ, promises).
    Memory: online — the sample (grows like c·dim·ln(n) on stationary keys, see above);
    merge-reduce — O((2b + 2(fan_in − 1)·levels·c·dim)·d) floats, levels = log_f(n/b).
    """

    family = "leverage-sampler"
    Spec = SamplerSpec
    spec: SamplerSpec

    def __init__(self, spec: SamplerSpec) -> None:
        super().__init__(spec)
        self.d = 0
        self.rows_dtype = ""
        # kept rows (online) / raw rows of incomplete leaves (merge-reduce)
        self.idx = np.zeros(0, dtype=np.int64)
        self.rows = np.zeros((0, 0))
        self.weights = np.zeros(0)
        self.parts = 1
        self.factor: _OnlineFactor | None = None
        # merge-reduce: complete nodes (height, index) -> (idx, rows, weights)
        self.nodes: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @property
    def affine(self) -> bool:
        return self.spec.variant == "affine"

    def _start(self, block: Block) -> None:
        if self.d == 0:
            self.d = int(block.rows.shape[1])
            self.rows_dtype = str(block.rows.dtype)
            self.rows = np.zeros((0, self.d))
            if self.spec.method == "online":
                self.factor = _OnlineFactor(self.d, self.affine, self.spec.rtol,
                                            self.spec.ridge)

    # ------------------------------------------------------------------ online
    def _update_online(self, idx: np.ndarray, x: np.ndarray) -> None:
        if self.parts > 1 or self.factor is None:
            raise IncompatibleMergeError(
                "an online sample merged from several parts cannot take more rows (its "
                "decisions were made against separate samples); fold rows before merging, "
                "or use method merge-reduce."
            )
        spec, factor = self.spec, self.factor
        u = keyed_uniform(spec.seed, ONLINE_STREAM, idx)

        def prob(s: np.ndarray) -> np.ndarray:
            with np.errstate(invalid="ignore"):
                return np.minimum(1.0, spec.c * np.minimum(1.0, (1.0 + spec.eps) * s))

        cand = np.flatnonzero(u < prob(factor.scores(x)) * BOUND_MARGIN)
        kept: list[tuple[int, float]] = []
        i = 0
        while i < cand.size:
            win = cand[i : i + WINDOW]
            p = prob(factor.scores(x[win]))
            hit = np.flatnonzero(u[win] < p)
            if hit.size == 0:
                i += win.size
                continue
            t = int(hit[0])
            j = int(win[t])
            i += t + 1
            # the kept row's probability from a one-row product: its weight (and the
            # factor built from it) is then bitwise the same for every chunking
            pj = float(prob(factor.scores(x[j : j + 1]))[0])
            if u[j] < pj:
                factor.add(x[j], 1.0 / pj)
                kept.append((j, 1.0 / pj))
        if kept:
            pos = np.array([j for j, _ in kept], dtype=np.int64)
            self.idx = np.concatenate([self.idx, idx[pos]])
            self.rows = np.vstack([self.rows, x[pos]])
            self.weights = np.concatenate([self.weights, [w for _, w in kept]])

    def _merge_online(self, other: LeverageSampler) -> None:
        self.parts += other.parts
        self.factor = None  # decisions after a union would need a different proof
        self._union(other.idx, other.rows, other.weights)

    def _union(self, idx: np.ndarray, rows: np.ndarray, weights: np.ndarray) -> None:
        idx = np.concatenate([self.idx, idx])
        order = np.argsort(idx, kind="stable")
        self.idx = idx[order]
        self.rows = np.vstack([self.rows, rows])[order]
        self.weights = np.concatenate([self.weights, weights])[order]

    # ------------------------------------------------------------------ merge-reduce
    def _settle(self) -> None:
        """Sample every complete leaf, then merge every complete set of siblings."""
        b, f = self.spec.leaf_rows, self.spec.fan_in
        if self.idx.size:
            leaf = self.idx // b
            ids, counts = np.unique(leaf, return_counts=True)
            full = ids[counts == b]
            if full.size:
                done = np.isin(leaf, full)
                for j in full.tolist():
                    sel = leaf == j
                    self.nodes[(0, j)] = resample(
                        self.idx[sel], self.rows[sel], self.weights[sel], self.spec,
                        LEVEL_STREAM,
                    )
                self.idx, self.rows = self.idx[~done], self.rows[~done]
                self.weights = self.weights[~done]
        changed = True
        while changed:
            changed = False
            for h, j in sorted(self.nodes):
                parent = j // f
                kids = [(h, parent * f + k) for k in range(f)]
                if all(k in self.nodes for k in kids):
                    parts = [self.nodes.pop(k) for k in kids]
                    self.nodes[(h + 1, parent)] = resample(
                        np.concatenate([p[0] for p in parts]),
                        np.vstack([p[1] for p in parts]),
                        np.concatenate([p[2] for p in parts]),
                        self.spec,
                        LEVEL_STREAM + h + 1,
                    )
                    changed = True
                    break

    def _forest(self) -> list[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """(height, sample) of every held node and of every incomplete leaf, sampled."""
        out = [(h, self.nodes[(h, j)]) for h, j in sorted(self.nodes)]
        if self.idx.size:
            leaf = self.idx // self.spec.leaf_rows
            for j in np.unique(leaf).tolist():
                sel = leaf == j
                out.append((0, resample(self.idx[sel], self.rows[sel], self.weights[sel],
                                        self.spec, LEVEL_STREAM)))
        return out

    # ------------------------------------------------------------------ protocol
    def _update(self, block: Block) -> None:
        with single_blas_thread():  # many small BLAS calls: threads only add overhead
            self._fold(block)

    def _fold(self, block: Block) -> None:
        self._start(block)
        x = np.asarray(block.rows, dtype=np.float64)
        idx = block.start + np.arange(x.shape[0], dtype=np.int64)
        if self.spec.method == "online":
            self._update_online(idx, x)
            return
        self.idx = np.concatenate([self.idx, idx])
        self.rows = np.vstack([self.rows, x])
        self.weights = np.concatenate([self.weights, np.ones(x.shape[0])])
        self._settle()

    def _merge(self, other: LeverageSampler) -> None:
        if self.spec.method == "online":
            self._merge_online(other)
            return
        self._union(other.idx, other.rows, other.weights)
        self.nodes.update(other.nodes)
        self._settle()

    def _state(self) -> State:
        out: State = {
            "d": np.array(self.d, dtype=np.int64),
            "rows_dtype": np.array(self.rows_dtype),
            "idx": self.idx,
            "rows": self.rows,
            "weights": self.weights,
            "parts": np.array(self.parts, dtype=np.int64),
        }
        if self.factor is not None:
            out["factor_r"] = self.factor.r
            out["factor_total"] = np.array(self.factor.total)
            out["factor_mean"] = self.factor.mean
        keys = sorted(self.nodes)
        out["node_key"] = np.array(keys, dtype=np.int64).reshape(-1, 2)
        sizes = [self.nodes[k][0].size for k in keys]
        out["node_offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        out["node_idx"] = np.concatenate(
            [self.nodes[k][0] for k in keys] or [np.zeros(0, np.int64)]
        )
        out["node_rows"] = (np.vstack([self.nodes[k][1] for k in keys]) if keys
                            else np.zeros((0, self.d)))
        out["node_weights"] = np.concatenate([self.nodes[k][2] for k in keys] or [np.zeros(0)])
        return out

    def _load(self, state: State) -> None:
        self.d = int(state["d"])
        self.rows_dtype = str(state["rows_dtype"])
        self.idx = np.array(state["idx"], dtype=np.int64)
        self.rows = np.array(state["rows"], dtype=np.float64).reshape(-1, self.d)
        self.weights = np.array(state["weights"], dtype=np.float64)
        self.parts = int(state["parts"])
        self.factor = None
        if "factor_r" in state:
            self.factor = _OnlineFactor(self.d, self.affine, self.spec.rtol, self.spec.ridge)
            self.factor.r = np.array(state["factor_r"], dtype=np.float64).reshape(-1, self.d)
            self.factor.total = float(state["factor_total"])
            self.factor.mean = np.array(state["factor_mean"], dtype=np.float64)
        off = np.asarray(state["node_offsets"])
        nidx = np.asarray(state["node_idx"], dtype=np.int64)
        nrows = np.asarray(state["node_rows"], dtype=np.float64).reshape(-1, self.d)
        nw = np.asarray(state["node_weights"], dtype=np.float64)
        self.nodes = {
            (int(h), int(j)): (nidx[a:b].copy(), nrows[a:b].copy(), nw[a:b].copy())
            for (h, j), a, b in zip(np.asarray(state["node_key"]).reshape(-1, 2), off[:-1], off[1:],
                                    strict=True)
        }

    def result(self) -> dict[str, Any]:
        spec = self.spec
        dim = self.d + 1 if self.affine else self.d
        if spec.method == "online":
            idx, rows, weights = self.idx, self.rows, self.weights
            bound = lambda e: online_delta_bound(  # noqa: E731
                spec.c, e, dim, self.parts, inflation=spec.eps
            )
            tree: dict[str, Any] = {"parts": self.parts}
        else:
            forest = self._forest()
            shape = TreeShape.of_forest([h for h, _ in forest], spec.fan_in)
            if len(forest) == 1:
                idx, rows, weights = forest[0][1]
            elif forest:
                idx, rows, weights = resample(
                    np.concatenate([f[1][0] for f in forest]),
                    np.vstack([f[1][1] for f in forest]),
                    np.concatenate([f[1][2] for f in forest]),
                    spec,
                    FINAL_STREAM,
                )
            else:
                idx, rows, weights = self.idx, self.rows, self.weights
            bound = lambda e: merge_reduce_delta_bound(spec.c, e, dim, shape)[0]  # noqa: E731
            tree = {
                "root_height": shape.root_height,
                "nodes": shape.nodes,
                "alpha": merge_reduce_delta_bound(spec.c, spec.eps, dim, shape)[1],
                "leaf_rows": spec.leaf_rows,
                "fan_in": spec.fan_in,
            }
        expected = spec.c * dim
        certificate = {
            "method": spec.method,
            "variant": spec.variant,
            "eps": spec.eps,
            "delta": spec.delta,
            "c": spec.c,
            "seed": spec.seed,
            "rtol": spec.rtol,
            "ridge": spec.ridge,
            "n": self.n_rows,
            "d": self.d,
            "kept": int(idx.size),
            "delta_bound": bound(spec.eps) if self.n_rows else 0.0,
            "eps_bound": eps_at_delta(bound, spec.delta) if self.n_rows else 0.0,
            **tree,
        }
        if spec.method == "merge-reduce":
            certificate["expected_size_bound"] = expected
            certificate["size_bound"] = size_bound(expected, spec.delta)
        return {
            "indices": idx.copy(),
            "weights": weights.copy(),
            "rows": rows.astype(self.rows_dtype or np.float64),
            "n": self.n_rows,
            "d": self.d,
            "certificate": certificate,
        }

    def nbytes_bound(self, d: int) -> int:
        """A projection, not a hard bound (sample sizes are random), for ``plan_rows`` rows.

        Merge-reduce: 2b raw rows plus 2(f − 1) node samples per level and one merge input
        (f samples), each at its w.h.p. size bound; online: the i.i.d.-keys law
        c·dim·(1 + ε)/(1 − ε)·(1 + ln(n/dim)) rows (log κ can make it larger).
        """
        spec = self.spec
        dim = d + 1 if self.affine else d
        n = spec.plan_rows or 2**40
        per = size_bound(spec.c * dim, spec.delta)
        if spec.method == "online":
            law = spec.c * dim * (1 + spec.eps) / (1 - spec.eps) * (1 + math.log(max(n / dim, 1)))
            return int(8 * (2 * dim * dim + law * (d + 2)))
        f = spec.fan_in
        levels = math.ceil(math.log(max(n / spec.leaf_rows, 1.0), f)) + 1
        rows = 2 * spec.leaf_rows + (2 * (f - 1) * levels + f) * per
        return int(8 * rows * (d + 2))


# ---------------------------------------------------------------------------- second pass
@dataclass(frozen=True)
class ApproxLeverageSpec:
    """Keep rows with ‖(x − shift) W‖² + offset ≥ threshold for a fixed map (affine maps
    carry their centring shift μ̃ and offset 1/W̃: ``LeverageSample.scoring_map``)."""

    w: np.ndarray
    threshold: float
    shift: np.ndarray | None = None
    offset: float = 0.0


class ApproxLeverage(Operator):
    """Mergeable threshold collector for approximate leverage scores from a sample.

    With the map of a sample with (1 ± ε) spectral error, the score is in
    [τ/(1 + ε), τ/(1 − ε)].
    Memory: O(|kept|·d + d²); |kept| ≤ Σ scores / threshold.
    """

    family = "approx-leverage"
    Spec = ApproxLeverageSpec
    spec: ApproxLeverageSpec

    def __init__(self, spec: ApproxLeverageSpec) -> None:
        super().__init__(spec)
        self.idx = np.zeros(0, dtype=np.int64)
        self.scores = np.zeros(0)
        self.rows = np.zeros((0, 0))
        self.values: np.ndarray | None = None
        self.total = 0.0
        self.rows_dtype = ""

    def _add(self, idx: np.ndarray, s: np.ndarray, rows: np.ndarray, vals: Any) -> None:
        self.idx, self.scores, self.rows, self.values = merge_scored(
            (self.idx, self.scores, self.rows, self.values), (idx, s, rows, vals))

    def _update(self, block: Block) -> None:
        if not self.rows_dtype:
            self.rows_dtype = str(block.rows.dtype)
            self.rows = np.zeros((0, block.rows.shape[1]))
            if block.values is not None:
                self.values = np.zeros((0, block.values.shape[1]))
        s = map_scores(block.rows, self.spec.w, self.spec.shift, self.spec.offset)
        self.total += float(s.sum())
        sel = np.flatnonzero(s >= self.spec.threshold)
        vals = None if block.values is None else np.asarray(block.values[sel], np.float64)
        self._add(block.start + sel.astype(np.int64), s[sel],
                  np.asarray(block.rows[sel], np.float64), vals)

    def _merge(self, other: ApproxLeverage) -> None:
        self.total += other.total
        self._add(other.idx, other.scores, other.rows, other.values)

    def _state(self) -> State:
        out: State = {"idx": self.idx, "scores": self.scores, "rows": self.rows,
                      "total": np.array(self.total), "rows_dtype": np.array(self.rows_dtype)}
        if self.values is not None:
            out["values"] = self.values
        return out

    def _load(self, state: State) -> None:
        self.idx = np.array(state["idx"], dtype=np.int64)
        self.scores = np.array(state["scores"], dtype=np.float64)
        self.rows = np.array(state["rows"], dtype=np.float64)
        self.total = float(state["total"])
        self.rows_dtype = str(state["rows_dtype"])
        self.values = np.array(state["values"], dtype=np.float64) if "values" in state else None

    def result(self) -> dict[str, Any]:
        return {
            "indices": self.idx.copy(),
            "scores": self.scores.copy(),
            "rows": self.rows.astype(self.rows_dtype or np.float64),
            "values": None if self.values is None else self.values.copy(),
            "sum_scores": self.total,
            "n": self.n_rows,
        }

    def nbytes_bound(self, d: int, d_values: int = 0) -> int:
        kept = int(2 * (d + 1) / self.spec.threshold + 1)
        return self.spec.w.nbytes + 8 * kept * (d + d_values + 2)
