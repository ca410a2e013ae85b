"""KV caches as they come: array layouts, layer/head subsets, torch and transformers inputs.

A cache is read as a :class:`Part` (the keys, the values or the queries of a cache): a
choice of layers and heads of one of these layouts,

- ``"lhnd"``: one array ``(layers, heads, n, d)`` (a 5-D ``(batch, layers, heads, n, d)``
  array is read at one ``batch``);
- ``"hnd"``: one array ``(heads, n, d)`` (one layer);
- ``"layers"``: one 2-D array ``(n, heads·d)`` per layer, head ``h`` in columns
  ``[h·d, (h+1)·d)`` (the zarr layout of docs/real-caches.md, and a plain 2-D array split
  by a declared ``n_heads``);
- ``"layer-hnd"``: one 3-D array ``(heads, n, d)`` per layer (a transformers cache: a
  tuple per layer of ``(k, v)`` tensors ``(batch, kv_heads, n, d)``, read at ``batch``).

``Part.read(start, stop)`` returns rows ``[start, stop)`` of the chosen heads as an
``(r, layers, heads, d)`` view of an ``(layers, heads, r, d)`` buffer, one read per array
and only the columns of the chosen heads (zarr reads only the chunks holding them). Torch
tensors (CPU; any float dtype, bfloat16 included) are read block by block and upcast to
float32 (float64 stays float64); torch is imported only when a tensor is passed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamattn.errors import ConfigError, InvalidInputError
from streamattn.sources.keys import MemmapRows, _check_float_array, block_buffer

LAYER_NAME = re.compile(r"^layer_(\d+)$")


# ---------------------------------------------------------------------------- adapters
def is_torch(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (checked without importing torch)."""
    return type(x).__module__.split(".")[0] == "torch"


class TorchArray:
    """A read-only view of a CPU torch tensor with numpy-style ``shape``/``dtype``/slicing.

    ``dtype`` is the numpy dtype blocks come out in: float16/float32/float64 as they are,
    bfloat16 (and other float types numpy lacks) as float32. Each ``x[key]`` converts only
    the indexed part.
    """

    def __init__(self, tensor: Any, label: str) -> None:
        import torch

        if not tensor.is_floating_point():
            raise InvalidInputError(
                f"{label}: torch tensor of dtype {tensor.dtype}; keys must be floating point."
            )
        if tensor.device.type != "cpu":
            raise InvalidInputError(
                f"{label}: torch tensor on {tensor.device}; move it to the CPU first "
                "(tensor.cpu()) — streamattn reads host memory block by block."
            )
        native = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
        self._tensor = tensor.detach()
        self._native = tensor.dtype in native
        self.dtype = np.dtype(native.get(tensor.dtype, np.float32))
        self.shape = tuple(int(s) for s in tensor.shape)
        self.ndim = len(self.shape)
        self.source_dtype = str(tensor.dtype).removeprefix("torch.")

    def __getitem__(self, key: Any) -> np.ndarray:
        part = self._tensor[key]
        if not self._native:
            part = part.float()
        return np.asarray(part.numpy())


class BatchView:
    """``base[batch]`` without reading it: indexing prepends the batch index."""

    def __init__(self, base: Any, batch: int) -> None:
        self.base, self.batch = base, batch
        self.shape = tuple(int(s) for s in base.shape[1:])
        self.ndim = len(self.shape)
        self.dtype = base.dtype
        chunks = getattr(base, "chunks", None)
        self.chunks = None if chunks is None else tuple(chunks)[1:]

    def __getitem__(self, key: Any) -> Any:
        key = key if isinstance(key, tuple) else (key,)
        return self.base[(self.batch, *key)]


def as_array(x: Any, label: str) -> Any:
    """Torch tensors wrapped as :class:`TorchArray`; anything else as it is."""
    return TorchArray(x, label) if is_torch(x) else x


def _compute(x: Any) -> np.ndarray:
    if type(x).__module__.startswith("dask."):
        x = x.compute()
    return np.asarray(x)


