"""The read path's block buffers, finite check and per-block file checks (issue 16, read side).

- ``BlockStream.blocks`` reads into pooled buffers; a consumer that keeps blocks, views of
  their rows or memoryviews must still see every block's own rows (compared with the arrays
  written to the store), and a consumer that drops each block gets the same few buffers back.
- ``all_finite`` against ``np.isfinite(a).all()``, including finite entries whose sum
  overflows (the fast sum says "not finite"; the exact check must clear them).
- A chunk file vanishing mid-pass is still an error naming it, for a cache's direct reads and
  for a single-head store's value array (whose direct reads no longer stat the files again).
"""

from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from streamattn.errors import InvalidInputError
from streamattn.sources import open_keys, open_kv
from streamattn.sources.keys import BufferPool, all_finite
from streamattn.synthetic import SyntheticSpec, generate_kv_store

N, D, CHUNK = 1200, 5, 100
LAYERS, HEADS = 3, 2


def key_store(path: Path, values: bool = False) -> tuple[Path, np.ndarray, np.ndarray | None]:
    """An uncompressed zarr group (read by direct chunk-file reads) and what it holds."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((N, D)).astype(np.float32)
    v = rng.standard_normal((N, D)).astype(np.float32) if values else None
    group = zarr.open_group(str(path), mode="w")
    for name, a in (("keys", x), ("values", v)):
        if a is not None:
            arr = group.create_array(name, shape=a.shape, dtype=a.dtype,
                                     chunks=(CHUNK, D), compressors=None)
            arr[...] = a
    return path, x, v


def cache_store(path: Path) -> tuple[Path, np.ndarray]:
    """A synthetic cache (per-layer uncompressed arrays) and its keys as (n, L, H, d)."""
    spec = SyntheticSpec(n=N, d=D, rank=3, chunk_rows=CHUNK, compressor="none", seed=5)
    store = generate_kv_store(path, spec, layers=LAYERS, heads=HEADS)
    keys = zarr.open_group(str(store), mode="r")["keys"]
    rows = np.stack([np.asarray(keys[f"layer_{lay}"][...]) for lay in range(LAYERS)], axis=1)
    return store, rows.reshape(N, LAYERS, HEADS, D)


def distinct_buffers(blocks: Any) -> int:
    """How many buffer objects the blocks' rows view, holding none of them (weakrefs)."""
    seen: list[weakref.ref[Any]] = []
    for blk in blocks:
        base = blk.rows.base
        assert base is not None  # a view of a pooled buffer
        if not any(ref() is base for ref in seen):
            seen.append(weakref.ref(base))
        del base
    return len(seen)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_a_consumer_that_keeps_every_block_gets_its_own_rows(
    tmp_path: Path, prefetch: int
) -> None:
    store, x, v = key_store(tmp_path / "k.zarr", values=True)
    kept = list(open_keys(store).blocks(2 * CHUNK, prefetch=prefetch, digests=True))
    assert len(kept) == N // (2 * CHUNK)
    assert len({id(b.rows.base) for b in kept}) == len(kept)  # no two share a buffer
    for b in kept:
        np.testing.assert_array_equal(b.rows, x[b.start : b.stop])
        assert v is not None and b.values is not None
        np.testing.assert_array_equal(b.values, v[b.start : b.stop])
    cache, rows = cache_store(tmp_path / "kv.zarr")
    kept = list(open_kv(cache).blocks(CHUNK, prefetch=prefetch))
    for b in kept:
        np.testing.assert_array_equal(b.rows, rows[b.start : b.stop])


