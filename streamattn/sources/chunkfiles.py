"""Which files hold which rows of a key store on local disk.

Two uses. (1) **Missing chunks.** zarr reads a chunk file that does not exist as the
fill value, silently; for a key store that is data loss read as zeros. A source checks
once at open that every chunk file of its arrays exists, and again for each block it
reads (a file deleted mid-run), and raises an error naming the chunk and its rows
unless the caller asked for fill values explicitly. (2) **Stamps.** The store-change
check (``streamattn.io.readlog``) records each file's ``(size, mtime_ns, ctime_ns, inode)``
before a pass reads it; a later resume or update skips re-reading a block only when all
the files holding its rows still carry the same stamp (the ctime cannot be set by a
user, so rewriting or replacing a file changes it).

Covered: zarr v2/v3 arrays in a ``LocalStore`` (the chunk grid is the shard grid for
sharded arrays: a missing shard file is detected, an inner chunk left out of a shard is
not), and ``.npy`` files (one file for all rows). Other stores (in memory, remote) give
``None``: no file check, and a resume re-reads what it must verify.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

Stamp = tuple[int, int, int, int]


class ChunkFiles:
    """The chunk files of one zarr array in a local store, by row range.

    ``row_axis`` is the axis holding the key rows (0 for ``(n, d)``, 1 for ``(H, n, d)``,
    2 for ``(L, H, n, d)``).
    """

    def __init__(self, root: Path, encode: Any, shape: tuple[int, ...], grid: tuple[int, ...],
                 row_axis: int) -> None:
        self.root, self.encode, self.row_axis = root, encode, row_axis
        self.rows_per_chunk = int(grid[row_axis])
        self.n = int(shape[row_axis])
        self._others = [
            range(-(-int(s) // int(g))) if k != row_axis else range(1)
            for k, (s, g) in enumerate(zip(shape, grid, strict=True))
        ]

    @classmethod
    def of(cls, arr: Any, row_axis: int = 0) -> ChunkFiles | None:
        """For a zarr array in a LocalStore, else None."""
        try:
            import zarr
            from zarr.storage import LocalStore
        except ImportError:  # pragma: no cover - zarr is a dependency
            return None
        if not isinstance(arr, zarr.Array):
            return None
        store = arr.store_path.store
        if not isinstance(store, LocalStore):
            return None
        meta = arr.metadata
        chunk_grid: Any = meta.chunk_grid
        grid = tuple(int(g) for g in chunk_grid.chunk_shape)
        shape = tuple(int(s) for s in arr.shape)
        if len(grid) != len(shape) or any(g < 1 for g in grid):
            return None
        root = Path(store.root) / arr.store_path.path
        return cls(root, meta.encode_chunk_key, shape, grid, row_axis)

    def chunks(self, start: int, stop: int) -> list[tuple[int, int, list[Path]]]:
        """``(lo, hi, files)`` for every row chunk overlapping rows ``[start, stop)``."""
        out = []
        r = self.rows_per_chunk
        for c in range(start // r, (max(stop, start + 1) - 1) // r + 1):
            files = []
            for coords in itertools.product(*self._others):
                key = list(coords)
                key[self.row_axis] = c
                files.append(self.root / self.encode(tuple(key)))
            out.append((c * r, min((c + 1) * r, self.n), files))
        return out

    def first_missing(self, start: int, stop: int) -> tuple[Path, int, int] | None:
        """The first chunk file of rows ``[start, stop)`` that does not exist."""
        for lo, hi, files in self.chunks(start, stop):
            for f in files:
                if not f.exists():
                    return f, lo, hi
        return None

    def files(self, start: int, stop: int) -> list[Path]:
        return [f for _, _, files in self.chunks(start, stop) for f in files]


def missing_chunk_message(label: str, what: str, found: tuple[Path, int, int]) -> str:
    path, lo, hi = found
    return (
        f"{label}: the {what} chunk file {path} (rows [{lo}, {hi})) is missing; zarr would "
        "read those rows as the fill value. Restore the file, or, if the store was "
        "written with fill-value chunks left out on purpose, ask for fill values "
        "explicitly (Python: fill_missing=True; CLI: --fill-missing-chunks; config: "
        "input.fill_missing_chunks: true)."
    )


def stamp(path: str | os.PathLike[str]) -> Stamp | None:
    """``(size, mtime_ns, ctime_ns, inode)`` of a file, None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns), int(st.st_ino))
