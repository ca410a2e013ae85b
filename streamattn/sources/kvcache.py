"""Whole KV caches: multi-layer, multi-head key stores read once for every head.

A KV cache holds, per layer ``l`` and head ``h``, an ``n × d_head`` key matrix. Layouts
opened by :func:`open_kv` (and by ``open_keys``, which hands them here):

- a 4-D array ``(layers, heads, n, d)`` (numpy, ``.npy``, zarr array or a group's
  ``keys`` array), or a 3-D array ``(heads, n, d)`` (one layer);
- a 2-D array ``(n, heads·d_head)`` with a declared head split (``heads=8``: columns
  ``[h·d_head, (h+1)·d_head)`` are head ``h``);
- a zarr group with per-layer arrays ``keys/layer_{l}`` of shape ``(n, heads·d_head)``
  (and optionally ``values/layer_{l}`` of shape ``(n, heads·d_v)``), the head count
  declared by ``heads=`` or the group's ``heads`` attribute.

:class:`MultiHeadSource` yields ``Block(start, rows)`` with ``rows`` of shape
``(r, layers, heads, d)``: each block of rows is read once — one read of the 4-D/2-D
array, or one read per layer array — and that one read serves every head's operator.
:class:`streamattn.operators.multihead.MultiHead` wraps one operator per (layer, head)
into a single operator, so the engines, checkpoints and the Dask engine handle a whole
cache without knowing about heads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.errors import ConfigError, InvalidInputError
from streamattn.io.safety import register_input
from streamattn.sources.chunkfiles import ChunkFiles, missing_chunk_message
from streamattn.sources.keys import (
    DEFAULT_BLOCK_ROWS,
    TARGET_BLOCK_BYTES,
    Block,
    BlockStream,
    KeySource,
    _check_float_array,
    _chunk_rows_of,
)

LAYER_NAME = re.compile(r"^layer_(\d+)$")


# ---------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class _Part:
    """The key (or value) arrays of a cache in one layout.

    ``layout`` is ``"lhnd"`` (one 4-D array), ``"hnd"`` (one 3-D array), ``"split"`` (one
    2-D array ``(n, heads·d)``) or ``"layers"`` (one 2-D array per layer).
    """

    arrays: tuple[Any, ...]
    layout: str
    layers: int
    heads: int
    n: int
    d: int

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as an ``(r, layers, heads, d)`` view of an
        ``(layers, heads, r, d)`` buffer (each head's rows contiguous)."""
        r = stop - start
        if self.layout == "lhnd":
            buf = _compute(self.arrays[0][:, :, start:stop])
        elif self.layout == "hnd":
            buf = _compute(self.arrays[0][:, start:stop])[None]
        else:
            parts = [_compute(arr[start:stop]) for arr in self.arrays]
            buf = np.empty((self.layers, self.heads, r, self.d), dtype=parts[0].dtype)
            for layer, x in enumerate(parts):
                if x.shape[0] != r:
                    buf = x  # reported as a truncated read below
                    break
                buf[layer] = x.reshape(r, self.heads, self.d).transpose(1, 0, 2)
        if buf.ndim != 4 or buf.shape[2] != r:
            got = buf.shape[2] if buf.ndim == 4 else buf.shape[0]
            raise InvalidInputError(
                f"reading rows [{start}, {stop}) returned {got} rows; the store changed or "
                "is truncated."
            )
        return buf.transpose(2, 0, 1, 3)

    def shapes(self) -> tuple[int, ...]:
        return (self.n, self.layers, self.heads, self.d)


def _compute(x: Any) -> np.ndarray:
    if type(x).__module__.startswith("dask."):
        x = x.compute()
    return np.asarray(x)


def _split_width(width: int, heads: int | None, label: str) -> int:
    if heads is None:
        raise ConfigError(
            f"{label}: a 2-D key array of width {width} needs a declared head count to be "
            "read as a KV cache (heads: H in the input config, heads=H in Python)."
        )
    if isinstance(heads, bool) or not isinstance(heads, (int, np.integer)) or heads < 1:
        raise ConfigError(f"{label}: heads must be an integer >= 1, got {heads!r}.")
    if width % heads:
        raise ConfigError(
            f"{label}: heads = {heads} does not divide the key width {width} "
            f"({width} / {heads} = {width / heads:g}); each head needs d_head = width / heads "
            "columns. Check the heads setting."
        )
    return width // heads


def _part_of_array(arr: Any, heads: int | None, label: str) -> _Part:
    shape = tuple(int(s) for s in arr.shape)
    _check_float_array(arr, label)
    if len(shape) == 4:
        layers, h, n, d = shape
        if heads is not None and heads != h:
            raise ConfigError(f"{label}: heads = {heads} declared, but the array has {h} heads.")
        return _Part((arr,), "lhnd", layers, h, n, d)
    if len(shape) == 3:
        h, n, d = shape
        if heads is not None and heads != h:
            raise ConfigError(f"{label}: heads = {heads} declared, but the array has {h} heads.")
        return _Part((arr,), "hnd", 1, h, n, d)
    if len(shape) == 2:
        n, width = shape
        return _Part((arr,), "split", 1, int(heads or 0), n, _split_width(width, heads, label))
    raise InvalidInputError(
        f"{label}: a KV cache is (layers, heads, n, d), (heads, n, d) or (n, heads*d) with "
        f"declared heads; got shape {shape}."
    )