def test_views_and_memoryviews_kept_past_their_block_are_never_overwritten(
    tmp_path: Path,
) -> None:
    store, x, _ = key_store(tmp_path / "k.zarr")
    views, memories, starts = [], [], []
    for i, b in enumerate(open_keys(store).blocks(CHUNK)):
        if i % 3 == 0:
            views.append(b.rows[::2, 1:])  # a strided view
            memories.append(memoryview(b.rows))
            starts.append(b.start)
    for view, mem, a in zip(views, memories, starts, strict=True):
        np.testing.assert_array_equal(view, x[a : a + CHUNK][::2, 1:])
        np.testing.assert_array_equal(np.asarray(mem), x[a : a + CHUNK])
    cache, rows = cache_store(tmp_path / "kv.zarr")
    heads, starts = [], []
    for i, b in enumerate(open_kv(cache).blocks(CHUNK)):
        if i % 4 == 1:
            heads.append(b.rows[:, 2, 1])  # one head: an r × d view with row stride H·d
            starts.append(b.start)
    assert len(heads) == 3
    for head, a in zip(heads, starts, strict=True):
        np.testing.assert_array_equal(head, rows[a : a + CHUNK, 2, 1])


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_a_consumer_that_drops_each_block_gets_the_same_few_buffers_back(
    tmp_path: Path, prefetch: int
) -> None:
    store, x, _ = key_store(tmp_path / "k.zarr")
    src = open_keys(store)
    blocks = N // CHUNK
    # prefetch + 1 buffers (2 without a reader thread); one more only if the consumer's
    # loop were stalled past the pool's patience (0.1 s) on a loaded machine
    assert distinct_buffers(src.blocks(CHUNK, prefetch=prefetch)) <= prefetch + 2 < blocks
    assert distinct_buffers(src.blocks(CHUNK, prefetch=prefetch, digests=True)) <= prefetch + 2
    cache, _ = cache_store(tmp_path / "kv.zarr")
    assert distinct_buffers(open_kv(cache).blocks(CHUNK, prefetch=prefetch)) <= prefetch + 2
    # the reused buffers still hold each block's own rows when it is handed out
    for b in src.blocks(CHUNK, prefetch=prefetch):
        np.testing.assert_array_equal(b.rows, x[b.start : b.stop])


def test_the_pool_hands_out_only_unreferenced_buffers_and_waits_for_a_dropped_one() -> None:
    pool = BufferPool(2, patience=5.0)
    a, b = pool.empty((4, 3), np.float32), pool.empty((4, 3), np.float32)
    ref_a, ref_b = weakref.ref(a.base), weakref.ref(b.base)
    assert a.base is not b.base and pool.allocated == 2
    del b  # dropped: the next one of that size is b's buffer again
    c = pool.empty((4, 3), np.float32)
    assert c.base is ref_b() and pool.allocated == 2
    view = c[1:, :2]
    del c  # a view still holds the buffer: not free
    # both in use: the pool waits; a thread drops ``a`` a moment later, and the pool
    # hands out a's buffer, not a fresh one
    held = [a]
    del a
    timer = threading.Timer(0.05, held.clear)
    timer.start()
    d = pool.empty((4, 3), np.float32)
    timer.join()
    assert d.base is ref_a() and pool.allocated == 2
    # nothing dropped within the patience: a fresh, unpooled buffer (and the next one too)
    quick = BufferPool(1, patience=0.05)
    e = quick.empty((2,), np.float64)
    f = quick.empty((2,), np.float64)
    g = quick.empty((2,), np.float64)
    assert len({id(e.base), id(f.base), id(g.base)}) == 3 and quick.allocated == 3
    assert view.base is ref_b()
    # a smaller request (a pass's last block) takes the front of a free larger buffer;
    # a larger one, or another array's ("value"), gets its own
    sizes = BufferPool(2)
    full = sizes.empty((4, 3), np.float32)
    ref_full = weakref.ref(full.base)
    del full
    assert sizes.empty((2, 3), np.float32).base is ref_full()
    assert sizes.empty((5, 3), np.float32).base is not ref_full()
    assert sizes.empty((4, 3), np.float32, "value").base is not ref_full()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_finite_agrees_with_isfinite_even_when_the_sum_overflows(dtype: Any) -> None:
    rng = np.random.default_rng(0)
    big = np.finfo(dtype).max / 4
    for trial in range(40):
        a = rng.standard_normal((64, 7)).astype(dtype)
        if trial % 2:  # finite entries whose (pairwise) sum overflows to +Inf
            a[rng.random(a.shape) < 0.5] = big
        if trial % 4 >= 2:
            a[rng.integers(64), rng.integers(7)] = rng.choice([np.nan, np.inf, -np.inf])
        for view in (a, a[:, 1:5], a.T):  # contiguous, strided, transposed
            assert all_finite(view) == bool(np.isfinite(view).all())
    pair = np.array([np.inf, -np.inf], dtype=dtype)  # Inf − Inf: a NaN sum, still caught
    assert not all_finite(pair)


