"""Sliding window: the exact universal set of the most recent rows of an endless stream.

A decoder generating tokens appends keys forever; attention looks at the last W keys.
:class:`SlidingWindow` keeps the LevAttention universal set (p = 2, plain or affine) of
a suffix of the stream in memory that depends on W, the block size b and d, never on the
stream length.

Exact blocked construction. Rows are grouped in aligned blocks of b rows
([0, b), [b, 2b), ...). For each *complete* block the state keeps its TSQR factor R_B
(d × d) and its candidates C_B = {j ∈ B : τ_j(B) ≥ ε} with their rows; the current,
incomplete block is a one-pass :class:`~streamattn.operators.leverage.LeverageScores`.
At time t (rows seen) the window is

    [s_t, t),   s_t = max(0, b·⌈(t − W)/b⌉),   so W − b < W_t = t − s_t ≤ W,

the longest block-aligned suffix of at most W rows (W_t = W exactly whenever t and W are
multiples of b, or t ≤ W). Every block in it is whole, so for a row j in block B ⊆ window,
G_window ⪰ G_B and τ_j(window) ≤ τ_j(B): a key with window score ≥ ε is in C_B. Rescoring
∪_B C_B against R_window = qr([R_B1; R_B2; ...]) therefore gives *exactly*
U_ε(window) = {j ∈ [s_t, t) : τ_j(window) ≥ ε}, the batch answer over those rows, with
its guarantee: for f(x) = x² attention over the window's keys, every key that any query
weights ≥ ε is in U, and |U| ≤ rank/ε. Blocks older than s_t are dropped for good (s_t
never decreases).

Memory: at most ⌈W/b⌉ + 1 blocks, each O(d² + (d/ε)·(d + d_v)) floats. Smaller b tracks
the window more tightly (W − b < W_t) at the price of more factors.

Braverman, Drineas, Musco, Musco, Upadhyay, Woodruff and Zhou ("Near optimal linear algebra
in the online and sliding window models", FOCS 2020) sample rows by *reverse online*
leverage scores to keep a (1 ± ε) spectral approximation of exactly the last W rows in
O(d·polylog) rows; it is approximate and randomised. The blocked form here is exact and
deterministic, for a window that moves in steps of b rows.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamattn.errors import ConfigError, InvalidInputError
from streamattn.operators.factors import centred_factor_result
from streamattn.operators.leverage import (
    DEFAULT_RTOL,
    LeverageScores,
    LeverageSpec,
    ScoringMap,
    augment,
    stack_qr,
)
from streamattn.sources import Block


@dataclass
class _Done:
    """A complete block: its factor and its own candidates (score ≥ ε within the block)."""

    start: int
    r: np.ndarray
    idx: np.ndarray
    rows: np.ndarray
    values: np.ndarray | None
    n: int  # rows folded into ``r``


@dataclass
class WindowSet:
    """The universal set of the window ``[start, stop)`` with its certificate."""

    indices: np.ndarray
    scores: np.ndarray
    rows: np.ndarray
    values: np.ndarray | None
    start: int
    stop: int
    certificate: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.indices.size)


class SlidingWindow:
    """Exact universal set of the last W_t ∈ (W − b, W] rows of a stream, bounded memory.

    Parameters
    ----------
    window : W, the number of most recent rows attention looks at.
    block : b ≤ W, the step in which the window moves (W a multiple of b is tidiest).
    eps : threshold in (0, 1].
    variant : ``"plain"`` or ``"affine"`` (1/n_window + centred leverage of the window).
    rtol : numerical-rank tolerance (relative to σ_max of the window's keys).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> sw = SlidingWindow(window=400, block=100, eps=0.3)
    >>> for t in range(10):
    ...     rows = rng.standard_normal((100, 4))
    ...     if t == 8:
    ...         rows[5] *= 40.0          # an outlier at row 805
    ...     sw.append(rows)
    >>> u = sw.result()
    >>> (u.start, u.stop), 805 in u.indices.tolist()
    ((600, 1000), True)
    """

    def __init__(
        self,
        window: int,
        block: int,
        eps: float,
        *,
        variant: str = "plain",
        rtol: float = DEFAULT_RTOL,
    ) -> None:
        for name, value in (("window", window), ("block", block)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"sliding window: {name} must be an integer >= 1, got {value!r}.")
        if block > window:
            raise ConfigError(f"sliding window: block {block} must be <= window {window}.")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
            raise ConfigError(f"sliding window: eps must be in (0, 1], got {eps!r}.")
        if variant not in ("plain", "affine"):
            raise ConfigError(f"variant must be 'plain' or 'affine', got {variant!r}.")
        self.window, self.block, self.eps = int(window), int(block), float(eps)
        self.variant, self.rtol = variant, rtol
        self.t = 0
        self.d: int | None = None
        self.done: collections.deque[_Done] = collections.deque()
        self.current = self._fresh()

    def _fresh(self) -> LeverageScores:
        return LeverageScores(LeverageSpec(self.eps, self.variant == "affine", self.rtol))

    @property
    def window_start(self) -> int:
        """s_t = max(0, b·⌈(t − W)/b⌉)."""
        return max(0, self.block * math.ceil((self.t - self.window) / self.block))

    def append(self, rows: np.ndarray, values: np.ndarray | None = None) -> None:
        """Append rows (global indices t, t+1, ...) and the matching value rows, if any."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise InvalidInputError(f"sliding window: append a 2-D (m, d) array, got {rows.shape}.")
        if self.d is None:
            self.d = rows.shape[1]
        if rows.shape[1] != self.d:
            raise InvalidInputError(
                f"sliding window: rows have width {rows.shape[1]}, the stream has d = {self.d}."
            )
        if not np.all(np.isfinite(rows)):
            bad = self.t + int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
            raise InvalidInputError(f"sliding window: row {bad} contains NaN or Inf.")
        a = 0
        while a < rows.shape[0]:
            room = self.block - self.t % self.block
            stop = min(rows.shape[0], a + room)
            vals = None if values is None else values[a:stop]
            self.current.update(Block(self.t, rows[a:stop], vals))
            self.t += stop - a
            a = stop
            if self.t % self.block == 0:
                st = self.current.settled()._state()  # an open Gram window closed
                self.done.append(
                    _Done(self.t - self.block, st["r"], st["idx"], st["rows"], st.get("values"),
                          self.block)
                )
                self.current = self._fresh()
        while self.done and self.done[0].start < self.window_start:
            self.done.popleft()

    def result(self) -> WindowSet:
        """Exactly U_ε of the rows [s_t, t) (see the module docstring)."""
        if self.t == 0:
            raise InvalidInputError("sliding window: no rows appended yet.")
        s = self.window_start
        parts = [b for b in self.done if b.start >= s]
        if self.current.n_rows:
            st = self.current.settled()._state()  # an open Gram window closed
            parts.append(_Done(self.t - self.current.n_rows, st["r"], st["idx"], st["rows"],
                               st.get("values"), self.current.n_rows))
        r = stack_qr(*[p.r for p in parts])  # affine: TSQR of the [1, K] factors
        if self.variant == "affine":
            n = sum(p.n for p in parts)
            smap = ScoringMap.from_centred(centred_factor_result(r, n), self.rtol)
        else:
            smap = ScoringMap.from_factor(r, self.rtol, r.shape[1])
        idx = np.concatenate([p.idx for p in parts])
        rows = np.vstack([p.rows for p in parts])
        with_values = all(p.values is not None for p in parts)
        scores = smap.scores(augment(rows, False))
        keep = scores >= self.eps
        values = (np.vstack([p.values for p in parts if p.values is not None])[keep]
                  if with_values else None)
        cert = {
            "mode": "sliding-window",
            "eps": self.eps,
            "variant": self.variant,
            "window": self.window,
            "block": self.block,
            "rows_seen": self.t,
            "window_start": s,
            "window_stop": self.t,
            "window_rows": self.t - s,
            "window_note": "window = [b*ceil((t-W)/b), t) clipped at 0: W - b < rows <= W",
            "blocks_held": len(parts),
            "numerical_rank": smap.rank,
            "rank_rtol": self.rtol,
            "size_bound": smap.rank / self.eps,
            "guarantee": (
                "Exact: equals the batch universal set of rows [window_start, window_stop). "
                "For f(x) = x^2 attention over those keys every key that any query weights "
                ">= eps is in U, and |U| <= rank/eps."
            ),
        }
        return WindowSet(idx[keep], scores[keep], rows[keep], values, s, self.t, cert)

    def nbytes_bound(self) -> int:
        """Upper bound on the state's memory (bytes), independent of the stream length."""
        dim = (self.d or 0) + (self.variant == "affine")
        per_block = 8 * (dim * dim + int(dim / self.eps) * ((self.d or 0) + 1))
        return (math.ceil(self.window / self.block) + 1) * per_block
