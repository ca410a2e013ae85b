"""Selections of a whole KV cache as a handful of stacked, labelled arrays.

``result.zarr/selection/<name>`` holds, for the L chosen layers and H chosen KV heads,

- ``layer`` (layer,), ``head`` (head,): the real indices (xarray coordinates);
- ``indices`` (layer, head, rank) int64: each head's kept keys, sorted, −1 padded;
- ``scores`` (layer, head, rank) float64 (NaN padded); ``sizes`` (layer, head);
- ``rows`` (layer, head, rank, dim) and, when values were read, ``values``
  (layer, head, rank, value_dim): the kept key/value rows (0 padded);
- ``keep_mask`` (layer, head, key) bool, only on request (``keep_mask=True``);

every array with zarr v3 ``dimension_names``, so ``xarray.open_zarr(path,
group="selection/<name>")`` opens it. The per-head certificates are the group's
``certificates`` attribute (a list in (layer, head) order). A 32-layer × 8-head cache is
eight arrays, not one group per head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from streamattn.io.outputs import to_jsonable
from streamattn.results import MultiHeadResult


def _stack_rows(result: MultiHeadResult, attr: str) -> np.ndarray | None:
    first = result.items[0][0]
    if getattr(first, attr) is None:
        return None
    width = int(result.sizes().max(initial=0))
    dim = int(np.asarray(getattr(first, attr)).shape[1])
    out = np.zeros((result.layers, result.heads, width, dim))
    for li, row in enumerate(result.items):
        for hi, item in enumerate(row):
            x = np.asarray(getattr(item, attr))
            out[li, hi, : x.shape[0]] = x
    return out


def write_cache_selection(
    root: Any, name: str, result: MultiHeadResult, *, n: int, keep_mask: bool = False
) -> None:
    """Write ``selection/<name>`` into the open zarr group ``root`` (see the module doc)."""
    group = root.require_group(f"selection/{name}")
    arrays: dict[str, tuple[np.ndarray | None, list[str]]] = {
        "layer": (np.asarray(result.layer_ids, dtype=np.int64), ["layer"]),
        "head": (np.asarray(result.head_ids, dtype=np.int64), ["head"]),
        "indices": (result.indices(), ["layer", "head", "rank"]),
        "scores": (result.scores(), ["layer", "head", "rank"]),
        "sizes": (result.sizes(), ["layer", "head"]),
        "rows": (_stack_rows(result, "rows"), ["layer", "head", "rank", "dim"]),
        "values": (_stack_rows(result, "values"), ["layer", "head", "rank", "value_dim"]),
        "keep_mask": (result.keep_mask(n) if keep_mask else None, ["layer", "head", "key"]),
    }
    for key, (arr, dims) in arrays.items():
        if arr is None:
            continue
        arr = np.ascontiguousarray(arr)
        chunks = tuple(max(1, min(s, 65536)) for s in arr.shape)
        group.create_array(key, data=arr, chunks=chunks, dimension_names=dims)
    group.attrs.update(to_jsonable({
        "n": n,
        "layout": "stacked (layer, head, rank); docs/real-caches.md",
        "certificates": [item.certificate for _, item in result],
    }))


def load_cache_selection(out: str | Path, name: str) -> MultiHeadResult:
    """Read ``selection/<name>`` of an output back as a :class:`MultiHeadResult`."""
    import zarr

    from streamattn.errors import InvalidInputError
    from streamattn.results import UniversalSet

    try:
        group: Any = zarr.open_group(f"{out}/result.zarr", mode="r")[f"selection/{name}"]
    except (KeyError, FileNotFoundError) as exc:
        raise InvalidInputError(f"{out}: no cache selection named {name!r} in result.zarr.") \
            from exc
    a = {k: np.asarray(v[...]) for k, v in group.arrays()}
    certs: list[dict[str, Any]] = dict(group.attrs)["certificates"]
    layers, heads = a["layer"].tolist(), a["head"].tolist()
    items: list[list[Any]] = []
    for li in range(len(layers)):
        row = []
        for hi in range(len(heads)):
            k = int(a["sizes"][li, hi])
            vals = a["values"][li, hi, :k] if "values" in a else None
            row.append(UniversalSet(a["indices"][li, hi, :k], a["scores"][li, hi, :k],
                                    a["rows"][li, hi, :k], vals, certs[li * len(heads) + hi]))
        items.append(row)
    return MultiHeadResult(items, layers, heads)
