"""Exact per-query sparsity statistics of attention in one pass (docs/architecture.md, note 2.9).

For queries q_i (s × d) and keys k_j the log-weights are ℓ_ij (``log_weights``: β q_i·k_j
for softmax) and A_ij = exp(ℓ_ij − L_i), L_i = log Σ_j exp(ℓ_ij), over the keys query i
may attend: all rows, rows ≤ pos_i (``mode="causal"``) and, when ``key_lo``/``key_hi``
are given, only rows in [key_lo_i, key_hi_i) (a segment: the native mask of a packed KV
cache). ``SparsityStats`` streams the keys once and keeps per query

- the running log-sum-exp L_i (online softmax, float64);
- the mass-weighted mean logit E_A[ℓ] = Σ_j A_ij ℓ_ij, rescaled whenever L_i grows, so the
  entropy H_i = −Σ_j A_ij log A_ij = L_i − E_A[ℓ] is exact up to rounding;
- the number of attended keys and the mean and variance of their logits (Chan's parallel
  update), i.e. the query's own logit σ_i;
- the exact M = ``top_keys`` largest log-weights (a running top-M: a new entry can enter
  only if it beats the current M-th largest; a merge keeps the M largest of both).

What is exact, from the one pass (all within rounding of the float64 logits):

- the max probability exp(max_j ℓ_ij − L_i) and the entropy H_i;
- the count #{j : A_ij ≥ ε} for every ε ≥ 1/M at once: at most ⌊1/ε⌋ ≤ M entries can
  reach ε (their weights sum to ≤ 1), so all of them are among the top M;
- k_δ = min{k : the k largest A_ij sum to ≥ 1 − δ} whenever the top M carry ≥ 1 − δ of
  the final mass (checked with the exact L_i). Otherwise k_δ > M and only the bound
  k_δ ≥ M + ⌈(1 − δ − m_M)/w_M⌉ is reported (m_M the top-M mass, w_M the M-th weight:
  every other key weighs ≤ w_M). No one-pass algorithm can do better in general: k_δ
  is a weighted quantile of the logits, and exact quantiles need memory Ω(n) in one
  pass; a larger M (or a second pass) is the price of an exact k_δ when it is large.

Memory: 8 · s · (2M + 6) bytes of state (the top M and a buffer of M candidates per query)
plus a few logit tiles of ``TILE_ENTRIES`` entries, independent of n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamattn.blas import single_blas_thread
from streamattn.errors import ConfigError, InvalidInputError
from streamattn.operators.ground_truth import AttentionSpec, log_weights
from streamattn.operators.protocol import Operator, State
from streamattn.sources import Block

#: Logits are formed in tiles of about this many entries (cache-sized: the elementwise
#: passes of a tile run from cache).
TILE_ENTRIES = 2**18


@dataclass(frozen=True)
class SparsitySpec(AttentionSpec):
    """Attention (see ``AttentionSpec``) plus the statistics' settings.

    ``top_keys`` M: the exact top-M log-weights kept per query (counts need ε ≥ 1/M);
    ``key_lo``/``key_hi`` (int64, one per query, optional): query i attends rows
    [key_lo_i, key_hi_i) only; ``columns`` (a, b): use columns a..b−1 of each block (one
    head of a multi-head row block; the queries then have b − a columns).
    """

    top_keys: int = 1024
    key_lo: np.ndarray | None = None
    key_hi: np.ndarray | None = None
    columns: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        m = self.top_keys
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ConfigError(f"top_keys must be an integer >= 1, got {m!r}.")
        s = self.queries.shape[0]
        if (self.key_lo is None) != (self.key_hi is None):
            raise ConfigError("key_lo and key_hi go together (one row range per query).")
        if self.key_lo is not None:
            lo, hi = np.asarray(self.key_lo), np.asarray(self.key_hi)
            for name, arr in (("key_lo", lo), ("key_hi", hi)):
                if arr.shape != (s,) or arr.dtype != np.int64:
                    raise ConfigError(f"{name} must be int64 with one entry per query.")
            if (lo < 0).any() or (hi < lo).any():
                raise ConfigError("key ranges must satisfy 0 <= key_lo <= key_hi.")
        if self.columns is not None:
            a, b = self.columns
            if not 0 <= a < b or b - a != self.queries.shape[1]:
                raise ConfigError(
                    f"columns {self.columns} must select {self.queries.shape[1]} columns "
                    "(the queries' width)."
                )


def _top_m(x: np.ndarray, m: int) -> np.ndarray:
    """The m largest entries of each row of ``x`` (unordered), ``x`` at least m wide."""
    if x.shape[1] == m:
        return x.copy()
    return np.partition(x, x.shape[1] - m, axis=1)[:, x.shape[1] - m :].copy()


def _rescale(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """exp(a − b), 0 where a = −∞."""
    out = np.zeros(a.shape)
    ok = np.isfinite(a)
    out[ok] = np.exp(a[ok] - b[ok])
    return out


class SparsityStats(Operator):
    """Per-query L, entropy, max probability, logit moments and the exact top-M log-weights.

    ``result()`` gives arrays over queries: ``n_keys``, ``lse``, ``max_prob``, ``entropy``,
    ``logit_mean``, ``logit_std`` and ``top`` (s × M log-weights, descending, −∞ padded);
    ``heavy_counts(result, eps)`` and ``k_delta(result, delta)`` turn them into counts.

    Examples
    --------
    >>> import numpy as np
    >>> from streamattn.sources import Block