def _part_of_layers(group: Any, heads: int | None, label: str) -> _Part:
    """Per-layer arrays ``layer_0 .. layer_{L-1}`` of one zarr group."""
    import zarr

    members = dict(group.members())
    names = sorted(members, key=lambda k: int(m.group(1)) if (m := LAYER_NAME.match(k)) else -1)
    if not names or any(not LAYER_NAME.match(k) for k in names):
        raise InvalidInputError(
            f"{label}: expected arrays named layer_0, layer_1, ...; found {sorted(members)}."
        )
    if [int(LAYER_NAME.match(k).group(1)) for k in names] != list(range(len(names))):  # type: ignore[union-attr]
        raise InvalidInputError(f"{label}: layer arrays must be layer_0 .. layer_{{L-1}}; "
                                f"found {names}.")
    arrays = [members[k] for k in names]
    if not all(isinstance(a, zarr.Array) for a in arrays):
        raise InvalidInputError(f"{label}: every layer_{{l}} must be an array.")
    dtypes = {k: str(a.dtype) for k, a in zip(names, arrays, strict=True)}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in dtypes.items())
        raise InvalidInputError(
            f"{label}: mixed dtypes across layers ({listing}); every layer must have one "
            "dtype so all heads stream with the same precision. Convert the odd layers."
        )
    shapes = {k: tuple(int(s) for s in a.shape) for k, a in zip(names, arrays, strict=True)}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in shapes.items())
        raise InvalidInputError(f"{label}: layers differ in shape ({listing}).")
    for k, a in zip(names, arrays, strict=True):
        _check_float_array(a, f"{label}/{k}")
        if a.ndim != 2:
            raise InvalidInputError(f"{label}/{k}: expected (n, heads*d_head), got {a.shape}.")
    n, width = shapes[names[0]]
    d = _split_width(width, heads, label)
    return _Part(tuple(arrays), "layers", len(arrays), int(heads), n, d)  # type: ignore[arg-type]


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
        return {**self.source.describe(), "layer": self.layer, "head": self.head}


