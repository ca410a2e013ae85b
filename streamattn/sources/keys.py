"""Key stores: open, validate once at the boundary, and stream row blocks.

A key store is an ``n × d`` floating-point matrix K whose rows are keys. It may be a
zarr array (format 2 or 3), a zarr group holding ``keys`` (and optionally ``values`` and
``queries``), a ``.npy`` file (memory-mapped read-only), a numpy array or a dask array.
``open_keys`` checks the shape and dtype up front; ``KeySource.blocks`` yields
``Block(start, rows)`` aligned with the storage chunks and checks every block for NaN/Inf
as it is read, naming the first bad row. Reads run ahead of the consumer in a background
thread (zarr decompression and file reads release the GIL), so I/O overlaps with BLAS,
into block buffers the stream reuses once nothing references them (:class:`BufferPool`).
Inputs are only ever opened read-only.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from streamattn.errors import InvalidInputError
from streamattn.io.safety import register_input
from streamattn.sources.chunkfiles import ChunkFiles, missing_chunk_message

#: Rows per block when neither the caller nor the storage chunking suggests one.
DEFAULT_BLOCK_ROWS = 65536
#: Blocks are sized to roughly this many bytes (a multiple of the storage chunk).
TARGET_BLOCK_BYTES = 32 * 2**20
FLOAT_DTYPES = (np.float16, np.float32, np.float64)


@dataclass(frozen=True)
class Block:
    """Rows ``start .. start + len(rows)`` of the key matrix (and matching value rows).

    ``digest``: the block's :func:`block_digest`, when the reader computed it ahead of the
    consumer (``BlockStream.blocks(digests=True)``, for a checkpointed pass's read log).
    """

    start: int
    rows: np.ndarray
    values: np.ndarray | None = None
    digest: int | None = None

    @property
    def stop(self) -> int:
        return self.start + self.rows.shape[0]


def storage_order(a: np.ndarray) -> np.ndarray:
    """``a`` as the C-contiguous buffer it views, when it is one in another axis order.

    Multi-head blocks are ``(r, L, H, d)`` views of an ``(L, r, H, d)`` buffer (per-layer
    arrays) or of an ``(L, H, r, d)`` one (4-D arrays); reductions and digests run over
    that buffer in memory order (the same for every read of the same source).
    """
    if not a.flags.c_contiguous and a.ndim == 4:
        for axes in ((1, 0, 2, 3), (1, 2, 0, 3)):
            b = a.transpose(axes)
            if b.flags.c_contiguous:
                return b
    return a


def _buffer(a: np.ndarray) -> memoryview:
    """The bytes of ``a`` in a fixed order (:func:`storage_order`), copied only when no
    axis order of ``a`` is C-contiguous."""
    return np.ascontiguousarray(storage_order(a)).data.cast("B")


def block_digest(block: Block) -> int:
    """XXH3-64 of the block's key bytes followed by its value bytes (``block.digest`` when
    the reader already computed it); the hash releases the GIL.

    XXH3 (not a cryptographic hash) runs at ~29 GB/s here against zlib's CRC-32 at
    ~4.7 GB/s (scripts/bench_read.py --digests); any change of the bytes goes unnoticed with
    probability about 2⁻⁶⁴ (the read log's only use: is this block as it was).
    """
    if block.digest is not None:
        return block.digest
    h = xxhash.xxh3_64()
    h.update(_buffer(np.asarray(block.rows)))
    if block.values is not None:
        h.update(_buffer(np.asarray(block.values)))
    return int(h.intdigest())


def all_finite(a: np.ndarray) -> bool:
    """Whether every entry of the float array ``a`` is finite, in one pass, no temporary.

    float32/float64: the sum of all entries, in the array's precision, is NaN or ±Inf when
    any entry is (IEEE arithmetic propagates them; Inf − Inf is NaN), so a finite sum
    proves every entry finite. A non-finite sum can also come from finite entries
    overflowing; it is confirmed entry by entry. The sum is einsum's (SIMD, ~2× numpy's
    pairwise ``add.reduce`` here: 22 against 11 GB/s on a 90 MB block) for a contiguous
    array. float16 (whose sums overflow at 65504): ``isfinite`` in 1M-entry slices.
    """
    flat = a.reshape(-1) if a.flags.c_contiguous else a
    if a.dtype != np.float16:
        with np.errstate(over="ignore", invalid="ignore"):
            total = np.einsum("i->", flat) if flat.ndim == 1 else np.add.reduce(a, axis=None)
        if np.isfinite(total):
            return True
    if a.dtype == np.float16 and flat.ndim == 1:
        step = 2**20
        return all(bool(np.isfinite(flat[i : i + step]).all())
                   for i in range(0, flat.size, step))
    return bool(np.isfinite(a).all())


class BufferPool:
    """Block buffers of one read-ahead stream, handed out again once nothing uses them.

    ``empty(shape, dtype, what)`` is ``np.empty`` served from pooled 1-D buffers: a view of
    the front of a pooled buffer at least that large that nothing outside the pool
    references (a pass's last, shorter block reuses a full one), else of a fresh buffer
    (pooled while fewer than ``limit`` of its kind exist). Reuse is safe by
    reference count: every numpy view keeps its base alive and every memoryview or Block
    its array, so while a consumer holds a block's rows, a view of them, a memoryview or
    the Block itself, the buffer's count exceeds the pool's own and it is not handed out
    (a reference cannot reappear once the last one is dropped, so the check has no race).
    The pool's own count is measured, not assumed, on a probe held the same way (and an
    interpreter on which one more reference does not show gets no pooling at all).

    When all ``limit`` buffers are in use, ``empty`` waits up to ``patience`` seconds for
    one to be dropped: the read-ahead asks for the next buffer while the consumer's loop
    still holds the block before the one it is being handed, and drops it a moment later.
    A wait that runs out means the consumer keeps blocks: a fresh buffer, unpooled, and no
    more waiting until a pooled buffer is free again. Why pool: glibc maps every
    allocation over 32 MB afresh and unmaps it on free, so a fresh buffer per block costs
    a page fault per 4 KiB it is written (about 0.1 s per GB read here).
    """

    def __init__(self, limit: int, patience: float = 0.0) -> None:
        self.limit, self.patience = int(limit), float(patience)
        self.allocated = 0  # fresh buffers made (pooled or not)
        self._buffers: dict[tuple[str, str], list[np.ndarray]] = {}
        self._lock = threading.Lock()
        probe = [np.empty(0, np.uint8)]
        self._idle = self._count(probe, 0)
        held = probe[0]
        if self._count(probe, 0) <= self._idle:  # an interpreter whose counts hide a
            self.limit = 0  # reference: pool nothing (every buffer fresh, no waits)
        del held
        self._patient = self.limit > 0

    @staticmethod
    def _count(buffers: list[np.ndarray], i: int) -> int:
        return sys.getrefcount(buffers[i])

    def empty(self, shape: tuple[int, ...], dtype: Any, what: str = "key") -> np.ndarray:
        """An uninitialised ``shape`` array of ``dtype`` that nothing else references."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        deadline = time.monotonic() + self.patience
        while True:
            with self._lock:
                buffers = self._buffers.setdefault((what, dtype.str), [])
                for i in range(len(buffers)):
                    if buffers[i].size >= count and self._count(buffers, i) == self._idle:
                        self._patient = True
                        return buffers[i][:count].reshape(shape)
                full = len(buffers) >= self.limit
                if not full or not self._patient or time.monotonic() >= deadline:
                    self._patient = self._patient and not full
                    fresh = np.empty(count, dtype)
                    self.allocated += 1
                    if not full:
                        buffers.append(fresh)
                    return fresh.reshape(shape)
            time.sleep(5e-5)


