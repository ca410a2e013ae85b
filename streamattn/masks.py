"""Attention masks: one object shared by ground truth, selectors and metrics.

Definitions: docs/architecture.md, note 1.4.

A cache's rows are split into *segments* (``tokens/window``: contiguous runs of rows with
one segment id; absent: one segment). Every mask lets query row ``i`` attend to one
contiguous interval of key rows ``[lo_i, hi_i]`` (inclusive):

- ``global``: every key, ``[0, n − 1]``;
- ``causal``: key row ≤ query row, ``[0, i]``;
- ``native``: the attention the model computed — keys of the query's own segment
  ``[a, b]``, causal inside it (``[a, i]``) when the cache's ``model.causal`` is true;
- ``local:W``: ``native`` restricted to keys within W rows of the query,
  ``[max(a, i − W), min(end, i + W)]`` (end = ``i`` for a causal model, else ``b``).

Rows of a segment are consecutive positions (``tokens/pos`` increases by one per row
inside a segment; :class:`Segments` checks it), so "within W positions" is "within W
rows". Because every mask is an interval, ground truth, selectors and metrics apply it
exactly with two comparisons per entry, and ``count = hi − lo + 1`` is the number of keys
a query can attend (what fractional budgets are fractions of).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamattn.errors import ConfigError, InvalidInputError

MASK_KINDS = ("global", "causal", "native", "local")


@dataclass(frozen=True)
class Segments:
    """Contiguous segments of ``n`` rows: segment ``k`` is rows ``[starts[k], stops[k])``."""

    starts: np.ndarray
    stops: np.ndarray
    ids: np.ndarray

    @property
    def n(self) -> int:
        return int(self.stops[-1])

    @classmethod
    def single(cls, n: int) -> Segments:
        return cls(np.array([0], dtype=np.int64), np.array([n], dtype=np.int64),
                   np.array([0], dtype=np.int64))

    @classmethod
    def from_tokens(
        cls, window: np.ndarray | None, pos: np.ndarray | None, n: int, label: str
    ) -> Segments:
        """Segments from ``tokens/window`` (segment id per row) and check ``tokens/pos``.

        Refuses a segment id that appears in two separate runs of rows, and positions
        that do not step by one inside a segment (named by row).
        """
        if window is None:
            segs = cls.single(n)
        else:
            w = np.asarray(window)
            if w.shape != (n,) or w.dtype.kind not in "iu":
                raise InvalidInputError(
                    f"{label}: tokens/window must be a 1-D integer array of n = {n} segment "
                    f"ids; got shape {w.shape}, dtype {w.dtype}."
                )
            change = np.flatnonzero(w[1:] != w[:-1]) + 1
            starts = np.concatenate([[0], change]).astype(np.int64)
            stops = np.concatenate([change, [n]]).astype(np.int64)
            ids = w[starts].astype(np.int64)
            if np.unique(ids).size != ids.size:
                dup = ids[np.flatnonzero(np.bincount(np.unique(ids, return_inverse=True)[1])
                                         > 1)[0]]
                rows = starts[ids == dup]
                raise InvalidInputError(
                    f"{label}: tokens/window id {int(dup)} appears in separate runs of rows "
                    f"(starting at rows {rows[:3].tolist()}); each segment's rows must be "
                    "contiguous."
                )
            segs = cls(starts, stops, ids)
        if pos is not None:
            p = np.asarray(pos)
            if p.shape != (n,) or p.dtype.kind not in "iu":
                raise InvalidInputError(
                    f"{label}: tokens/pos must be a 1-D integer array of n = {n} positions; "
                    f"got shape {p.shape}, dtype {p.dtype}."
                )
            step = np.diff(p.astype(np.int64))
            inner = np.ones(max(0, n - 1), dtype=bool)
            inner[segs.starts[1:] - 1] = False  # a step across a segment boundary is free
            bad = np.flatnonzero(inner & (step != 1))
            if bad.size:
                r = int(bad[0]) + 1
                raise InvalidInputError(
                    f"{label}: tokens/pos at row {r} is {int(p[r])} after {int(p[r - 1])} in "
                    "the same segment; positions inside a segment must step by one per row."
                )
        return segs

    def of_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(segment start, segment stop) of each row."""
        k = np.searchsorted(self.starts, rows, side="right") - 1
        return self.starts[k], self.stops[k]


@dataclass(frozen=True)
class Mask:
    """One attention mask (``global``, ``causal``, ``native`` or ``local:W``).

    ``Mask.parse("local:64")``; ``bounds(rows, segments, causal)`` gives each query row's
    interval of key rows ``[lo, hi]``; ``name`` is how outputs label it.
    """

    kind: str
    window: int = 0

    @classmethod
    def parse(cls, text: str) -> Mask:
        name, _, arg = str(text).partition(":")
        if name not in MASK_KINDS:
            raise ConfigError(
                f"mask {text!r} is not one of global, causal, native, local:W."
            )
        if name == "local":
            try:
                w = int(arg)
            except ValueError:
                w = -1
            if w < 0:
                raise ConfigError(f"mask {text!r}: local needs a window W >= 0, e.g. local:64.")
            return cls("local", w)
        if arg:
            raise ConfigError(f"mask {text!r}: only local takes an argument (local:W).")
        return cls(name)

    @property
    def name(self) -> str:
        return f"local:{self.window}" if self.kind == "local" else self.kind

    def bounds(
        self, rows: np.ndarray, segments: Segments, causal: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Inclusive key-row intervals ``(lo, hi)`` (int64) of query rows ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        n = segments.n
        if self.kind == "global":
            return np.zeros_like(rows), np.full_like(rows, n - 1)
        if self.kind == "causal":
            return np.zeros_like(rows), rows.copy()
        a, b = segments.of_rows(rows)
        hi = rows.copy() if causal else b - 1
        if self.kind == "native":
            return a, hi
        return np.maximum(a, rows - self.window), np.minimum(hi, rows + self.window)

    def allowed(self, lo: np.ndarray, hi: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Dense boolean ``(s, len(keys))``: key row ``keys[j]`` allowed for query ``i``."""
        k = np.asarray(keys)[None, :]
        return (k >= lo[:, None]) & (k <= hi[:, None])


def parse_masks(names: tuple[str, ...] | list[str]) -> list[Mask]:
    """Masks from config strings, refusing duplicates."""
    masks = [Mask.parse(m) for m in names]
    labels = [m.name for m in masks]
    if len(set(labels)) != len(labels) or not masks:
        raise ConfigError(f"attention.modes must be distinct and non-empty, got {list(names)}.")
    return masks