class MultiHeadSource(BlockStream):
    """A validated, read-only KV cache streamed in row blocks for all heads at once.

    Attributes: ``n`` rows, ``d`` = d_head, ``layers``, ``heads``, ``dtype``, ``label``,
    ``path``, ``array_name``, ``layout``. Blocks carry ``rows`` of shape
    ``(r, layers, heads, d)`` (and ``values`` ``(r, layers, heads, d_v)`` when present).
    """

    def __init__(
        self,
        keys: _Part,
        *,
        values: _Part | None = None,
        label: str,
        path: str | None = None,
        array_name: str | None = None,
        fill_missing: bool = False,
    ) -> None:
        if keys.n == 0:
            raise InvalidInputError(f"{label}: the cache has n = 0 rows; nothing to do.")
        if keys.d == 0:
            raise InvalidInputError(f"{label}: the cache has d_head = 0 columns.")
        if values is not None and (values.n, values.layers, values.heads) != (
            keys.n,
            keys.layers,
            keys.heads,
        ):
            raise InvalidInputError(
                f"{label}: values {values.shapes()} do not match keys {keys.shapes()} "
                "(same n, layers and heads needed)."
            )
        self._keys = keys
        self._values = values
        self.label = label
        self.path = path
        self.array_name = array_name
        self.layout = f"kv-{keys.layout}-{keys.layers}x{keys.heads}"
        #: True when the head split comes from a ``heads`` setting, not from the store.
        self.declared = keys.layout == "split"
        self.n, self.d = keys.n, keys.d
        self.layers, self.heads = keys.layers, keys.heads
        self.dtype = np.dtype(keys.arrays[0].dtype)
        self.storage_chunk_rows = _chunk_rows_of(keys.arrays[0]) if keys.layout in (
            "split",
            "layers",
        ) else None
        self.fill_missing = bool(fill_missing)
        axis = {"lhnd": 2, "hnd": 1}.get(keys.layout, 0)
        self._files = [
            (files, what)
            for part, what in ((keys, "key"), (values, "value"))
            if part is not None
            for files in (ChunkFiles.of(a, axis) for a in part.arrays)
            if files is not None
        ]
        if not self.fill_missing:
            self._check_chunks(0, self.n)

    def _check_chunks(self, start: int, stop: int) -> None:
        """Every chunk file holding rows ``[start, stop)`` exists (zarr on local disk)."""
        for files, what in self._files:
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

    def head(self, layer: int, head: int) -> HeadView:
        return HeadView(self, layer, head)

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
            "layout": self._keys.layout,
            "dtype": str(self.dtype),
            "storage_chunk_rows": self.storage_chunk_rows,
            "has_values": self._values is not None,
        }

    def current_shape(self) -> tuple[int, ...]:
        """``(n, layers, heads, d)`` as the store is on disk now (reopened)."""
        if self.path is None:
            return self._keys.shapes()
        return open_kv(self.path, array=self.array_name, heads=self.heads)._keys.shapes()

    # -- reading -------------------------------------------------------------------
    def _read(self, part: _Part, start: int, stop: int, what: str) -> np.ndarray:
        try:
            rows = part.read(start, stop)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{self.label}: {what} {exc}") from exc
        except Exception as exc:
            raise InvalidInputError(
                f"{self.label}: could not read {what} rows [{start}, {stop}): "
                f"{type(exc).__name__}: {exc}. The chunk holding these rows may be corrupt."
            ) from exc
        if not self.fill_missing:
            self._check_chunks(start, stop)
        bad = ~np.isfinite(rows)
        if bad.any():
            r, layer, head = np.argwhere(bad.any(axis=3))[0]
            raise InvalidInputError(
                f"{self.label}: {what} row {start + int(r)} (layer {layer}, head {head}) "
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

    True for a :class:`MultiHeadSource`, a 4-D array (in memory, ``.npy``, zarr) and a
    zarr group whose key entry is a group of per-layer arrays. A 3-D array is ambiguous
    and stays an error for ``open_keys``; open it with ``open_kv`` as (heads, n, d).
    """
    if isinstance(path_or_array, MultiHeadSource):
        return True
    if isinstance(path_or_array, KeySource):
        return False
    if isinstance(path_or_array, (str, Path)):
        path = Path(path_or_array)
        if not path.exists():
            return False
        if path.is_file():
            if path.suffix != ".npy":
                return False
            try:
                return np.load(path, mmap_mode="r", allow_pickle=False).ndim == 4
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
        return len(node.shape) == 4
    shape = getattr(path_or_array, "shape", None)
    return shape is not None and len(shape) == 4


def open_kv(path_or_array: Any, *, heads: int | None = None, array: str | None = None,
            fill_missing: bool = False) -> MultiHeadSource:
    """Open a KV cache read-only (see the module docstring for the layouts).

    Parameters
    ----------
    path_or_array
        A path (``.npy``, zarr array, zarr group) or an in-memory numpy/dask/zarr array.
    heads
        The head count: required for 2-D arrays and per-layer groups without a ``heads``
        attribute; checked against 3-D/4-D arrays.
    array
        The key entry of a zarr group (default ``"keys"``: an array or a group of
        ``layer_{l}`` arrays).
    fill_missing
        Read missing zarr chunk files as the fill value instead of refusing the store.

    Examples
    --------
    >>> import numpy as np
    >>> src = open_kv(np.zeros((10, 8), dtype=np.float32) + 1, heads=2)
    >>> (src.layers, src.heads, src.n, src.d)
    (1, 2, 10, 4)
    """
    if isinstance(path_or_array, MultiHeadSource):
        return path_or_array
    if isinstance(path_or_array, KeySource):
        return MultiHeadSource(
            _part_of_array(path_or_array.keys, heads, path_or_array.label),
            label=path_or_array.label,
            path=path_or_array.path,
            array_name=path_or_array.array_name,
        )
    if not isinstance(path_or_array, (str, Path)):
        if not hasattr(path_or_array, "shape") or not hasattr(path_or_array, "dtype"):
            raise InvalidInputError(
                f"cannot open {type(path_or_array).__name__} as a KV cache: pass a path or "
                "an array."
            )
        label = f"<{type(path_or_array).__name__}>"
        return MultiHeadSource(_part_of_array(path_or_array, heads, label), label=label)
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
        return MultiHeadSource(_part_of_array(arr, heads, label), label=label, path=label)
    import zarr

    fill: dict[str, Any] = {"fill_missing": fill_missing}
    node = _zarr_node(path)
    if isinstance(node, zarr.Array):
        return MultiHeadSource(_part_of_array(node, heads, label), label=label, path=label,
                               **fill)
    name = array or "keys"
    if name not in node:
        raise InvalidInputError(f"{label}: zarr group has no {name!r} entry.")
    entry = node[name]
    where = f"{label}[{name}]"
    if isinstance(entry, zarr.Array):
        return MultiHeadSource(
            _part_of_array(entry, heads, where), label=where, path=label, array_name=name,
            **fill,
        )
    if heads is None:
        heads = _declared_heads(entry, node, where)
    keys = _part_of_layers(entry, heads, where)
    values = None
    if name == "keys" and "values" in node and isinstance(node["values"], zarr.Group):
        values = _part_of_layers(node["values"], keys.heads, f"{label}[values]")
    return MultiHeadSource(keys, values=values, label=where, path=label, array_name=name, **fill)


def _declared_heads(entry: Any, node: Any, where: str) -> int | None:
    """The ``heads`` attribute of a per-layer group (or its parent): a whole number >= 1."""
    declared = dict(entry.attrs).get("heads", dict(node.attrs).get("heads"))
    if declared is None:
        return None
    if isinstance(declared, bool) or not isinstance(declared, int) or declared < 1:
        raise InvalidInputError(
            f"{where}: the 'heads' attribute must be a whole number >= 1, got {declared!r}; "
            "fix the attribute or declare the head count (heads: H / --heads H)."
        )
    return declared
