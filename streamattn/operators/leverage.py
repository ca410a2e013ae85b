"""Leverage scores and the exact one-pass LevAttention universal set (p = 2).

Mathematics (docs/architecture.md, note 2.1; Kannan, Bhattacharyya, Kacham, Woodruff, arXiv
2410.05462). For keys k_j (rows of K) and G = KᵀK, the leverage score is τ_j = k_jᵀ G⁺ k_j. For
f(x) = x² attention, A_qj = (q·k_j)² / Σ_l (q·k_l)² ≤ τ_j for every query q
(Cauchy–Schwarz in the G metric), and Σ_j τ_j = rank(K) ≤ d. Hence
U_ε = {j : τ_j ≥ ε} holds every key that any query weights ≥ ε, and |U_ε| ≤ rank/ε.

One pass, exact. The state is (R, C): R the triangular factor of all rows seen so far
(TSQR in float64: R ← qr([R; block]).R, never the normal equations, since real keys have
cond(KᵀK) ≈ 1e13), and C the candidate rows whose score against the current R is
≥ threshold. Adding rows only lowers every score (G grows in Loewner order), so a row
dropped once never qualifies again: no false negatives, and |C| ≤ rank/threshold at
every step. Merge stacks the two factors and re-prunes. The final set is the offline
U_ε for any chunking and merge tree, up to float rounding at the threshold itself.

Speed (docs/architecture.md, note 3): once R is square and well conditioned, a block X updates it
by a preconditioned Cholesky step (``fast_factor_update``: Y = X R⁻¹, R ← chol(I + YᵀY) R),
QR-accurate at level-3 BLAS speed, and ‖y_j‖² = k_jᵀ G_old⁻¹ k_j bounds every later score
of row j from above (G only grows; the full inverse dominates the truncated one), so
only rows with ‖y_j‖² ≥ threshold (less a rounding margin) are scored exactly.

Numerical rank: scores use the pseudo-inverse on the numerical range of R,
σ_i > rtol · σ_max (default rtol = 1e-10), computed from the SVD of the d × d factor.
A direction below that tolerance mid-stream can rise above it later, so pruning uses a
finer range (σ_i > PRUNE_RTOL_FACTOR · rtol · σ_max) and a margin: a row seen so far
has component ≤ σ_i along each direction, so its final score is at most
(‖W_fineᵀk‖ + δ)² with δ = ‖σ_dropped‖ / (rtol · σ_max). Rows are dropped only below
that bound (δ = 0 when no direction is dropped, e.g. for full-rank keys).

Where its computed certificate allows (well-conditioned factor, block small against the rows
seen), a block instead takes the *Gram step* of :mod:`.gram_step`: G_b = XᵀX by SYRK and
R ← chol(I + R⁻ᵀG_bR⁻¹) R, half the flops, with a certified relative Gram error δ ≤ 1e-9
per step; its rows are pruned by a certified norm / eigen-split bound against the old
factor, and the accumulated error Δ lowers every pruning cut to threshold / (1 + Δ).
Several blocks share one such frame (a *Gram window*, up to ``WINDOW_ROWS`` rows or as many
as the factor held when it opened): their Grams are summed, the window's step is computed
and certified after every block (so the window can close at any block with a certified
R'), and the held candidates are pruned when it closes. Small blocks (a KV cache's
4096-row chunks) then pay the d × d work (SVD, inverse, Cholesky) once per window.

The affine factor (R of [1, K]) is updated the same way in the centred frame
(``centred_fast_update``): y = [1/√n, (k − μ) R_c⁻¹], whose ‖y‖² is the row's affine
score against the rows before its block, so affine rows are pruned by the same bound.

Affine variant: each key is augmented with a constant 1, k̃_j = (k_j, 1). Its score is
τ̃_j = 1/n + (k_j − μ)ᵀ S⁺ (k_j − μ) (μ the mean, S the scatter matrix): centred
leverage. It bounds (q·k_j + c)² shares for every query q and every offset c, and
softmax is unchanged by a common key offset.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import scipy.linalg
from scipy.linalg import lapack

from streamattn.blas import single_blas_thread
from streamattn.operators.candidates import candidate_state, load_candidates, stack_values
from streamattn.operators.factors import centred_factor_result, centred_factor_update, stack_qr
from streamattn.operators.gram_step import (
    GRAM_TOL,
    LONG_SYRK_ROWS,
    PIECE_ROWS,
    REL_ERR_BUDGET,
    SYRK_ROWS,
    Frame,
    U,
    accumulation_length,
    centred_gram_step,
    gamma,
    gram_and_bounds,
    gram_step,
    make_frame,
    triangular_bounds,
    upper,
    window_length,
    work_buffer,
)
from streamattn.operators.gram_step import pool as _pool
from streamattn.operators.gram_step import split_rows as _split_rows
from streamattn.operators.protocol import Operator, State
from streamattn.sources import Block

DEFAULT_RTOL = 1e-10
#: Pruning keeps directions down to this fraction of the rank tolerance (see above).
PRUNE_RTOL_FACTOR = 1e-3
#: The fast update needs a well-conditioned old factor: ‖R‖_F ‖R⁻¹‖_F ≤ this ...
FAST_COND_LIMIT = 1e8
#: ... and a moderate growth ‖Y‖₂² ≤ this, Y = X R⁻¹ (else: Householder for the block).
FAST_GROWTH_LIMIT = 1e4
#: A block is folded in sub-blocks of at most this many times the rows already seen, so
#: the free bound (the score against the rows before the sub-block) prunes early rows too.
SUBBLOCK_GROWTH = 8
#: Rows of the first block factored by Householder QR before the fast update can start,
#: in multiples of dim.
SEED_ROWS_PER_DIM = 4


#: The predicted δ (a heuristic) runs 5–10 % below the certified one on the bench keys:
#: a window is planned for tol / PREDICTION_MARGIN, so the certificate rarely refuses a
#: block whose Gram was already computed.
PREDICTION_MARGIN = 1.25
#: Fewest rows worth a Gram window of their own at the start of a stream, per key
#: dimension: a window's d × d work (SVD, inverse, Cholesky, prune: ≈ 5 ms at d = 128)
#: costs what ≈ 50·d rows of the TRMM step's extra 2·d² flops do; twice that is asked.
MIN_GRAM_ROWS_PER_DIM = 96
#: A Gram window closes once it holds this many rows, or as many as its factor had when it
#: opened (bounds against that factor stay within 2× of the current scores).
WINDOW_ROWS = 2**20


@dataclass(frozen=True)
class _Window:
    """An open Gram window: the frame of R₀ (and, affine, its mean and √n), the summed
    Gram / column sums / Σ‖x‖² of the blocks folded since, and the certified R' of them."""

    frame: Frame
    shift: np.ndarray | None
    root_n: float
    n_old: float  # ‖ |T|ᵀ|RᵀR||T| ‖_∞, for the predicted δ
    seen: int  # rows in R₀
    syrk_rows: int  # rows per SYRK call in this window (its L)
    gram: np.ndarray
    colsum: np.ndarray
    fro2: float = 0.0
    rows: int = 0
    calls: int = 0
    longest: int = 0
    r_next: np.ndarray | None = None
    delta: float = 0.0