def _pick_batch(arr: Any, batch: int | None, label: str) -> Any:
    size = int(arr.shape[0])
    if batch is None:
        if size != 1:
            raise ConfigError(
                f"{label}: the cache has a batch axis of size {size}; choose one sequence "
                "with batch=B (CLI: --batch B, config: input.batch)."
            )
        batch = 0
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or not (
        0 <= batch < size
    ):
        raise ConfigError(f"{label}: batch must be an integer in [0, {size}), got {batch!r}.")
    return BatchView(arr, int(batch))


# ---------------------------------------------------------------------------- choosing
def _choose(
    available: Sequence[int], wanted: Sequence[int] | None, what: str, label: str
) -> list[int]:
    """Positions (into ``available``) of the ``wanted`` real indices (None: all)."""
    if wanted is None:
        return list(range(len(available)))
    if isinstance(wanted, (str, bytes)) or not isinstance(wanted, Sequence):
        raise ConfigError(f"{label}: {what} must be a list of indices, got {wanted!r}.")
    out = []
    for w in wanted:
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w not in available:
            raise ConfigError(
                f"{label}: {what[:-1]} {w!r} is not in the cache; it has {what} "
                f"{list(available)}."
            )
        out.append(list(available).index(int(w)))
    if len(set(out)) != len(out) or not out:
        raise ConfigError(f"{label}: {what} must be distinct and non-empty, got {list(wanted)}.")
    return out


def _split_width(width: int, n_heads: Any, label: str) -> int:
    if n_heads is None:
        raise ConfigError(
            f"{label}: a 2-D key array of width {width} needs a declared head count to be "
            "read as a KV cache (an n_heads attribute on the array, n_heads: H in the input "
            "config, --n-heads H on the CLI, n_heads=H in Python)."
        )
    if isinstance(n_heads, bool) or not isinstance(n_heads, (int, np.integer)) or n_heads < 1:
        raise ConfigError(f"{label}: n_heads must be an integer >= 1, got {n_heads!r}.")
    if width % n_heads:
        raise ConfigError(
            f"{label}: n_heads = {n_heads} does not divide the key width {width} "
            f"({width} / {n_heads} = {width / n_heads:g}); each head needs d_head = width / "
            "n_heads columns. Check the n_heads setting."
        )
    return width // int(n_heads)


def _runs(positions: Sequence[int]) -> list[tuple[int, int, int]]:
    """Contiguous runs ``(first output slot, first position, length)`` of ``positions``."""
    out: list[tuple[int, int, int]] = []
    for slot, p in enumerate(positions):
        if out and out[-1][1] + out[-1][2] == p:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((slot, p, 1))
    return out


