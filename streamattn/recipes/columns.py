"""The over-parameterised regime d ≫ n: select and reweight columns, streaming over columns.

Paper: Deng, Li, Song, "Randomized and Deterministic Attention Sparsification Algorithms
for Over-parameterized Feature Dimension" (arXiv 2304.04397). For X ∈ R^{n×d} with d ≫ n
(few tokens, huge feature dimension) find Y ∈ R^{n×m}, m ≪ d, whose columns are reweighted
columns of X, with ‖D(Y)⁻¹exp(YYᵀ) − D(X)⁻¹exp(XXᵀ)‖∞ = O(r) when ‖XXᵀ‖∞ < r (‖·‖∞ the
largest absolute entry; no 1/√d scale, as in the paper).

Why it works. Both methods give a spectral approximation (1 − ε)XXᵀ ⪯ YYᵀ ⪯ (1 + ε)XXᵀ.
Then every entry moves by |(YYᵀ − XXᵀ)_ij| ≤ ε·√(M_ii M_jj) ≤ ε·max_i M_ii =: δ ≤ εr
(M = XXᵀ), each softmax ratio changes by a factor in [e^{−2δ}, e^{2δ}], and so
‖D(Y)⁻¹exp(YYᵀ) − D(X)⁻¹exp(XXᵀ)‖∞ ≤ e^{2δ} − 1 ≤ e^{2εr} − 1 = O(r). Every result
reports ε achieved (measured on the whitened sum), δ, this bound and the measured error.

Whitening. Pass 1 streams column blocks and accumulates M = Σ_i X_i X_iᵀ (n × n, float64).
With M = U Λ Uᵀ and numerical rank r (eigenvalues > ``rtol``·λ_max, default 1e-12, i.e.
singular values > 1e-6·σ_max), u_i = Λ_r^{-1/2} U_rᵀ X_i satisfy Σ u_i u_iᵀ = I_r, and
l_i = ‖u_i‖² is the leverage of column i (Σ l_i = r). A reweighting s_i with
Σ s_i u_i u_iᵀ ∈ [1 − ε, 1 + ε] is exactly a spectral approximation of M by Y.

- ``column_leverage_sample`` (randomised, one more pass): keep column i independently
  with probability p_i = min(1, c·l_i), weight 1/p_i, c = ln(2r/δ)/((1+ε)ln(1+ε) − ε).
  Matrix Chernoff (Tropp 2012; summands have norm ≤ 1/c after splitting the p_i = 1
  terms) gives the spectral (1 ± ε) bound with probability ≥ 1 − δ, with
  E[m] = Σ p_i ≤ c·r = O(n log(n/δ)/ε²). The coins are a keyed hash of (seed, column
  index): the same selection for any column blocking and on any worker.
- ``bss_sparsify`` (deterministic, Batson–Spielman–Srivastava "Twice-Ramanujan
  sparsifiers", Thm 3.1, barrier potentials Φ^u(A) = tr(uI − A)⁻¹, Φ_l(A) = tr(A − lI)⁻¹):
  with s = (1 + √(1 − ε²))/ε and b = s², q = ⌈b·r⌉ steps each add t·u_i u_iᵀ for a column
  with U_A(u_i) ≤ 1/t ≤ L_A(u_i) (one exists by the averaging lemma), moving the barriers
  by δ_U = (s+1)/(s−1) and δ_L = 1. Afterwards the spectrum of A lies in
  (l₀ + q, u₀ + q·δ_U) with l₀ = −r·s, u₀ = r(b + s)/(s − 1), whose ratio gives
  ε_theory ≤ ε; rescaling makes it (1 ± ε) deterministically, with m ≤ q = ⌈b·r⌉ ≈ 4r/ε²
  distinct columns (O(n/ε²)). Streaming: column blocks are scanned cyclically; each block
  is re-scored after every addition (O(r³ + r²·cols) per step) and left when none of its
  columns qualifies. The number of passes over the columns is reported; a full pass
  without a qualifying column (possible only through rounding) is an error.

Memory: O(n² + n·cols_per_block + n·m), independent of d. For these passes the store
should be chunked along columns (a row-chunked store is re-read per column block).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.special

from streamattn.errors import ConfigError, InvalidInputError, StreamattnError
from streamattn.operators.projection import keyed_uniform
from streamattn.sources import KeySource, open_keys

DEFAULT_RTOL = 1e-12
#: Bytes of one column block (n × cols float64) when ``cols_per_block`` is not given.
TARGET_COLUMN_BLOCK_BYTES = 32 * 2**20
METHODS = ("bss", "leverage")


def column_blocks(source: KeySource, cols_per_block: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first column, X[:, a:b] as float64), validating finiteness per block."""
    for a in range(0, source.d, cols_per_block):
        b = min(a + cols_per_block, source.d)
        try:
            block = np.asarray(source.keys[:, a:b], dtype=np.float64)
        except Exception as exc:  # a corrupt chunk or a vanished file
            raise InvalidInputError(
                f"{source.label}: could not read columns [{a}, {b}): {type(exc).__name__}: {exc}."
            ) from exc
        bad = ~np.isfinite(block)
        if bad.any():
            col = a + int(np.flatnonzero(bad.any(axis=0))[0])
            raise InvalidInputError(
                f"{source.label}: column {col} contains NaN or Inf; every value must be finite."
            )
        yield a, block


