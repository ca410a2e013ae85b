"""One entry point that opens any key input: a single-head store or a whole KV cache."""

from __future__ import annotations

from typing import Any

from streamattn.sources.keys import KeySource, open_key_source
from streamattn.sources.kvcache import MultiHeadSource, is_multihead, open_kv


def open_keys(path_or_array: Any, array: str | None = None) -> Any:
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

    Examples
    --------
    >>> import numpy as np
    >>> src = open_keys(np.ones((10, 4), dtype=np.float32))
    >>> (src.n, src.d)
    (10, 4)
    """
    if isinstance(path_or_array, KeySource):
        return path_or_array
    if is_multihead(path_or_array, array):
        return open_kv(path_or_array, array=array)
    return open_key_source(path_or_array, array)


def open_source(
    path_or_array: Any, *, array: str | None = None, heads: int | None = None
) -> KeySource | MultiHeadSource:
    """``open_kv`` when ``heads`` is declared or the input is a cache, else ``open_keys``."""
    if heads is not None:
        return open_kv(path_or_array, heads=heads, array=array)
    out: KeySource | MultiHeadSource = open_keys(path_or_array, array=array)
    return out
