"""Typed results: what recipes return and what outputs store.

``UniversalSet`` (a selected key set with its certificate), ``MultiHeadResult`` (one
result per (layer, head) of a KV cache) and ``versions`` (the provenance recorded in
every certificate).
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
    """Per-(layer, head) results of one request, indexable as ``result[layer, head]``.

    Each item has the single-head type (e.g. ``UniversalSet``).
    """

    def __init__(self, items: list[list[Any]]) -> None:
        self.items = items

    @property
    def layers(self) -> int:
        return len(self.items)

    @property
    def heads(self) -> int:
        return len(self.items[0])

    def __getitem__(self, key: tuple[int, int]) -> Any:
        layer, head = key
        return self.items[layer][head]

    def __len__(self) -> int:
        return self.layers * self.heads

    def __iter__(self) -> Iterator[tuple[tuple[int, int], Any]]:
        for layer, row in enumerate(self.items):
            for head, item in enumerate(row):
                yield (layer, head), item

    def named(self, name: str) -> dict[str, Any]:
        """``{"name/layer_{l}/head_{h}": item}``, the layout of saved outputs."""
        return {f"{name}/layer_{lay}/head_{h}": item for (lay, h), item in self}


def flatten_results(names: list[str], results: list[Any]) -> dict[str, Any]:
    """Name → single-head result, expanding multi-head results per (layer, head)."""
    out: dict[str, Any] = {}
    for name, res in zip(names, results, strict=True):
        out.update(res.named(name) if isinstance(res, MultiHeadResult) else {name: res})
    return out
