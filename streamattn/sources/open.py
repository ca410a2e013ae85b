"""One entry point that opens any key input: a single-head store or a whole KV cache."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from streamattn.errors import InvalidInputError, StreamattnError
from streamattn.sources.cache_layout import TorchArray, is_torch
from streamattn.sources.keys import KeySource, check_array_name, open_key_source
from streamattn.sources.kvcache import MultiHeadSource, is_multihead, open_kv


def open_keys(path_or_array: Any, array: str | None = None, *, fill_missing: bool = False
              ) -> Any:
    """Open a key store read-only and validate its shape and dtype.

    A whole KV cache (a 4-D array, or a zarr group of ``keys/layer_{l}`` arrays) is
    opened by :func:`streamattn.sources.kvcache.open_kv` and returned as a
    ``MultiHeadSource``; anything else is a single-head ``KeySource``.

    Parameters
    ----------
    path_or_array
        A path to a ``.npy`` file, a zarr array or a zarr group (``keys`` plus optional
        ``values`` and ``queries`` arrays), or an in-memory numpy / dask / zarr array, or
        an existing ``KeySource`` (returned as is).
    array
        Name of the key array inside a zarr group (default ``"keys"``).
    fill_missing
        Read missing zarr chunk files as the fill value (default: a missing chunk file
        is an error naming the chunk and its rows).

    Examples
    --------
    >>> import numpy as np
    >>> src = open_keys(np.ones((10, 4), dtype=np.float32))
    >>> (src.n, src.d)
    (10, 4)
    """
    if isinstance(path_or_array, KeySource):
        return path_or_array
    if array is not None:
        check_array_name(array)

    def open_it() -> Any:
        if is_multihead(path_or_array, array):
            return open_kv(path_or_array, array=array, fill_missing=fill_missing)
        if is_torch(path_or_array):  # CPU tensors of any float dtype, upcast block by block
            return open_key_source(TorchArray(path_or_array, "<Tensor>"), array,
                                   fill_missing=fill_missing)
        return open_key_source(path_or_array, array, fill_missing=fill_missing)

    return _at_the_boundary(path_or_array, open_it)


T = TypeVar("T")


def _at_the_boundary(path_or_array: Any, fn: Callable[[], T]) -> T:
    """Run an open; an OS or metadata error on a path becomes one clear InvalidInputError.

    Unreadable metadata (a ``zarr.json`` without read permission, a data type zarr does not
    know, a corrupt ``.npy`` header) surfaces from zarr/numpy as OSError, ValueError,
    TypeError or KeyError; the user gets the path and the cause, never a traceback.
    """
    try:
        return fn()
    except StreamattnError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as exc:
        if not isinstance(path_or_array, (str, os.PathLike)):
            raise
        raise InvalidInputError(
            f"{os.fspath(path_or_array)}: cannot be opened as a key store "
            f"({type(exc).__name__}: {exc}). Check its metadata (zarr.json / .zarray / .npy "
            "header), its data type (float16/32/64) and its read permissions."
        ) from exc


def open_source(
    path_or_array: Any,
    *,
    array: str | None = None,
    n_heads: int | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    batch: int | None = None,
    fill_missing: bool = False,
) -> KeySource | MultiHeadSource:
    """``open_kv`` when a cache option is given or the input is a cache, else ``open_keys``."""
    if any(v is not None for v in (n_heads, layers, heads, batch)):
        if array is not None:
            check_array_name(array)
        return _at_the_boundary(
            path_or_array,
            lambda: open_kv(path_or_array, array=array, fill_missing=fill_missing,
                            n_heads=n_heads, layers=layers, heads=heads, batch=batch),
        )
    out: KeySource | MultiHeadSource = open_keys(path_or_array, array=array,
                                                 fill_missing=fill_missing)
    return out
