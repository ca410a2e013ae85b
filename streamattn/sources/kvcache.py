"""Whole KV caches: multi-layer, multi-head key stores read once for every head.

A KV cache holds, per layer ``l`` and head ``h``, an ``n × d_head`` key matrix. Layouts
opened by :func:`open_kv` (and by ``open_keys``, which hands them here; the array layouts
and torch/transformers adapters live in :mod:`streamattn.sources.cache_layout`):

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
:class:`streamattn.operators.multihead.MultiHead` wraps one operator per (layer, head)
into a single operator, so the engines, checkpoints and the Dask engine handle a whole
cache without knowing about heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.errors import ConfigError, InvalidInputError
from streamattn.io.safety import register_input
from streamattn.masks import Segments
from streamattn.sources.cache_layout import (
    Part,
    _compute,
    part_of_array,
    part_of_layer_arrays,
    part_of_tensors,
    transformers_entries,
    zarr_layer_arrays,
)
from streamattn.sources.chunkfiles import ChunkFiles, missing_chunk_message
from streamattn.sources.keys import (
    DEFAULT_BLOCK_ROWS,
    TARGET_BLOCK_BYTES,
    Block,
    BlockStream,
    KeySource,
    MemmapRows,
    _chunk_rows_of,
    _RawChunkReader,
    all_finite,
    block_buffer,
    raw_reader,
    scratch_bytes,
    storage_order,
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

    #: One block read ahead: a cache's block holds every head's rows (94 MB for 30 × 3 ×
    #: 64 float32 at 4096 rows) and its fold takes 3–4× its read, so a second block ahead
    #: only waits in memory. Measured on the 50k synthetic cache (local engine, 5 runs
    #: each, alternating): 2.98–3.33 s and 286 MiB with one, 3.17–3.64 s and 376 MiB with two.
    READ_AHEAD = 1

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
        fill_missing: bool = False,
        values_stored: bool = False,
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
        #: Whether the cache holds values (from its layout, none of them read); they are
        #: opened and streamed only when asked for (``open_kv(values=True)``).
        self.values_stored = values is not None or bool(values_stored)
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
        self.fill_missing = bool(fill_missing)
        #: per part, one direct chunk-file reader per layer array (None: zarr's own read)
        self._raw = {id(part): self._raw_readers(part, what, label)
                     for part, what in ((keys, "key"), (values, "value")) if part is not None}
        found = [
            (files, what, raw is not None)
            for part, what in ((keys, "key"), (values, "value"))
            if part is not None
            for a, raw in zip(part.arrays, self._raw[id(part)], strict=True)
            for files in (ChunkFiles.of(a, part.row_axis),)
            if files is not None
        ]
        self._files = [(files, what) for files, what, _ in found]
        #: the chunk files checked again after each block's read: those of the arrays
        #: zarr reads (it reads a vanished file as fill); a direct read opens every chunk
        #: file of the block itself, and a missing one is an error naming it
        self._files_after_read = [(files, what) for files, what, direct in found if not direct]
        if not self.fill_missing:
            self._check_chunks(0, self.n)

    def _raw_readers(self, part: Part, what: str, label: str
                     ) -> list[_RawChunkReader | MemmapRows | None]:
        if part.layout != "layers" or not part.full:
            return [None] * len(part.arrays)
        out = [raw_reader(a) for a in part.arrays]
        for raw in out:
            if raw is not None:
                raw.fill_missing, raw.label, raw.what = self.fill_missing, label, what
        return out

    def _check_chunks(self, start: int, stop: int, after_read: bool = False) -> None:
        """Every chunk file holding rows ``[start, stop)`` exists (zarr on local disk);
        ``after_read``: only those of arrays not read directly (``_files_after_read``)."""
        for files, what in self._files_after_read if after_read else self._files:
            found = files.first_missing(start, stop)
            if found is not None:
                raise InvalidInputError(missing_chunk_message(self.label, what, found))

    def row_files(self, start: int, stop: int) -> list[str] | None:
        """The files holding rows ``[start, stop)`` (None: not files on local disk)."""
        if self._files:
            return [str(f) for files, _ in self._files for f in files.files(start, stop)]
        if self.path is not None and Path(self.path).is_file():
            return [self.path]
        return None

    @property
    def values_dim(self) -> int:
        return 0 if self._values is None else self._values.d


    def head(self, layer: int, head: int) -> HeadView:
        return HeadView(self, layer, head)

    def reader_scratch_bytes(self) -> int:
        return scratch_bytes(r for readers in self._raw.values() for r in readers)

    def row_nbytes(self) -> int:
        parts = [self._keys] if self._values is None else [self._keys, self._values]
        return int(sum(q.layers * q.heads * q.d for q in parts) * self.dtype.itemsize)

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
            "has_values": self.values_stored,
            "values_opened": self._values is not None,
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
    def _gather(self, part: Part, start: int, stop: int, what: str) -> np.ndarray:
        """Rows ``[start, stop)`` of every chosen head as ``(r, layers, heads, d)``.

        Per-layer ``(n, H·d)`` arrays with every head chosen (the documented layout) are
        read straight into one ``(layers, r, H·d)`` buffer — chunk files of a local zarr
        array by ``preadv`` into it (zstd or blosc ones decompressed into it), a ``.npy``
        file likewise, anything else by one read and one copy per layer; a single in-memory
        layer is a view, not a copy — and the
        block is a strided view of that buffer: head (l, h) is ``rows[:, l, h]``, an
        ``r × d`` view with row stride H·d (no per-head copy; the operators convert
        their pieces to float64 themselves). Other layouts go through ``Part.read``.
        """
        raws = self._raw.get(id(part))
        if part.layout != "layers" or not part.full or raws is None:
            try:
                return part.read(start, stop)
            except InvalidInputError as exc:
                raise InvalidInputError(f"{self.label}: {what} {exc}") from exc
        r, width = stop - start, part.n_heads_total * part.d
        first = part.arrays[0]
        if (len(part.arrays) == 1 and isinstance(first, np.ndarray) and first.ndim == 2
                and raws[0] is None):  # in memory: a view (a .npy memmap is read, not mapped)
            buf = first[start:stop][None]
        else:
            buf = block_buffer((part.layers, r, width), part.dtype, what)
            for lay, (arr, raw) in enumerate(zip(part.arrays, raws, strict=True)):
                if raw is not None:
                    raw(start, stop, out=buf[lay])
                    continue
                x = _compute(arr[start:stop])
                if x.shape != (r, width):
                    raise InvalidInputError(
                        f"{self.label}: {what} rows [{start}, {stop}) of layer "
                        f"{part.layer_ids[lay]}: returned {x.shape[0]} rows, expected {r}; "
                        "the store changed or is truncated."
                    )
                buf[lay] = x
        return buf.reshape(part.layers, r, part.n_heads_total, part.d).transpose(1, 0, 2, 3)

    def _read(self, part: Part, start: int, stop: int, what: str) -> np.ndarray:
        try:
            rows = self._gather(part, start, stop, what)
        except InvalidInputError:
            raise
        except Exception as exc:
            raise InvalidInputError(
                f"{self.label}: could not read {what} rows [{start}, {stop}): "
                f"{type(exc).__name__}: {exc}. The chunk holding these rows may be corrupt."
            ) from exc
        if not self.fill_missing:
            self._check_chunks(start, stop, after_read=True)
        # one pass over the block buffer, no boolean array; the offending row is located
        # only when there is one
        if rows.size and not all_finite(storage_order(rows)):
            bad = ~np.isfinite(rows)
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
    tok: Any = root["tokens"]
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
    fill_missing: bool = False,
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
    fill_missing
        Read missing zarr chunk files as the fill value instead of refusing the store.

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
        return MultiHeadSource(keys, values=vals, label=label, reopen=reopen,
                               values_stored=True)
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
    register_input(path)  # outputs must never be written into, over or around it
    if path.is_file():
        if path.suffix != ".npy":
            raise InvalidInputError(f"{label}: expected a .npy file or a zarr directory.")
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # truncated, object dtype (needs pickle), not an .npy
            raise InvalidInputError(f"{label}: cannot read as .npy: {exc}") from exc
        part = part_of_array(arr, n_heads=n_heads, batch=batch, label=label, **pick)
        return MultiHeadSource(part, label=label, path=label, reopen=reopen)
    import zarr

    reopen["fill_missing"] = fill_missing
    node = _zarr_node(path)
    if isinstance(node, zarr.Array):
        part = part_of_array(node, n_heads=n_heads, batch=batch, label=label, **pick)
        return MultiHeadSource(part, label=label, path=label, reopen=reopen,
                               fill_missing=fill_missing)
    name = array or "keys"
    if name not in node:
        raise InvalidInputError(f"{label}: zarr group has no {name!r} entry.")
    entry = node[name]
    where = f"{label}[{name}]"
    if isinstance(entry, zarr.Array):
        part = part_of_array(entry, n_heads=n_heads, batch=batch, label=where, **pick)
        return MultiHeadSource(part, label=where, path=label, array_name=name, reopen=reopen,
                               fill_missing=fill_missing)
    legacy = _declared_heads(entry, node, where)

    def layered(group: Any, what: str, count: int | None, chosen: Any) -> Part:
        arrays, attrs, names = zarr_layer_arrays(group, f"{label}[{what}]")
        if count is None and legacy is not None and all("n_heads" not in a
                                                        for a in attrs.values()):
            count = int(legacy)
        return part_of_layer_arrays(arrays, n_heads=count, layers=layers, heads=chosen,
                                    label=f"{label}[{what}]", attrs=attrs, names=names)

    keys = layered(entry, name, n_heads, heads)
    vals = qs = None
    # the group's metadata only: a values array is not opened unless asked for
    stored = name == "keys" and "values" in node and isinstance(node["values"], zarr.Group)
    if stored and values:
        vals = layered(node["values"], "values", keys.n_heads_total, heads)
    if name == "keys" and "queries" in node and isinstance(node["queries"], zarr.Group):
        qs = layered(node["queries"], "queries", None, query_heads)
    model = dict(node.attrs).get("model")
    return MultiHeadSource(
        keys, values=vals, label=where, path=label, array_name=name,
        model=model if isinstance(model, dict) else None,
        segments=_read_tokens(node, keys.n, label), queries=qs, reopen=reopen,
        fill_missing=fill_missing, values_stored=stored,
    )


def _declared_heads(entry: Any, node: Any, where: str) -> int | None:
    """The legacy ``heads`` attribute of a per-layer group (or its parent): an int >= 1."""
    declared = dict(entry.attrs).get("heads", dict(node.attrs).get("heads"))
    if declared is None:
        return None
    if isinstance(declared, bool) or not isinstance(declared, int) or declared < 1:
        raise InvalidInputError(
            f"{where}: the 'heads' attribute must be a whole number >= 1, got {declared!r}; "
            "fix the attribute or declare the head count (n_heads: H / --n-heads H)."
        )
    return declared
