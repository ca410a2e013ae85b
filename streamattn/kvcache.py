"""Whole KV caches: multi-layer, multi-head key stores read once for every head.

A KV cache holds, per layer ``l`` and head ``h``, an ``n × d_head`` key matrix. Layouts
opened by :func:`open_kv` (and by ``open_keys``, which hands them here; the array layouts
and torch/transformers adapters live in :mod:`streamattn.cache_layout`):

- the documented zarr layout (docs/real-caches.md): per-layer arrays ``keys/layer_{l}``
  ``(n, H_kv·hd)`` with attributes ``n_heads``, ``head_dim``, ``layer`` (any subset of
  layers), optional ``queries/layer_{l}``, ``values/layer_{l}``, ``tokens/window``,
  ``tokens/pos`` and the group attribute ``model``;
- a 4-D array ``(layers, heads, n, d)`` or 5-D ``(batch, layers, heads, n, d)`` (numpy,
  ``.npy``, zarr, dask, CPU torch), or a 3-D array ``(heads, n, d)`` (one layer);
- a 2-D array ``(n, heads·d_head)`` split by a declared ``n_heads``;
- a transformers cache: a tuple per layer of ``(k, v)`` tensors
  ``(batch, kv_heads, seq, head_dim)``, or a ``DynamicCache``.

``layers=`` / ``heads=`` choose real layer and KV-head indices (only their arrays and
columns are read); values are read only with ``values=True``.

:class:`MultiHeadSource` yields ``Block(start, rows)`` with ``rows`` of shape
``(r, layers, heads, d)``: each block of rows is read once — one read of the 4-D/2-D
array, or one read per layer array — and that one read serves every head's operator.
:class:`MultiHead` wraps one operator per (layer, head) into a single operator, so the
engines, checkpoints and the Dask engine handle a whole cache without knowing about
heads. Its update runs a Python loop over the ``layers × heads`` head operators *per
block* (never per row); each head's work is block-level BLAS/LAPACK on a contiguous
``r × d`` slice, so for the usual 64k-row blocks the loop costs microseconds against
milliseconds of QR per head. Memory is bounded by ``layers × heads`` times the
single-head bound of the wrapped operator (``MultiHead.nbytes_bound``), still
independent of n.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.cache_layout import (
    Part,
    part_of_array,
    part_of_layer_arrays,
    part_of_tensors,
    transformers_entries,
    zarr_layer_arrays,
)
from streamattn.checkpoint import decode_state, encode_state
from streamattn.errors import ConfigError, InvalidInputError
from streamattn.masks import Segments
from streamattn.operators.protocol import Operator, RowRanges, State, spec_to_state
from streamattn.source import (
    DEFAULT_BLOCK_ROWS,
    TARGET_BLOCK_BYTES,
    Block,
    BlockStream,
    KeySource,
    _chunk_rows_of,
)


# ---------------------------------------------------------------------------- the source
@dataclass(frozen=True)
class HeadView:
    """One (layer, head) of a cache, as certificates describe it."""

    source: MultiHeadSource
    layer: int
    head: int

    @property
    def n(self) -> int:
        return self.source.n

    @property
    def d(self) -> int:
        return self.source.d

    @property
    def dtype(self) -> np.dtype:
        return self.source.dtype

    def describe(self) -> dict[str, Any]:
        """The cache's description with this head's real layer and head index."""
        return {**self.source.describe(), "layer": self.source.layer_ids[self.layer],
                "head": self.source.head_ids[self.head]}


class MultiHeadSource(BlockStream):
    """A validated, read-only KV cache streamed in row blocks for all chosen heads at once.

    Attributes: ``n`` rows, ``d`` = d_head, ``layers`` / ``heads`` (how many are chosen),
    ``layer_ids`` / ``head_ids`` (their real indices), ``dtype``, ``label``, ``path``,
    ``array_name``, ``layout``, ``model`` (the store's ``model`` attributes), ``segments``
    (``streamattn.masks.Segments`` from ``tokens/window``), ``queries`` (a
    ``cache_layout.Part`` of ``queries/layer_{l}``, or None). Blocks carry ``rows`` of shape
    ``(r, layers, heads, d)`` (and ``values`` ``(r, layers, heads, d_v)`` when values were
    asked for).
    """

    def __init__(
        self,
        keys: Part,
        *,
        values: Part | None = None,
        label: str,
        path: str | None = None,
        array_name: str | None = None,
        model: dict[str, Any] | None = None,
        segments: Segments | None = None,
        queries: Part | None = None,
        reopen: dict[str, Any] | None = None,
    ) -> None:
        if keys.n == 0:
            raise InvalidInputError(f"{label}: the cache has n = 0 rows; nothing to do.")
        if keys.d == 0:
            raise InvalidInputError(f"{label}: the cache has d_head = 0 columns.")
        for what, part in (("values", values), ("queries", queries)):
            if part is not None and (part.n, part.layer_ids) != (keys.n, keys.layer_ids):
                raise InvalidInputError(
                    f"{label}: {what} {part.shapes()} (layers {list(part.layer_ids)}) do not "
                    f"match keys {keys.shapes()} (layers {list(keys.layer_ids)}); the same n "
                    "and layers are needed."
                )
        if values is not None and values.head_ids != keys.head_ids:
            raise InvalidInputError(
                f"{label}: values have heads {list(values.head_ids)}, keys "
                f"{list(keys.head_ids)}; each KV head needs its value columns."
            )
        if segments is not None and segments.n != keys.n:
            raise InvalidInputError(
                f"{label}: tokens cover {segments.n} rows, the keys have n = {keys.n}."
            )
        self._keys = keys
        self._values = values
        self.queries = queries
        self.label = label
        self.path = path
        self.array_name = array_name
        self.model = dict(model or {})
        self.segments = segments or Segments.single(keys.n)
        #: how ``current_shape`` (and workers) reopen this cache: open_kv keyword options
        self.reopen = dict(reopen or {})
        self.layout = f"kv-{keys.layout}-{keys.layers}x{keys.heads}"
        #: True when the head split comes from an ``n_heads`` setting, not from the store.
        self.declared = reopen is not None and reopen.get("n_heads") is not None
        #: True when only some layers or heads are read (workers reopen every head).
        self.subset = not keys.full or keys.layers != len(keys.layer_ids) or bool(
            reopen and (reopen.get("layers") is not None or reopen.get("heads") is not None)
        )
        self.n, self.d = keys.n, keys.d
        self.layers, self.heads = keys.layers, keys.heads
        self.layer_ids, self.head_ids = keys.layer_ids, keys.head_ids
        self.n_heads_total = keys.n_heads_total
        self.dtype = keys.dtype
        self.storage_chunk_rows = _chunk_rows_of(keys.arrays[0]) if keys.layout == "layers" \
            else None

    @property
    def values_dim(self) -> int:
        return 0 if self._values is None else self._values.d

    def keys_only(self) -> MultiHeadSource:
        """The same cache without its values (a pass that needs no values reads none)."""
        out = copy.copy(self)
        out._values = None
        return out

    def head(self, layer: int, head: int) -> HeadView:
        return HeadView(self, layer, head)

    def default_chunk_rows(self) -> int:
        """Blocks of about ``TARGET_BLOCK_BYTES`` over all heads, storage-aligned."""
        row_bytes = self.layers * self.heads * self.d * self.dtype.itemsize
        target = max(1, TARGET_BLOCK_BYTES // row_bytes)
        base = self.storage_chunk_rows
        if base is None:
            return int(min(self.n, max(256, min(target, DEFAULT_BLOCK_ROWS))))
        return int(min(self.n, base * max(1, round(target / base))))

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "path": self.path,
            "array": self.array_name,
            "n": self.n,
            "d_head": self.d,
            "layers": self.layers,
            "heads": self.heads,
            "layer_ids": list(self.layer_ids),
            "head_ids": list(self.head_ids),
            "n_heads_total": self.n_heads_total,
            "layout": self._keys.layout,
            "dtype": str(self.dtype),
            "storage_chunk_rows": self.storage_chunk_rows,
            "has_values": self._values is not None,
            "values_dim": self.values_dim,
            "query_heads": None if self.queries is None else self.queries.n_heads_total,
            "segments": int(self.segments.starts.size),
            "model": self.model,
        }

    def current_shape(self) -> tuple[int, ...]:
        """``(n, layers, heads, d)`` as the store is on disk now (reopened)."""
        if self.path is None:
            return self._keys.shapes()
        return open_kv(self.path, array=self.array_name, **self.reopen)._keys.shapes()

    # -- reading -------------------------------------------------------------------
    def _read(self, part: Part, start: int, stop: int, what: str) -> np.ndarray:
        try:
            rows = part.read(start, stop)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{self.label}: {what} {exc}") from exc
        except Exception as exc:
            raise InvalidInputError(
                f"{self.label}: could not read {what} rows [{start}, {stop}): "
                f"{type(exc).__name__}: {exc}. The chunk holding these rows may be corrupt."
            ) from exc
        bad = ~np.isfinite(rows)
        if bad.any():
            r, layer, head = np.argwhere(bad.any(axis=3))[0]
            raise InvalidInputError(
                f"{self.label}: {what} row {start + int(r)} (layer "
                f"{part.layer_ids[layer]}, head {part.head_ids[head]}) "
                "contains NaN or Inf; every value must be finite."
            )
        return rows

    def _read_block(self, start: int, stop: int) -> Block:
        """Rows ``[start, stop)`` of every head: one read per array (per layer)."""
        rows = self._read(self._keys, start, stop, "key")
        values = None if self._values is None else self._read(self._values, start, stop, "value")
        return Block(start, rows, values)


# ---------------------------------------------------------------------------- opening
def _zarr_node(path: Path) -> Any:
    import zarr

    try:
        return zarr.open(str(path), mode="r")
    except Exception as exc:
        raise InvalidInputError(
            f"{path}: not a readable zarr array or group ({type(exc).__name__}: {exc})."
        ) from exc


def is_multihead(path_or_array: Any, array: str | None = None) -> bool:
    """Whether ``open_keys`` should hand this input to :func:`open_kv`.

    True for a :class:`MultiHeadSource`, a transformers cache (tuple per layer of
    ``(k, v)``, ``DynamicCache``), a 4-D/5-D array or tensor (in memory, ``.npy``, zarr)
    and a zarr group whose key entry is a group of per-layer arrays. A 3-D array is
    ambiguous and stays an error for ``open_keys``; open it with ``open_kv`` as
    (heads, n, d).
    """
    if isinstance(path_or_array, MultiHeadSource):
        return True
    if isinstance(path_or_array, KeySource):
        return False
    if transformers_entries(path_or_array) is not None:
        return True
    if isinstance(path_or_array, (str, Path)):
        path = Path(path_or_array)
        if not path.exists():
            return False
        if path.is_file():
            if path.suffix != ".npy":
                return False
            try:
                return np.load(path, mmap_mode="r", allow_pickle=False).ndim in (4, 5)
            except Exception:
                return False
        import zarr

        try:
            node = zarr.open(str(path), mode="r")
        except Exception:
            return False
        if isinstance(node, zarr.Group):
            name = array or "keys"
            if name not in node:
                return False
            node = node[name]
            if isinstance(node, zarr.Group):
                return True
        return len(node.shape) in (4, 5)
    shape = getattr(path_or_array, "shape", None)
    return shape is not None and len(shape) in (4, 5)


def _check_subset_args(heads: Any, n_heads: Any) -> None:
    if heads is not None and isinstance(heads, (int, np.integer)) and not isinstance(heads, bool):
        raise ConfigError(
            f"heads = {heads!r}: heads is a list of head indices to read (e.g. heads=[0, 2]; "
            "CLI --heads 0,2); the head count of a 2-D (n, H*d) array is n_heads=H "
            "(CLI --n-heads H)."
        )


def _read_tokens(root: Any, n: int, label: str) -> Segments:
    """Segments from ``tokens/window`` and ``tokens/pos`` (both optional)."""
    import zarr

    if "tokens" not in root or not isinstance(root["tokens"], zarr.Group):
        return Segments.single(n)
    tok = root["tokens"]
    window = np.asarray(tok["window"][...]) if "window" in tok else None
    pos = np.asarray(tok["pos"][...]) if "pos" in tok else None
    return Segments.from_tokens(window, pos, n, f"{label}/tokens")


def open_kv(
    path_or_array: Any,
    *,
    n_heads: int | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    query_heads: Sequence[int] | None = None,
    values: bool = False,
    batch: int | None = None,
    array: str | None = None,
) -> MultiHeadSource:
    """Open a KV cache read-only, as it comes (layout: docs/real-caches.md).

    Parameters
    ----------
    path_or_array
        A path (``.npy``, zarr array, zarr group in the cache layout), an in-memory numpy /
        dask / zarr array or CPU torch tensor (``(L, H, n, d)``, ``(B, L, H, n, d)``,
        ``(H, n, d)`` or ``(n, H·d)``), or a transformers cache (a tuple per layer of
        ``(k, v)`` tensors ``(batch, kv_heads, seq, head_dim)``, or a ``DynamicCache``).
    n_heads
        The head count of a 2-D ``(n, H·d)`` array; per-layer zarr arrays carry it as their
        ``n_heads`` attribute (or the legacy group attribute ``heads``).
    layers, heads
        Real layer indices and KV-head indices to read (None: all). Only those arrays and
        columns are read.
    query_heads
        Query heads of ``queries/layer_{l}`` to attach (None: all; only ``evaluate`` reads
        them).
    values
        Also stream ``values/layer_{l}`` (or the transformers values); False reads keys
        only.
    batch
        The sequence of a batched input (5-D arrays, transformers tensors); needed when
        the batch axis is longer than 1.
    array
        The key entry of a zarr group (default ``"keys"``).

    Examples
    --------
    >>> import numpy as np
    >>> src = open_kv(np.zeros((10, 8), dtype=np.float32) + 1, n_heads=2)
    >>> (src.layers, src.heads, src.n, src.d)
    (1, 2, 10, 4)
    >>> open_kv(np.ones((4, 2, 10, 3), dtype=np.float32), layers=[1, 3]).layer_ids
    (1, 3)
    """
    _check_subset_args(heads, n_heads)
    reopen = {"n_heads": n_heads, "layers": layers, "heads": heads, "values": values,
              "batch": batch}
    pick = {"layers": layers, "heads": heads}
    if isinstance(path_or_array, MultiHeadSource):
        return path_or_array
    if isinstance(path_or_array, KeySource):
        return MultiHeadSource(
            part_of_array(path_or_array.keys, n_heads=n_heads, batch=batch,
                          label=path_or_array.label, **pick),
            label=path_or_array.label,
            path=path_or_array.path,
            array_name=path_or_array.array_name,
            reopen=reopen,
        )
    entries = transformers_entries(path_or_array)
    if entries is not None:
        label = f"<{type(path_or_array).__name__} cache>"
        keys = part_of_tensors(entries[0], batch=batch, label=label, **pick)
        vals = part_of_tensors(entries[1], batch=batch, label=f"{label} values",
                               **pick) if values else None
        return MultiHeadSource(keys, values=vals, label=label, reopen=reopen)
    if not isinstance(path_or_array, (str, Path)):
        if not hasattr(path_or_array, "shape") or not hasattr(path_or_array, "dtype"):
            raise InvalidInputError(
                f"cannot open {type(path_or_array).__name__} as a KV cache: pass a path, an "
                "array or tensor, or a transformers cache."
            )
        label = f"<{type(path_or_array).__name__}>"
        part = part_of_array(path_or_array, n_heads=n_heads, batch=batch, label=label, **pick)
        return MultiHeadSource(part, label=label, reopen=reopen)
    path = Path(path_or_array)
    label = str(path)
    if not path.exists():
        raise InvalidInputError(f"{label}: no such file or directory.")
    if path.is_file():
        if path.suffix != ".npy":
            raise InvalidInputError(f"{label}: expected a .npy file or a zarr directory.")
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        part = part_of_array(arr, n_heads=n_heads, batch=batch, label=label, **pick)
        return MultiHeadSource(part, label=label, path=label, reopen=reopen)
    import zarr

    node = _zarr_node(path)
    if isinstance(node, zarr.Array):
        part = part_of_array(node, n_heads=n_heads, batch=batch, label=label, **pick)
        return MultiHeadSource(part, label=label, path=label, reopen=reopen)
    name = array or "keys"
    if name not in node:
        raise InvalidInputError(f"{label}: zarr group has no {name!r} entry.")
    entry = node[name]
    where = f"{label}[{name}]"
    if isinstance(entry, zarr.Array):
        part = part_of_array(entry, n_heads=n_heads, batch=batch, label=where, **pick)
        return MultiHeadSource(part, label=where, path=label, array_name=name, reopen=reopen)
    legacy = dict(entry.attrs).get("heads", dict(node.attrs).get("heads"))

    def layered(group: Any, what: str, count: int | None, chosen: Any) -> Part:
        arrays, attrs, names = zarr_layer_arrays(group, f"{label}[{what}]")
        if count is None and legacy is not None and all("n_heads" not in a
                                                        for a in attrs.values()):
            count = int(legacy)
        return part_of_layer_arrays(arrays, n_heads=count, layers=layers, heads=chosen,
                                    label=f"{label}[{what}]", attrs=attrs, names=names)

    keys = layered(entry, name, n_heads, heads)
    vals = qs = None
    if name == "keys" and values and "values" in node and isinstance(node["values"],
                                                                       zarr.Group):
        vals = layered(node["values"], "values", keys.n_heads_total, heads)
    if name == "keys" and "queries" in node and isinstance(node["queries"], zarr.Group):
        qs = layered(node["queries"], "queries", None, query_heads)
    model = dict(node.attrs).get("model")
    return MultiHeadSource(
        keys, values=vals, label=where, path=label, array_name=name,
        model=model if isinstance(model, dict) else None,
        segments=_read_tokens(node, keys.n, label), queries=qs, reopen=reopen,
    )


def open_source(
    path_or_array: Any,
    *,
    array: str | None = None,
    n_heads: int | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    batch: int | None = None,
) -> KeySource | MultiHeadSource:
    """``open_kv`` when a cache option is given or the input is a cache, else ``open_keys``."""
    from streamattn.source import open_keys

    opts = {"n_heads": n_heads, "layers": layers, "heads": heads, "batch": batch}
    if any(v is not None for v in opts.values()) or is_multihead(path_or_array, array):
        return open_kv(path_or_array, array=array, **opts)
    return open_keys(path_or_array, array=array)

# ---------------------------------------------------------------------------- operator
@dataclass(frozen=True)
class MultiHeadSpec:
    """``layers × heads`` inner operators; ``inner`` encodes their specs (any family)."""

    layers: int
    heads: int
    inner: np.ndarray


def _empty_state(op: Operator) -> State:
    return {
        "family": np.array(op.family),
        "format_version": np.array(op.format_version, dtype=np.int64),
        "covered": RowRanges().to_array(),
        **spec_to_state(op.spec),
    }


def _split_prefixed(state: State) -> dict[tuple[int, int], State]:
    out: dict[tuple[int, int], State] = {}
    for key, value in state.items():
        head, _, rest = key.partition("|")
        layer, h = head.split(".")
        out.setdefault((int(layer), int(h)), {})[rest] = value
    return out


class MultiHead(Operator):
    """One operator per (layer, head), fed from one read of each block.

    ``update`` takes blocks with rows ``(r, layers, heads, d)`` and folds the slice
    ``rows[:, l, h]`` (contiguous) into head (l, h)'s operator: a loop over heads per
    block, block-level BLAS inside each. ``merge``, states and results are per head.
    Memory: the sum of the heads' bounds (``layers × heads`` × the single-head bound).
    """

    family = "multi-head"
    Spec = MultiHeadSpec
    needs_values = True

    def __init__(self, spec: MultiHeadSpec) -> None:
        super().__init__(spec)
        empties = _split_prefixed(decode_state(spec.inner))
        self.ops = [
            [Operator.from_state(empties[(layer, h)]) for h in range(spec.heads)]
            for layer in range(spec.layers)
        ]

    @classmethod
    def of(cls, ops: list[list[Operator]]) -> MultiHead:
        """Wrap empty per-head operators ``ops[layer][head]`` (any families)."""
        layers, heads = len(ops), len(ops[0])
        if any(len(row) != heads for row in ops):
            raise ConfigError("every layer needs the same number of head operators.")
        flat: State = {}
        for layer, row in enumerate(ops):
            for h, op in enumerate(row):
                for key, value in _empty_state(op).items():
                    flat[f"{layer}.{h}|{key}"] = value
        return cls(MultiHeadSpec(layers, heads, encode_state(flat)))

    def _heads(self) -> Iterator[tuple[int, int, Operator]]:
        for layer, row in enumerate(self.ops):
            for h, op in enumerate(row):
                yield layer, h, op

    def _update(self, block: Block) -> None:
        rows = block.rows
        want = (self.spec.layers, self.spec.heads)
        if rows.ndim != 4 or rows.shape[1:3] != want:
            raise InvalidInputError(
                f"multi-head operator for {want[0]} layers x {want[1]} heads got a block of "
                f"shape {rows.shape}; expected (rows, {want[0]}, {want[1]}, d)."
            )
        vals = block.values
        for layer, h, op in self._heads():
            op.update(Block(block.start, rows[:, layer, h],
                            None if vals is None else vals[:, layer, h]))

    def _merge(self, other: MultiHead) -> None:
        for layer, h, op in self._heads():
            op.merge(other.ops[layer][h])

    def _state(self) -> State:
        out: State = {}
        for layer, h, op in self._heads():
            for key, value in op.to_state().items():
                out[f"{layer}.{h}|{key}"] = value
        return out

    def _load(self, state: State) -> None:
        for (layer, h), sub in _split_prefixed(state).items():
            self.ops[layer][h] = Operator.from_state(sub)

    def result(self) -> list[list[Any]]:
        """``result()[layer][head]``: each head operator's result."""
        return [[op.result() for op in row] for row in self.ops]

    def nbytes_bound(self, d: int) -> int:
        return sum(op.nbytes_bound(d) for _, _, op in self._heads())


# ---------------------------------------------------------------------------- results
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


# ---------------------------------------------------------------------------- universal sets
def multihead_universal_sets(
    source: MultiHeadSource,
    selections: list[Any],
    *,
    chunk_rows: int,
    checkpoint: Any = None,
    **run: Any,
) -> list[MultiHeadResult]:
    """Universal sets of every (layer, head) of a cache, in the passes of one head.

    Pass 1 folds each block into one ``LeverageScores`` per (selection, layer, head);
    budget selections for which some head cannot certify its top-B from pass 1 get one
    shared second pass (``TopScores`` per head; heads already certified keep their pass-1
    answer, so every head's set is the one a single-head run would give). Each head's
    result is ``universal.finish_selection`` of its own pass results.
    """
    from streamattn.engines import run_operators
    from streamattn.operators.leverage import (
        LeverageScores,
        LeverageSpec,
        TopScores,
        TopScoresSpec,
    )
    from streamattn.universal import finish_selection, needs_second_pass

    run = dict(run, chunk_rows=chunk_rows, checkpoint=checkpoint)
    if run.get("engine", "local") != "local" and (
        source.path is None or source.declared or source.subset
    ):
        raise ConfigError(
            f"{source.label}: the {run['engine']} engine's workers open a KV cache by path "
            "and read all of it with its head layout from disk (a 4-D array or "
            "keys/layer_{l} arrays with an n_heads attribute); an in-memory cache, a 2-D "
            "array split by a declared n_heads, or a layers/heads subset runs on engine: "
            "local."
        )
    grid = [(layer, h) for layer in range(source.layers) for h in range(source.heads)]
    thresholds = [sel.pruning_threshold(source.d) for sel in selections]
    ops = [
        MultiHead.of(
            [
                [LeverageScores(LeverageSpec(t, sel.variant == "affine", sel.rtol))
                 for _ in range(source.heads)]
                for _ in range(source.layers)
            ]
        )
        for sel, t in zip(selections, thresholds, strict=True)
    ]
    run_operators(source, ops, description="leverage", **run)
    firsts = [op.result() for op in ops]
    second: dict[int, MultiHead] = {}
    for i, (sel, t, res) in enumerate(zip(selections, thresholds, firsts, strict=True)):
        if any(needs_second_pass(sel, t, res[lay][h]) for lay, h in grid):
            second[i] = MultiHead.of(
                [
                    [TopScores(TopScoresSpec(sel.budget, head["scoring_map"].w,
                                             sel.variant == "affine"))
                     for head in row]
                    for row in res
                ]
            )
    if second:
        run_operators(source, list(second.values()), description="top-B", **run)
    out = []
    for i, (sel, t, res) in enumerate(zip(selections, thresholds, firsts, strict=True)):
        items = [[None] * source.heads for _ in range(source.layers)]
        for lay, h in grid:
            first = res[lay][h]
            top = None
            if i in second and needs_second_pass(sel, t, first):
                top = second[i].ops[lay][h].result()
            items[lay][h] = finish_selection(
                source.head(lay, h), sel, t, first, top,
                chunk_rows=chunk_rows, engine=run.get("engine", "local"),
            )
        out.append(MultiHeadResult(items, source.layer_ids, source.head_ids))
    return out
