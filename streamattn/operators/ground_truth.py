"""Exact heavy-attention ground truth in one pass, and two companions (docs/architecture.md, note
2.5).

For a query batch Q (s × d) every key j gets a log-weight per query,

- softmax:    ℓ_ij = β q_i·k_j                      (β = 1/√d by default),
- |x|^p:      ℓ_ij = p · log|q_i·k_j|               (f(x) = |x|^p attention, shares
  A_ij = |q_i·k_j|^p / Σ_l |q_i·k_l|^p; the universal set's guarantee holds for p = 2),

and A_ij = exp(ℓ_ij − L_i) with the log-normaliser L_i = log Σ_j exp(ℓ_ij). In ``causal``
mode a query at position pos_i sees only keys j ≤ pos_i (the others get ℓ = −∞).

``GroundTruth`` streams K (and V) once and keeps, per query, the running log-sum-exp L_i,
the online-softmax output o_i = Σ_j A_ij v_j (accumulator rescaled whenever L_i grows, so
it never overflows), and the *candidates* j with ℓ_ij − L_i^running ≥ log ε. L_i only
grows as keys are added, so a key pruned once can never come back above ε: the final
candidates are exactly the heavy entries {j : A_ij ≥ ε}. Every candidate holds weight
≥ ε · exp(L_i^running) and their weights sum to at most exp(L_i^running), so at most
⌊1/ε⌋ candidates per query exist after every block and every merge (``max_candidates``;
``candidate_counts()`` exposes the live count). Merge: L = logaddexp(L_a, L_b), outputs
mixed with weights exp(L_a − L), exp(L_b − L), candidates pooled and re-pruned.

Memory: O(s · (1/ε + d_v) + s · SUB_ROWS) floats, independent of n. Everything in
float64, one BLAS product Q Kᵀ per sub-block, candidate bookkeeping vectorised over all
queries at once.

Companions sharing the same log-weights: ``ObservedAttentionTop`` (the H2O-style
selector: exact top-B keys by accumulated attention Σ_i A_ij, which needs the queries
and the final L_i, hence a second pass) and ``RestrictedAttention`` (per selected set S
and query: log Σ_{j∈S_i} exp(ℓ_ij) and the output renormalised over S_i, in one pass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamattn.errors import ConfigError, InvalidInputError
from streamattn.operators.protocol import Operator, State
from streamattn.sources import Block

KINDS = ("softmax", "power")
MODES = ("global", "causal")
#: Logit matrices are formed for at most this many entries (s × rows) at a time.
MAX_LOGIT_ENTRIES = 2**22


def _check_attention(
    queries: Any, scale: Any, kind: str, p: float, mode: str, positions: Any, values_dim: int
) -> None:
    q = np.asarray(queries)
    if q.ndim != 2 or q.shape[0] < 1 or q.shape[1] < 1 or q.dtype != np.float64:
        raise ConfigError(f"queries must be a non-empty float64 (s, d) array, got {q.shape}.")
    if not np.isfinite(q).all():
        raise ConfigError("queries contain NaN or Inf.")
    if kind not in KINDS:
        raise ConfigError(f"attention kind must be one of {list(KINDS)}, got {kind!r}.")
    if mode not in MODES:
        raise ConfigError(f"attention mode must be one of {list(MODES)}, got {mode!r}.")
    if kind == "power" and not (isinstance(p, (int, float)) and p > 0):
        raise ConfigError(f"p must be > 0 for |x|^p attention, got {p!r}.")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ConfigError(f"scale must be > 0 (or null for 1/sqrt(d)), got {scale!r}.")
    if mode == "causal":
        pos = None if positions is None else np.asarray(positions)
        if pos is None or pos.shape != (q.shape[0],) or pos.dtype != np.int64 or (pos < 0).any():
            raise ConfigError(
                "causal mode needs positions: one int64 key position >= 0 per query "
                "(a query at position i sees keys 0..i); store them as query_positions."
            )
    if values_dim < 0:
        raise ConfigError(f"values_dim must be >= 0, got {values_dim}.")


@dataclass(frozen=True)
class AttentionSpec:
    """Queries and the attention they define (shared by the operators of this module).

    ``queries`` (s × d, float64); ``scale`` β (None: 1/√d; softmax only); ``kind``
    ``"softmax"`` or ``"power"`` (f(x) = |x|^p); ``mode`` ``"global"`` or ``"causal"``
    with ``positions`` (int64, one per query); ``values_dim`` d_v (0: no outputs).
    ``key_lo`` / ``key_hi`` (int64, one per query, optional): query i sees only key rows
    in ``[key_lo_i, key_hi_i]`` (a ``streamattn.masks.Mask`` interval), on top of ``mode``.
    """

    queries: np.ndarray
    scale: float | None = None
    kind: str = "softmax"
    p: float = 2.0
    mode: str = "global"
    positions: np.ndarray | None = None
    values_dim: int = 0
    key_lo: np.ndarray | None = None
    key_hi: np.ndarray | None = None

    def __post_init__(self) -> None:
        _check_attention(
            self.queries, self.scale, self.kind, self.p, self.mode, self.positions,
            self.values_dim,
        )
        if (self.key_lo is None) != (self.key_hi is None):
            raise ConfigError("key_lo and key_hi go together (one key interval per query).")
        s = self.queries.shape[0]
        for name in ("key_lo", "key_hi"):
            b = getattr(self, name)
            if b is not None and (np.asarray(b).shape != (s,) or np.asarray(b).dtype != np.int64):
                raise ConfigError(f"{name} must be int64 with one entry per query ({s}).")

    @property
    def beta(self) -> float:
        return float(self.scale) if self.scale is not None else 1.0 / math.sqrt(
            self.queries.shape[1]
        )


def log_weights(spec: Any, start: int, rows: np.ndarray) -> np.ndarray:
    """ℓ (s × b, float64) of keys ``start ..`` for every query, −∞ where masked."""
    x = spec.queries @ np.asarray(rows, dtype=np.float64).T
    if spec.kind == "softmax":
        out = spec.beta * x
    else:
        with np.errstate(divide="ignore"):
            out = spec.p * np.log(np.abs(x))
    cols = np.arange(start, start + rows.shape[0])
    if spec.mode == "causal":
        out[cols[None, :] > spec.positions[:, None]] = -np.inf
    if spec.key_lo is not None:
        out[(cols[None, :] < spec.key_lo[:, None]) | (cols[None, :] > spec.key_hi[:, None])] = (
            -np.inf
        )
    return out


def _shift(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """exp(a − b) with 0 where a = −∞ (so −∞ − (−∞) never makes NaN)."""
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    out = np.zeros(a.shape)
    ok = np.isfinite(a)
    out[ok] = np.exp(a[ok] - b[ok])
    return out


def online_fold(
    lse: np.ndarray, acc: np.ndarray | None, logits: np.ndarray, values: np.ndarray | None
) -> np.ndarray:
    """Fold a logit block into (lse, acc) in place; returns the new lse.

    ``acc`` holds Σ_j exp(ℓ_j − lse) v_j (the normalised output); it is rescaled by
    exp(lse_old − lse_new) when the normaliser grows (online softmax). ``values`` is
    (b × d_v), shared by all queries, or (s × b × d_v), one row set per query.
    """
    mx = logits.max(axis=1) if logits.shape[1] else np.full(logits.shape[0], -np.inf)
    safe = np.where(np.isfinite(mx), mx, 0.0)
    e = np.exp(logits - safe[:, None])
    with np.errstate(divide="ignore"):
        block_lse = np.log(e.sum(axis=1)) + safe
    new = np.logaddexp(lse, block_lse)
    if acc is not None and values is not None:
        acc *= _shift(lse, new)[:, None]
        w = e * _shift(mx, new)[:, None]
        acc += w @ values if values.ndim == 2 else np.einsum("sb,sbd->sd", w, values)
    lse[...] = new
    return new


def merge_folds(
    lse: np.ndarray, acc: np.ndarray | None, lse_b: np.ndarray, acc_b: np.ndarray | None
) -> None:
    """(lse, acc) ← the fold of both parts (log-sum-exp merge), in place."""
    new = np.logaddexp(lse, lse_b)
    if acc is not None and acc_b is not None:
        acc *= _shift(lse, new)[..., None]
        acc += acc_b * _shift(lse_b, new)[..., None]
    lse[...] = new


def _pieces(
    spec: Any, block: Block, use_values: bool = True
) -> list[tuple[int, np.ndarray, np.ndarray | None]]:
    """Split a block so each logit matrix has at most MAX_LOGIT_ENTRIES entries."""
    use_values = use_values and spec.values_dim > 0
    if use_values:
        if block.values is None or block.values.shape[1] != spec.values_dim:
            got = None if block.values is None else block.values.shape[1]
            raise InvalidInputError(
                f"rows [{block.start}, {block.stop}): the operator expects value rows of width "
                f"{spec.values_dim}, got {got}; the store needs a matching 'values' array."
            )
    if block.rows.shape[1] != spec.queries.shape[1]:
        raise InvalidInputError(
            f"rows [{block.start}, {block.stop}) have d = {block.rows.shape[1]}; the queries "
            f"have d = {spec.queries.shape[1]}."
        )
    step = max(1, MAX_LOGIT_ENTRIES // spec.queries.shape[0])
    out = []
    for a in range(0, block.rows.shape[0], step):
        b = min(a + step, block.rows.shape[0])
        vals = None
        if use_values:
            assert block.values is not None
            vals = np.asarray(block.values[a:b], dtype=np.float64)
        out.append((block.start + a, block.rows[a:b], vals))
    return out


@dataclass(frozen=True)
class GroundTruthSpec(AttentionSpec):
    """Attention (see ``AttentionSpec``) plus the heavy-entry threshold ``eps`` in (0, 1]."""

    eps: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.eps, (int, float)) and 0 < self.eps <= 1):
            raise ConfigError(f"eps must be in (0, 1], got {self.eps!r}.")

    @property
    def max_candidates(self) -> int:
        """⌊1/ε⌋: no query ever holds more candidates than this."""
        return math.floor(1.0 / self.eps + 1e-9)


class GroundTruth(Operator[GroundTruthSpec, dict[str, Any]]):
    """Exact heavy entries, normalisers and outputs of attention, one pass, bounded memory.

    ``result()`` gives ``lse`` (s,) the exact log-normalisers L_i; ``indices`` (s × ⌊1/ε⌋)
    the heavy keys {j : A_ij ≥ ε} of each query in increasing order, −1 padded;
    ``weights`` their exact shares A_ij (0 padded); ``counts``; ``output`` (s × d_v)
    the exact attention outputs Σ_j A_ij v_j (None without values); ``dropped`` the
    number of candidates cut by the ⌊1/ε⌋ cap (0 in exact arithmetic; non-zero only
    through rounding at the threshold itself).

    Examples
    --------
    >>> import numpy as np
    >>> from streamattn.sources import Block
    >>> k = 0.1 * np.random.default_rng(0).standard_normal((1000, 8))
    >>> k[5, 0] = k[700, 1] = 10.0
    >>> q = 3.0 * np.eye(8)[:2]                        # two queries that like keys 5, 700
    >>> op = GroundTruth(GroundTruthSpec(q, eps=0.1)).update(Block(0, k))
    >>> [row[row >= 0].tolist() for row in op.result()["indices"]]
    [[5], [700]]
    """

    family = "ground-truth"
    Spec = GroundTruthSpec

    def __init__(self, spec: GroundTruthSpec) -> None:
        super().__init__(spec)
        s, cap = spec.queries.shape[0], spec.max_candidates
        self.lse = np.full(s, -np.inf)
        self.acc = np.zeros((s, spec.values_dim)) if spec.values_dim else None
        self.cand_idx = np.full((s, cap), -1, dtype=np.int64)
        self.cand_lw = np.full((s, cap), -np.inf)
        self.dropped = 0

    def candidate_counts(self) -> np.ndarray:
        """Live candidates per query (never above ``spec.max_candidates``)."""
        return np.count_nonzero(self.cand_idx >= 0, axis=1)

    def _keep(self, qi: np.ndarray, idx: np.ndarray, lw: np.ndarray) -> None:
        """Rebuild the candidate table from flat (query, key, log-weight) triples."""
        thresh = self.lse + math.log(self.spec.eps)
        ok = np.isfinite(lw) & (lw >= thresh[qi])
        qi, idx, lw = qi[ok], idx[ok], lw[ok]
        order = np.lexsort((idx, -lw, qi))
        qi, idx, lw = qi[order], idx[order], lw[order]
        s, cap = self.cand_idx.shape
        counts = np.bincount(qi, minlength=s)
        rank = np.arange(qi.size) - (np.cumsum(counts) - counts)[qi]
        keep = rank < cap
        self.dropped += int(np.count_nonzero(~keep))
        self.cand_idx = np.full((s, cap), -1, dtype=np.int64)
        self.cand_lw = np.full((s, cap), -np.inf)
        self.cand_idx[qi[keep], rank[keep]] = idx[keep]
        self.cand_lw[qi[keep], rank[keep]] = lw[keep]

    def _old_triples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        qi, slot = np.nonzero(self.cand_idx >= 0)
        return qi, self.cand_idx[qi, slot], self.cand_lw[qi, slot]

    def _update(self, block: Block) -> None:
        for start, rows, vals in _pieces(self.spec, block):
            logits = log_weights(self.spec, start, rows)
            online_fold(self.lse, self.acc, logits, vals)
            thresh = self.lse + math.log(self.spec.eps)
            qb, cb = np.nonzero(logits >= thresh[:, None])
            qo, io, lo = self._old_triples()
            self._keep(
                np.concatenate([qo, qb]),
                np.concatenate([io, start + cb]),
                np.concatenate([lo, logits[qb, cb]]),
            )

    def _merge(self, other: GroundTruth) -> None:
        merge_folds(self.lse, self.acc, other.lse, other.acc)
        qa, ia, la = self._old_triples()
        qb, ib, lb = other._old_triples()
        self.dropped += other.dropped
        self._keep(np.concatenate([qa, qb]), np.concatenate([ia, ib]), np.concatenate([la, lb]))

    def _state(self) -> State:
        out: State = {
            "lse": self.lse,
            "cand_idx": self.cand_idx,
            "cand_lw": self.cand_lw,
            "dropped": np.array(self.dropped, dtype=np.int64),
        }
        if self.acc is not None:
            out["acc"] = self.acc
        return out

    def _load(self, state: State) -> None:
        self.lse = np.array(state["lse"], dtype=np.float64)
        self.cand_idx = np.array(state["cand_idx"], dtype=np.int64)
        self.cand_lw = np.array(state["cand_lw"], dtype=np.float64)
        self.dropped = int(state["dropped"])
        self.acc = np.array(state["acc"], dtype=np.float64) if "acc" in state else None

    def result(self) -> dict[str, Any]:
        key = np.where(self.cand_idx >= 0, self.cand_idx, np.iinfo(np.int64).max)
        order = np.argsort(key, axis=1, kind="stable")
        idx = np.take_along_axis(self.cand_idx, order, axis=1)
        lw = np.take_along_axis(self.cand_lw, order, axis=1)
        weights = _shift(lw, self.lse[:, None])
        return {
            "lse": self.lse.copy(),
            "indices": idx,
            "weights": weights,
            "counts": np.count_nonzero(idx >= 0, axis=1),
            "output": None if self.acc is None else self.acc.copy(),
            "dropped": self.dropped,
            "n": self.n_rows,
        }

    def nbytes_bound(self, d: int) -> int:
        s = self.spec.queries.shape[0]
        per_query = 3 * self.spec.max_candidates + 1 + self.spec.values_dim
        return 8 * (s * per_query + s * d + 2 * MAX_LOGIT_ENTRIES)


@dataclass(frozen=True)
class ObservedAttentionSpec(AttentionSpec):
    """Attention plus the final log-normalisers ``lse`` (s,) and the ``budget`` B."""

    lse: np.ndarray | None = None
    budget: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        lse = None if self.lse is None else np.asarray(self.lse)
        if lse is None or lse.shape != (self.queries.shape[0],):
            raise ConfigError("observed attention needs lse: one log-normaliser per query.")
        if not (isinstance(self.budget, (int, np.integer)) and self.budget >= 1):
            raise ConfigError(f"budget must be an integer >= 1, got {self.budget!r}.")


class ObservedAttentionTop(Operator[ObservedAttentionSpec, dict[str, Any]]):
    """Exact top-B keys by accumulated attention a_j = Σ_i A_ij (H2O-style heavy hitters).

    Needs the queries *and* their final normalisers (a ``GroundTruth`` pass first), so it
    is a second pass; ties are broken by the smaller index. Memory O(B), independent of n.
    """

    family = "observed-attention-top"
    Spec = ObservedAttentionSpec

    def __init__(self, spec: ObservedAttentionSpec) -> None:
        super().__init__(spec)
        self.idx = np.zeros(0, dtype=np.int64)
        self.scores = np.zeros(0)

    def _keep_top(self, idx: np.ndarray, scores: np.ndarray) -> None:
        order = np.lexsort((idx, -scores))[: self.spec.budget]
        order = order[np.argsort(idx[order], kind="stable")]
        self.idx, self.scores = idx[order], scores[order]

    def _update(self, block: Block) -> None:
        spec = self.spec
        assert spec.lse is not None
        for start, rows, _ in _pieces(spec, block, use_values=False):
            a = _shift(log_weights(spec, start, rows), spec.lse[:, None])
            self._keep_top(
                np.concatenate([self.idx, np.arange(start, start + rows.shape[0])]),
                np.concatenate([self.scores, a.sum(axis=0)]),
            )

    def _merge(self, other: ObservedAttentionTop) -> None:
        self._keep_top(
            np.concatenate([self.idx, other.idx]), np.concatenate([self.scores, other.scores])
        )

    def _state(self) -> State:
        return {"idx": self.idx, "scores": self.scores}

    def _load(self, state: State) -> None:
        self.idx = np.array(state["idx"], dtype=np.int64)
        self.scores = np.array(state["scores"], dtype=np.float64)

    def result(self) -> dict[str, Any]:
        """``indices`` (sorted) and ``scores`` (accumulated attention) of the top-B keys."""
        return {"indices": self.idx.copy(), "scores": self.scores.copy(), "n": self.n_rows}

    def nbytes_bound(self, d: int) -> int:
        s = self.spec.queries.shape[0]
        return 8 * (2 * self.spec.budget + s * (d + 1) + 2 * MAX_LOGIT_ENTRIES)


@dataclass(frozen=True)
class RestrictedAttentionSpec(AttentionSpec):
    """Attention plus k selected sets S^(m) = I_m ∪ W_m(i), m = 0..k−1.

    ``set_indices`` concatenates the sorted global indices I_m, ``set_offsets`` (k + 1)
    delimits them, ``set_windows`` (k,) gives per set a recent window w_m: query i also
    uses keys (pos_i − w_m, pos_i] (pos_i = n − 1 for every query in global mode, where
    ``n_keys`` is the store length). Causal masking still applies.
    """

    set_indices: np.ndarray | None = None
    set_offsets: np.ndarray | None = None
    set_windows: np.ndarray | None = None
    n_keys: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        off = np.asarray(self.set_offsets)
        win = np.asarray(self.set_windows)
        if self.set_indices is None or off.ndim != 1 or off.size < 1 or win.shape != (
            off.size - 1,
        ):
            raise ConfigError("restricted attention needs set_indices, set_offsets, set_windows.")
        if self.n_keys < 1:
            raise ConfigError("restricted attention needs n_keys >= 1.")

    def window_positions(self) -> np.ndarray:
        if self.mode == "causal":
            assert self.positions is not None
            return self.positions
        return np.full(self.queries.shape[0], self.n_keys - 1, dtype=np.int64)


class RestrictedAttention(Operator[RestrictedAttentionSpec, dict[str, Any]]):
    """Per selected set and query: log Σ_{j∈S_i} exp(ℓ_ij) and the output renormalised over S_i.

    ``result()``: ``lse`` (k × s) and ``output`` (k × s × d_v, or None). With the full
    normaliser L_i of ``GroundTruth``, exp(lse − L) is the attention mass S keeps and
    ``output`` the renormalised output o_S. Memory O(k · s · d_v), independent of n.
    """

    family = "restricted-attention"
    Spec = RestrictedAttentionSpec

    def __init__(self, spec: RestrictedAttentionSpec) -> None:
        super().__init__(spec)
        k, s = spec.set_windows.shape[0], spec.queries.shape[0]  # type: ignore[union-attr]
        self.lse = np.full((k, s), -np.inf)
        self.acc = np.zeros((k, s, spec.values_dim)) if spec.values_dim else None

    def _update(self, block: Block) -> None:
        spec = self.spec
        idx_all, off, win = spec.set_indices, spec.set_offsets, spec.set_windows
        assert idx_all is not None and off is not None and win is not None
        wpos = spec.window_positions()
        for start, rows, vals in _pieces(spec, block):
            logits = log_weights(spec, start, rows)
            stop = start + rows.shape[0]
            for m in range(win.shape[0]):  # a loop over sets; each step is whole-block
                members = idx_all[off[m] : off[m + 1]]
                a, b = np.searchsorted(members, [start, stop])
                local = members[a:b] - start
                acc = None if self.acc is None else self.acc[m]
                online_fold(
                    self.lse[m], acc, logits[:, local], None if vals is None else vals[local]
                )
                if win[m] > 0:
                    inset = np.zeros(rows.shape[0], dtype=bool)
                    inset[local] = True
                    self._fold_window(m, int(win[m]), start, logits, vals, inset, wpos)

    def _fold_window(
        self,
        m: int,
        w: int,
        start: int,
        logits: np.ndarray,
        vals: np.ndarray | None,
        inset: np.ndarray,
        wpos: np.ndarray,
    ) -> None:
        """Fold the band (pos_i − w, pos_i] ∩ block of every query, minus keys in I_m.

        Gathers at most min(w, b) columns per query from the block's logits, so the
        work is O(s · min(w, b) · d_v), not O(s · b · d_v) per set.
        """
        b = logits.shape[1]
        lo = np.maximum(wpos - w + 1, start) - start
        hi = np.minimum(wpos, start + b - 1) - start
        width = int(max(0, (hi - lo + 1).max()))
        if width == 0:
            return
        # queries in groups, so the gathered value rows stay under MAX_LOGIT_ENTRIES
        group = max(1, MAX_LOGIT_ENTRIES // (width * max(1, self.spec.values_dim)))
        for g0 in range(0, logits.shape[0], group):
            sl = slice(g0, g0 + group)
            cols = lo[sl, None] + np.arange(width)[None, :]
            ok = cols <= hi[sl, None]
            cols = np.where(ok, cols, 0)
            band = np.take_along_axis(logits[sl], cols, axis=1)
            band[~ok | inset[cols]] = -np.inf  # outside the band, or already counted in I_m
            acc = None if self.acc is None else self.acc[m, sl]
            online_fold(self.lse[m, sl], acc, band, None if vals is None else vals[cols])

    def _merge(self, other: RestrictedAttention) -> None:
        merge_folds(self.lse, self.acc, other.lse, other.acc)

    def _state(self) -> State:
        out: State = {"lse": self.lse}
        if self.acc is not None:
            out["acc"] = self.acc
        return out

    def _load(self, state: State) -> None:
        self.lse = np.array(state["lse"], dtype=np.float64)
        self.acc = np.array(state["acc"], dtype=np.float64) if "acc" in state else None

    def result(self) -> dict[str, Any]:
        return {
            "lse": self.lse.copy(),
            "output": None if self.acc is None else self.acc.copy(),
            "n": self.n_rows,
        }

    def nbytes_bound(self, d: int) -> int:
        k, s = self.lse.shape
        return 8 * (k * s * (1 + self.spec.values_dim) + s * d + 3 * MAX_LOGIT_ENTRIES)