# ---------------------------------------------------------------------------- the part
@dataclass(frozen=True)
class Part:
    """Chosen layers × heads of one cache array set (see the module docstring).

    ``layer_ids`` / ``head_ids`` are the real indices (what outputs report); ``layer_pos``
    and ``head_pos`` where they sit in the arrays. ``attrs`` holds each chosen layer's
    array attributes (``attn_scaling``, ``post_rope``, ...), ``n_heads_total`` the heads
    per layer in the store.
    """

    arrays: tuple[Any, ...]
    layout: str
    layer_ids: tuple[int, ...]
    head_ids: tuple[int, ...]
    layer_pos: tuple[int, ...]
    head_pos: tuple[int, ...]
    n: int
    d: int
    n_heads_total: int
    attrs: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    @property
    def layers(self) -> int:
        return len(self.layer_ids)

    @property
    def heads(self) -> int:
        return len(self.head_ids)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.arrays[0].dtype)

    @property
    def row_axis(self) -> int:
        """The axis of each array holding the key rows."""
        return {"lhnd": 2, "hnd": 1, "layer-hnd": 1}.get(self.layout, 0)

    @property
    def full(self) -> bool:
        """Whether every head of every array is chosen (one plain slice per array)."""
        return list(self.head_pos) == list(range(self.n_heads_total))

    def shapes(self) -> tuple[int, ...]:
        return (self.n, self.layers, self.heads, self.d)

    def _rows(self, arr: Any, rows: slice | np.ndarray) -> Any:
        """``arr[rows]`` along the first axis (orthogonal selection for zarr)."""
        if isinstance(rows, slice):
            return arr[rows]
        get = getattr(arr, "get_orthogonal_selection", None)
        if get is not None and getattr(arr, "ndim", 0) >= 1:
            return get((rows, *([slice(None)] * (len(arr.shape) - 1))))
        return arr[rows]

    def _layer_block(self, arr: Any, rows: slice | np.ndarray, r: int) -> np.ndarray:
        """(heads, r, d) of the chosen heads from one per-layer array."""
        if self.layout == "layer-hnd":
            if self.full:
                return _compute(arr[:, rows])
            return np.stack([_compute(arr[p, rows]) for p in self.head_pos])
        out = np.empty((self.heads, r, self.d), dtype=self.dtype)
        for slot, p, count in _runs(self.head_pos):
            cols = slice(p * self.d, (p + count) * self.d)
            get = getattr(arr, "get_orthogonal_selection", None)
            if isinstance(rows, slice):
                x = _compute(arr[rows, cols])
            elif get is not None:
                x = _compute(get((rows, cols)))
            else:
                x = _compute(arr[rows][:, cols])
            if x.shape[0] != r:
                raise InvalidInputError(
                    f"returned {x.shape[0]} rows, expected {r}; the store changed or is "
                    "truncated."
                )
            out[slot : slot + count] = x.reshape(r, count, self.d).transpose(1, 0, 2)
        return out

    def _gather(self, rows: slice | np.ndarray, r: int) -> np.ndarray:
        direct = MemmapRows.of(self.arrays[0]) if self.layout in ("lhnd", "hnd") else None
        layers = 1 if self.layout == "hnd" else int(self.arrays[0].shape[0])
        whole = self.full and list(self.layer_pos) == list(range(layers))
        if direct is not None and whole and isinstance(rows, slice):
            # a .npy memmap: read into a block buffer, not mapped (RSS would grow with n)
            buf = direct(rows.start, rows.stop, block_buffer(
                (*direct.shape[:-2], r, direct.shape[-1]), direct.dtype, "key"))
            return buf if self.layout == "lhnd" else buf[None]
        if self.layout == "lhnd":
            arr = self.arrays[0]
            if self.full and list(self.layer_pos) == list(range(int(arr.shape[0]))):
                buf = _compute(arr[:, :, rows])
            else:
                buf = np.stack([
                    np.stack([_compute(arr[lp, hp, rows]) for hp in self.head_pos])
                    for lp in self.layer_pos
                ])
        elif self.layout == "hnd":
            arr = self.arrays[0]
            buf = (_compute(arr[:, rows]) if self.full else
                   np.stack([_compute(arr[hp, rows]) for hp in self.head_pos]))[None]
        else:
            buf = np.stack([self._layer_block(arr, rows, r) for arr in self.arrays])
        if buf.ndim != 4 or buf.shape[2] != r:
            got = buf.shape[2] if buf.ndim == 4 else buf.shape[0]
            raise InvalidInputError(
                f"returned {got} rows, expected {r}; the store changed or is truncated."
            )
        return buf

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)``: an ``(r, layers, heads, d)`` view (heads contiguous)."""
        return self._gather(slice(start, stop), stop - start).transpose(2, 0, 1, 3)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given (sorted, unique) rows: ``(s, layers, heads, d)``."""
        return self._gather(np.asarray(rows, dtype=np.int64), len(rows)).transpose(2, 0, 1, 3)