def test_a_nan_among_huge_finite_keys_is_named_by_row(tmp_path: Path) -> None:
    path = tmp_path / "big.zarr"
    x = np.full((N, D), 3e38, dtype=np.float32)  # finite; every block's sum overflows
    arr = zarr.create_array(str(path), shape=x.shape, dtype=x.dtype, chunks=(CHUNK, D),
                            compressors=None)
    arr[...] = x
    assert sum(b.rows.shape[0] for b in open_keys(path).blocks(CHUNK)) == N  # accepted
    x[777, 3] = np.nan
    arr[...] = x
    with pytest.raises(InvalidInputError, match=r"key row 777 contains NaN or Inf"):
        list(open_keys(path).blocks(CHUNK))


def test_a_chunk_file_vanishing_mid_pass_is_named_for_caches_and_value_arrays(
    tmp_path: Path,
) -> None:
    cache, _ = cache_store(tmp_path / "kv.zarr")
    src = open_kv(cache)  # opened (and checked) while complete
    os.remove(cache / "keys" / "layer_1" / "c" / "7" / "0")
    with pytest.raises(InvalidInputError, match=r"key chunk file .*layer_1/c/7/0 \(rows "
                       r"\[700, 800\)\) is missing"):
        list(src.blocks(CHUNK))
    store, _, _ = key_store(tmp_path / "k.zarr", values=True)
    src = open_keys(store)
    os.remove(store / "values" / "c" / "4" / "0")
    with pytest.raises(InvalidInputError, match=r"value chunk file .*values/c/4/0 \(rows "
                       r"\[400, 500\)\) is missing"):
        list(src.blocks(CHUNK))


def test_a_dask_leaf_reads_into_the_same_few_buffers_and_keeps_kept_blocks_intact(
    tmp_path: Path,
) -> None:
    from streamattn.engines.dask_engine import _read_ahead

    store, x, _ = key_store(tmp_path / "k.zarr")
    src = open_keys(store)
    ranges = [(a, a + CHUNK) for a in range(0, N, CHUNK)]
    assert distinct_buffers(_read_ahead(src.read, ranges)) <= 3 < len(ranges)
    kept = list(_read_ahead(src.read, ranges))  # a consumer that keeps every block
    assert len({id(b.rows.base) for b in kept}) == len(kept)
    for b in kept:
        np.testing.assert_array_equal(b.rows, x[b.start : b.stop])


def test_a_cache_pass_reads_one_block_ahead_and_projects_the_blocks_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache's fold is slower than its read: one block ahead (two alive), where a key
    store keeps two ahead; the runner's memory projection counts the same blocks."""
    from streamattn.engines.local import run_local
    from streamattn.operators.leverage import LeverageScores, LeverageSpec
    from streamattn.operators.multihead import MultiHead
    from streamattn.runner import projected_bytes

    cache, _ = cache_store(tmp_path / "kv.zarr")
    kv = open_kv(cache)
    store, _, _ = key_store(tmp_path / "k.zarr")
    keys = open_keys(store)
    assert (kv.READ_AHEAD, keys.READ_AHEAD) == (1, 2)
    assert distinct_buffers(kv.blocks(CHUNK)) <= 1 + 2 < N // CHUNK
    for src in (kv, keys):
        need = projected_bytes(src, [], CHUNK)
        assert need["blocks"] == (1 + src.READ_AHEAD) * CHUNK * src.row_nbytes()
    asked: list[int | None] = []
    blocks = type(kv).blocks

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("prefetch"))
        return blocks(self, *args, **kwargs)

    monkeypatch.setattr(type(kv), "blocks", spy)
    op = MultiHead.of([[LeverageScores(LeverageSpec(0.5)) for _ in range(HEADS)]
                       for _ in range(LAYERS)])
    run_local(kv, [op], chunk_rows=CHUNK)
    assert asked == [None] and op.n_rows == N  # the source's own read-ahead


