""".npy inputs read into the block buffers, not through their memory mapping (issue 16).

Read through the mapping, every page a pass touched stayed mapped and the process's RSS
grew with n (a 2^22 × 128 ``.npy`` pass peaked at the file's 2 GiB). ``MemmapRows`` reads
the rows with ``preadv`` instead: blocks must equal the array (single head ``(n, d)``,
caches ``(n, H·d)``, ``(H, n, d)`` and ``(L, H, n, d)``, layer and head subsets), no block
may view the mapping, a pass must give the in-memory set, and a file cut short after it
was opened is an error naming the rows.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamattn.errors import InvalidInputError
from streamattn.recipes.universal import universal_set
from streamattn.sources import open_keys, open_kv
from streamattn.sources.keys import MemmapRows

N, D = 1000, 6


def mapped(a: Any) -> bool:
    """Whether ``a`` views a memory-mapped file (its chain of bases reaches an mmap)."""
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


def saved(path: Path, a: np.ndarray) -> Path:
    np.save(path, a)
    return path


def test_a_single_head_npy_is_read_not_mapped(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((N, D)).astype(np.float32)
    src = open_keys(saved(tmp_path / "k.npy", x))
    assert isinstance(src._raw_keys, MemmapRows)
    blocks = list(src.blocks(128))
    assert not any(mapped(b.rows) for b in blocks)
    np.testing.assert_array_equal(np.vstack([b.rows for b in blocks]), x)
    np.testing.assert_array_equal(src.read(990, N).rows, x[990:])
    x[::50] *= 30.0
    src = open_keys(saved(tmp_path / "heavy.npy", x))
    on_disk: Any = universal_set(src, eps=0.02, chunk_rows=256)
    in_memory: Any = universal_set(x, eps=0.02, chunk_rows=256)
    assert on_disk.indices.size > 0
    np.testing.assert_array_equal(on_disk.indices, in_memory.indices)
    np.testing.assert_array_equal(on_disk.scores, in_memory.scores)


@pytest.mark.parametrize("shape", [(2, 3, N, D), (3, N, D), (N, 3 * D)])
def test_a_cache_npy_is_read_not_mapped(tmp_path: Path, shape: tuple[int, ...]) -> None:
    a = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    path = saved(tmp_path / "kv.npy", a)
    opened = open_kv(path, n_heads=3) if len(shape) == 2 else open_kv(path)
    want = {4: lambda: a.transpose(2, 0, 1, 3),
            3: lambda: a.transpose(1, 0, 2)[:, None],
            2: lambda: a.reshape(N, 1, 3, D)}[len(shape)]()
    blocks = list(opened.blocks(300))
    assert not any(mapped(b.rows) for b in blocks)
    np.testing.assert_array_equal(np.concatenate([b.rows for b in blocks]), want)
    if len(shape) == 4:  # a subset goes through the array's own indexing, same rows
        sub = open_kv(path, layers=[1], heads=[0, 2])
        got = np.concatenate([b.rows for b in sub.blocks(300)])
        np.testing.assert_array_equal(got, want[:, 1:2][:, :, [0, 2]])


def test_a_npy_cut_short_after_opening_is_an_error_naming_rows(tmp_path: Path) -> None:
    x = np.random.default_rng(3).standard_normal((N, D)).astype(np.float32)
    path = saved(tmp_path / "k.npy", x)
    src = open_keys(path)
    os.truncate(path, os.path.getsize(path) - 40 * D * 4)  # the last 40 rows gone
    np.testing.assert_array_equal(src.read(0, 900).rows, x[:900])
    with pytest.raises(InvalidInputError, match=r"rows \[\d+, 1000\)"):
        src.read(900, N)


def test_a_copy_on_write_memmap_is_read_as_the_array_holds_it(tmp_path: Path) -> None:
    """A ``mode="c"`` memmap's changes live in memory, not in the file: it is read through
    the array (a file read would return the old rows)."""
    x = np.random.default_rng(4).standard_normal((N, D)).astype(np.float32)
    path = saved(tmp_path / "k.npy", x)
    cow = np.load(path, mmap_mode="c")
    cow[10] = 7.0
    src = open_keys(cow)
    assert src._raw_keys is None
    np.testing.assert_array_equal(src.read(0, 20).rows[10], 7.0)
    shared = np.load(path, mmap_mode="r+")
    shared[11] = 5.0  # a shared mapping's writes reach the file: read directly
    src = open_keys(shared)
    assert isinstance(src._raw_keys, MemmapRows)
    np.testing.assert_array_equal(src.read(0, 20).rows[11], 5.0)