def part_of_array(
    arr: Any,
    *,
    n_heads: int | None,
    layers: Sequence[int] | None,
    heads: Sequence[int] | None,
    batch: int | None,
    label: str,
) -> Part:
    """A 2-D ``(n, H·d)`` (declared ``n_heads``), 3-D, 4-D or 5-D (batch) array."""
    arr = as_array(arr, label)
    if len(arr.shape) == 5:
        arr = _pick_batch(arr, batch, label)
    shape = tuple(int(s) for s in arr.shape)
    _check_float_array(arr, label)
    if len(shape) in (3, 4):
        *lead, h, n, d = shape
        if n_heads is not None and n_heads != h:
            raise ConfigError(f"{label}: n_heads = {n_heads} declared, but the array has {h} "
                              "heads.")
        n_layers = lead[0] if lead else 1
        lpos = _choose(range(n_layers), layers, "layers", label)
        hpos = _choose(range(h), heads, "heads", label)
        return Part((arr,), "lhnd" if lead else "hnd", tuple(lpos), tuple(hpos), tuple(lpos),
                    tuple(hpos), n, d, h, tuple({} for _ in lpos))
    if len(shape) == 2:
        n, width = shape
        d = _split_width(width, n_heads, label)
        _choose([0], layers, "layers", label)
        hpos = _choose(range(int(n_heads or 0)), heads, "heads", label)
        return Part((arr,), "layers", (0,), tuple(hpos), (0,), tuple(hpos), n, d,
                    int(n_heads or 0), ({},))
    raise InvalidInputError(
        f"{label}: a KV cache is (layers, heads, n, d), (batch, layers, heads, n, d), "
        f"(heads, n, d) or (n, heads*d) with a declared n_heads; got shape {shape}."
    )


def part_of_layer_arrays(
    arrays: dict[int, Any],
    *,
    n_heads: int | None,
    layers: Sequence[int] | None,
    heads: Sequence[int] | None,
    label: str,
    attrs: dict[int, dict[str, Any]] | None = None,
    names: dict[int, str] | None = None,
) -> Part:
    """Per-layer arrays keyed by their real layer index: 2-D ``(n, H·d)`` or 3-D ``(H, n, d)``.

    Every chosen layer must have the same shape and dtype (all heads stream with one
    precision). ``attrs``: per-layer attributes (``n_heads``, ``head_dim``, ...).
    """
    attrs = attrs or {}
    names = names or {lay: f"layer_{lay}" for lay in arrays}
    ids = sorted(arrays)
    chosen = [ids[p] for p in _choose(ids, layers, "layers", label)]
    chosen_arrays = [arrays[lay] for lay in chosen]
    dtypes = {names[lay]: str(np.dtype(a.dtype)) for lay, a in zip(chosen, chosen_arrays,
                                                                     strict=True)}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in dtypes.items())
        raise InvalidInputError(
            f"{label}: mixed dtypes across layers ({listing}); every layer must have one "
            "dtype so all heads stream with the same precision. Convert the odd layers."
        )
    shapes = {names[lay]: tuple(int(s) for s in a.shape)
              for lay, a in zip(chosen, chosen_arrays, strict=True)}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in shapes.items())
        raise InvalidInputError(f"{label}: layers differ in shape ({listing}).")
    for lay, a in zip(chosen, chosen_arrays, strict=True):
        _check_float_array(a, f"{label}/{names[lay]}")
    shape = shapes[names[chosen[0]]]
    if len(shape) == 3:
        h, n, d = shape
        layout = "layer-hnd"
    elif len(shape) == 2:
        n, width = shape
        declared = {int(v) for lay in chosen
                    if (v := attrs.get(lay, {}).get("n_heads")) is not None}
        if n_heads is None and len(declared) == 1:
            n_heads = int(declared.pop())
        elif n_heads is None and len(declared) > 1:
            raise InvalidInputError(
                f"{label}: layers declare different n_heads {sorted(declared)}; every layer "
                "needs the same head count."
            )
        d = _split_width(width, n_heads, label)
        h = int(n_heads)  # type: ignore[arg-type]
        layout = "layers"
        for lay in chosen:
            hd = attrs.get(lay, {}).get("head_dim")
            if hd is not None and int(hd) != d:
                raise InvalidInputError(
                    f"{label}/{names[lay]}: head_dim attribute {hd} does not match width "
                    f"{width} / n_heads {h} = {d}."
                )
    else:
        raise InvalidInputError(
            f"{label}/{names[chosen[0]]}: expected (n, heads*d_head), got {shape}."
        )
    hpos = _choose(range(h), heads, "heads", label)
    return Part(tuple(chosen_arrays), layout, tuple(chosen), tuple(hpos),
                tuple(range(len(chosen))), tuple(hpos), n, d, h,
                tuple(dict(attrs.get(lay, {})) for lay in chosen))