#: The pool of the read-ahead stream this thread is reading a block for (None: fresh).
_POOL: ContextVar[BufferPool | None] = ContextVar("streamattn_block_pool", default=None)


def block_buffer(shape: tuple[int, ...], dtype: Any, what: str = "key") -> np.ndarray:
    """A buffer to read a block's ``what`` rows into: from the stream's pool inside
    ``BlockStream.blocks``, a fresh ``np.empty`` elsewhere (``read`` called directly)."""
    pool = _POOL.get()
    return np.empty(shape, dtype) if pool is None else pool.empty(shape, dtype, what)


def pooled_read(pool: BufferPool, read: Callable[[int, int], Block], start: int,
                stop: int) -> Block:
    """``read(start, stop)`` with its block buffers served from ``pool``."""
    token = _POOL.set(pool)
    try:
        return read(start, stop)
    finally:
        _POOL.reset(token)


def _check_float_array(arr: Any, what: str) -> None:
    dtype = np.dtype(arr.dtype)
    if dtype.kind in "iub":
        raise InvalidInputError(
            f"{what} has integer dtype {dtype}; keys must be floating point "
            "(float16, float32 or float64). Convert the store first, e.g. "
            "arr.astype('float32')."
        )
    if dtype.kind == "c":
        raise InvalidInputError(
            f"{what} has complex dtype {dtype}; attention keys must be real "
            "(float16, float32 or float64)."
        )
    if dtype.type not in FLOAT_DTYPES:
        raise InvalidInputError(
            f"{what} has dtype {dtype}; supported dtypes are float16, float32 and float64."
        )


def _check_positions(positions: Any, queries: Any, n: int, label: str) -> np.ndarray:
    """``query_positions``: one integer key position in [0, n) per query (causal mode)."""
    pos = np.asarray(positions[:])
    if queries is None or pos.shape != (int(queries.shape[0]),) or pos.dtype.kind not in "iu":
        raise InvalidInputError(
            f"{label}: query_positions must be a 1-D integer array with one entry per query "
            f"row; got shape {pos.shape}, dtype {pos.dtype}."
        )
    if pos.size and (pos.min() < 0 or pos.max() >= n):
        raise InvalidInputError(f"{label}: query_positions must lie in [0, n = {n}).")
    return pos.astype(np.int64)


