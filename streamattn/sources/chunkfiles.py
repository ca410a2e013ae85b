"""Which files hold which rows of a key store on local disk.

Two uses. (1) **Missing chunks.** zarr reads a chunk file that does not exist as the
fill value, silently; for a key store that is data loss read as zeros. A source checks
once at open that every chunk file of its arrays exists, and again for each block it
reads (a file deleted mid-run), and raises an error naming the chunk and its rows
unless the caller asked for fill values explicitly. The per-block check is a ``stat``
after zarr's read for arrays zarr reads; uncompressed, zstd or blosc local arrays read directly
(``sources.keys._RawChunkReader``) need none: the read opens every chunk file holding
the block's rows (a missing one is the same error) and checks its size.
(2) **Stamps.** The store-change check (``streamattn.io.readlog``) records each file's
``(size, mtime_ns, ctime_ns, inode)`` before a pass reads it; a later resume or update
skips re-reading a block only when all the files holding its rows still carry the same
stamp (the ctime cannot be set by a user, so rewriting or replacing a file changes it).

Covered: zarr v2/v3 arrays in a ``LocalStore``, and ``.npy`` files (one file for all
rows). For sharded arrays the chunk grid is the shard grid: a missing shard file is
detected, and so is an inner chunk left out of a shard, read off the shard's index
(``(offset, nbytes)`` per inner chunk, both 2⁶⁴ − 1 for an absent one; zarr v3 spec,
sharding codec) when the index is plain little-endian bytes (optionally with its
CRC32C), zarr's default. Other stores (in memory, remote) give ``None``: no file check,
and a resume re-reads what it must verify.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Stamp = tuple[int, int, int, int]
#: An absent inner chunk's (offset, nbytes) in a shard index.
_ABSENT = np.uint64(2**64 - 1)


@dataclass(frozen=True)
class ShardIndex:
    """Where a shard file keeps the index of its inner chunks."""

    inner: tuple[int, ...]  # inner chunks per shard along each axis
    chunk_shape: tuple[int, ...]
    at_end: bool
    crc: bool

    @classmethod
    def of(cls, codecs: Any, shard_shape: tuple[int, ...]) -> ShardIndex | None:
        """For an array whose first codec is zarr's sharding codec with a plain index."""
        try:
            from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
        except ImportError:  # pragma: no cover - zarr is a dependency
            return None
        if not codecs or not isinstance(codecs[0], ShardingCodec):
            return None
        sc = codecs[0]
        index = tuple(sc.index_codecs)
        plain = (
            len(index) in (1, 2)
            and isinstance(index[0], BytesCodec)
            and str(getattr(index[0].endian, "value", "little")) == "little"
            and (len(index) == 1 or isinstance(index[1], Crc32cCodec))
        )
        chunk = tuple(int(c) for c in sc.chunk_shape)
        if not plain or len(chunk) != len(shard_shape):
            return None
        inner = tuple(s // c for s, c in zip(shard_shape, chunk, strict=True))
        return cls(inner, chunk, str(sc.index_location.value) == "end", len(index) == 2)

    def absent(self, path: Path) -> list[tuple[int, ...]]:
        """Inner-chunk coordinates (within the shard) the index of ``path`` marks absent."""
        count = math.prod(self.inner)
        size = 16 * count + (4 if self.crc else 0)
        with open(path, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            if total < size:
                return []  # not a shard this code understands: zarr reports it on read
            f.seek(total - size if self.at_end else 0)
            raw = f.read(16 * count)
        pairs = np.frombuffer(raw, dtype="<u8").reshape(count, 2)
        flat = np.flatnonzero((pairs[:, 0] == _ABSENT) & (pairs[:, 1] == _ABSENT))
        return [tuple(int(i) for i in np.unravel_index(k, self.inner)) for k in flat]


class ChunkFiles:
    """The chunk files of one zarr array in a local store, by row range.

    ``row_axis`` is the axis holding the key rows (0 for ``(n, d)``, 1 for ``(H, n, d)``,
    2 for ``(L, H, n, d)``).
    """

    def __init__(self, root: Path, encode: Any, shape: tuple[int, ...], grid: tuple[int, ...],
                 row_axis: int, shards: ShardIndex | None = None) -> None:
        self.root, self.encode, self.row_axis, self.shards = root, encode, row_axis, shards
        self.shape, self.grid = shape, grid
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
        shards = ShardIndex.of(getattr(meta, "codecs", ()), grid)
        return cls(root, meta.encode_chunk_key, shape, grid, row_axis, shards)

    def _chunk_keys(self, start: int, stop: int) -> Iterator[tuple[int, int, list[int], Path]]:
        """``(lo, hi, key, file)`` per chunk (shard) of rows ``[start, stop)``, row-major."""
        r = self.rows_per_chunk
        for c in range(start // r, (max(stop, start + 1) - 1) // r + 1):
            for coords in itertools.product(*self._others):
                key = list(coords)
                key[self.row_axis] = c
                yield c * r, min((c + 1) * r, self.n), key, self.root / self.encode(tuple(key))

    def chunks(self, start: int, stop: int) -> list[tuple[int, int, list[Path]]]:
        """``(lo, hi, files)`` for every row chunk overlapping rows ``[start, stop)``."""
        out: list[tuple[int, int, list[Path]]] = []
        for lo, hi, _, f in self._chunk_keys(start, stop):
            if not out or out[-1][0] != lo:
                out.append((lo, hi, []))
            out[-1][2].append(f)
        return out

    def first_missing(self, start: int, stop: int) -> tuple[Path | str, int, int] | None:
        """The first chunk of rows ``[start, stop)`` not stored: ``(where, lo, hi)``.

        ``where`` is the missing chunk file (a Path), or for a sharded array a text
        naming the shard file and the inner chunk its index marks absent (inner chunks
        wholly outside the array, which zarr never writes, do not count).
        """
        for lo, hi, key, f in self._chunk_keys(start, stop):
            if not f.exists():
                return f, lo, hi
            if self.shards is not None:
                origin = [k * g for k, g in zip(key, self.grid, strict=True)]
                found = self._absent_inner(f, origin, start, stop)
                if found is not None:
                    return found
        return None

    def _absent_inner(self, shard: Path, origin: list[int], start: int,
                      stop: int) -> tuple[str, int, int] | None:
        """An inner chunk of ``shard`` (first element at ``origin``) that is absent."""
        assert self.shards is not None
        ax, cs = self.row_axis, self.shards.chunk_shape
        for coords in self.shards.absent(shard):
            first = [o + c * k for o, c, k in zip(origin, coords, cs, strict=True)]
            if any(f >= s for f, s in zip(first, self.shape, strict=True)):
                continue  # beyond the array's edge: never stored
            lo, hi = first[ax], min(first[ax] + cs[ax], self.n)
            if lo < stop and hi > start:
                return f"{coords} inside the shard file {shard}", lo, hi
        return None

    def files(self, start: int, stop: int) -> list[Path]:
        return [f for _, _, files in self.chunks(start, stop) for f in files]


def missing_chunk_message(label: str, what: str, found: tuple[str | Path, int, int]) -> str:
    path, lo, hi = found
    where = f"file {path}" if isinstance(path, Path) else path
    return (
        f"{label}: the {what} chunk {where} (rows [{lo}, {hi})) is missing; zarr would "
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