def zarr_layer_arrays(
    group: Any, label: str
) -> tuple[dict[int, Any], dict[int, dict[str, Any]], dict[int, str]]:
    """The ``layer_{l}`` arrays of a zarr group by real layer index (attribute ``layer``,
    else the number in the name), with their attributes."""
    import zarr

    members = dict(group.members())
    bad = sorted(k for k in members if not LAYER_NAME.match(k))
    if not members or bad:
        raise InvalidInputError(
            f"{label}: expected arrays named layer_{{l}} (any subset of layers); found "
            f"{sorted(members)}."
        )
    arrays: dict[int, Any] = {}
    attrs: dict[int, dict[str, Any]] = {}
    names: dict[int, str] = {}
    for name, arr in members.items():
        if not isinstance(arr, zarr.Array):
            raise InvalidInputError(f"{label}/{name}: every layer_{{l}} must be an array.")
        meta: dict[str, Any] = dict(arr.attrs)
        m = LAYER_NAME.match(name)
        assert m is not None
        declared = meta.get("layer")
        if declared is not None and (isinstance(declared, bool) or not isinstance(declared, int)):
            raise InvalidInputError(
                f"{label}/{name}: the 'layer' attribute must be an integer, got {declared!r}."
            )
        layer = int(declared) if declared is not None else int(str(m.group(1)))
        if layer in arrays:
            raise InvalidInputError(f"{label}: {names[layer]} and {name} both hold layer {layer}.")
        arrays[layer], attrs[layer], names[layer] = arr, meta, name
    return arrays, attrs, names


# ---------------------------------------------------------------------------- transformers
def transformers_entries(obj: Any) -> tuple[list[Any], list[Any]] | None:
    """(keys, values) per layer of a transformers cache, or None if ``obj`` is not one.

    Accepts the legacy tuple of ``(k, v)`` per layer and a ``DynamicCache`` (``layers``
    with ``.keys``/``.values``, or the older ``key_cache``/``value_cache`` lists).
    """
    if isinstance(obj, (tuple, list)) and obj and all(
        isinstance(e, (tuple, list)) and len(e) >= 2 and hasattr(e[0], "shape") for e in obj
    ):
        return [e[0] for e in obj], [e[1] for e in obj]
    layers = getattr(obj, "layers", None)
    if isinstance(layers, (list, tuple)) and layers and hasattr(layers[0], "keys") and hasattr(
        getattr(layers[0], "keys", None), "shape"
    ):
        return [lay.keys for lay in layers], [lay.values for lay in layers]
    kc, vc = getattr(obj, "key_cache", None), getattr(obj, "value_cache", None)
    if isinstance(kc, list) and kc and isinstance(vc, list):
        return list(kc), list(vc)
    return None


def part_of_tensors(
    tensors: list[Any],
    *,
    layers: Sequence[int] | None,
    heads: Sequence[int] | None,
    batch: int | None,
    label: str,
) -> Part:
    """Per-layer ``(batch, kv_heads, n, d)`` tensors (transformers layout) at ``batch``."""
    arrays: dict[int, Any] = {}
    for lay, t in enumerate(tensors):
        where = f"{label}[layer {lay}]"
        x = as_array(t, where)
        if len(x.shape) != 4:
            raise InvalidInputError(
                f"{where}: expected (batch, kv_heads, seq, head_dim), got {tuple(x.shape)}."
            )
        arrays[lay] = _pick_batch(x, batch, where)
    return part_of_layer_arrays(arrays, n_heads=None, layers=layers, heads=heads, label=label)