@dataclass(frozen=True)
class Whitening:
    """M = XXᵀ and W = Λ_r^{-1/2} U_rᵀ (r × n) with Σ_i (W X_i)(W X_i)ᵀ = I_r."""

    gram: np.ndarray
    w: np.ndarray
    rank: int
    rtol: float

    @classmethod
    def from_gram(cls, gram: np.ndarray, rtol: float) -> Whitening:
        lam, u = np.linalg.eigh((gram + gram.T) / 2)
        keep = lam > rtol * max(lam[-1], 0.0) if lam[-1] > 0 else np.zeros_like(lam, bool)
        w = (u[:, keep] / np.sqrt(lam[keep])).T
        return cls(gram, w, int(keep.sum()), rtol)


def column_gram(source: KeySource, cols_per_block: int) -> np.ndarray:
    """Pass 1: M = XXᵀ = Σ over column blocks of X_b X_bᵀ (float64, n × n)."""
    gram = np.zeros((source.n, source.n))
    for _, xb in column_blocks(source, cols_per_block):
        gram += xb @ xb.T
    return gram


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """D⁻¹exp(L): each row's softmax, computed with logsumexp."""
    return np.exp(logits - scipy.special.logsumexp(logits, axis=1, keepdims=True))


@dataclass
class ColumnSelection:
    """Selected columns, their weights and the checked bounds.

    Attributes
    ----------
    indices : sorted distinct column indices (int64)
    weights : s_i ≥ 0 (float64): Y = X[:, indices] · √weights
    y : the n × m matrix Y
    certificate : method, m and its bound, ε target / guaranteed / achieved, r, δ and the
        softmax error with its bound, passes over the columns, rank and tolerance
    """

    indices: np.ndarray
    weights: np.ndarray
    y: np.ndarray
    certificate: dict[str, Any] = field(default_factory=dict)

    @property
    def m(self) -> int:
        return int(self.indices.size)