#: Logits are formed in tiles of about this many entries (cache-sized: the elementwise
#: passes of a tile run from cache).
TILE_ENTRIES = 2**18
    >>> k = np.zeros((1000, 4)); k[7, 0] = 20.0          # one dominant key for query 0
    >>> op = SparsityStats(SparsitySpec(np.eye(4)[:2], scale=1.0, top_keys=16))
    >>> res = op.update(Block(0, k)).result()
    >>> heavy_counts(res, 0.5).tolist()
    [1, 0]
    >>> kd, exact = k_delta(res, 0.1)      # query 1 is uniform: k_δ = 900 > M, a bound
    >>> kd.tolist(), exact.tolist()
    ([1.0, 900.0], [True, False])
    """

    family = "sparsity-stats"
    Spec = SparsitySpec
    spec: SparsitySpec

    def __init__(self, spec: SparsitySpec) -> None:
        super().__init__(spec)
        s = spec.queries.shape[0]
        self.lse = np.full(s, -np.inf)
        self.mean_logit = np.zeros(s)  # E_A[ℓ] under the running softmax
        self.count = np.zeros(s, dtype=np.int64)
        self.mean = np.zeros(s)  # plain mean of the attended logits
        self.m2 = np.zeros(s)  # Σ (ℓ − mean)²
        self.top = np.full((s, int(spec.top_keys)), -np.inf)
        self._reset_pool()
        self._masked = spec.mode == "causal" or spec.key_lo is not None or spec.kind != "softmax"

    def _reset_pool(self) -> None:
        self._buf = np.full(self.top.shape, -np.inf)
        self._fill = np.zeros(self.top.shape[0], dtype=np.int64)
        self._thr = self.top.min(axis=1)

    # ------------------------------------------------------------------ folding
    def _logits(self, start: int, rows: np.ndarray) -> np.ndarray:
        spec = self.spec
        out = log_weights(spec, start, rows)
        if spec.key_lo is not None:
            assert spec.key_hi is not None
            cols = np.arange(start, start + rows.shape[0])
            before = cols[None, :] < spec.key_lo[:, None]
            outside = before | (cols[None, :] >= spec.key_hi[:, None])
            out[outside] = -np.inf
        return out

    def _fold(self, logits: np.ndarray) -> None:
        if self._masked:
            finite = np.isfinite(logits)
            zeroed = np.where(finite, logits, 0.0)
            nb = finite.sum(axis=1)
        else:  # every entry finite: no masks, fewer temporaries
            zeroed, nb = logits, np.full(logits.shape[0], logits.shape[1], dtype=np.int64)
        # logit moments (Chan et al.'s parallel update)
        mb = zeroed.sum(axis=1) / np.maximum(nb, 1)
        tmp = logits - mb[:, None]
        if self._masked:
            tmp[~finite] = 0.0
        m2b = np.einsum("ij,ij->i", tmp, tmp)
        self._combine_moments(nb, mb, m2b)
        # log-sum-exp and the softmax-weighted mean logit
        mx = logits.max(axis=1) if logits.shape[1] else np.full(logits.shape[0], -np.inf)
        safe = np.where(np.isfinite(mx), mx, 0.0)
        np.subtract(logits, safe[:, None], out=tmp)
        np.exp(tmp, out=tmp)
        z = tmp.sum(axis=1)
        with np.errstate(divide="ignore"):
            block_lse = np.log(z) + safe
        el = np.einsum("ij,ij->i", tmp, zeroed)
        block_mean = np.where(z > 0, el / np.where(z > 0, z, 1.0), 0.0)
        self._combine_softmax(block_lse, block_mean)
        # running top-M: only entries above the current M-th largest can enter
        qi, ci = np.nonzero(logits > self._thr[:, None])
        if qi.size:
            self._offer(qi, logits[qi, ci])

    def _offer(self, qi: np.ndarray, vals: np.ndarray) -> None:
        """Add candidates (query index sorted ascending, log-weight) to the top-M pool.

        Candidates go to a buffer of M slots per query; when a query's buffer would
        overflow, top ∪ buffer is reduced to its M largest (amortised O(1) per candidate).
        Everything left out is ≤ the M-th largest kept, so top ∪ buffer always contains
        the exact top M of the entries seen.
        """
        s, m = self.top.shape
        per = np.bincount(qi, minlength=s)
        if (self._fill + per).max() > m:
            self._compact()
        rank = np.arange(qi.size) - (np.cumsum(per) - per)[qi]
        if per.max() > m:  # more than M new candidates for one query: merge directly
            pad = np.full((s, int(per.max())), -np.inf)
            pad[qi, rank] = vals
            self.top = _top_m(np.hstack([self.top, pad]), m)
            self._thr = self.top.min(axis=1)
            return
        self._buf[qi, self._fill[qi] + rank] = vals
        self._fill += per

    def _compact(self) -> None:
        if self._fill.any():
            self.top = _top_m(np.hstack([self.top, self._buf]), self.top.shape[1])
            self._buf.fill(-np.inf)
            self._fill[:] = 0
            self._thr = self.top.min(axis=1)

    def _combine_moments(self, nb: np.ndarray, mb: np.ndarray, m2b: np.ndarray) -> None:
        na = self.count
        tot = na + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = mb - self.mean
            frac = np.where(tot > 0, nb / np.maximum(tot, 1), 0.0)
            self.m2 = self.m2 + m2b + delta**2 * na * frac
            self.mean = self.mean + delta * frac
        self.count = tot

    def _combine_softmax(self, lse_b: np.ndarray, mean_b: np.ndarray) -> None:
        new = np.logaddexp(self.lse, lse_b)
        self.mean_logit = self.mean_logit * _rescale(self.lse, new) + mean_b * _rescale(lse_b, new)
        self.lse = new

    def _update(self, block: Block) -> None:
        rows = block.rows
        if self.spec.columns is not None:
            a, b = self.spec.columns
            if rows.shape[1] < b:
                raise InvalidInputError(
                    f"rows [{block.start}, {block.stop}) have {rows.shape[1]} columns; the "
                    f"operator reads columns [{a}, {b})."
                )
            rows = rows[:, a:b]
        if rows.shape[1] != self.spec.queries.shape[1]:
            raise InvalidInputError(
                f"rows [{block.start}, {block.stop}) have d = {rows.shape[1]}; the queries "
                f"have d = {self.spec.queries.shape[1]}."
            )
        step = max(1, TILE_ENTRIES // self.spec.queries.shape[0])
        with single_blas_thread():  # the reader thread has the other core
            for a in range(0, rows.shape[0], step):
                self._fold(self._logits(block.start + a, rows[a : a + step]))

    def _merge(self, other: SparsityStats) -> None:
        self._combine_moments(other.count, other.mean, other.m2)
        self._combine_softmax(other.lse, other.mean_logit)
        self._compact()
        self.top = _top_m(np.hstack([self.top, other._top_now()]), self.top.shape[1])
        self._thr = self.top.min(axis=1)

    def _top_now(self) -> np.ndarray:
        """The exact top M of the entries seen (top ∪ buffer reduced), without mutating."""
        if not self._fill.any():
            return self.top
        return _top_m(np.hstack([self.top, self._buf]), self.top.shape[1])

    # ------------------------------------------------------------------ state
    def _state(self) -> State:
        return {
            "lse": self.lse,
            "mean_logit": self.mean_logit,
            "count": self.count,
            "mean": self.mean,
            "m2": self.m2,
            "top": self._top_now(),
        }

    def _load(self, state: State) -> None:
        self.lse = np.array(state["lse"], dtype=np.float64)
        self.mean_logit = np.array(state["mean_logit"], dtype=np.float64)
        self.count = np.array(state["count"], dtype=np.int64)
        self.mean = np.array(state["mean"], dtype=np.float64)
        self.m2 = np.array(state["m2"], dtype=np.float64)
        self.top = np.array(state["top"], dtype=np.float64)
        self._reset_pool()

    def result(self) -> dict[str, Any]:
        top = -np.sort(-self._top_now(), axis=1)
        ok = np.isfinite(self.lse)
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.where(self.count > 1, self.m2 / np.maximum(self.count - 1, 1), np.nan)
        return {
            "n_keys": self.count.copy(),
            "lse": self.lse.copy(),
            "max_prob": np.where(ok, _rescale(top[:, 0], np.where(ok, self.lse, 0.0)), np.nan),
            "entropy": np.where(ok, self.lse - self.mean_logit, np.nan),
            "logit_mean": np.where(self.count > 0, self.mean, np.nan),
            "logit_std": np.sqrt(var),
            "top": top,
            "n": self.n_rows,
        }

    def nbytes_bound(self, d: int) -> int:
        s = self.spec.queries.shape[0]
        return 8 * (s * (3 * int(self.spec.top_keys) + 8 + d) + 4 * TILE_ENTRIES)


def heavy_counts(result: dict[str, Any], eps: float) -> np.ndarray:
    """#{j : A_ij ≥ ε} per query, exact when ε ≥ 1/M (refused otherwise)."""
    top = result["top"]
    if not 0 < eps <= 1 or math.floor(1.0 / eps + 1e-9) > top.shape[1]:
        raise ConfigError(
            f"eps = {eps:g} needs top_keys >= floor(1/eps) = {math.floor(1 / eps + 1e-9)} "
            f"for an exact count; the statistics kept {top.shape[1]}."
        )
    thresh = result["lse"][:, None] + math.log(eps)
    return np.count_nonzero(np.isfinite(top) & (top >= thresh), axis=1)


