"""Operators for evaluating key selectors on real caches: per-key scores, per-query top-B
keys, and attention restricted to per-query key sets (docs/architecture.md, notes 1.4 and 2.5).

- ``KeyScores``: the query-free score of *every* key — ``‖k‖²`` (``kind="norm"``) or
  ``‖(k − μ) W‖² + c`` for a fixed scoring map (``kind="map"``: leverage with the final
  factor of a ``LeverageScores`` pass, ``ScoringMap.w`` / ``.shift`` / ``.offset``).
  Memory O(n): the output is one float per key.
- ``QueryTopKeys``: per query the exact top-B keys by its own log-weight ℓ_ij under its
  mask (ties: smaller index) — the query-aware oracle set. Memory O(s · B).
- ``SetAttention``: for M key sets per query, S_{m,i}, the log-normaliser
  log Σ_{j∈S_{m,i}} exp(ℓ_ij), the output renormalised over S_{m,i} and |S_{m,i}| (the
  keys the query actually used). Memory O(M · s · (d_v + 2)).

A set is described per query, not listed: with the query's mask interval [lo_i, hi_i],

    S_{m,i} = [lo_i, hi_i] ∩ ( W1_{m,i} ∪ W2_{m,i} ∪ R_{m,i} ),

two row windows W = [a, b] and a ranked part R_{m,i}: with a per-key score array σ,
{j : σ_j > t_{m,i} or (σ_j = t_{m,i} and j ≤ τ_{m,i})} — exactly the top-B of the
interval by (σ descending, index ascending) when (t, τ) is its B-th key — or, for the
oracle, the first c_{m,i} entries of the query's ``QueryTopKeys`` ranking.
``SetAttentionSpec.member`` decides membership for any (query, key) pairs; the operator
and the recall metric both use it, so they can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from streamattn.errors import ConfigError
from streamattn.operators.ground_truth import (
    MAX_LOGIT_ENTRIES,
    AttentionSpec,
    _pieces,
    _shift,
    log_weights,
    merge_folds,
)
from streamattn.operators.leverage import map_scores
from streamattn.operators.protocol import Operator, State
from streamattn.sources import Block

#: ``SetAttentionSpec.rank_src`` codes besides a score-array index.
NO_RANKED, ORACLE_RANKED = -1, -2


# ---------------------------------------------------------------------------- key scores
@dataclass(frozen=True)
class KeyScoresSpec:
    """``kind`` ``"norm"`` (‖k‖²) or ``"map"`` (‖(k − shift) W‖² + offset, ``w`` d × r)."""

    n: int
    kind: str = "norm"
    w: np.ndarray | None = None
    shift: np.ndarray | None = None
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("norm", "map") or (self.kind == "map") != (self.w is not None):
            raise ConfigError("key scores: kind 'norm' (no w) or 'map' (with w).")
        if self.n < 1:
            raise ConfigError(f"key scores need n >= 1, got {self.n}.")


class KeyScores(Operator):
    """The score of every key row (NaN for rows not folded yet). Memory: 16 bytes per key."""

    family = "key-scores"
    Spec = KeyScoresSpec
    spec: KeyScoresSpec

    def __init__(self, spec: KeyScoresSpec) -> None:
        super().__init__(spec)
        self.idx = np.zeros(0, dtype=np.int64)
        self.scores = np.zeros(0)

    def _update(self, block: Block) -> None:
        if self.spec.kind == "norm":
            x = np.asarray(block.rows, dtype=np.float64)
            s = np.einsum("ij,ij->i", x, x)
        else:
            assert self.spec.w is not None
            s = map_scores(block.rows, self.spec.w, self.spec.shift, self.spec.offset)
        self.idx = np.concatenate([self.idx, np.arange(block.start, block.stop)])
        self.scores = np.concatenate([self.scores, s])

    def _merge(self, other: KeyScores) -> None:
        self.idx = np.concatenate([self.idx, other.idx])
        self.scores = np.concatenate([self.scores, other.scores])

    def _state(self) -> State:
        order = np.argsort(self.idx, kind="stable")
        return {"idx": self.idx[order], "scores": self.scores[order]}

    def _load(self, state: State) -> None:
        self.idx = np.array(state["idx"], dtype=np.int64)
        self.scores = np.array(state["scores"], dtype=np.float64)

    def result(self) -> np.ndarray:
        """(n,) float64 scores, NaN where a row was not folded."""
        out = np.full(self.spec.n, np.nan)
        out[self.idx] = self.scores
        return out

    def nbytes_bound(self, d: int) -> int:
        return 16 * self.spec.n + 8 * d * d


# ---------------------------------------------------------------------------- oracle
@dataclass(frozen=True)
class QueryTopKeysSpec(AttentionSpec):
    """Attention (with its mask) plus the per-query budget ``budget`` (the largest B)."""

    budget: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, np.integer)) or (
            self.budget < 1
        ):
            raise ConfigError(f"budget must be an integer >= 1, got {self.budget!r}.")


def _top_per_row(idx: np.ndarray, lw: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row the ``budget`` best (lw descending, idx ascending) entries; −1/−inf padded."""
    lw = np.where(idx >= 0, lw, -np.inf)
    key_idx = np.where(np.isfinite(lw), idx, np.iinfo(np.int64).max)
    order = np.lexsort((key_idx, -lw), axis=-1)[:, :budget]
    top_idx = np.take_along_axis(idx, order, axis=1)
    top_lw = np.take_along_axis(lw, order, axis=1)
    top_idx = np.where(np.isfinite(top_lw), top_idx, -1)
    if top_idx.shape[1] < budget:
        pad = budget - top_idx.shape[1]
        top_idx = np.pad(top_idx, ((0, 0), (0, pad)), constant_values=-1)
        top_lw = np.pad(top_lw, ((0, 0), (0, pad)), constant_values=-np.inf)
    return top_idx, top_lw