def _chunk_rows_of(arr: Any) -> int | None:
    chunks = getattr(arr, "chunks", None)
    if chunks is None:
        return None
    first = chunks[0]
    if isinstance(first, tuple):  # dask: a tuple of chunk sizes per axis
        return int(first[0]) if first else None
    return int(first)


def _is_dask(arr: Any) -> bool:
    return type(arr).__module__.startswith("dask.")


def _first_unreadable_chunk(arr: Any, start: int, stop: int) -> tuple[int, int]:
    """Error path only: the first storage chunk in ``[start, stop)`` that fails to read."""
    step = _chunk_rows_of(arr) or (stop - start)
    for a in range((start // step) * step, stop, step):
        lo, hi = max(a, start), min(a + step, stop)
        try:
            np.asarray(arr[lo:hi])
        except Exception:
            return lo, hi
    return start, stop


def zstd_content_size(frame: memoryview | bytes) -> int | None:
    """The decompressed size a zstd frame's header declares (RFC 8878, 3.1.1.1), or None
    where it declares none or ``frame`` is not a zstd frame."""
    head = bytes(frame[:18])
    if len(head) < 6 or int.from_bytes(head[:4], "little") != 0xFD2FB528:
        return None
    fhd = head[4]
    single = bool(fhd & 0x20)
    fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 0x3]
    if fcs == 0 or len(head) < at + fcs:
        return None
    size = int.from_bytes(head[at : at + fcs], "little")
    return size + 256 if fcs == 2 else size


def zstd_bound(size: int) -> int:
    """The most bytes a zstd frame of ``size`` bytes takes (zstd's ZSTD_COMPRESSBOUND),
    plus 64 for the frame's header and checksum."""
    small = (128 * 1024 - size) >> 11 if size < 128 * 1024 else 0
    return size + (size >> 8) + small + 64


def blosc_content_size(frame: memoryview | bytes) -> int | None:
    """The decompressed size a blosc (1.x) frame's header declares, or None where the bytes
    are shorter than its header or than the compressed size the header declares (a blosc
    decoder trusts that size: it would read past them). Bytes after the frame are ignored,
    as blosc (and so zarr) ignores them."""
    if len(frame) < 16:
        return None
    head = bytes(frame[:16])
    nbytes, cbytes = int.from_bytes(head[4:8], "little"), int.from_bytes(head[12:16], "little")
    return nbytes if 16 <= cbytes <= len(frame) else None


def blosc_bound(size: int) -> int:
    """The most bytes a blosc frame of ``size`` bytes takes (BLOSC_MAX_OVERHEAD = 16)."""
    return size + 16


@dataclass(frozen=True)
class FrameFormat:
    """How a compressed chunk file is read directly: its frame header's declared size (None:
    none declared, or a frame this format cannot decode safely), the largest frame of a
    given size, the numcodecs module that decodes it, whether bytes after the frame are
    ignored (the decoder reads only the declared frame) and whether a frame may omit its
    size (then numcodecs decodes it into its own buffer, whose size is checked)."""

    declared_size: Callable[[Any], int | None]
    largest: Callable[[int], int]
    module: str
    tail_ignored: bool
    size_optional: bool


#: The compressed chunk files read directly, by codec.
FRAMES = {
    "zstd": FrameFormat(zstd_content_size, zstd_bound, "numcodecs.zstd",
                        tail_ignored=False, size_optional=True),
    "blosc": FrameFormat(blosc_content_size, blosc_bound, "numcodecs.blosc",
                         tail_ignored=True, size_optional=False),
}


class _RawChunkReader:
    """Direct reads of a local, row-chunked zarr array's chunk files: uncompressed, or
    zstd- or blosc-compressed.

    An uncompressed chunk file is exactly the C-ordered bytes of ``chunk_rows`` full rows,
    so rows ``[start, stop)`` are read with ``preadv`` straight into the output buffer: no
    codec pipeline and no intermediate copies (about 3× faster than zarr's own read on
    32 MB chunks here). A compressed chunk file (one frame: zarr v3's ``BytesCodec`` +
    ``ZstdCodec`` or ``BloscCodec``, zarr v2's ``Zstd`` or ``Blosc`` compressor) is read
    into a per-thread buffer and decompressed straight into the output where the block
    holds the whole chunk (else into a per-thread chunk buffer, then copied): zarr's own
    read decodes every chunk into a fresh array, and a 32 MiB one is a fresh mmap whose
    pages fault in again (the d = 128, 2^22 zstd pass: 5.6–8.1 s through zarr, 4.3–4.5 s
    without those faults). The frame's header must declare one chunk's size (blosc: and
    the file's size as its compressed size); a zstd frame written without its size is
    decompressed by numcodecs into its own buffer and must come to one chunk; checksums,
    where written, are checked by zstd. A missing chunk file is an error naming it and its
    rows (the fill value only with ``fill_missing``); a chunk file of the wrong size
    (compressed: larger than any frame of one chunk), or a frame that does not decompress
    to exactly one chunk, raises ``OSError`` (the caller reports it).
    """

    def __init__(
        self,
        root: Path,
        encode: Any,
        chunk_rows: int,
        shape: tuple[int, int],
        dtype: np.dtype,
        fill: Any,
        codec: str | None = None,
    ) -> None:
        self.root, self.encode, self.chunk_rows = root, encode, chunk_rows
        self.shape, self.dtype, self.fill, self.codec = shape, dtype, fill, codec
        self.row_bytes = shape[1] * dtype.itemsize
        self.fill_missing = False
        self.label = str(root)
        self.what = "key"  # how a missing chunk file names the array ("key", "value")

    def scratch(self) -> tuple[int, int]:
        """Bytes of this thread's frame and chunk buffers (``_scratch``) its reads take:
        the largest frame of one chunk and one chunk; (0, 0) uncompressed."""
        if self.codec is None:
            return 0, 0
        full = self.chunk_rows * self.row_bytes
        return FRAMES[self.codec].largest(full), full

    @classmethod
    def of(cls, arr: Any) -> _RawChunkReader | None:
        """A reader when ``arr`` qualifies (zarr v2/v3, plain bytes, optionally zstd or
        blosc), else None."""
        import zarr
        from zarr.storage import LocalStore

        if not isinstance(arr, zarr.Array) or len(arr.shape) != 2:
            return None
        meta, store = arr.metadata, arr.store_path.store
        dtype = np.dtype(arr.dtype)
        if not isinstance(store, LocalStore) or not dtype.isnative or sys.byteorder != "little":
            return None
        if meta.zarr_format == 3:
            codecs = meta.codecs
            names = [type(c).__name__ for c in codecs]
            compressors = {"ZstdCodec": "zstd", "BloscCodec": "blosc"}
            if names[:1] != ["BytesCodec"] or names[1:] not in ([], *([c] for c in compressors)):
                return None
            first: Any = codecs[0]
            if first.endian is not None and first.endian.value != "little":
                return None
            codec = compressors[names[1]] if len(names) == 2 else None
        else:
            compressor = type(meta.compressor).__name__ if meta.compressor is not None else None
            if compressor not in (None, "Zstd", "Blosc") or meta.filters or meta.order != "C":
                return None
            codec = None if compressor is None else compressor.lower()
        chunk_rows, chunk_cols = (int(c) for c in arr.chunks)
        if chunk_cols != arr.shape[1]:
            return None
        root = Path(store.root) / arr.store_path.path
        shape = (int(arr.shape[0]), int(arr.shape[1]))
        return cls(root, meta.encode_chunk_key, chunk_rows, shape, dtype, meta.fill_value,
                   codec)

    def __call__(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[start, stop)``, into ``out`` (C-contiguous ``(stop - start, width)``)
        when given."""
        if out is None:
            out = block_buffer((stop - start, self.shape[1]), self.dtype, self.what)
        view = out.reshape(-1).view(np.uint8).data
        rb, cr = self.row_bytes, self.chunk_rows
        for c in range(start // cr, (stop - 1) // cr + 1):
            lo, hi = max(start, c * cr), min(stop, (c + 1) * cr)
            path = self.root / self.encode((c, 0))
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                if not self.fill_missing:
                    found = (path, c * cr, min((c + 1) * cr, self.shape[0]))
                    raise InvalidInputError(
                        missing_chunk_message(self.label, self.what, found)
                    ) from None
                out[lo - start : hi - start] = self.fill
                continue
            try:
                pos, end = (lo - start) * rb, (hi - start) * rb
                if self.codec is not None:
                    self._decompress(fd, path, view[pos:end], lo - c * cr, hi - c * cr)
                    continue
                size = os.fstat(fd).st_size
                if size != cr * rb:
                    raise OSError(f"chunk file {path} has {size} bytes, expected {cr * rb}")
                _pread_exactly(fd, view[pos:end], (lo - c * cr) * rb, path)
            finally:
                os.close(fd)
        return out

    def _decompress(self, fd: int, path: Path, dest: memoryview, lo: int, hi: int) -> None:
        """Chunk rows ``[lo, hi)`` (within the chunk) of the compressed frame in ``fd`` into
        ``dest``."""
        assert self.codec is not None
        fmt = FRAMES[self.codec]
        codec = importlib.import_module(fmt.module)
        rb, full = self.row_bytes, self.chunk_rows * self.row_bytes
        size, bound = os.fstat(fd).st_size, fmt.largest(full)
        if size > bound and not fmt.tail_ignored:  # else the frame lies within ``bound``
            raise OSError(f"chunk file {path} has {size} bytes, more than any {self.codec} "
                          f"frame of {full} bytes ({self.chunk_rows} rows) takes ({bound})")
        frame = _scratch("frame", bound)[: min(size, bound)]
        _pread_exactly(fd, frame, 0, path)
        declared = fmt.declared_size(frame)
        if declared != full:
            if declared is not None or not fmt.size_optional:
                raise OSError(f"chunk file {path} declares {declared} decompressed bytes "
                              f"for {full} ({self.chunk_rows} rows)")
            # a frame written without its size: numcodecs' own buffer, then checked
            data = memoryview(codec.decompress(frame))
            if len(data) != full:
                raise OSError(f"chunk file {path} decompresses to {len(data)} bytes, "
                              f"expected {full} ({self.chunk_rows} rows)")
            dest[:] = data[lo * rb : hi * rb]
        elif hi - lo == self.chunk_rows:
            codec.decompress(frame, dest)
        else:
            chunk = _scratch("chunk", full)
            codec.decompress(frame, chunk)
            dest[:] = chunk[lo * rb : hi * rb]


class MemmapRows:
    """Rows of a C-ordered ``np.memmap`` (a ``.npy`` file opened by ``np.load(mmap_mode=
    "r")``), read with ``preadv`` into the block buffer instead of through the mapping.

    For an array ``(*lead, n, w)`` rows ``[start, stop)`` of every leading index are one
    contiguous run of the file each. Read through the mapping, every page a pass touched
    stayed mapped: the process's RSS grew with n (the 2^22 × 128 ``.npy`` pass peaked at
    2147 MiB, the whole file, against 264 MiB from zarr). A file shorter than its header
    says raises ``OSError`` (the caller reports the rows).
    """

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype
        self.row_bytes = shape[-1] * dtype.itemsize
        self.fill_missing = False  # (one file: nothing to fill)
        self.label = path
        self.what = "key"

    @classmethod
    def of(cls, arr: Any) -> MemmapRows | None:
        """A reader for a whole, C-ordered, native-endian memmap of ≥ 2 axes whose writes
        reach the file (not copy-on-write: ``mode="c"`` changes live in memory only), else
        None."""
        import mmap

        if (not isinstance(arr, np.memmap) or arr.ndim < 2 or arr.filename is None
                or not isinstance(arr.base, mmap.mmap) or not arr.flags.c_contiguous
                or not arr.dtype.isnative or arr.mode == "c"):
            return None
        return cls(str(arr.filename), int(arr.offset), tuple(int(s) for s in arr.shape),
                   np.dtype(arr.dtype))

    def __call__(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of every leading index: ``(*lead, stop - start, w)``, into
        ``out`` (C-contiguous) when given."""
        *lead, n, w = self.shape
        if out is None:
            out = block_buffer((*lead, stop - start, w), self.dtype, self.what)
        runs = out.reshape(-1, (stop - start) * self.row_bytes // self.dtype.itemsize)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i in range(runs.shape[0]):
                at = self.offset + (i * n + start) * self.row_bytes
                _pread_exactly(fd, runs[i].view(np.uint8).data, at, Path(self.path), "file")
        finally:
            os.close(fd)
        return out


def raw_reader(arr: Any) -> _RawChunkReader | MemmapRows | None:
    """The direct reader of ``arr`` (chunk files of a local zarr array, or a ``.npy``
    memmap), or None: it is read through its own indexing."""
    return _RawChunkReader.of(arr) or MemmapRows.of(arr)


#: The zstd reads' frame and chunk buffers, one of each per thread, shared by every array's
#: reader (a cache has one reader per layer: per-reader buffers held 30 × 2 chunks, 180 MB).
_SCRATCH = threading.local()


def scratch_bytes(readers: Iterable[_RawChunkReader | MemmapRows | None]) -> int:
    """What one reader thread's ``_scratch`` buffers reach for these readers: each buffer
    grows to the largest request, so the largest frame plus the largest chunk."""
    sizes = [r.scratch() for r in readers if isinstance(r, _RawChunkReader)]
    return max((f for f, _ in sizes), default=0) + max((c for _, c in sizes), default=0)


def _scratch(name: str, size: int) -> memoryview:
    """This thread's byte buffer ``name`` of at least ``size`` bytes, kept for the next call."""
    buf = getattr(_SCRATCH, name, None)
    if buf is None or len(buf) < size:
        buf = memoryview(bytearray(size))
        setattr(_SCRATCH, name, buf)
    return buf


def _pread_exactly(fd: int, dest: memoryview, offset: int, path: Path,
                   what: str = "chunk file") -> None:
    """Fill ``dest`` from ``fd`` at ``offset`` (``preadv`` until done)."""
    pos, end = 0, len(dest)
    while pos < end:
        got = os.preadv(fd, [dest[pos:end]], offset)
        if got <= 0:
            raise OSError(f"{what} {path} ended early (at byte {offset})")
        pos, offset = pos + got, offset + got


class BlockStream:
    """Row-block iteration shared by every source: needs ``n``, ``label``, ``read`` and
    ``default_chunk_rows``."""

    n: int
    label: str
    #: Blocks read ahead of the one being folded by default (``blocks(prefetch=...)``), each
    #: by its own reader thread; a source whose fold is far slower than its read keeps
    #: fewer (``MultiHeadSource``).
    READ_AHEAD = 2

    def read(self, start: int, stop: int) -> Block:
        """Read and validate rows ``[start, stop)`` (keys, and values when present)."""
        if not 0 <= start < stop <= self.n:
            raise InvalidInputError(
                f"{self.label}: row range [{start}, {stop}) is outside [0, {self.n})."
            )
        return self._read_block(start, stop)

    def _read_block(self, start: int, stop: int) -> Block:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read_digested(self, start: int, stop: int) -> Block:
        block = self.read(start, stop)
        return replace(block, digest=block_digest(block))

    def default_chunk_rows(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def row_nbytes(self) -> int:  # pragma: no cover - abstract
        """Bytes of one row as a block holds it (keys and values, every head)."""
        raise NotImplementedError

    def reader_scratch_bytes(self) -> int:
        """Bytes a reader thread keeps besides the block buffers (a compressed store's
        frame and chunk buffers; 0 here)."""
        return 0

    def rows_per_block(self, chunk_rows: int | None = None) -> int:
        """The block size of a pass: ``chunk_rows``, or the storage-aligned default.

        The one place where a missing ``chunk_rows`` becomes a number (the runner, the
        engines, checkpoints and certificates all ask here).
        """
        rows = int(chunk_rows) if chunk_rows is not None else self.default_chunk_rows()
        if rows < 1:
            raise InvalidInputError(f"chunk_rows must be >= 1, got {chunk_rows}.")
        return rows

    def block_ranges(
        self, chunk_rows: int | None = None, start: int = 0, stop: int | None = None
    ) -> list[tuple[int, int]]:
        """The ``[start, stop)`` row ranges that ``blocks`` yields, in order."""
        rows = self.rows_per_block(chunk_rows)
        stop = self.n if stop is None else int(stop)
        if not 0 <= start <= stop <= self.n:
            raise InvalidInputError(
                f"{self.label}: row range [{start}, {stop}) is outside [0, {self.n})."
            )
        return [(a, min(a + rows, stop)) for a in range(start, stop, rows)]

    def blocks(
        self,
        chunk_rows: int | None = None,
        *,
        start: int = 0,
        stop: int | None = None,
        prefetch: int | None = None,
        digests: bool = False,
    ) -> Iterator[Block]:
        """Yield validated blocks in row order, reading up to ``prefetch`` blocks ahead
        (None: ``READ_AHEAD``), side by side, one reader thread each.

        Side by side because a single reader's copies (and decompression) bound the pass
        once the kernels have more cores than two: measured on 2 cores, the engine's read
        of the 2^22 × 128 store alone took 0.66 s with one reader and 0.29 s with two
        (zstd: 2.39 → 1.23 s), the pass unchanged (it is compute-bound there). A compressed
        store's reader threads hold a frame buffer each (one chunk's largest frame).

        Memory: ``prefetch + 1`` block buffers per array (a :class:`BufferPool`), whatever
        ``n`` is: the block the consumer holds and ``prefetch`` read (or being read) ahead;
        a buffer is reused once the consumer has dropped every reference to its block (the
        read ahead waits a moment for the consumer's loop to move on). A consumer that
        keeps blocks gets fresh buffers, never a reused one (and holds them itself).
        ``prefetch = 0``: two buffers, read in the consumer's thread. ``digests``: each
        block also carries its ``digest`` (:func:`block_digest`), computed by its reader
        thread, off the consumer's path.
        """
        ranges = self.block_ranges(chunk_rows, start, stop)
        prefetch = self.READ_AHEAD if prefetch is None else prefetch
        # the read ahead waits for the consumer's last block; a read in the consumer's own
        # thread cannot (it holds that block), so it has one more buffer instead
        buffers = BufferPool(prefetch + 1, patience=0.1) if prefetch > 0 else BufferPool(2)
        read = self._read_digested if digests else self.read
        if prefetch <= 0:
            yield from (pooled_read(buffers, read, a, b) for a, b in ranges)
            return
        with ThreadPoolExecutor(prefetch, thread_name_prefix="streamattn-read") as pool:
            pending = [pool.submit(pooled_read, buffers, read, a, b) for a, b in ranges[:prefetch]]
            rest = iter(ranges[prefetch:])
            try:
                while pending:
                    block = pending.pop(0).result()
                    nxt = next(rest, None)
                    if nxt is not None:
                        pending.append(pool.submit(pooled_read, buffers, read, *nxt))
                    yield block
            finally:
                for fut in pending:
                    fut.cancel()


class KeySource(BlockStream):
    """A validated, read-only key matrix with optional ``values`` and ``queries``.

    Parameters
    ----------
    keys
        Array-like of shape ``(n, d)`` with a float dtype (numpy, zarr, dask, memmap).
        Its row slices are read from up to ``READ_AHEAD`` threads at once (and from the
        Dask engine's tasks): slicing must be thread-safe, as it is for these.
    label
        How error messages name this input (a path and array name).
    values, queries
        Optional arrays from the same store; ``values`` must have ``n`` rows.
    query_positions
        Optional int array, one key position in [0, n) per query row: a query at
        position i sees keys 0..i in causal attention.
    fill_missing
        Read missing zarr chunk files as the fill value (off: a missing chunk file is
        an error naming the chunk and its rows, at open and at every read).
    """

    def __init__(
        self,
        keys: Any,
        *,
        label: str = "<array>",
        values: Any | None = None,
        queries: Any | None = None,
        query_positions: Any | None = None,
        path: str | None = None,
        array_name: str | None = None,
        fill_missing: bool = False,
    ) -> None:
        self.label = label
        self.path = path
        self.array_name = array_name
        self.fill_missing = bool(fill_missing)
        shape = tuple(int(s) for s in keys.shape)
        if len(shape) != 2:
            raise InvalidInputError(
                f"{label}: expected a 2-D key matrix (n, d), got shape {shape} "
                f"({len(shape)}-D)."
            )
        _check_float_array(keys, label)
        n, d = shape
        if n == 0:
            raise InvalidInputError(f"{label}: the key matrix has n = 0 rows; nothing to do.")
        if d == 0:
            raise InvalidInputError(f"{label}: the key matrix has d = 0 columns.")
        if values is not None:
            vshape = tuple(int(s) for s in values.shape)
            if len(vshape) != 2 or vshape[0] != n:
                raise InvalidInputError(
                    f"{label}: values have shape {vshape}; expected ({n}, d_v) to match the keys."
                )
            _check_float_array(values, f"{label} (values)")
        if queries is not None:
            qshape = tuple(int(s) for s in queries.shape)
            if len(qshape) != 2 or qshape[1] != d:
                raise InvalidInputError(
                    f"{label}: queries have shape {qshape}; expected (s, {d}) to match the keys."
                )
            _check_float_array(queries, f"{label} (queries)")
        if query_positions is not None:
            query_positions = _check_positions(query_positions, queries, n, label)
        self.keys = keys
        self.values = values
        self.queries = queries
        self.query_positions = query_positions
        self.n = n
        self.d = d
        self.dtype = np.dtype(keys.dtype)
        self.storage_chunk_rows = _chunk_rows_of(keys)
        self._raw_keys = raw_reader(keys)
        self._raw_values = None if values is None else raw_reader(values)
        for raw, what in ((self._raw_keys, "key"), (self._raw_values, "value")):
            if raw is not None:
                raw.fill_missing, raw.label, raw.what = self.fill_missing, label, what
        self._files = ChunkFiles.of(keys)
        self._value_files = None if values is None else ChunkFiles.of(values)
        if not self.fill_missing:
            self._check_chunks(0, n)

    def _check_chunks(self, start: int, stop: int) -> None:
        """Every chunk file holding rows ``[start, stop)`` exists (zarr on local disk)."""
        for files, what in ((self._files, "key"), (self._value_files, "value")):
            found = None if files is None else files.first_missing(start, stop)
            if found is not None:
                raise InvalidInputError(missing_chunk_message(self.label, what, found))

    def row_files(self, start: int, stop: int) -> list[str] | None:
        """The files holding rows ``[start, stop)`` (None: not files on local disk)."""
        if self._files is not None:
            files = self._files.files(start, stop)
            if self._value_files is not None:
                files += self._value_files.files(start, stop)
            return [str(f) for f in files]
        if self.path is not None and Path(self.path).is_file():
            return [self.path]
        return None

    # ------------------------------------------------------------------ layout
    def reader_scratch_bytes(self) -> int:
        return scratch_bytes((self._raw_keys, self._raw_values))

    def row_nbytes(self) -> int:
        values = 0 if self.values is None else int(np.prod(self.values.shape[1:]))
        vbytes = 0 if self.values is None else values * np.dtype(self.values.dtype).itemsize
        return int(self.d * self.dtype.itemsize + vbytes)

    def default_chunk_rows(self) -> int:
        """A block size aligned with storage chunks, about ``TARGET_BLOCK_BYTES`` each."""
        row_bytes = self.d * self.dtype.itemsize
        target = max(1, TARGET_BLOCK_BYTES // row_bytes)
        base = self.storage_chunk_rows
        if base is None:
            return int(min(self.n, max(1024, min(target, DEFAULT_BLOCK_ROWS))))
        multiple = max(1, round(target / base))
        return int(min(self.n, base * multiple)) if base < self.n else int(self.n)

    def describe(self) -> dict[str, Any]:
        """Plain-data description for provenance records."""
        return {
            "label": self.label,
            "path": self.path,
            "array": self.array_name,
            "n": self.n,
            "d": self.d,
            "dtype": str(self.dtype),
            "storage_chunk_rows": self.storage_chunk_rows,
            "has_values": self.values is not None,
            "has_queries": self.queries is not None,
        }

    # ------------------------------------------------------------------ reading
    def _read_array(self, arr: Any, start: int, stop: int, what: str) -> np.ndarray:
        raw = self._raw_keys if arr is self.keys else self._raw_values
        try:
            out: Any = raw(start, stop) if raw is not None else arr[start:stop]
            if _is_dask(out):
                out = out.compute()
            out = np.asarray(out)
        except InvalidInputError:
            raise
        except Exception as exc:  # a corrupt chunk, a vanished file, a codec error
            a, b = _first_unreadable_chunk(arr, start, stop)
            raise InvalidInputError(
                f"{self.label}: could not read {what} rows [{a}, {b}) (in the block "
                f"[{start}, {stop})): {type(exc).__name__}: {exc}. The storage chunk "
                "holding these rows is corrupt or unreadable."
            ) from exc
        files = self._files if arr is self.keys else self._value_files
        # zarr reads a vanished chunk file as fill, so its files are checked after the read;
        # a direct read opened every chunk file of the block (a missing one is an error)
        if not self.fill_missing and files is not None and raw is None:
            found = files.first_missing(start, stop)
            if found is not None:
                raise InvalidInputError(missing_chunk_message(self.label, what, found))
        if out.shape[0] != stop - start:
            raise InvalidInputError(
                f"{self.label}: reading {what} rows [{start}, {stop}) returned "
                f"{out.shape[0]} rows; the store changed or is truncated."
            )
        if not all_finite(out):
            row = start + int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0])
            raise InvalidInputError(
                f"{self.label}: {what} row {row} contains NaN or Inf; every value must be "
                "finite. Clean or drop that row before streaming."
            )
        return out

    def _read_block(self, start: int, stop: int) -> Block:
        rows = self._read_array(self.keys, start, stop, "key")
        values = None
        if self.values is not None:
            values = self._read_array(self.values, start, stop, "value")
        return Block(start, rows, values)


def check_array_name(name: Any) -> str:
    """An array name inside a group: non-empty ``/``-separated parts, no ``.``/``..``."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
        raise InvalidInputError(
            f"array name {name!r} is not a plain name inside the store (no empty, '.' or "
            "'..' parts, no leading or trailing '/'); name an array of the group, e.g. "
            "--array keys."
        )
    return name


def _open_path(path: Path, array: str | None, fill_missing: bool = False) -> KeySource:
    label = str(path)
    if not path.exists():
        raise InvalidInputError(f"{label}: no such file or directory.")
    register_input(path)  # outputs must never be written into, over or around it
    if path.is_file():
        if path.suffix != ".npy":
            raise InvalidInputError(
                f"{label}: not a key store; expected a .npy file or a zarr array/group directory."
            )
        if array is not None:
            raise InvalidInputError(f"{label}: a .npy file holds one array; drop array={array!r}.")
        try:
            keys = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise InvalidInputError(f"{label}: cannot read as .npy: {exc}") from exc
        return KeySource(keys, label=label, path=str(path), fill_missing=fill_missing)
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise InvalidInputError(
            f"{label}: not a readable zarr array or group ({type(exc).__name__}: {exc})."
        ) from exc
    if isinstance(node, zarr.Array):
        if array is not None:
            raise InvalidInputError(f"{label}: is a single zarr array; drop array={array!r}.")
        return KeySource(node, label=label, path=str(path), fill_missing=fill_missing)
    names = sorted(k for k, v in node.members() if isinstance(v, zarr.Array))
    name = array or "keys"
    if name not in names:
        raise InvalidInputError(
            f"{label}: zarr group has no array {name!r}; arrays present: {names or 'none'}. "
            "Name the key array with array=... (CLI: --array)."
        )
    values = node["values"] if name == "keys" and "values" in names else None
    queries = node["queries"] if name == "keys" and "queries" in names else None
    has_positions = queries is not None and "query_positions" in names
    positions = node["query_positions"] if has_positions else None
    return KeySource(
        node[name],
        label=f"{label}[{name}]",
        values=values,
        queries=queries,
        query_positions=positions,
        path=str(path),
        array_name=name,
        fill_missing=fill_missing,
    )


def open_key_source(path_or_array: Any, array: str | None = None, *,
                    fill_missing: bool = False) -> KeySource:
    """Open a single-head key store ``(n, d)`` read-only; ``streamattn.sources.open_keys``
    is the public entry (it hands whole KV caches to ``open_kv``). ``fill_missing``: read
    missing zarr chunk files as the fill value instead of refusing the store.

    Examples
    --------
    >>> import numpy as np
    >>> src = open_key_source(np.ones((10, 4), dtype=np.float32))
    >>> (src.n, src.d)
    (10, 4)
    """
    if isinstance(path_or_array, KeySource):
        return path_or_array
    if array is not None:
        check_array_name(array)
    if isinstance(path_or_array, (str, os.PathLike)):
        return _open_path(Path(path_or_array), array, fill_missing)
    if not hasattr(path_or_array, "shape") or not hasattr(path_or_array, "dtype"):
        raise InvalidInputError(
            f"cannot open {type(path_or_array).__name__} as keys: pass a path, or a numpy, "
            "zarr or dask array of shape (n, d)."
        )
    if isinstance(path_or_array, np.ndarray) and path_or_array.dtype == object:
        raise InvalidInputError("<array> has dtype object; keys must be float16/32/64.")
    return KeySource(path_or_array, label=f"<{type(path_or_array).__name__}>")