def k_delta(result: dict[str, Any], delta: float) -> tuple[np.ndarray, np.ndarray]:
    """k_δ per query and whether it is exact; where not, the value is a lower bound.

    k_δ = the fewest keys whose weights sum to ≥ 1 − δ. Exact when the kept top M carry
    ≥ 1 − δ of the mass (or the query attends ≤ M keys); otherwise the lower bound
    M + ⌈(1 − δ − m_M)/w_M⌉ (returned as a float, with exact = False).
    """
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}.")
    top, lse = result["top"], result["lse"]
    m = top.shape[1]
    w = np.zeros(top.shape)
    ok = np.isfinite(top) & np.isfinite(lse)[:, None]
    w[ok] = np.exp((top - np.where(np.isfinite(lse), lse, 0.0)[:, None])[ok])
    csum = np.cumsum(w, axis=1)
    target = 1.0 - delta
    reached = csum[:, -1] >= target
    all_kept = result["n_keys"] <= m
    k = np.argmax(csum >= target, axis=1).astype(np.float64) + 1.0
    # every key outside the top M weighs at most w_M
    with np.errstate(divide="ignore", invalid="ignore"):
        lower = m + np.ceil((target - csum[:, -1]) / np.where(w[:, -1] > 0, w[:, -1], np.nan))
    exact = reached | all_kept
    k = np.where(reached, k, np.where(all_kept, result["n_keys"].astype(np.float64), lower))
    return k, exact
