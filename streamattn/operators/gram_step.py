"""Certified Gram step and certified pruning bound for the one-pass leverage set (issue 16).

The preconditioned Cholesky update of ``leverage.fast_factor_update`` (Y = X R⁻¹ by TRMM, YᵀY
by SYRK: 2·m·d² flops per block) is replaced, where a computed certificate allows it, by

    G_b = XᵀX by float64 SYRK (m·d² flops),  R' = chol(I + Tᵀ G_b T) R,  T = R⁻¹ (dtrtri),

which halves the flops. Float32 keys are converted to float64 piece by piece, so every
product x_i x_j is exact in float64 and only the accumulation rounds.

Certificate (u = 2⁻⁵³, γ_n = n·u / (1 − n·u); ``‖·‖`` the 2-norm). With M = I + R⁻ᵀG_bR⁻¹ ⪰ I,
R'ᵀR' = Rᵀ(M + E)R for the E the rounding leaves, so ‖E‖ ≤ δ gives
(1 − δ)(RᵀR + G_b) ⪯ R'ᵀR' ⪯ (1 + δ)(RᵀR + G_b). The step bounds δ by (``gram_step``):

- SYRK: |fl(G_b) − G_b| ≤ γ_L |X|ᵀ|X| entrywise, L = S + ⌈P/S⌉ + ⌈m/P⌉ + 2
  (``accumulation_length``: SYRK calls of S = 128 rows with β = 0 into a scratch, summed
  per piece of P rows, pieces per row span, then the spans (any number); + 1 for float64 keys,
  whose products round), so ‖TᵀΔG T‖ ≤ γ_L ‖X‖_F² ‖T‖², ‖T‖ ≤ (1 + ψ)/σ_lo.
- σ_lo: σ̂_min − ``SVD_BACKWARD``·d·u·σ̂_max from the SVD of R. Assumption (stated, not
  proved here): LAPACK's SVD is backward stable with ‖ΔR‖ ≤ SVD_BACKWARD·d·u·‖R‖, so by
  Weyl σ_min(R) ≥ σ_lo. Every other constant below is a textbook rounding bound.
- T ≠ R⁻¹: ψ ≥ ‖RT − I‖ from the computed residual plus γ_{d+1}‖R‖_F‖T‖_F; with
  T = R⁻¹(I + Ψ), ‖TᵀG_bT − R⁻ᵀG_bR⁻¹‖ ≤ (2ψ + ψ²)‖R⁻ᵀG_bR⁻¹‖.
- the d × d transform fl(Tᵀ(Ĝ T)): ≤ (2γ_d + γ_d²)‖ |T|ᵀ|Ĝ||T| ‖, the nonnegative matrix
  computed and its ∞-norm taken (≥ its 2-norm, it is symmetric).
- Cholesky: ĈᵀĈ = M̂ + F, ‖F‖ ≤ γ_{d+1}‖Ĉ‖_F²; the product fl(Ĉ R): relative ρ =
  γ_d‖Ĉ‖_F‖R‖_F/σ_lo (·1.01 for ‖Ĉ⁻¹‖), i.e. 2ρ + ρ² on the Gram.
- affine (centred frame, rows z = x − μ̂ with μ̂ the mean read off the factor): the extra
  roundings of z (u per entry), of Σz (summed row after row within a piece: its own length,
  ``sum_length``), of μ̂ itself (|μ̂ − μ̃| ≤ 4u|μ̂|, μ̃ the exact ratio
  in the stored factor: relative ψ_μ = √n‖4u μ̂‖/σ_lo) and of the final row-0 update.

The terms are summed (×1.01, which covers their products while δ ≤ ``GRAM_TOL`` ≪ 1e-3).
G_b may be the sum of several calls' results (a window of blocks against one frame):
``window_length`` adds one addition per later call to L; nothing else changes.
The step is taken only when δ ≤ ``GRAM_TOL`` = 1e-9 and the accumulated relative error Δ
(Δ' = (1 + Δ)(1 + δ) − 1) stays ≤ ``REL_ERR_BUDGET`` = 1e-7, below float32's unit
roundoff (the precision of the keys themselves); else the caller takes the TRMM step. The
transform term dominates δ: it grows like (m/n)·κ(R)², against the TRMM step's ~κ(R), so
the Gram step is the cheaper path only once the factor has seen several blocks. Δ enters
the pruning cut: τ_true ≤ (1 + Δ)·τ̂, so rows are dropped only below threshold / (1 + Δ).

Pruning bound (``Frame.split_bounds``, 2·m·d·k + m·d flops): with V_S (d × k) the top right
singular vectors of R (any d × k matrix would do, the bound does not assume V_S exact),
for any row x and â = fl(V_Sᵀx):

    √(xᵀ(RᵀR)⁻¹x) ≤ ‖B̂ â‖ + ‖F‖‖â‖/σ_lo + ‖x − V_S â‖/σ_lo,   B̂ = fl(Tᵀ V_S), F = V_S − RᵀB̂,

‖B̂ â‖² ≤ fl(âᵀĤâ) + (2.01γ_k‖Ĥ‖_F + γ_d‖B̂‖_F²)‖â‖² (Ĥ = fl(B̂ᵀB̂)), and
‖x − V_S â‖² ≤ fl(‖x‖²) − fl(‖â‖²) + c·fl(‖x‖²) with c = 2(γ_d + γ_k + 2.2γ_d√k + η) + 8u,
η ≥ ‖V_SᵀV_S − I‖ (computed, plus its rounding): the cancellation allowance. The norm
bound (k = 0, ``Frame.norm_bounds``) is ‖x‖²(1 + 2γ_d + 8u)/σ_lo²: m·d flops. Every row
gets the norm bound; only rows it does not prune get the split bound (two stages), and
the smaller of the two is kept. The bounds are against the factor before the block;
since the Gram only grows, they bound every later score of the row.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy.linalg import lapack

from streamattn.cores import usable_cores

#: Unit roundoff of float64.
U = 2.0**-53
#: The environment variable that sets ``STREAM_THREADS``.
STREAM_THREADS_ENV = "STREAMATTN_STREAM_THREADS"
#: Rows per piece of the streaming kernels: float64 work buffers of PIECE_ROWS × dim stay
#: in cache, and the float32 → float64 conversion happens piece by piece.
PIECE_ROWS = 2048
#: Python threads sharing one block's GEMM/SYRK work (single-threaded BLAS each; they
#: block instead of spinning, so a busy machine degrades gracefully): one per core this
#: process may use (``cores.usable_cores``: affinity mask, cgroup quota). The environment
#: variable STREAMATTN_STREAM_THREADS sets it (e.g. 1 in each of several worker processes
#: sharing a machine's cores; the Dask engine's LocalCluster sets it for its workers).
STREAM_THREADS = max(1, int(os.environ.get(STREAM_THREADS_ENV, "0")) or usable_cores())
#: Largest certified relative Gram error of one Gram step (else: the TRMM step) ...
GRAM_TOL = 1e-9
#: ... and of all steps together (Δ): below float32's unit roundoff 6e-8, so below the
#: precision the keys themselves carry.
REL_ERR_BUDGET = 1e-7
#: Assumed LAPACK SVD backward-error constant: σ̂ are exact for R + ΔR, ‖ΔR‖ ≤ this·d·u·‖R‖.
SVD_BACKWARD = 8.0
#: The eigen-split keeps σ_i > SPLIT_RATIO · σ_min in V_S (a cost heuristic, any k is valid) ...
SPLIT_RATIO = 2.0
#: ... and at most this fraction of d directions (beyond it the TRMM step costs about as much).
SPLIT_MAX_FRACTION = 0.25


@cache
def _strict_lower(d: int) -> np.ndarray:
    """The strictly lower triangle of a d × d matrix, as a cached read-only mask."""
    mask = np.tri(d, d, -1, dtype=bool)
    mask.flags.writeable = False
    return mask


def upper(a: np.ndarray) -> np.ndarray:
    """``np.triu(a)`` of a square matrix, the same values (np.triu builds its mask anew
    with Python-level work on every call: 16 % of a cache head's GIL-held time)."""
    return np.where(_strict_lower(a.shape[0]), 0.0, a)


def symmetric_from_upper(a: np.ndarray) -> np.ndarray:
    """The symmetric matrix with ``a``'s upper triangle (diagonal included)."""
    return np.where(_strict_lower(a.shape[0]), a.T, a)


def cholesky_upper(m: np.ndarray) -> np.ndarray | None:
    """The upper Cholesky factor by LAPACK dpotrf, as ``scipy.linalg.cholesky(m,
    lower=False)`` computes it (the same call, without its Python wrappers), or None where
    dpotrf finds ``m`` not positive definite."""
    c, info = lapack.dpotrf(m, lower=0, clean=1)
    return None if info != 0 else c


def gamma(n: int | float) -> float:
    """γ_n = n·u / (1 − n·u): the classic bound for n accumulated float64 roundings."""
    return n * U / (1.0 - n * U)


@cache
def pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(STREAM_THREADS, thread_name_prefix="streamattn-blas")


_local = threading.local()


@contextmanager
def serial_rows() -> Iterator[None]:
    """Within the body, this thread's kernels take one row span (no stream threads).

    For callers that already run kernels side by side (``MultiHead`` folds its heads in
    stream threads of its own): the same arithmetic per span, no nested pool.
    """
    before = getattr(_local, "serial", False)
    _local.serial = True
    try:
        yield
    finally:
        _local.serial = before


#: Row spans per stream thread: the pool hands them out as threads free up, so a thread
#: that shares its core with the reader does fewer (one span each left one thread idle
#: ~half of a d = 64 pass, measured).
SPANS_PER_THREAD = 4


#: Largest work buffer a thread keeps between calls (``work_buffer``).
KEEP_WORK_BYTES = 8 << 20


def work_buffer(name: str, rows: int, cols: int) -> np.ndarray:
    """A float64 ``(rows, cols)`` work buffer of this thread, kept across calls.

    The kernels' piece buffers (0.5–2 MB) would otherwise be fresh allocations per span:
    glibc serves that size by mmap, and a process started with MALLOC_TRIM_THRESHOLD_ set
    (Dask's nanny does, for every worker) keeps doing so, so each call page-faults its
    buffers in again (measured: the local pass 2.9 → 3.3–3.7 s, sys 0.7 → 1.3–1.7 s, with
    MALLOC_TRIM_THRESHOLD_=65536). Callers use the buffer before their next call with the
    same name in the same thread and never hand it out. Buffers over ``KEEP_WORK_BYTES``
    (very wide keys) are fresh each call: their size amortises the faults, and a thread
    keeps at most a few of the small ones.
    """
    size = rows * cols
    if 8 * size > KEEP_WORK_BYTES:
        return np.empty((rows, cols))
    bufs: dict[str, np.ndarray] = _local.__dict__.setdefault("work", {})
    have = bufs.get(name)
    if have is None or have.size < size:
        have = bufs[name] = np.empty(max(size, 1))
    return have[:size].reshape(rows, cols)


def work_bytes(d: int) -> int:
    """The most one thread's ``work_buffer`` buffers hold for keys of dimension d: pieces of
    PIECE_ROWS rows of the Gram pass (d, and 2 × k ≤ SPLIT_MAX_FRACTION·d of the split
    bound), the TRMM pass (d and d + 1) and the scoring map (d and ≤ d + 1)."""
    k = int(SPLIT_MAX_FRACTION * d)
    return 8 * PIECE_ROWS * (d + 2 * k + d + (d + 1) + d + (d + 1))


def kernel_threads(operators: int) -> int:
    """Threads that may hold kernel work buffers in a pass of this many operators: the
    stream pool's, the head pool's (``MultiHead``) and one per operator folding in a
    thread of its own (small blocks run their one span there)."""
    return 2 * STREAM_THREADS + max(1, operators)


def split_rows(m: int) -> list[tuple[int, int]]:
    """Contiguous row spans, ``SPANS_PER_THREAD`` per stream thread (fewer for small m),
    each a whole number of pieces (one span inside :func:`serial_rows`). Their results
    are summed in span order, whichever thread computed them."""
    if STREAM_THREADS == 1 or m < 2 * PIECE_ROWS or getattr(_local, "serial", False):
        return [(0, m)]
    pieces = -(-m // PIECE_ROWS)
    spans = min(SPANS_PER_THREAD * STREAM_THREADS, pieces)
    per = -(-pieces // spans) * PIECE_ROWS
    return [(a, min(a + per, m)) for a in range(0, m, per)]


#: Rows per SYRK call: each call's d × d result (summed over SYRK_ROWS products) is added to
#: a per-piece sum, pieces to a per-thread sum: the accumulation length stays ~180, not m ...
SYRK_ROWS = 128
#: ... or, where the certificate has room for L ≈ 2200 (``LeverageScores`` decides per
#: window), one SYRK call per piece: 1.1–1.5× faster (measured, d = 64 / 128, one core:
#: a 2048-row piece in 128-row calls 346 / 1163 µs, in one call 266 / 765 µs).
LONG_SYRK_ROWS = PIECE_ROWS


def sum_length(length: int, syrk_rows: int = SYRK_ROWS) -> int:
    """L of the column sums fl(Σz) formed alongside a Gram of accumulation length ``length``
    (``accumulation_length`` / ``window_length``) with ``syrk_rows`` rows per SYRK call.

    numpy sums a piece's rows one after another (``xb.sum(axis=0)``: no pairwise summation
    along axis 0), so a piece contributes ≤ PIECE_ROWS − 1 additions where the Gram has
    ≤ syrk_rows − 1 per call plus ⌈PIECE_ROWS/syrk_rows⌉ call results; pieces, spans and a
    window's calls are summed alike. (With the Gram's L, the column sums of 128-row SYRK
    windows were under-covered ≈ 12×: 2047 sequential terms per piece.)
    """
    return length + PIECE_ROWS + 1 - syrk_rows - -(-PIECE_ROWS // syrk_rows)


def accumulation_length(m: int, syrk_rows: int = SYRK_ROWS) -> int:
    """L of the SYRK/column-sum certificate for m rows summed as ``_pass`` does.

    Any summation order of n terms has error ≤ γ_{n−1}·Σ|terms|; here every entry is a
    sum of ≤ S = ``syrk_rows`` products (one SYRK call), ⌈PIECE_ROWS/S⌉ call results per
    piece, then a = ⌈p/s⌉ piece sums per span and b ≤ s span sums (``split_rows``, s spans,
    p = ⌈m/PIECE_ROWS⌉ pieces): a + b ≤ ⌈p/s⌉ + s ≤ p + 1 for 1 ≤ s ≤ p (+1 for slack).
    """
    return syrk_rows + -(-PIECE_ROWS // syrk_rows) + -(-max(m, 1) // PIECE_ROWS) + 2


@dataclass(frozen=True)
class Frame:
    """Certified data of a square upper-triangular factor R for one Gram step.

    ``rinv`` = T ≈ R⁻¹; ``abs_rt`` ≥ |R||T| entrywise; ``sigma_lo`` ≤ σ_min(R) (module
    docstring); ``psi`` ≥ ‖RT − I‖;
    ``v`` = V_S (d × k) with ``h`` = Ĥ, ``q_allow``, ``f_over`` = ‖F‖/σ_lo, ``res_allow`` = c
    the allowances of the split bound; ``sigma`` the computed singular values.
    """

    r: np.ndarray
    rinv: np.ndarray
    abs_rt: np.ndarray
    sigma: np.ndarray
    sigma_lo: float
    psi: float
    v: np.ndarray
    h: np.ndarray
    q_allow: float
    f_over: float
    res_allow: float

    @property
    def k(self) -> int:
        return int(self.v.shape[1])

    @property
    def rinv_norm(self) -> float:
        """An upper bound of ‖T‖₂."""
        return (1.0 + self.psi) / self.sigma_lo

    def norm_bounds(self, xx: np.ndarray) -> np.ndarray:
        """Upper bounds of ‖R⁻ᵀx‖ from fl(‖x‖²) alone (the k = 0 bound)."""
        return np.sqrt(xx * (1.0 + 2 * gamma(self.r.shape[0]) + 8 * U)) / self.sigma_lo * (
            1.0 + 8 * U)

    def split_bounds(self, xx: np.ndarray, aa: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Upper bounds of ‖R⁻ᵀx‖ (not squared) from fl(‖x‖²), fl(‖â‖²), fl(âᵀĤâ)."""
        res = np.maximum(xx - aa + self.res_allow * xx, 0.0)
        a_up = aa / (1.0 - gamma(self.k))
        s = np.sqrt(res) / self.sigma_lo
        s += np.sqrt(np.maximum(q + self.q_allow * a_up, 0.0)) + self.f_over * np.sqrt(a_up)
        return s * (1.0 + 8 * U)


def triangular_bounds(frame: Frame, z: np.ndarray) -> np.ndarray:
    """Upper bounds of ‖R⁻ᵀz‖ per row of float64 ``z`` from ŷ = fl(z T) (2·d² flops a row).

    With RT = I + Ψ (‖Ψ‖ ≤ ψ), R⁻¹ = T(I + Ψ)⁻¹, so ‖zR⁻¹‖ ≤ ‖zT‖/(1 − ψ); and
    |fl(zT) − zT| ≤ γ_d|z||T| entrywise, so ‖zT‖ ≤ ‖ŷ‖ + γ_d‖z‖‖T‖_F. The two norms are
    computed sums of d squares (relative error ≤ γ_d each, ≤ 1 + γ_d after the root; ×(1 + 8u)
    covers the roots, the products and the division). The tight second stage for rows the
    norm and split bounds admit: about the TRMM step's exact bound, for those rows only.
    """
    d = frame.r.shape[0]
    y = z @ frame.rinv
    up = 1.0 + 2 * gamma(d)
    yn = np.sqrt(np.einsum("ij,ij->i", y, y)) * up
    zn = np.sqrt(np.einsum("ij,ij->i", z, z)) * up
    tf = float(np.linalg.norm(frame.rinv)) * up
    return (yn + gamma(d) * zn * tf) / (1.0 - frame.psi) * (1.0 + 8 * U)


def make_frame(r: np.ndarray, k: int | None = None) -> Frame | None:
    """The certified frame of R, or None (not square, singular, or not certifiable).

    k (unless given): #{σ_i > SPLIT_RATIO·σ_min}, at most SPLIT_MAX_FRACTION·d (a cost
    heuristic: the bound is valid for every k ≤ d).
    """
    d = r.shape[1]
    if r.shape[0] != d or d == 0:
        return None
    try:
        _, s, vt = np.linalg.svd(r)
    except np.linalg.LinAlgError:
        return None
    if not np.all(np.isfinite(s)):
        return None
    sigma_lo = float(s[-1] - SVD_BACKWARD * d * U * s[0])
    if sigma_lo <= 0:
        return None
    rinv, info = lapack.dtrtri(r, lower=0)
    if info != 0:
        return None
    rinv = upper(rinv)
    rt = upper(r)
    rf = float(np.linalg.norm(rt))
    abs_rt = np.abs(rt) @ np.abs(rinv) / (1 - gamma(d))  # ≥ |R||T| entrywise
    resid = rt @ rinv
    resid[np.diag_indices(d)] -= 1.0
    psi = float(np.linalg.norm(resid)) + gamma(d + 1) * float(np.linalg.norm(abs_rt))
    if not np.isfinite(psi) or psi >= 1e-3:
        return None
    if k is None:
        k = min(int(np.count_nonzero(s > SPLIT_RATIO * s[-1])), int(SPLIT_MAX_FRACTION * d))
    empty = np.zeros((0, 0))
    plain = Frame(rt, rinv, abs_rt, s, sigma_lo, psi, np.zeros((d, 0)), empty, 0.0, 0.0, 0.0)
    if k == 0:
        return plain
    v = np.ascontiguousarray(vt[:k].T)
    vtv = v.T @ v
    vf2 = float(np.sum(v * v)) * (1 + gamma(d * k))
    vtv[np.diag_indices(k)] -= 1.0
    eta = float(np.linalg.norm(vtv)) + gamma(d + 1) * vf2
    if eta > 1e-6 or gamma(d) * np.sqrt(k) > 1e-6:
        return plain
    b = rinv.T @ v
    h = b.T @ b
    h = 0.5 * (h + h.T)
    bf2 = float(np.sum(b * b)) * (1 + gamma(d * k))
    q_allow = 2.01 * gamma(k) * float(np.linalg.norm(h)) + gamma(d) * bf2
    fres = v - rt.T @ b
    f = float(np.linalg.norm(fres)) + gamma(d + 1) * rf * np.sqrt(bf2)
    res_allow = 2 * (gamma(d) + gamma(k) + 2.2 * gamma(d) * np.sqrt(k) + eta) + 8 * U
    return Frame(rt, rinv, abs_rt, s, sigma_lo, psi, v, np.ascontiguousarray(h), q_allow,
                 f / sigma_lo, res_allow)


def _pass(
    rows: np.ndarray, lo: int, hi: int, frame: Frame, shift: np.ndarray | None,
    screen: float, xx: np.ndarray, bounds: np.ndarray, syrk_rows: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Σ zᵀz (symmetric, C order), Σ z and the number of rows given the split bound,
    over rows [lo, hi), z = x − shift; fills ‖z‖² and the bounds of ‖R⁻ᵀz‖ per row.

    Every row gets the norm bound; rows whose norm bound is ≥ ``screen`` also get the
    split bound (the smaller of the two is kept: both are valid). One float64 conversion
    per piece; the float64 piece stays in cache for SYRK, norms and projection.
    """
    d = rows.shape[1]
    piece = min(PIECE_ROWS, hi - lo)
    k = frame.k
    buf = work_buffer("gram-piece", piece, d)
    abuf = work_buffer("gram-split-a", piece, k)
    tbuf = work_buffer("gram-split-t", piece, k)
    acc = np.zeros((d, d))
    pacc = np.zeros((d, d))  # C order like the products: a strided add cost 28 ms per block
    scratch = np.zeros((d, d))
    colsum = np.zeros(d)
    split = 0
    for a in range(lo, hi, piece):
        n = min(piece, hi - a)
        xb = buf[:n]
        np.copyto(xb, rows[a : a + n], casting="safe")
        if shift is not None:
            xb -= shift
            colsum += xb.sum(axis=0)
        pacc[:] = 0.0
        for b in range(0, n, syrk_rows):  # each product is a fresh sum of ≤ syrk_rows terms
            sub = xb[b : b + syrk_rows]
            # numpy computes sub.T @ sub by SYRK (it detects the transpose) and, unlike
            # scipy.linalg.blas, releases the GIL: the stream threads then really overlap
            # (measured 1.4–2.5× on 2 cores; scipy's wrappers serialise them, 0.9×).
            np.matmul(sub.T, sub, out=scratch)
            pacc += scratch
        acc += pacc
        xp = xx[a : a + n]
        xp[:] = np.einsum("ij,ij->i", xb, xb)
        sp = bounds[a : a + n]
        sp[:] = frame.norm_bounds(xp)
        if k:
            sel = np.flatnonzero(sp >= screen)
            if 4 * sel.size > n:  # most rows: the whole piece, no gather
                split += n
                ab, tb = abuf[:n], tbuf[:n]
                np.matmul(xb, frame.v, out=ab)
                np.matmul(ab, frame.h, out=tb)
                aa = np.einsum("ij,ij->i", ab, ab)
                q = np.einsum("ij,ij->i", ab, tb)
                np.minimum(sp, frame.split_bounds(xp, aa, q), out=sp)
            elif sel.size:
                split += sel.size
                ab = xb[sel] @ frame.v
                aa = np.einsum("ij,ij->i", ab, ab)
                q = np.einsum("ij,ij->i", ab, ab @ frame.h)
                sp[sel] = np.minimum(sp[sel], frame.split_bounds(xp[sel], aa, q))
    return acc, colsum, split


def gram_and_bounds(
    rows: np.ndarray, frame: Frame, shift: np.ndarray | None = None, screen: float = 0.0,
    syrk_rows: int = SYRK_ROWS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(fl(ZᵀZ) symmetric, fl(Σz), upper bounds of ‖R⁻ᵀz‖ per row, fl(‖z‖²) per row, rows
    given the split bound), z = x − shift, threaded by row spans (``split_rows``).

    ``screen``: rows whose norm bound is below it (rows the caller drops anyway) skip the
    split bound (2·d·k flops each); 0 gives every row both. ``syrk_rows``: rows per SYRK
    call (``accumulation_length``).
    """
    m = rows.shape[0]
    xx, bounds = np.empty(m), np.empty(m)
    spans = split_rows(m)
    if len(spans) == 1:
        parts = [_pass(rows, 0, m, frame, shift, screen, xx, bounds, syrk_rows)]
    else:
        parts = list(pool().map(
            lambda ab: _pass(rows, ab[0], ab[1], frame, shift, screen, xx, bounds, syrk_rows),
            spans))
    gram, colsum, split = parts[0]
    for g, c, sp in parts[1:]:
        gram += g
        colsum += c
        split += sp
    gram = symmetric_from_upper(gram)
    return gram, colsum, bounds, xx, split


def _transform(frame: Frame, gram: np.ndarray) -> tuple[np.ndarray, float]:
    """(fl(Tᵀ Ĝ T) symmetrised, a bound of its rounding error in the 2-norm)."""
    t = frame.rinv
    w = t.T @ (gram @ t)
    w = 0.5 * (w + w.T)
    at = np.abs(t)
    nmat = at.T @ (np.abs(gram) @ at)
    d = t.shape[0]
    err = (2 * gamma(d) + gamma(d) ** 2) * float(np.abs(nmat).sum(axis=1).max()) / (
        1 - gamma(2 * d))
    return w, err


def _chol_and_product(m_hat: np.ndarray, right: np.ndarray, abs_rt: np.ndarray, psi: float
                      ) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(Ĉ, fl(Ĉ·right), relative Gram error of the Cholesky and the product), or None.

    ĈᵀĈ = M̂ + F with ‖F‖ ≤ γ_{d+1}‖Ĉ‖_F²; fl(ĈR) = ĈR + Δ, |Δ| ≤ γ_d|Ĉ||R|, and
    ‖Δ(ĈR)⁻¹‖ ≤ ‖ |Ĉ||R||T| ‖_F / (1 − ψ) · ‖Ĉ⁻¹‖ (R⁻¹ = T(I + Ψ)⁻¹, ‖Ĉ⁻¹‖ ≤ 1.01).
    """
    c = cholesky_upper(m_hat)
    if c is None or not np.all(np.isfinite(c)):
        return None
    d = c.shape[0]
    cf2 = float(np.sum(c * c))
    crt = float(np.linalg.norm(np.abs(c) @ abs_rt)) / (1 - gamma(d))
    rho = 1.01 * gamma(d) * crt / (1 - psi)
    return c, c @ right, gamma(d + 1) * cf2 + 2 * rho + rho**2


def window_length(longest: int, calls: int, syrk_rows: int = SYRK_ROWS) -> int:
    """L for the sum of ``calls`` results of ``gram_and_bounds`` (each over ≤ ``longest``
    rows), added one after the other: each call's L plus one addition per later call."""
    return accumulation_length(longest, syrk_rows) + max(calls, 1) - 1


def gram_step(frame: Frame, gram: np.ndarray, x_fro2: float, m: int, tol: float = GRAM_TOL,
              length: int | None = None) -> tuple[np.ndarray, float] | None:
    """(R', δ): R'ᵀR' within relative δ ≤ ``tol`` of RᵀR + G_b (Loewner), or None.

    ``gram`` = fl(XᵀX) from ``gram_and_bounds`` over m rows (or the sum of several calls'
    results: ``length`` = their ``window_length``), ``x_fro2`` = Σ fl(‖x‖²).
    """
    d = gram.shape[0]
    t2 = frame.rinv_norm**2
    L = accumulation_length(m) if length is None else length
    # L + 1: float64 keys round their products too (float32/16 products are exact).
    d_syrk = gamma(L + 1) * x_fro2 * (1 + gamma(d + m)) * t2
    if d_syrk > tol:
        return None
    w, d_tr = _transform(frame, gram)
    g = float(np.linalg.norm(w)) + d_syrk + d_tr
    d_t = (2 * frame.psi + frame.psi**2) * g
    w[np.diag_indices(d)] += 1.0
    d_add = U * (1 + g)
    out = _chol_and_product(w, frame.r, frame.abs_rt, frame.psi)
    if out is None:
        return None
    _, new, d_cp = out
    delta = 1.01 * (d_syrk + d_tr + d_t + d_add + d_cp)
    if not np.isfinite(delta) or delta > tol:
        return None
    return new, delta


def centred_gram_step(
    frame: Frame, root_n: float, mean: np.ndarray, zz: np.ndarray, zsum: np.ndarray,
    z_fro2: float, m: int, tol: float = GRAM_TOL, length: int | None = None,
    syrk_rows: int = SYRK_ROWS,
) -> tuple[np.ndarray, float] | None:
    """(R', δ) for the factor of [1, K] (``centred_fast_update``'s layout), or None.

    ``frame`` is that of R_c, ``root_n`` = |r₀₀| and ``mean`` = μ̂ of the old factor;
    ``zz`` = fl(ZᵀZ), ``zsum`` = fl(Σz), ``z_fro2`` = Σ fl(‖z‖²) for z = fl(x − μ̂)
    (``length``: as for :func:`gram_step`; ``syrk_rows``: the rows per SYRK call ``zz`` was
    summed in, for the length of ``zsum``'s sums, :func:`sum_length`).
    In the frame D = diag(√n, R_c) the block adds W = D⁻ᵀ[[m, Σzᵀ], [Σz, ZᵀZ]]D⁻¹;
    R' = chol(I + W) D, then row 0 gains r'₀₀ μ̂ (back from the shifted frame).
    """
    d = zz.shape[0]
    dim = d + 1
    L = accumulation_length(m, syrk_rows) if length is None else length
    t2 = frame.rinv_norm**2
    zf2 = z_fro2 * (1 + gamma(d + m + 4))  # ≥ ‖x − μ̂‖_F² (z rounds by u per entry)
    d_syrk = gamma(L + 3) * zf2 * t2
    if d_syrk > tol:
        return None
    w_cc, d_tr = _transform(frame, zz)
    w0 = frame.rinv.T @ zsum / root_n
    d_sum = (gamma(sum_length(L, syrk_rows) + 1) * np.sqrt(m * zf2) * frame.rinv_norm
             + gamma(d + 1) * float(np.linalg.norm(frame.rinv)) * float(np.linalg.norm(zsum))
             ) / root_n
    w = np.empty((dim, dim))
    w[0, 0] = m / root_n**2
    w[0, 1:] = w[1:, 0] = w0
    w[1:, 1:] = w_cc
    g = float(np.linalg.norm(w)) + d_syrk + d_tr + d_sum
    psi = max(frame.psi, 2 * U)
    d_t = (2 * psi + psi**2) * g
    mu_norm = float(np.linalg.norm(mean))
    psi_mu = root_n * 4 * U * mu_norm / frame.sigma_lo
    psi_mu = psi_mu / (1 - psi_mu) if psi_mu < 0.5 else np.inf
    d_mu = 2 * psi_mu + psi_mu**2
    w[np.diag_indices(dim)] += 1.0
    d_add = U * (1 + g) + 4 * U * w[0, 0]
    shifted = np.zeros((dim, dim))
    shifted[0, 0] = root_n
    shifted[1:, 1:] = frame.r
    inv_d = max(1 / root_n, 1 / frame.sigma_lo)
    abs_dt = np.zeros((dim, dim))
    abs_dt[0, 0] = 1 + 2 * U  # √n · fl(1/√n)
    abs_dt[1:, 1:] = frame.abs_rt
    out = _chol_and_product(w, shifted, abs_dt, psi)
    if out is None:
        return None
    _, new, d_cp = out
    new[0, 1:] += new[0, 0] * mean
    eta = 2.02 * U * (float(np.linalg.norm(new[0, 1:])) + abs(float(new[0, 0])) * mu_norm)
    psi_eta = 1.01 * eta * inv_d
    d_row0 = 2 * psi_eta + psi_eta**2
    delta = 1.01 * (d_syrk + d_tr + d_sum + d_t + d_mu + d_add + d_cp + d_row0)
    if not np.isfinite(delta) or delta > tol:
        return None
    return new, delta