class QueryTopKeys(Operator):
    """Exact per-query top-B keys by log-weight under the mask (ties: smaller index).

    ``result()``: ``indices`` (s × B) best first, −1 where a query can attend fewer than B
    keys; ``log_weights`` the matching ℓ_ij. Memory O(s · B), independent of n.
    """

    family = "query-top-keys"
    Spec = QueryTopKeysSpec
    spec: QueryTopKeysSpec

    def __init__(self, spec: QueryTopKeysSpec) -> None:
        super().__init__(spec)
        s = spec.queries.shape[0]
        self.idx = np.full((s, spec.budget), -1, dtype=np.int64)
        self.lw = np.full((s, spec.budget), -np.inf)

    def _update(self, block: Block) -> None:
        b = self.spec.budget
        for start, rows, _ in _pieces(self.spec, block, use_values=False):
            lg = log_weights(self.spec, start, rows)
            cols = np.broadcast_to(np.arange(start, start + rows.shape[0]), lg.shape)
            if lg.shape[1] > b:  # keep each row's top-b of the piece (exact, index ties)
                t = -np.partition(-lg, b - 1, axis=1)[:, b - 1 : b]
                gt, eq = lg > t, lg == t
                need = b - gt.sum(axis=1, keepdims=True)
                take = gt | (eq & (np.cumsum(eq, axis=1) <= need))
                cols = cols[take].reshape(-1, b)
                lg = lg[take].reshape(-1, b)
            cand = np.where(np.isfinite(lg), cols, -1)
            self.idx, self.lw = _top_per_row(np.hstack([self.idx, cand]),
                                             np.hstack([self.lw, lg]), b)

    def _merge(self, other: QueryTopKeys) -> None:
        self.idx, self.lw = _top_per_row(np.hstack([self.idx, other.idx]),
                                         np.hstack([self.lw, other.lw]), self.spec.budget)

    def _state(self) -> State:
        return {"idx": self.idx, "lw": self.lw}

    def _load(self, state: State) -> None:
        self.idx = np.array(state["idx"], dtype=np.int64)
        self.lw = np.array(state["lw"], dtype=np.float64)

    def result(self) -> dict[str, Any]:
        return {"indices": self.idx.copy(), "log_weights": self.lw.copy(), "n": self.n_rows}

    def nbytes_bound(self, d: int) -> int:
        s = self.spec.queries.shape[0]
        return 8 * (4 * s * self.spec.budget + s * d + 3 * MAX_LOGIT_ENTRIES)