def _sample(rows: np.ndarray) -> np.ndarray:
    """About 256 evenly spaced rows as float64: what ``_predicted`` sizes a window by
    (taken once per offered block, not once per prediction)."""
    return np.asarray(rows[:: max(1, rows.shape[0] // 256)], dtype=np.float64)


def augment(rows: np.ndarray, affine: bool) -> np.ndarray:
    """Rows as float64, with a constant-1 column appended for the affine variant."""
    x = np.asarray(rows, dtype=np.float64)
    if not affine:
        return x
    return np.hstack([x, np.ones((x.shape[0], 1))])


@dataclass(frozen=True)
class ScoringMap:
    """W with τ(k) = ‖(k − shift) W‖² + offset: the pseudo-inverse of R on its range.

    From R = U Σ Vᵀ we get KᵀK = V Σ² Vᵀ, so τ(k) = ‖Σ_r⁻¹ V_rᵀ k‖², W = V_r Σ_r⁻¹
    (plain: no shift, offset 0). The affine map (:meth:`from_centred`) has W from the
    centred factor R_c, shift = μ and offset = 1/n; its ``rank`` is rank(R_c) + 1, the
    rank of [K, 1] (Σ_j τ̃_j = rank), and the σ fields describe R_c.
    """

    w: np.ndarray
    rank: int
    sigma_max: float
    sigma_min_kept: float
    abs_tol: float
    shift: np.ndarray | None = None
    offset: float = 0.0

    @classmethod
    def from_factor(cls, r: np.ndarray, rtol: float, d: int, floor: float = 0.0) -> ScoringMap:
        """The map on σ_i > max(rtol · σ_max, floor) (``floor``: an absolute noise level)."""
        if r.shape[0] == 0:
            return cls(np.zeros((d, 0)), 0, 0.0, 0.0, 0.0)
        _, s, vt = np.linalg.svd(r, full_matrices=False)
        tol = max(rtol * s[0], floor)
        rank = int(np.count_nonzero(s > tol)) if s[0] > 0 else 0
        w = vt[:rank].T / s[:rank]
        return cls(w, rank, float(s[0]), float(s[rank - 1]) if rank else 0.0, float(tol))

    @classmethod
    def from_centred(cls, factor: Any, rtol: float) -> ScoringMap:
        """The affine map from a ``CentredFactorResult`` (n, μ, R_c): rank on R_c only.

        R_c is the trailing block of a backward-stable QR of [1, K], so its entries carry
        rounding of order u·‖[1, K]‖_F (u the float64 unit roundoff), however small R_c
        itself is: singular values below (d + 1)·u·‖[1, K]‖_F are counted as zero (e.g.
        identical keys, whose centred rows are exactly zero). ‖[1, K]‖_F² is read off the
        factor: n + n‖μ‖² + ‖R_c‖_F².
        """
        rc = np.asarray(factor.r_centred, dtype=np.float64)
        n = int(factor.n)
        mean = np.asarray(factor.mean, dtype=np.float64)
        norm = np.sqrt(n * (1.0 + float(mean @ mean)) + float(np.sum(rc * rc)))
        floor = (rc.shape[1] + 1) * np.finfo(np.float64).eps * norm
        c = cls.from_factor(rc, rtol, rc.shape[1], floor)
        return cls(c.w, c.rank + (1 if n else 0), c.sigma_max, c.sigma_min_kept, c.abs_tol,
                   mean, 1.0 / n if n else 0.0)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """τ for each row of ``x`` (float64; raw keys for a centred map)."""
        if self.shift is not None:
            y = (x - self.shift) @ self.w
            return np.einsum("ij,ij->i", y, y) + self.offset
        y = x @ self.w
        return np.einsum("ij,ij->i", y, y)


def _gram_pass(
    rows: np.ndarray,
    lo: int,
    hi: int,
    rinv: np.ndarray,
    bounds: np.ndarray,
    shift: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Σ yᵀy and Σ y over rows [lo, hi), y = (x − shift) R⁻¹ (Gram: symmetric, C order);
    fills bounds with ‖y‖².

    Through numpy's matmul (GEMM for Y, SYRK for YᵀY): unlike scipy.linalg.blas's TRMM,
    which would halve the flops of Y, it releases the GIL, so the stream threads (or the
    heads of a cache) really run side by side (measured, 2^16 rows on 2 cores: 1.3–1.4×
    faster than the TRMM version, which two threads do not speed up at all).
    """
    d = rows.shape[1]
    dim = rinv.shape[0]
    piece = min(PIECE_ROWS, hi - lo)
    top = np.ascontiguousarray(rinv[:d])
    buf = work_buffer("trmm-piece", piece, d)
    y = work_buffer("trmm-y", piece, dim)
    gram = np.zeros((dim, dim))
    scratch = np.empty((dim, dim))
    colsum = np.zeros(dim)
    for a in range(lo, hi, piece):
        k = min(piece, hi - a)
        xb, yb = buf[:k], y[:k]
        np.copyto(xb, rows[a : a + k], casting="safe")
        if shift is not None:
            xb -= shift
        np.matmul(xb, top, out=yb)
        bounds[a : a + k] = np.einsum("ij,ij->i", yb, yb)
        if shift is not None:
            colsum += yb.sum(axis=0)
        np.matmul(yb.T, yb, out=scratch)
        gram += scratch
    return gram, colsum


def _preconditioned_gram(
    rows: np.ndarray, rinv: np.ndarray, shift: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(YᵀY symmetric, Σ_i y_i, ‖y_i‖²) for Y = (X − shift) R⁻¹, threaded by row spans."""
    m = rows.shape[0]
    bounds = np.empty(m)
    spans = _split_rows(m)
    if len(spans) == 1:
        parts = [_gram_pass(rows, 0, m, rinv, bounds, shift)]
    else:
        parts = list(
            _pool().map(lambda ab: _gram_pass(rows, ab[0], ab[1], rinv, bounds, shift), spans)
        )
    gram, colsum = parts[0]
    for g, c in parts[1:]:
        gram += g
        colsum += c
    return 0.5 * (gram + gram.T), colsum, bounds


def map_scores(
    rows: np.ndarray, w: np.ndarray, shift: np.ndarray | None = None, offset: float = 0.0
) -> np.ndarray:
    """‖(x − shift) W‖² + offset for each row, in float64 pieces.

    Same value as ``ScoringMap.scores`` without a float64 copy of the whole block. The
    shift is subtracted before the product (for a common offset ≫ the centred scale,
    x W − shift W would cancel catastrophically).
    """
    m, d = rows.shape
    out = np.empty(m)
    if m == 0:
        return out
    piece = min(PIECE_ROWS, m)
    top = np.ascontiguousarray(w[:d])
    buf = work_buffer("map-piece", piece, d)
    y = work_buffer("map-y", piece, w.shape[1])
    for a in range(0, m, piece):
        k = min(piece, m - a)
        xb, yb = buf[:k], y[:k]
        np.copyto(xb, rows[a : a + k], casting="safe")
        if shift is not None:
            xb -= shift
        np.matmul(xb, top, out=yb)
        out[a : a + k] = np.einsum("ij,ij->i", yb, yb)
    if offset:
        out += offset
    return out


@dataclass(frozen=True)
class FactorUpdate:
    """Result of :func:`fast_factor_update`.

    ``r`` is the new factor; ``bounds[i] = ‖x_i R_old⁻¹‖²`` is the score of block row i
    against the *old* factor, an upper bound of its score against any later factor
    (the Gram only grows); ``rel_err`` bounds the relative rounding error of ``bounds``.
    """

    r: np.ndarray
    bounds: np.ndarray
    rel_err: float


def fast_factor_update(r: np.ndarray, rows: np.ndarray) -> FactorUpdate | None:
    """R' with R'ᵀR' = RᵀR + XᵀX by a preconditioned Cholesky step, or None.

    With Y = X R⁻¹ (float64), [R; X] = [I; Y] R, so R' = C R with CᵀC = I + YᵀY. The
    matrix I + YᵀY has condition number ≤ 1 + ‖Y‖₂², so while that growth is moderate
    (≤ ``FAST_GROWTH_LIMIT``) and R is well conditioned (≤ ``FAST_COND_LIMIT``) the
    Cholesky factor is as accurate as Householder QR of [R; X] (relative score error
    ~ u·cond(R), u = 2⁻⁵³) — the normal equations' cond² loss is avoided because the
    Gram is formed from the preconditioned Y, not from X. The work is two level-3
    BLAS calls per piece (Y = X R⁻¹ by GEMM, YᵀY by SYRK), ≈ 3·m·dim² flops, against
    Householder's 4·m·dim² in slower panel code, and the row norms ‖y_i‖² come free.

    Returns None (the caller falls back to Householder QR) when R is not square, not
    invertible, too ill-conditioned, or when the block grows the factor too much.
    """
    dim = r.shape[1]
    if r.shape[0] != dim or dim == 0:
        return None
    rinv, info = lapack.dtrtri(r, lower=0)
    if info != 0:
        return None
    kappa = float(np.linalg.norm(r) * np.linalg.norm(rinv))
    if not np.isfinite(kappa) or kappa > FAST_COND_LIMIT:
        return None
    gram, _, bounds = _preconditioned_gram(rows, rinv)
    if float(np.linalg.eigvalsh(gram)[-1]) > FAST_GROWTH_LIMIT:
        return None
    gram[np.diag_indices(dim)] += 1.0
    c = scipy.linalg.cholesky(gram, lower=False, check_finite=False)
    # |rounding of ‖x R⁻¹‖²| <= ~2·dim·u·cond(R) relative (GEMM forward error).
    rel_err = 4.0 * dim * np.finfo(np.float64).eps * kappa
    return FactorUpdate(c @ r, bounds, rel_err)


def centred_fast_update(r: np.ndarray, rows: np.ndarray) -> FactorUpdate | None:
    """The factor of [1, K] after appending ``rows`` by a centred preconditioned step, or None.

    ``r`` is the square TSQR factor of [1, K_old] (``centred_factor_update``); from it
    n = r₀₀², the mean μ and the centred factor R_c. In the shifted frame the factor of
    [1, K_old − μ] is diag(√n, R_c) (the ones column is orthogonal to K_old − μ), so for a
    block X the preconditioned rows are y = [1/√n, (x − μ) R_c⁻¹]: the ones column needs
    no product, and μ is subtracted before the GEMM, so a common offset ≫ the spread does
    not enter cond. With CᵀC = I + YᵀY (Cholesky), the factor of [1, K_all − μ] is
    C diag(√n, R_c), and that of [1, K_all] is it times [[1, μᵀ], [0, I]] (only row 0
    changes). Accuracy as :func:`fast_factor_update` with cond(R_c) in place of cond(R);
    the same refusals (None: singular, too ill-conditioned, too much growth) apply.

    ``bounds[i] = 1/n + (‖(x_i − μ) R_c⁻¹‖ + δ)²``, δ covering the rounding of μ, bounds
    row i's affine score against the old rows, hence its final affine score (the Gram of
    [1, K] only grows); ``rel_err`` covers the GEMM rounding as in the plain update.
    """
    dim = r.shape[1]
    if r.shape[0] != dim or dim < 2 or r[0, 0] == 0:
        return None
    cf = centred_factor_result(r, 1)
    rc = cf.r_centred
    rcinv, info = lapack.dtrtri(rc, lower=0)
    if info != 0:
        return None
    kappa = float(np.linalg.norm(rc) * np.linalg.norm(rcinv))
    if not np.isfinite(kappa) or kappa > FAST_COND_LIMIT:
        return None
    root_n = abs(float(r[0, 0]))
    zz, zsum, znorm = _preconditioned_gram(rows, rcinv, cf.mean)
    gram = np.empty((dim, dim))
    gram[0, 0] = rows.shape[0] / root_n**2
    gram[0, 1:] = gram[1:, 0] = zsum / root_n
    gram[1:, 1:] = zz
    if float(np.linalg.eigvalsh(gram)[-1]) > FAST_GROWTH_LIMIT:
        return None
    gram[np.diag_indices(dim)] += 1.0
    c = scipy.linalg.cholesky(gram, lower=False, check_finite=False)
    shifted = np.zeros((dim, dim))
    shifted[0, 0] = root_n
    shifted[1:, 1:] = rc
    new = c @ shifted
    new[0, 1:] += new[0, 0] * cf.mean
    u = np.finfo(np.float64).eps
    # μ is read off r to within ~4u|μ| per entry: that shifts each z_i by at most δ.
    delta = float(np.linalg.norm(4.0 * u * np.abs(cf.mean)) * np.linalg.norm(rcinv))
    bounds = np.square(np.sqrt(znorm) + delta) if delta > 0 else znorm
    return FactorUpdate(new, bounds + 1.0 / root_n**2, 4.0 * (dim - 1) * u * kappa)


def _triangular_scores(r: np.ndarray, rows: np.ndarray, rtol: float) -> np.ndarray | None:
    """‖x R⁻¹‖² per row by a triangular inverse when R is square and well conditioned.

    With κ = ‖R‖_F ‖R⁻¹‖_F < min(FAST_COND_LIMIT, 1 / (PRUNE_RTOL_FACTOR · rtol)) every
    σ_i ≥ σ_max / κ lies above the pruning range's cut (PRUNE_RTOL_FACTOR · rtol · σ_max),
    so the fine range is all of R, no slack applies, and x W (W = V Σ⁻¹ from the SVD)
    equals x R⁻¹ up to an orthogonal factor: the same scores without the SVD. Else None.
    """
    dim = r.shape[1]
    if r.shape[0] != dim or dim == 0 or rows.shape[1] != dim:
        return None
    rinv, info = lapack.dtrtri(r, lower=0)
    if info != 0:
        return None
    kappa = float(np.linalg.norm(r) * np.linalg.norm(rinv))
    if not np.isfinite(kappa) or kappa >= min(FAST_COND_LIMIT, 1 / (PRUNE_RTOL_FACTOR * rtol)):
        return None
    y = np.asarray(rows, dtype=np.float64) @ upper(rinv)
    return np.einsum("ij,ij->i", y, y)


@dataclass(frozen=True)
class LeverageSpec:
    """Keep every row whose leverage score can still be ≥ ``threshold``."""

    threshold: float
    affine: bool = False
    rtol: float = DEFAULT_RTOL


class LeverageScores(Operator[LeverageSpec, dict[str, Any]]):
    """One-pass exact set {j : τ_j ≥ threshold} with its rows, scores and factor.

    Memory: O(d² + (rank/threshold) · (d + d_v)) floats, independent of n.
    """

    family = "leverage-scores"
    concurrent_updates = True
    format_version = 3  # 2: the affine factor is the centred one (R of [1, K]); 3: windows
    Spec = LeverageSpec

    def __init__(self, spec: LeverageSpec) -> None:
        super().__init__(spec)
        self.r = np.zeros((0, 0))
        self.idx = np.zeros(0, dtype=np.int64)
        self.rows = np.zeros((0, 0))
        self.values: np.ndarray | None = None
        self.rows_dtype = ""
        #: Δ: relative error of RᵀR against the exact Gram, accumulated over fast steps
        #: (certified for Gram steps, the standard estimate for TRMM steps).
        self.rel_err = 0.0
        #: Steps to wait before the Gram step is tried again (adaptive back-off; in the
        #: state, so a resumed pass takes the same path bit for bit).
        self._gram_wait = 0
        #: The open Gram window (``_gram_fold``; in the state), and windows closed so far.
        self._window: _Window | None = None
        self._flushes = 0
        #: Diagnostics of this operator's own folds (not part of the state): steps and rows
        #: per path ("gram", "trmm", "householder"), rows admitted to exact scoring, and
        #: rows of Gram steps that needed the split bound (the norm bound did not prune).
        self.fold_stats = {f"{kind}_{unit}": 0 for kind in ("gram", "trmm", "householder")
                           for unit in ("steps", "rows")} | {"admitted_rows": 0, "split_rows": 0,
                                                        "rescored_rows": 0}

    def _dim(self, d: int) -> int:
        return d + 1 if self.spec.affine else d

    def _threshold(self) -> float:
        """The pruning threshold: τ_true ≤ (1 + Δ)·τ̂, so rows go below threshold / (1 + Δ)."""
        return self.spec.threshold / (1.0 + self.rel_err)

    def _pruning_scores(self, rows: np.ndarray) -> tuple[np.ndarray, float]:
        """Scores on the fine range and the cut below which a row's final score < threshold.

        The cut is (√threshold − δ)², δ = ‖σ_dropped‖ / (rtol · σ_max) (module docstring);
        it is the threshold itself when no direction is dropped.
        """
        if self.spec.affine:
            return self._centred_pruning_scores(rows)
        direct = _triangular_scores(self.r, rows, self.spec.rtol)
        if direct is not None:
            return direct, self._threshold()
        rtol = self.spec.rtol
        fine = ScoringMap.from_factor(self.r, rtol * PRUNE_RTOL_FACTOR, self.r.shape[1])
        cut = self._threshold()
        if fine.sigma_max > 0 and fine.rank < min(self.r.shape):
            dropped = np.linalg.svd(self.r, compute_uv=False)[fine.rank :]
            slack = float(np.linalg.norm(dropped)) / (rtol * fine.sigma_max)
            cut = max(0.0, np.sqrt(cut) - slack) ** 2 if slack > 0 else cut
        return fine.scores(augment(rows, False)), cut

    def _centred(self) -> Any:
        return centred_factor_result(self.r, self.n_rows)

    def _centred_pruning_scores(self, rows: np.ndarray) -> tuple[np.ndarray, float]:
        """Affine: centred scores c on the fine range of R_c and the cut on c.

        A row is kept while 1/n + (√c + δ)² ≥ threshold (module docstring), i.e. while
        c ≥ (√(threshold − 1/n) − δ)²; everything is kept while 1/n ≥ threshold.
        """
        rtol = self.spec.rtol
        cf = self._centred()
        rc = cf.r_centred
        need = self._threshold() - 1.0 / max(1, cf.n)
        if need <= 0:
            return np.ones(rows.shape[0]), 0.0
        direct = _triangular_scores(rc, np.asarray(rows, dtype=np.float64) - cf.mean, rtol)
        if direct is not None:
            return direct, need
        fine = ScoringMap.from_factor(rc, rtol * PRUNE_RTOL_FACTOR, rc.shape[1])
        slack = 0.0
        if fine.sigma_max > 0 and fine.rank < min(rc.shape):
            dropped = np.linalg.svd(rc, compute_uv=False)[fine.rank :]
            slack = float(np.linalg.norm(dropped)) / (rtol * fine.sigma_max)
        cut = max(0.0, np.sqrt(need) - slack) ** 2 if slack > 0 else need
        return fine.scores(np.asarray(rows, dtype=np.float64) - cf.mean), cut

    def _prune(self, idx: np.ndarray, rows: np.ndarray, values: np.ndarray | None) -> None:
        assert self._window is None  # scores against R hold for rows R has seen
        scores, cut = self._pruning_scores(rows)
        keep = scores >= cut
        order = np.argsort(idx[keep], kind="stable")
        self.idx = idx[keep][order]
        self.rows = rows[keep][order]
        self.values = None if values is None else values[keep][order]

    def _update(self, block: Block) -> None:
        """Fold a block: update R, admit the rows that can still reach the threshold.

        Where certified, a sub-block takes the Gram step (:meth:`_gram_fold`); else, while
        R is square and well conditioned, the factor is updated by
        :func:`fast_factor_update`, whose free by-product ‖x R_old⁻¹‖² bounds each
        row's score from above; only rows with bound ≥ threshold·(1 − rounding margin)
        are scored exactly, with every held candidate, against the new R. Otherwise
        (the start of the stream, rank-deficient or badly conditioned data) the block
        goes through Householder QR and every row is scored exactly. Candidates are
        re-pruned whenever rows are admitted, so |C| ≤ rank/threshold after every update.
        BLAS runs single-threaded here (:mod:`streamattn.blas`).
        """
        with single_blas_thread():
            self._fold(block)

    def _fold(self, block: Block) -> None:
        x = block.rows
        if self.r.size == 0 and self.idx.size == 0:
            self.r = np.zeros((0, self._dim(x.shape[1])))
            self.rows = np.zeros((0, x.shape[1]))
            self.rows_dtype = str(x.dtype)
            if block.values is not None:
                self.values = np.zeros((0, block.values.shape[1]))
        m = x.shape[0]
        head = 0
        if self.r.shape[0] < self.r.shape[1]:  # seed the factor by Householder QR
            head = min(m, SEED_ROWS_PER_DIM * self.r.shape[1])
            self.r = self._householder(x[:head])
        spans = [np.arange(head)]
        if head:
            self._count("householder", head, head)
        fast = centred_fast_update if self.spec.affine else fast_factor_update
        seen = self.n_rows - m + head  # rows in the factor and its open window
        flushes = self._flushes
        while head < m:
            # Sub-blocks of ≤ SUBBLOCK_GROWTH × the rows seen: a bound against the rows
            # before the sub-block is tight enough to prune most rows even at the start.
            # Bounds ≈ dim / seen cannot prune before seen ≈ dim / threshold: go there first.
            reach = int(self.r.shape[1] / self.spec.threshold) - seen
            stop = min(m, head + max(PIECE_ROWS, SUBBLOCK_GROWTH * seen, reach))
            gram = self._gram_fold(x[head:stop], seen)
            if gram is not None:  # it may take fewer rows than offered (its certificate)
                admitted_here, used = gram
                spans.append(head + admitted_here)
                stop = head + used
            else:
                sub = x[head:stop]
                step = fast(self.r, sub)
                if step is None:
                    self.r = self._householder(sub)
                    spans.append(np.arange(head, stop))
                    self._count("householder", stop - head, stop - head)
                else:
                    self.r = step.r
                    cut = self._threshold() * (1.0 - step.rel_err)
                    self.rel_err = (1.0 + self.rel_err) * (1.0 + step.rel_err) - 1.0
                    spans.append(head + np.flatnonzero(step.bounds >= cut))
                    self._count("trmm", stop - head, spans[-1].size)
            seen += stop - head
            head = stop
        admitted = np.concatenate(spans)
        idx, rows, values = self.idx, self.rows, self.values
        if admitted.size:
            idx = np.concatenate([idx, block.start + admitted.astype(np.int64)])
            rows = np.vstack([rows, np.asarray(x[admitted], dtype=np.float64)])
            if values is not None and block.values is not None:
                values = np.vstack([values, np.asarray(block.values[admitted], np.float64)])
        if self._window is not None:  # prune when the window closes (or C outgrows its cap)
            if idx.size <= self._candidate_cap(x.shape[1]):
                self.idx, self.rows, self.values = idx, rows, values
                return
            self._flush()
        if admitted.size or self._flushes > flushes:
            # held candidates only lose score; they are re-checked when rows arrive
            self._prune(idx, rows, values)

    def _candidate_cap(self, d: int) -> int:
        """|C| ≤ rank / threshold after a prune; an open window holds at most as many."""
        return int(self._dim(d) / self.spec.threshold)

    def _count(self, kind: str, rows: int, admitted: int) -> None:
        self.fold_stats[f"{kind}_steps"] += 1
        self.fold_stats[f"{kind}_rows"] += rows
        self.fold_stats["admitted_rows"] += admitted

    def _open_window(self, seen: int) -> _Window | None:
        """A Gram window on the current factor (its certified frame), or None where the
        Gram step cannot apply (R not square, small or singular; affine: 1/n ≥ threshold)."""
        r = self.r
        if r.shape[0] != r.shape[1] or r.shape[1] == 0:
            return None
        shift: np.ndarray | None = None
        root_n = 0.0
        if self.spec.affine:
            if r.shape[1] < 2 or r[0, 0] == 0:
                return None
            cf = centred_factor_result(r, 1)
            base, shift, root_n = cf.r_centred, cf.mean, abs(float(r[0, 0]))
            if self._threshold() - 1.0 / root_n**2 <= 0:
                return None
        else:
            base = r
        frame = make_frame(base)
        if frame is None:
            return None
        d = base.shape[1]
        at = np.abs(frame.rinv)
        n_old = at.T @ (np.abs(frame.r.T @ frame.r) @ at)
        return _Window(frame, shift, root_n, float(n_old.sum(axis=1).max()), seen, SYRK_ROWS,
                       np.zeros((d, d)), np.zeros(d))

    def _flush(self) -> None:
        """Close the Gram window: R ← its certified R' (rows pending in it are in R')."""
        win, self._window = self._window, None
        if win is None or win.rows == 0:
            return
        assert win.r_next is not None
        self._flushes += 1
        self.r = win.r_next
        self.rel_err = (1.0 + self.rel_err) * (1.0 + win.delta) - 1.0

    def _gram_fold(self, rows: np.ndarray, seen: int) -> tuple[np.ndarray, int] | None:
        """Fold the first rows of ``rows`` into the Gram window (:mod:`.gram_step`):
        (the admitted rows among them, how many were folded), or None.

        A window keeps one certified frame of the factor R₀ at its start and sums the
        blocks' Grams; after every block the step R' = chol(I + TᵀΣG_bT)R₀ of the whole
        window is computed and certified (δ ≤ GRAM_TOL), so a window is always ready to
        close (``_flush``) with a certified factor. Rows are admitted by their certified
        bound against R₀ (the Gram only grows, so it bounds every later score), times
        1 + Δ: the norm / split bound for every row, then ‖fl(z T)‖ with its allowances
        (``triangular_bounds``, about the TRMM step's own bound) for the rows it admits.
        The certificate's main terms grow like the rows folded against R₀, so where the
        offered rows would not fit (the start of a stream) only as many are folded as the
        predicted δ allows, if that is at least ``MIN_GRAM_ROWS_PER_DIM`` · d. Returns None, with no
        window left open (the caller then takes the TRMM step), where the step is not
        certified (ill-conditioned keys, large offsets in the plain variant, small
        factors; a block that would take its window past GRAM_TOL closes the window
        without it), or for the one step after such a refusal (``_gram_wait``).
        """
        if self._gram_wait > 0:
            self._flush()
            self._gram_wait -= 1
            return None
        m = rows.shape[0]
        if m == 0:
            return None
        tol = min(GRAM_TOL, (1.0 + REL_ERR_BUDGET) / (1.0 + self.rel_err) - 1.0)
        aim = tol / PREDICTION_MARGIN
        win = self._window
        sample = _sample(rows)
        if win is not None and self._predicted(win, sample, win.rows + m) > aim:
            self._flush()
            win = None
        if win is None:
            win = self._window = self._open_window(seen)
            predicted = 0.0 if win is None or tol <= 0 else self._predicted(win, sample, m)
            if win is not None and tol > 0 and predicted > aim:  # fewer rows, if enough fit
                fit = int(m * aim / (2 * predicted)) // PIECE_ROWS * PIECE_ROWS
                if fit >= max(2 * PIECE_ROWS, MIN_GRAM_ROWS_PER_DIM * win.frame.r.shape[1]):
                    rows, m = rows[:fit], fit
                    sample = _sample(rows)
                    predicted = self._predicted(win, sample, m)
            if win is None or tol <= 0 or predicted > aim:
                self._window = None
                return None
            # one SYRK call per piece where the certificate has room for its longer sums
            # (predicted for a full window; a block that would not fit closes the window)
            longer = replace(win, syrk_rows=LONG_SYRK_ROWS)
            if self._predicted(longer, sample, max(m, min(WINDOW_ROWS, seen))) <= aim / 4:
                win = self._window = longer
        frame, shift = win.frame, win.shift
        thr = self._threshold()
        affine = self.spec.affine
        need = thr - 1.0 / win.root_n**2 if affine else thr
        # μ̂ is within 4u|μ̂| of the factor's exact mean, and z = fl(x − μ̂) within u|z| of
        # x − μ̂: both enter ‖(x − μ̃) R_c⁻¹‖ additively, before squaring (affine only).
        d_mu = 0.0 if shift is None else float(np.linalg.norm(4 * U * np.abs(shift))) / (
            frame.sigma_lo)
        z_round = 1.01 * U * frame.rinv_norm * frame.sigma_lo if affine else 0.0
        # rows whose norm bound is below the screen are dropped whatever the split bound
        screen = (np.sqrt(need) * (1 - 1e-9) - d_mu) / (1 + z_round + 8 * U)
        if need < 1e-6 * thr:  # (1 − 1e-9)² no longer covers the rounding of thr − 1/n
            screen = 0.0
        gram, colsum, s, xx, split = gram_and_bounds(rows, frame, shift, max(screen, 0.0),
                                                     win.syrk_rows)
        if win.rows:  # 0 + x = x exactly: a window of one block is the one-block step
            gram += win.gram
            colsum += win.colsum
        fro2 = win.fro2 + float(xx.sum())
        total, calls, longest = win.rows + m, win.calls + 1, max(win.longest, m)
        length = window_length(longest, calls, win.syrk_rows)
        if affine:
            assert shift is not None
            step = centred_gram_step(frame, win.root_n, shift, gram, colsum, fro2, total, tol,
                                     length, win.syrk_rows)
        else:
            step = gram_step(frame, gram, fro2, total, tol, length)
        if step is None:
            self._flush()  # the window without this block (certified), or nothing
            self._gram_wait = 1
            return None
        self._window = replace(win, gram=gram, colsum=colsum, fro2=fro2, rows=total,
                               calls=calls, longest=longest, r_next=step[0], delta=step[1])
        self.fold_stats["split_rows"] += split

        def squared(s: np.ndarray, zz: np.ndarray) -> np.ndarray:
            if affine:  # + the roundings of μ̂ and of z = fl(x − μ̂)
                s = s + d_mu + 1.01 * U * np.sqrt(zz) * frame.rinv_norm
                return (np.square(s) + 1.0 / win.root_n**2) * (1 + 4 * U)
            return np.square(s) * (1 + 4 * U)

        admitted = np.flatnonzero(squared(s, xx) >= thr)
        if admitted.size:  # second stage: ‖fl(z T)‖ with its allowances, those rows only
            z = np.asarray(rows[admitted], dtype=np.float64)
            if shift is not None:
                z -= shift
            tight = squared(triangular_bounds(frame, z), xx[admitted])
            self.fold_stats["rescored_rows"] += admitted.size
            admitted = admitted[tight >= thr]
        self._count("gram", m, admitted.size)
        if total >= min(WINDOW_ROWS, max(win.seen, PIECE_ROWS)):
            self._flush()
        return admitted, m

    def _predicted(self, win: _Window, sample: np.ndarray, m: int) -> float:
        """Predicted δ of a window of m rows like ``sample`` (``_sample`` of the offered
        rows; a heuristic, the certificate is computed after the block): the SYRK term, and
        the transform term for a Gram ≈ (m / seen)·RᵀR (stationary rows, seen ≈ ‖R‖_F² /
        typical). Skips blocks whose certificate would refuse anyway."""
        frame = win.frame
        if win.shift is not None:
            sample = sample - win.shift
        typical = float(np.einsum("ij,ij->", sample, sample)) / sample.shape[0]
        scale = m * typical / max(float(np.sum(frame.r * frame.r)), np.finfo(float).tiny)
        return (gamma(accumulation_length(m, win.syrk_rows) + 3) * m * typical
                * frame.rinv_norm**2
                + 2 * gamma(frame.r.shape[1]) * scale * win.n_old)

    def _householder(self, rows: np.ndarray) -> np.ndarray:
        """The factor after appending ``rows`` by Householder TSQR (affine: of [1, X])."""
        if self.spec.affine:
            return centred_factor_update(self.r, rows)
        return stack_qr(self.r, augment(rows, False))

    def settled(self) -> LeverageScores:
        """This operator with its Gram window closed: self, or a closed shallow copy."""
        if self._window is None:
            return self
        out = copy.copy(self)
        out._flush()
        return out

    def _merge(self, other: LeverageScores) -> None:
        self._flush()
        other = other.settled()
        self.r = stack_qr(self.r, other.r)
        self.rel_err = max(self.rel_err, other.rel_err)
        self._prune(
            np.concatenate([self.idx, other.idx]), np.vstack([self.rows, other.rows]),
            stack_values(self.values, other.values),
        )

    def _state(self) -> State:
        state: State = {"r": self.r, "rows_dtype": np.array(self.rows_dtype),
                        "rel_err": np.array(self.rel_err),
                        "gram_wait": np.array(self._gram_wait),
                        **candidate_state(self.idx, self.rows, self.values)}
        win = self._window
        if win is not None:  # the frame is recomputed from R on load (deterministic)
            assert win.r_next is not None
            state |= {"window_gram": win.gram, "window_colsum": win.colsum,
                      "window_r_next": win.r_next,
                      "window_sums": np.array([win.fro2, win.delta]),
                      "window_counts": np.array([win.seen, win.rows, win.calls, win.longest,
                                                 win.syrk_rows], dtype=np.int64)}
        return state

    def _load(self, state: State) -> None:
        self.r = np.array(state["r"], dtype=np.float64)
        self.rel_err = float(state["rel_err"]) if "rel_err" in state else 0.0
        self._gram_wait = int(state["gram_wait"]) if "gram_wait" in state else 0
        self.idx, self.rows, self.values = load_candidates(state)
        self.rows_dtype = str(state["rows_dtype"])
        self._window = None
        if "window_gram" in state:
            seen, rows, calls, longest, syrk_rows = (int(v) for v in state["window_counts"])
            win = self._open_window(seen)
            if win is None:
                raise ValueError("a leverage-scores state holds a Gram window its factor "
                                 "cannot open: the state is corrupt.")
            fro2, delta = (float(v) for v in state["window_sums"])
            self._window = replace(
                win, gram=np.array(state["window_gram"], dtype=np.float64),
                colsum=np.array(state["window_colsum"], dtype=np.float64), fro2=fro2,
                rows=rows, calls=calls, longest=longest, syrk_rows=syrk_rows,
                r_next=np.array(state["window_r_next"], dtype=np.float64), delta=delta)

    def scoring_map(self) -> ScoringMap:
        if self._window is not None:
            return self.settled().scoring_map()
        if self.spec.affine:
            return ScoringMap.from_centred(self._centred(), self.spec.rtol)
        return ScoringMap.from_factor(self.r, self.spec.rtol, self.r.shape[1])

    def result(self) -> dict[str, Any]:
        """Held rows whose exact final score is ≥ threshold, their scores, and the map."""
        if self._window is not None:
            return self.settled().result()
        smap = self.scoring_map()
        scores = smap.scores(augment(self.rows, False)) if self.idx.size else np.zeros(0)
        keep = scores >= self.spec.threshold
        return {
            "indices": self.idx[keep],
            "scores": scores[keep],
            "rows": self.rows[keep].astype(self.rows_dtype or np.float64),
            "values": None if self.values is None else self.values[keep],
            "scoring_map": smap,
            "n": self.n_rows,
        }

    def nbytes_bound(self, d: int, d_values: int = 0) -> int:
        dim = self._dim(d)
        max_candidates = int(dim / self.spec.threshold)
        # R, and an open window's frame (T, |R||T|, V_S, Ĥ), Gram and R'
        return 8 * (7 * dim * dim + max_candidates * (d + d_values + 1))


@dataclass(frozen=True)
class TopScoresSpec:
    """Keep the ``budget`` rows with the largest ‖(k − shift) W‖² + offset (ties: smaller
    index first). ``affine`` maps come with their centring ``shift`` (μ) and ``offset``
    (1/n): pass ``ScoringMap.shift`` / ``.offset``."""

    budget: int
    w: np.ndarray
    affine: bool = False
    shift: np.ndarray | None = None
    offset: float = 0.0


class TopScores(Operator[TopScoresSpec, dict[str, Any]]):
    """Mergeable exact top-B by a fixed scoring map (the second pass of budget mode).

    Memory: O(B · (d + d_v)), independent of n.
    """

    family = "top-scores"
    concurrent_updates = True
    Spec = TopScoresSpec

    def __init__(self, spec: TopScoresSpec) -> None:
        super().__init__(spec)
        if spec.affine and spec.shift is None:
            from streamattn.errors import ConfigError

            raise ConfigError(
                "an affine TopScores map needs its centring shift (ScoringMap.shift, the "
                "mean key) and offset (1/n)."
            )
        self.idx = np.zeros(0, dtype=np.int64)
        self.scores = np.zeros(0)
        self.rows = np.zeros((0, 0))
        self.values: np.ndarray | None = None
        self.rows_dtype = ""

    def _keep_top(self, idx: np.ndarray, scores: np.ndarray, rows: np.ndarray,
                  values: np.ndarray | None) -> None:
        order = np.lexsort((idx, -scores))[: self.spec.budget]
        order = order[np.argsort(idx[order], kind="stable")]
        self.idx, self.scores, self.rows = idx[order], scores[order], rows[order]
        self.values = None if values is None else values[order]

    def _update(self, block: Block) -> None:
        if self.rows.size == 0 and self.idx.size == 0:
            self.rows = np.zeros((0, block.rows.shape[1]))
            self.rows_dtype = str(block.rows.dtype)
            if block.values is not None:
                self.values = np.zeros((0, block.values.shape[1]))
        with single_blas_thread():
            s = map_scores(block.rows, self.spec.w, self.spec.shift, self.spec.offset)
        # Only rows that can enter the top-B are copied.
        if s.size > self.spec.budget:
            cut = np.partition(s, s.size - self.spec.budget)[s.size - self.spec.budget]
            sel = np.flatnonzero(s >= cut)
        else:
            sel = np.arange(s.size)
        values = None
        if self.values is not None and block.values is not None:
            values = np.vstack([self.values, block.values[sel].astype(np.float64)])
        self._keep_top(
            np.concatenate([self.idx, block.start + sel.astype(np.int64)]),
            np.concatenate([self.scores, s[sel]]),
            np.vstack([self.rows, block.rows[sel].astype(np.float64)]),
            values,
        )

    def _merge(self, other: TopScores) -> None:
        self._keep_top(
            np.concatenate([self.idx, other.idx]),
            np.concatenate([self.scores, other.scores]),
            np.vstack([self.rows, other.rows]),
            stack_values(self.values, other.values),
        )

    def _state(self) -> State:
        return {"scores": self.scores, "rows_dtype": np.array(self.rows_dtype),
                **candidate_state(self.idx, self.rows, self.values)}

    def _load(self, state: State) -> None:
        self.idx, self.rows, self.values = load_candidates(state)
        self.scores = np.array(state["scores"], dtype=np.float64)
        self.rows_dtype = str(state["rows_dtype"])

    def result(self) -> dict[str, Any]:
        return {
            "indices": self.idx.copy(),
            "scores": self.scores.copy(),
            "rows": self.rows.astype(self.rows_dtype or np.float64),
            "values": None if self.values is None else self.values.copy(),
            "n": self.n_rows,
        }

    def nbytes_bound(self, d: int, d_values: int = 0) -> int:
        shift = 0 if self.spec.shift is None else self.spec.shift.nbytes
        return 8 * self.spec.budget * (d + d_values + 2) + self.spec.w.nbytes + shift