def test_the_read_ahead_reads_its_blocks_side_by_side_and_yields_them_in_order() -> None:
    """``prefetch`` reads in flight at once (one reader thread each: on a machine with more
    cores than the kernels' threads, a single reader's copies bound the pass); blocks still
    come in row order with their own rows, whichever read finishes first, and a failed
    read is raised at its own block, after every block before it."""
    from streamattn.sources import KeySource

    x = np.random.default_rng(3).standard_normal((N, D)).astype(np.float32)
    both_inside = threading.Barrier(2, timeout=10)
    inside: list[int] = []

    class Racing(KeySource):
        def _read_block(self, start: int, stop: int) -> Any:
            if start < 2 * CHUNK:  # the first two reads wait for each other
                both_inside.wait()
                if start == 0:  # ... and the first finishes last
                    threading.Event().wait(0.2)
            inside.append(start)
            if start == 7 * CHUNK and fail:
                raise InvalidInputError(f"planted failure at row {start}")
            return super()._read_block(start, stop)

    fail = False
    got = list(Racing(x).blocks(CHUNK, prefetch=2))
    assert inside[:2] == [CHUNK, 0]  # read side by side; the second finished first
    assert [b.start for b in got] == list(range(0, N, CHUNK))
    for b in got:
        np.testing.assert_array_equal(b.rows, x[b.start : b.stop])
    fail, seen = True, []
    both_inside.reset()
    with pytest.raises(InvalidInputError, match="planted failure at row 700"):
        for b in Racing(x).blocks(CHUNK, prefetch=2):
            seen.append(b.start)
    assert seen == list(range(0, 7 * CHUNK, CHUNK))


def _work_nbytes() -> tuple[str, int]:
    """This thread's name and the bytes of its kernel work buffers."""
    from streamattn.operators import gram_step

    bufs = getattr(gram_step._local, "work", {})
    return threading.current_thread().name, sum(b.nbytes for b in bufs.values())


def _every_thread_of(pool: Any, threads: int) -> dict[str, int]:
    """``_work_nbytes`` of each of the pool's threads (a barrier holds each to one task)."""
    meet = threading.Barrier(threads, timeout=10)

    def one(_: int) -> tuple[str, int]:
        meet.wait()
        return _work_nbytes()

    return dict(pool.map(one, range(threads)))


def test_the_projection_covers_the_threads_own_buffers(tmp_path: Path) -> None:
    """The runner's ``threads`` term against the buffers the threads really hold after
    passes that take every kernel (Gram, TRMM, the budget pass's scoring map; one head in
    row spans, a cache's head lanes, small blocks in the caller), and a zstd store's reader
    buffers."""
    import streamattn as sa
    from streamattn.operators import gram_step
    from streamattn.operators.gram_step import STREAM_THREADS, kernel_threads, work_bytes
    from streamattn.operators.multihead import _head_pool
    from streamattn.sources import KeySource
    from streamattn.sources.keys import _SCRATCH

    d = 24
    x = np.random.default_rng(1).standard_normal((40000, d)).astype(np.float32) * np.logspace(
        0, -2, d).astype(np.float32)
    for variant in ("plain", "affine"):
        for rows in (16384, 1000):
            sa.universal_sets(KeySource(x), [sa.Selection(eps=0.002, variant=variant),
                                             sa.Selection(budget=300, variant=variant)],
                              chunk_rows=rows)
    cache, _ = cache_store(tmp_path / "kv.zarr")  # heads of d = 5, in the head lanes
    sa.universal_sets(open_kv(cache), [sa.Selection(eps=0.05)], chunk_rows=CHUNK)
    spans = _every_thread_of(gram_step.pool(), STREAM_THREADS)
    lanes = _every_thread_of(_head_pool(), STREAM_THREADS)
    held = {**spans, **lanes, **dict([_work_nbytes()])}
    assert len(held) == kernel_threads(1)  # the threads the bound counts, probed each
    assert max(held.values()) > 0.5 * work_bytes(d)  # the probe sees the buffers
    assert all(b <= work_bytes(d) for b in held.values()), (held, work_bytes(d))
    if STREAM_THREADS > 1:  # both pools hold buffers: the bound needs both terms
        assert any(spans.values()) and any(lanes.values()), (spans, lanes)
    # a zstd store: one reader thread's frame and chunk buffers, aligned and partial chunks
    store = tmp_path / "z.zarr"
    arr = zarr.create_array(str(store), shape=x.shape, dtype=x.dtype, chunks=(4096, d))
    arr[...] = x
    src = open_keys(store)
    assert src.reader_scratch_bytes() > 4096 * d * 4

    def read_both() -> int:
        src.read(0, 4096)
        src.read(100, 5000)
        return sum(len(getattr(_SCRATCH, name, b"")) for name in ("frame", "chunk"))

    with ThreadPoolExecutor(1) as one:
        assert 4096 * d * 4 < one.submit(read_both).result() <= src.reader_scratch_bytes()
