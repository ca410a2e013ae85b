"""zstd- and blosc-compressed zarr chunk files read straight into the block buffers (issue 16).

The direct reader (``sources.keys._RawChunkReader`` with a ``codec``) must return exactly
what zarr's own codec pipeline returns — zarr v3 (``BytesCodec`` + ``ZstdCodec``, with and
without checksums, or ``BloscCodec``) and v2 (the ``Zstd`` and ``Blosc`` compressors),
blocks aligned to chunks or not, the padded edge chunk — and a pass over such a store must
give the set an in-memory copy of the keys gives. A chunk file that is corrupt, truncated,
oversized, holds a frame of the wrong size or is missing is an error naming its rows; the
frame-size parsers and bounds are checked against numcodecs' own frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from numcodecs import blosc, zstd

from streamattn.errors import InvalidInputError
from streamattn.recipes.universal import universal_set
from streamattn.sources import open_keys, open_kv
from streamattn.sources.keys import (
    blosc_bound,
    blosc_content_size,
    zstd_bound,
    zstd_content_size,
)

N, D, CHUNK = 1000, 6, 128


def keys(seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)).astype(np.float32)
    x[::97] *= 40.0  # a few heavy rows, so the set is not empty
    return x


#: (zarr format, codec) of every compressed layout the direct reader takes.
LAYOUTS = {
    "v3-zstd-checksum": (3, lambda: zarr.codecs.ZstdCodec(level=1, checksum=True)),
    "v3-zstd": (3, lambda: zarr.codecs.ZstdCodec(level=1, checksum=False)),
    "v2-zstd": (2, lambda: numcodecs.Zstd(level=1)),
    "v3-blosc": (3, lambda: zarr.codecs.BloscCodec()),
    "v2-blosc": (2, lambda: numcodecs.Blosc()),
}


def compressed_store(path: Path, x: np.ndarray, layout: str = "v3-zstd-checksum") -> Path:
    fmt, codec = LAYOUTS[layout]
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt)  # type: ignore[arg-type]
    arr = group.create_array("keys", shape=x.shape, dtype=x.dtype, chunks=(CHUNK, D),
                             compressors=codec())
    arr[...] = x
    return path


def chunk_file(store: Path, c: int) -> Path:
    arr: Any = zarr.open_group(str(store), mode="r")["keys"]
    return store / "keys" / arr.metadata.encode_chunk_key((c, 0))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_direct_reads_equal_zarrs_own(tmp_path: Path, layout: str) -> None:
    x = keys()
    store = compressed_store(tmp_path / "k.zarr", x, layout)
    src = open_keys(store)
    assert src._raw_keys is not None  # read directly, with the codec of the layout
    assert src._raw_keys.codec == layout.split("-")[1]
    arr: Any = zarr.open_group(str(store), mode="r")["keys"]
    for a, b in ((0, CHUNK), (0, 3 * CHUNK), (5, 300), (CHUNK - 1, CHUNK + 1), (900, N),
                 (N - 1, N)):
        np.testing.assert_array_equal(src.read(a, b).rows, arr[a:b])
    for rows in (CHUNK, 2 * CHUNK, 100):  # chunk-aligned and unaligned blocks
        got = np.vstack([blk.rows for blk in src.blocks(rows)])
        np.testing.assert_array_equal(got, x)


def test_a_pass_over_a_compressed_store_gives_the_in_memory_set(tmp_path: Path) -> None:
    x = keys(5)
    store = compressed_store(tmp_path / "k.zarr", x)
    for variant in ("plain", "affine"):
        on_disk: Any = universal_set(store, eps=0.02, variant=variant, chunk_rows=256)
        in_memory: Any = universal_set(x, eps=0.02, variant=variant, chunk_rows=256)
        assert on_disk.indices.size > 0
        np.testing.assert_array_equal(on_disk.indices, in_memory.indices)
        np.testing.assert_array_equal(on_disk.scores, in_memory.scores)


def test_a_whole_cache_of_zstd_layers_reads_what_zarr_reads(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    layers, heads = 2, 3
    root = zarr.open_group(str(tmp_path / "kv.zarr"), mode="w")
    data = [rng.standard_normal((N, heads * D)).astype(np.float32) for _ in range(layers)]
    for lay, a in enumerate(data):
        arr = root.create_array(f"keys/layer_{lay}", shape=a.shape, dtype=a.dtype,
                                chunks=(CHUNK, heads * D),
                                compressors=zarr.codecs.ZstdCodec(level=1))
        arr[...] = a
        arr.attrs["n_heads"] = heads
    src = open_kv(tmp_path / "kv.zarr")
    blocks = list(src.blocks(300))
    got = np.concatenate([b.rows for b in blocks])  # (n, layers, heads, d)
    want = np.stack([a.reshape(N, heads, D) for a in data], axis=1)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layout", ["v3-zstd-checksum", "v2-blosc"])
@pytest.mark.parametrize("damage", ["garbage", "truncated", "short frame", "oversized",
                                    "missing"])
def test_a_damaged_chunk_file_is_an_error_naming_its_rows(tmp_path: Path, damage: str,
                                                          layout: str) -> None:
    x = keys()
    store = compressed_store(tmp_path / "k.zarr", x, layout)
    src = open_keys(store)
    victim = chunk_file(store, 2)
    raw = victim.read_bytes()
    if damage == "garbage":
        victim.write_bytes(bytes(len(raw)))
    elif damage == "truncated":
        victim.write_bytes(raw[: len(raw) // 2])
    elif damage == "short frame":  # a valid frame holding one row fewer than a chunk
        short = x[: CHUNK - 1].tobytes()
        victim.write_bytes(zstd.compress(short) if "zstd" in layout else
                           bytes(numcodecs.Blosc().encode(short)))
    elif damage == "oversized":  # more bytes than any frame of one chunk (never read whole)
        victim.write_bytes(raw + bytes(4 * CHUNK * D * 4))
        if "blosc" in layout:  # blosc (and so zarr) ignore the bytes after the frame
            np.testing.assert_array_equal(src.read(0, N).rows, x)
            return
    else:
        victim.unlink()
    np.testing.assert_array_equal(src.read(0, 2 * CHUNK).rows, x[: 2 * CHUNK])  # others read
    with pytest.raises(InvalidInputError, match=r"rows \[256, 384\)|256, 384"):
        src.read(0, N)


def test_a_missing_zstd_chunk_reads_as_fill_only_when_asked(tmp_path: Path) -> None:
    x = keys()
    store = compressed_store(tmp_path / "k.zarr", x)
    chunk_file(store, 1).unlink()
    src = open_keys(store, fill_missing=True)
    got = src.read(0, 3 * CHUNK).rows
    np.testing.assert_array_equal(got[CHUNK : 2 * CHUNK], 0.0)
    np.testing.assert_array_equal(got[2 * CHUNK :], x[2 * CHUNK : 3 * CHUNK])


def without_content_size(frame: bytes) -> bytes:
    """The same zstd frame with its header declaring no content size (a window descriptor
    instead), as a streaming writer leaves it (RFC 8878, 3.1.1.1)."""
    fhd = frame[4]
    single = bool(fhd & 0x20)
    fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 0x3]
    assert fhd & 0x3 == 0  # no dictionary id
    size = CHUNK * D * 4
    exponent = max(0, (size - 1).bit_length() - 10)
    return frame[:4] + bytes([fhd & 0x04, exponent << 3]) + frame[at + fcs :]


def test_a_frame_without_a_declared_size_still_reads(tmp_path: Path) -> None:
    x = keys()
    store = compressed_store(tmp_path / "k.zarr", x)
    victim = chunk_file(store, 3)
    frame = without_content_size(victim.read_bytes())
    assert zstd_content_size(frame) is None
    victim.write_bytes(frame)
    src = open_keys(store)
    np.testing.assert_array_equal(src.read(0, N).rows, x)  # whole chunk and ...
    np.testing.assert_array_equal(src.read(400, 450).rows, x[400:450])  # ... part of one


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300_000))
def test_the_frame_size_parser_reads_numcodecs_frames(size: int) -> None:
    frame = zstd.compress(bytes(size))
    assert zstd_content_size(frame) == size
    noise = np.random.default_rng(size).bytes(size)  # incompressible: the largest frames
    assert len(zstd.compress(noise)) <= zstd_bound(size)
    if size:  # (blosc refuses to decode an empty frame)
        packed = bytes(numcodecs.Blosc().encode(noise))
        assert blosc_content_size(packed) == size and len(packed) <= blosc_bound(size)
        assert blosc_content_size(packed[:-1]) is None  # shorter than its declared size
        assert blosc_content_size(packed + b"tail") == size  # what follows is ignored
        assert bytes(blosc.decompress(packed)) == noise
    assert zstd_content_size(b"\x00" * 16) is None and zstd_content_size(frame[:3]) is None


def test_every_layer_of_a_cache_shares_one_thread_buffer(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache has one reader per layer; their frame buffers are the thread's one buffer
    (per-reader buffers held 2 × layers chunks: 180 MB on a 30-layer cache)."""
    from streamattn.sources import keys as keys_module

    root = zarr.open_group(str(tmp_path / "kv.zarr"), mode="w")
    for lay in range(4):
        arr = root.create_array(f"keys/layer_{lay}", shape=(N, 2 * D), dtype=np.float32,
                                chunks=(CHUNK, 2 * D), compressors=zarr.codecs.ZstdCodec())
        arr[...] = np.random.default_rng(lay).standard_normal((N, 2 * D))
        arr.attrs["n_heads"] = 2
    seen: list[int] = []
    scratch = keys_module._scratch

    def spy(name: str, size: int) -> memoryview:
        buf = scratch(name, size)
        if name == "frame":
            seen.append(id(buf.obj))
        return buf

    monkeypatch.setattr(keys_module, "_scratch", spy)
    for _ in open_kv(tmp_path / "kv.zarr").blocks(2 * CHUNK, prefetch=0):
        pass
    assert len(seen) >= 4 * (N // CHUNK) and len(set(seen)) <= 2  # grown at most once
