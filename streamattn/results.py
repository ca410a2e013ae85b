"""Typed results: what recipes return and what outputs store.

``UniversalSet`` (a selected key set with its certificate), ``MultiHeadResult`` (one
result per (layer, head) of a KV cache) and ``versions`` (the provenance recorded in
every certificate).
"""

from __future__ import annotations

import platform
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamattn.errors import ConfigError


@dataclass
class UniversalSet:
    """A selected key set with its scores, rows and certificate.

    Attributes
    ----------
    indices : sorted int64 row indices of the selected keys
    scores : float64 leverage scores of those keys (affine: 1/n + centred leverage)
    rows : the selected key rows, in the store's dtype
    values : the matching value rows when the store has values, else None
    certificate : eps, n, d, rank and tolerance, sum of scores, variant, chunking,
        passes, size bound, guarantee text and versions
    """

    indices: np.ndarray
    scores: np.ndarray
    rows: np.ndarray
    values: np.ndarray | None
    certificate: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_candidates(
        cls,
        res: dict[str, Any],
        keep: np.ndarray,
        scores: np.ndarray,
        dtype: Any,
        certificate: dict[str, Any],
    ) -> UniversalSet:
        """The rows ``keep`` of an operator result (indices, rows, values) with ``scores``."""
        values = res["values"]
        return cls(
            res["indices"][keep],
            scores,
            res["rows"][keep].astype(dtype),
            None if values is None else values[keep],
            certificate,
        )

    def __len__(self) -> int:
        return int(self.indices.size)

    def __contains__(self, j: object) -> bool:
        if not isinstance(j, (int, np.integer)):
            return False
        pos = np.searchsorted(self.indices, j)
        return bool(pos < self.indices.size and self.indices[pos] == j)


def versions() -> dict[str, str]:
    import scipy

    import streamattn

    out = {
        "streamattn": streamattn.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
    }
    try:
        import zarr

        out["zarr"] = zarr.__version__
    except ImportError:  # pragma: no cover - zarr is a dependency
        pass
    return out


class MultiHeadResult:
    """Per-(layer, head) results of one request, indexable as ``result[layer, head]``
    with the *real* layer and head indices (``layer_ids``, ``head_ids``).

    Each item has the single-head type (e.g. ``UniversalSet``). For key sets, the
    kvpress-style handle: ``indices()`` is the ``(L, H, B)`` array of kept keys and
    ``keep_mask(n)`` the ``(L, H, n)`` boolean mask.
    """

    def __init__(
        self,
        items: list[list[Any]],
        layer_ids: Sequence[int] | None = None,
        head_ids: Sequence[int] | None = None,
    ) -> None:
        self.items = items
        self.layer_ids = tuple(range(len(items)) if layer_ids is None else layer_ids)
        self.head_ids = tuple(range(len(items[0])) if head_ids is None else head_ids)

    @property
    def layers(self) -> int:
        return len(self.items)

    @property
    def heads(self) -> int:
        return len(self.items[0])

    def __getitem__(self, key: tuple[int, int]) -> Any:
        layer, head = key
        if layer not in self.layer_ids or head not in self.head_ids:
            raise KeyError(
                f"(layer {layer}, head {head}) is not in this result: layers "
                f"{list(self.layer_ids)}, heads {list(self.head_ids)}."
            )
        return self.items[self.layer_ids.index(layer)][self.head_ids.index(head)]

    def __len__(self) -> int:
        return self.layers * self.heads

    def __iter__(self) -> Iterator[tuple[tuple[int, int], Any]]:
        """``((real layer, real head), item)`` pairs."""
        for layer, row in zip(self.layer_ids, self.items, strict=True):
            for head, item in zip(self.head_ids, row, strict=True):
                yield (layer, head), item

    def named(self, name: str) -> dict[str, Any]:
        """``{"name/layer_{l}/head_{h}": item}``, the layout of per-head outputs."""
        return {f"{name}/layer_{lay}/head_{h}": item for (lay, h), item in self}

    def sizes(self) -> np.ndarray:
        """``(L, H)``: how many keys each head keeps."""
        return np.array([[len(item.indices) for item in row] for row in self.items],
                        dtype=np.int64)

    def indices(self) -> np.ndarray:
        """``(L, H, B)`` int64: each head's kept keys, sorted; −1 pads heads keeping fewer
        than the largest set (threshold sets differ in size; budget sets do not)."""
        width = int(self.sizes().max(initial=0))
        out = np.full((self.layers, self.heads, width), -1, dtype=np.int64)
        for li, row in enumerate(self.items):
            for hi, item in enumerate(row):
                out[li, hi, : len(item.indices)] = item.indices
        return out

    def scores(self) -> np.ndarray:
        """``(L, H, B)`` float64 scores of ``indices()`` (NaN padded)."""
        width = int(self.sizes().max(initial=0))
        out = np.full((self.layers, self.heads, width), np.nan)
        for li, row in enumerate(self.items):
            for hi, item in enumerate(row):
                out[li, hi, : len(item.scores)] = item.scores
        return out

    def keep_mask(self, n: int) -> np.ndarray:
        """``(L, H, n)`` bool: True for the keys each head keeps."""
        idx = self.indices()
        if idx.size and int(idx.max()) >= n:
            raise ConfigError(f"keep_mask(n = {n}): the sets hold key {int(idx.max())} >= n.")
        mask = np.zeros((self.layers, self.heads, n), dtype=bool)
        li, hi, k = np.nonzero(idx >= 0)
        mask[li, hi, idx[li, hi, k]] = True
        return mask


def flatten_results(names: list[str], results: list[Any]) -> dict[str, Any]:
    """Name → single-head result, expanding multi-head results per (layer, head)."""
    out: dict[str, Any] = {}
    for name, res in zip(names, results, strict=True):
        out.update(res.named(name) if isinstance(res, MultiHeadResult) else {name: res})
    return out