# ---------------------------------------------------------------------------- set attention
@dataclass(frozen=True)
class SetAttentionSpec(AttentionSpec):
    """Attention (``key_lo``/``key_hi`` = each query's mask interval) plus M key sets.

    ``windows`` (M, s, 4) int64: [a1, b1, a2, b2] (a > b: empty); ``rank_src`` (M,) int64:
    ``NO_RANKED``, ``ORACLE_RANKED`` or an index into ``scores`` (K, n); ``rank_t`` (M, s)
    float64 and ``rank_j`` (M, s) int64: the threshold key (see the module docstring);
    ``oracle`` (s, E) int64: each query's ranking from ``QueryTopKeys`` (−1 padded).
    """

    windows: np.ndarray | None = None
    rank_src: np.ndarray | None = None
    rank_t: np.ndarray | None = None
    rank_j: np.ndarray | None = None
    scores: np.ndarray | None = None
    oracle: np.ndarray | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        s = self.queries.shape[0]
        w, src = np.asarray(self.windows), np.asarray(self.rank_src)
        if self.key_lo is None or w.ndim != 3 or w.shape[1:] != (s, 4) or src.shape != (
            w.shape[0],
        ):
            raise ConfigError("set attention needs key_lo/key_hi, windows (M, s, 4), "
                              "rank_src (M,).")
        m = w.shape[0]
        if np.asarray(self.rank_t).shape != (m, s) or np.asarray(self.rank_j).shape != (m, s):
            raise ConfigError("set attention: rank_t and rank_j must be (M, s).")
        if np.asarray(self.scores).ndim != 2 or np.asarray(self.oracle).shape[:1] != (s,):
            raise ConfigError("set attention: scores must be (K, n), oracle (s, E).")
        if (src >= np.asarray(self.scores).shape[0]).any() or (src < ORACLE_RANKED).any():
            raise ConfigError("set attention: rank_src out of range.")

    @property
    def n_sets(self) -> int:
        return int(np.asarray(self.windows).shape[0])

    def member(self, m: int, q: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Whether key ``keys[..]`` is in S_{m, q}: ``q`` (s', 1) query indices, ``keys``
        (1, c) or (s', c) key rows (−1 entries are never members)."""
        assert self.key_lo is not None and self.key_hi is not None
        w = np.asarray(self.windows)[m][q[:, 0]]
        keys = np.asarray(keys)
        inside = (keys >= self.key_lo[q]) & (keys <= self.key_hi[q]) & (keys >= 0)
        hit = np.zeros(np.broadcast_shapes(keys.shape, (w.shape[0], 1)), dtype=bool)
        for a, b in ((0, 1), (2, 3)):
            if (w[:, a] <= w[:, b]).any():  # ranked sets have empty windows: skip them
                hit |= (keys >= w[:, a : a + 1]) & (keys <= w[:, b : b + 1])
        src = int(np.asarray(self.rank_src)[m])
        if src >= 0:
            sc = np.asarray(self.scores)[src]
            sj = sc[np.clip(keys, 0, sc.size - 1)]
            t = np.asarray(self.rank_t)[m][q]
            hit |= (sj > t) | ((sj == t) & (keys <= np.asarray(self.rank_j)[m][q]))
        elif src == ORACLE_RANKED:
            hit |= self._oracle_member(np.asarray(self.rank_j)[m][q], q, keys)
        return inside & hit

    def _oracle_member(self, count: np.ndarray, q: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """keys among the first ``count`` entries of each query's oracle ranking."""
        ranking = np.asarray(self.oracle)[q[:, 0]]  # (s', E)
        big = np.int64(np.iinfo(np.int32).max)
        ranks = np.broadcast_to(np.arange(ranking.shape[1]), ranking.shape)
        chosen = np.where((ranks < count) & (ranking >= 0), ranking, big)
        order = np.argsort(chosen, axis=1)
        sorted_keys = np.take_along_axis(chosen, order, axis=1)
        row = np.arange(ranking.shape[0])[:, None] * (big + 1)
        flat = (sorted_keys + row).ravel()
        probe = np.broadcast_to(keys, (ranking.shape[0], keys.shape[1])) + row
        pos = np.clip(np.searchsorted(flat, probe), 0, flat.size - 1)
        return flat[pos] == probe


def fold_pairs(
    lse: np.ndarray, acc: np.ndarray | None, count: np.ndarray, qi: np.ndarray,
    lg: np.ndarray, vals: np.ndarray | None,
) -> None:
    """Online-softmax fold of (query ``qi``, log-weight ``lg``, value row) triples, ``qi``
    ascending, into (lse, acc, count) in place: a segmented version of ``online_fold``."""
    if qi.size == 0:
        return
    starts = np.flatnonzero(np.r_[True, qi[1:] != qi[:-1]])
    uq = qi[starts]
    sizes = np.diff(np.r_[starts, qi.size])
    mx = np.maximum.reduceat(lg, starts)
    e = np.exp(lg - np.repeat(mx, sizes))
    new = np.logaddexp(lse[uq], np.log(np.add.reduceat(e, starts)) + mx)
    if acc is not None and vals is not None:
        acc[uq] *= _shift(lse[uq], new)[:, None]
        acc[uq] += np.add.reduceat(e[:, None] * vals, starts, axis=0) * np.exp(mx - new)[:, None]
    lse[uq] = new
    count[uq] += sizes


class SetAttention(Operator):
    """Attention restricted to M described key sets per query (see the module docstring).

    ``result()``: ``lse`` (M × s), ``output`` (M × s × d_v or None), ``keys`` (M × s) the
    number of keys each query used. Work per block: one logit matrix, then per set a
    membership test and a gather of the member entries only (O(|S| · d_v) for outputs).
    """

    family = "set-attention"
    Spec = SetAttentionSpec
    spec: SetAttentionSpec

    def __init__(self, spec: SetAttentionSpec) -> None:
        super().__init__(spec)
        m, s = spec.n_sets, spec.queries.shape[0]
        self.lse = np.full((m, s), -np.inf)
        self.acc = np.zeros((m, s, spec.values_dim)) if spec.values_dim else None
        self.count = np.zeros((m, s), dtype=np.int64)

    def _update(self, block: Block) -> None:
        spec = self.spec
        step = max(1, MAX_LOGIT_ENTRIES // max(1, spec.values_dim))
        assert spec.key_lo is not None and spec.key_hi is not None
        for start, rows, vals in _pieces(spec, block):
            stop = start + rows.shape[0]
            # only queries whose mask interval meets this piece can gain keys from it
            act = np.flatnonzero((spec.key_lo < stop) & (spec.key_hi >= start))
            if act.size == 0:
                continue
            logits = log_weights(spec, start, rows)[act]
            keys = np.arange(start, stop)[None, :]
            finite = np.isfinite(logits)
            for m in range(spec.n_sets):
                qa, kj = np.nonzero(spec.member(m, act[:, None], keys) & finite)
                qi = act[qa]
                acc = None if self.acc is None else self.acc[m]
                for a in range(0, qi.size, step):  # bounded gathers of value rows
                    sl = slice(a, a + step)
                    v = None if vals is None else vals[kj[sl]]
                    fold_pairs(self.lse[m], acc, self.count[m], qi[sl], logits[qa[sl], kj[sl]],
                               v)

    def _merge(self, other: SetAttention) -> None:
        merge_folds(self.lse, self.acc, other.lse, other.acc)
        self.count += other.count

    def _state(self) -> State:
        out: State = {"lse": self.lse, "count": self.count}
        if self.acc is not None:
            out["acc"] = self.acc
        return out

    def _load(self, state: State) -> None:
        self.lse = np.array(state["lse"], dtype=np.float64)
        self.count = np.array(state["count"], dtype=np.int64)
        self.acc = np.array(state["acc"], dtype=np.float64) if "acc" in state else None

    def result(self) -> dict[str, Any]:
        return {
            "lse": self.lse.copy(),
            "output": None if self.acc is None else self.acc.copy(),
            "keys": self.count.copy(),
            "n": self.n_rows,
        }

    def nbytes_bound(self, d: int) -> int:
        m, s = self.lse.shape
        return 8 * (m * s * (2 + self.spec.values_dim) + s * d + 6 * MAX_LOGIT_ENTRIES) + int(
            np.asarray(self.spec.scores).nbytes + np.asarray(self.spec.oracle).nbytes
        )