def _check(source: KeySource, eps: Any, cols_per_block: int | None) -> int:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ConfigError(f"eps must be in (0, 1), got {eps!r}.")
    if cols_per_block is None:
        return max(1, TARGET_COLUMN_BLOCK_BYTES // (8 * source.n))
    if (
        isinstance(cols_per_block, bool)
        or not isinstance(cols_per_block, int)
        or (cols_per_block < 1)
    ):
        raise ConfigError(f"cols_per_block must be an integer >= 1, got {cols_per_block!r}.")
    return cols_per_block


def _finish(
    source: KeySource,
    white: Whitening,
    columns: dict[int, np.ndarray],
    weights: dict[int, float],
    cert: dict[str, Any],
) -> ColumnSelection:
    """Y, achieved ε on the whitened sum, and the softmax check against r = ‖XXᵀ‖∞."""
    idx = np.array(sorted(weights), dtype=np.int64)
    w = np.array([weights[i] for i in idx], dtype=np.float64)
    x_sel = np.stack([columns[i] for i in idx], axis=1) if idx.size else np.zeros((source.n, 0))
    y = x_sel * np.sqrt(w)
    gram, yy = white.gram, y @ y.T
    z = white.w @ yy @ white.w.T  # whitened Σ s_i u_i u_iᵀ
    spec = np.linalg.eigvalsh((z + z.T) / 2) if white.rank else np.ones(1)
    eps_achieved = float(max(spec[-1] - 1.0, 1.0 - spec[0]))
    r = float(np.max(np.abs(gram)))
    diag_max = float(np.max(np.diag(gram)))
    err = float(np.max(np.abs(softmax_rows(yy) - softmax_rows(gram))))
    delta_entry = eps_achieved * diag_max
    cert.update(
        {
            "m": int(idx.size),
            "n": source.n,
            "d": source.d,
            "rank": white.rank,
            "rank_rtol": white.rtol,
            "rank_note": "eigenvalues of XX^T <= rank_rtol * max eigenvalue count as zero",
            "eps_achieved": eps_achieved,
            "whitened_spectrum": [float(spec[0]), float(spec[-1])],
            "r": r,
            "r_note": "r = ||XX^T||_inf, the largest absolute entry",
            "entrywise_error": float(np.max(np.abs(yy - gram))),
            "entrywise_bound": delta_entry,
            "softmax_error": err,
            "softmax_bound": float(np.expm1(2.0 * delta_entry)),
            "softmax_bound_note": (
                "||D(Y)^-1 exp(YY^T) - D(X)^-1 exp(XX^T)||_inf <= exp(2 delta) - 1 with "
                "delta = eps_achieved * max_i (XX^T)_ii <= eps * r: O(r)"
            ),
        }
    )
    return ColumnSelection(idx, w, y, cert)


def column_leverage_sample(
    source: Any,
    eps: float = 0.5,
    delta: float = 0.01,
    seed: int = 0,
    *,
    cols_per_block: int | None = None,
    rtol: float = DEFAULT_RTOL,
    array: str | None = None,
) -> ColumnSelection:
    """Randomised column-leverage sampling with reweighting (two passes over columns).

    With probability ≥ 1 − δ, (1 − ε)XXᵀ ⪯ YYᵀ ⪯ (1 + ε)XXᵀ, with E[m] ≤ c·rank,
    c = ln(2·rank/δ)/((1+ε)ln(1+ε) − ε). See the module docstring.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((8, 3000)) / 300
    >>> sel = column_leverage_sample(x, eps=0.5, seed=1)
    >>> sel.m < 3000, sel.certificate["eps_achieved"] <= 0.5
    (True, True)
    """
    src = open_keys(source, array=array)
    cols = _check(src, eps, cols_per_block)
    if not (isinstance(delta, float) and 0 < delta < 1):
        raise ConfigError(f"delta must be a float in (0, 1), got {delta!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.")
    white = Whitening.from_gram(column_gram(src, cols), rtol)
    c = np.log(2 * max(white.rank, 1) / delta) / ((1 + eps) * np.log1p(eps) - eps)
    columns: dict[int, np.ndarray] = {}
    weights: dict[int, float] = {}
    expected = 0.0
    for a, xb in column_blocks(src, cols):
        lev = np.einsum("ij,ij->j", white.w @ xb, white.w @ xb)
        p = np.minimum(1.0, c * lev)
        expected += float(p.sum())
        coins = keyed_uniform(int(seed), 0xC01, np.arange(a, a + xb.shape[1]))
        for j in np.flatnonzero(coins < p):
            columns[a + int(j)] = xb[:, j].copy()
            weights[a + int(j)] = 1.0 / float(p[j])
    cert = {
        "method": "leverage",
        "eps_target": eps,
        "delta": delta,
        "seed": int(seed),
        "oversampling_c": float(c),
        "m_expected": expected,
        "m_bound_expected": float(c * white.rank),
        "guarantee": (
            "with probability >= 1 - delta: (1 - eps) XX^T <= YY^T <= (1 + eps) XX^T "
            "(matrix Chernoff), E[m] <= c * rank = O(n log(n/delta) / eps^2)"
        ),
        "passes": 2,
        "cols_per_block": cols,
    }
    return _finish(src, white, columns, weights, cert)


def bss_parameters(eps: float, rank: int) -> dict[str, float]:
    """BSS constants for target ε: s, b = s², steps q = ⌈b·rank⌉, barriers and ε_theory."""
    s = (1 + np.sqrt(1 - eps**2)) / eps
    b = s * s
    q = int(np.ceil(b * rank - 1e-9))
    delta_u = (s + 1) / (s - 1)
    l0, u0 = -rank * s, rank * (b + s) / (s - 1)
    lo, hi = l0 + q, u0 + q * delta_u
    return {
        "s": s,
        "b": b,
        "steps": q,
        "delta_u": delta_u,
        "delta_l": 1.0,
        "l0": l0,
        "u0": u0,
        "eps_theory": (hi - lo) / (hi + lo) if rank else 0.0,
    }


def bss_sparsify(
    source: Any,
    eps: float = 0.5,
    *,
    cols_per_block: int | None = None,
    rtol: float = DEFAULT_RTOL,
    array: str | None = None,
    max_passes: int = 1000,
) -> ColumnSelection:
    """Deterministic BSS barrier-potential column sparsifier (see the module docstring).

    (1 − ε)XXᵀ ⪯ YYᵀ ⪯ (1 + ε)XXᵀ always, with m ≤ ⌈b·rank⌉, b = ((1 + √(1−ε²))/ε)².

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((6, 800)) / 100
    >>> sel = bss_sparsify(x, eps=0.5)
    >>> sel.m <= sel.certificate["m_bound"], sel.certificate["eps_achieved"] <= 0.5
    (True, True)
    """
    src = open_keys(source, array=array)
    cols = _check(src, eps, cols_per_block)
    white = Whitening.from_gram(column_gram(src, cols), rtol)
    r = white.rank
    prm = bss_parameters(eps, r)
    lower, upper = prm["l0"], prm["u0"]
    a_mat = np.zeros((r, r))
    columns: dict[int, np.ndarray] = {}
    weights: dict[int, float] = {}
    steps, passes = 0, 1
    while steps < prm["steps"]:
        if passes > max_passes:
            raise StreamattnError(f"BSS did not finish within max_passes = {max_passes}.")
        added = 0
        for a, xb in column_blocks(src, cols):
            v = white.w @ xb
            lev = np.einsum("ij,ij->j", v, v)
            usable = lev > 1e-12 * max(float(lev.max()), 1e-300)
            while steps < prm["steps"]:
                alpha, basis = np.linalg.eigh(a_mat)
                p2 = (basis.T @ v) ** 2
                up, lo = upper + prm["delta_u"], lower + prm["delta_l"]
                iu, il = 1.0 / (up - alpha), 1.0 / (alpha - lo)
                phi_u_gap = np.sum(1.0 / (upper - alpha)) - iu.sum()
                phi_l_gap = il.sum() - np.sum(1.0 / (alpha - lower))
                u_val = (iu**2 @ p2) / phi_u_gap + iu @ p2
                l_val = (il**2 @ p2) / phi_l_gap - il @ p2
                ok = usable & (u_val <= l_val)
                if not ok.any():
                    break
                j = int(np.argmax(np.where(ok, l_val - u_val, -np.inf)))
                t = 2.0 / (u_val[j] + l_val[j])
                a_mat += t * np.outer(v[:, j], v[:, j])
                col = a + j
                columns.setdefault(col, xb[:, j].copy())
                weights[col] = weights.get(col, 0.0) + t
                upper, lower = up, lo
                steps += 1
                added += 1
            if steps >= prm["steps"]:
                break
        if steps < prm["steps"]:
            if added == 0:
                raise StreamattnError(
                    "BSS found no column with U_A(v) <= L_A(v) in a full pass (rounding at "
                    f"step {steps} of {prm['steps']}); try a larger eps or rtol."
                )
            passes += 1
    spec = np.linalg.eigvalsh(a_mat) if r else np.ones(1)
    scale = 2.0 / (spec[0] + spec[-1])
    weights = {k: w * scale for k, w in weights.items()}
    cert = {
        "method": "bss",
        "eps_target": eps,
        "eps_theory": prm["eps_theory"],
        "bss_b": prm["b"],
        "steps": prm["steps"],
        "m_bound": prm["steps"],
        "barriers_final": [lower, upper],
        "guarantee": (
            "deterministic: (1 - eps) XX^T <= YY^T <= (1 + eps) XX^T with "
            "m <= ceil(b * rank), b = ((1 + sqrt(1 - eps^2)) / eps)^2 = O(1/eps^2)"
        ),
        "passes": 1 + passes,
        "cols_per_block": cols,
    }
    return _finish(src, white, columns, weights, cert)


def sparsify_columns(source: Any, method: str = "bss", **kwargs: Any) -> ColumnSelection:
    """Dispatch to ``bss_sparsify`` or ``column_leverage_sample``."""
    if method == "bss":
        return bss_sparsify(source, **kwargs)
    if method == "leverage":
        return column_leverage_sample(source, **kwargs)
    raise ConfigError(f"unknown column method {method!r}; choose one of {list(METHODS)}.")
