"""One BLAS thread for the streaming kernels, reentrant across threads.

The pass already runs the reader (file reads, decompression) in a background thread; on
a small machine a multi-threaded BLAS then oversubscribes the cores, and OpenBLAS's
spinning worker threads make it dramatically worse (measured on 2 cores: the one-pass
universal set of 2^20 × 128 keys took 3.5 s with one BLAS thread, 66 s with two). The
streaming kernels work on ~2048-row pieces, where a second BLAS thread gains little
even on an idle machine. ``single_blas_thread()`` limits BLAS to one thread while any
caller is inside it (reference-counted, so concurrent Dask threads do not restore the
limit under each other) and restores the previous setting when the last one leaves.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

_lock = threading.Lock()
_depth = 0
_limiter: Any = None


@cache
def _controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextmanager
def single_blas_thread() -> Iterator[None]:
    """Run the body with BLAS limited to one thread (see the module docstring)."""
    global _depth, _limiter
    with _lock:
        if _depth == 0:
            _limiter = _controller().limit(limits=1, user_api="blas")
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _limiter.restore_original_limits()
                _limiter = None
