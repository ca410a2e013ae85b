"""A whole KV cache in one pass: every head's set equals its offline reference.

The documented layout (``keys/layer_{l}`` arrays of shape (n, H·d)) is read one block per
layer array straight into one buffer and each head is folded from a strided view of it;
these tests compare every head with an offline SVD of its own columns and with the
single-head path on a contiguous copy, check that the raw-file and zarr reads give the
same blocks, that bad rows are still named, and that values are never opened unless
asked for (a cache whose values are corrupt still selects).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

import streamattn as sa
from streamattn.cli.main import main as cli
from streamattn.errors import InvalidInputError
from streamattn.sources import open_kv
from streamattn.synthetic import SyntheticSpec, generate_kv_store

LAYERS, HEADS, D, N, CHUNK = 3, 2, 8, 3000, 512


def make_cache(path: Path, compressor: str = "none") -> Path:
    spec = SyntheticSpec(n=N, d=D, rank=4, chunk_rows=CHUNK, compressor=compressor,
                         values_dim=4, seed=3)
    return generate_kv_store(path, spec, layers=LAYERS, heads=HEADS)


def head_keys(store: Path, layer: int, head: int) -> np.ndarray:
    arr = zarr.open_group(str(store), mode="r")["keys"][f"layer_{layer}"]
    return np.asarray(arr[:, head * D : (head + 1) * D], dtype=np.float64)


def offline_scores(k: np.ndarray, affine: bool, rtol: float = 1e-10) -> np.ndarray:
    """Leverage by SVD (affine: of [1, K]): tau_j = ||U_r[j]||^2 on sigma > rtol sigma_max."""
    x = np.hstack([np.ones((k.shape[0], 1)), k]) if affine else k
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    rank = int(np.count_nonzero(s > rtol * s[0]))
    return np.einsum("ij,ij->i", u[:, :rank], u[:, :rank])


@pytest.mark.parametrize(("compressor", "variant", "eps"),
                         [("none", "plain", 0.02), ("zstd", "affine", 0.02)])
def test_every_head_equals_its_offline_svd_and_the_single_head_path(
    tmp_path: Path, compressor: str, variant: str, eps: float
) -> None:
    store = make_cache(tmp_path / "kv.zarr", compressor)
    sel = sa.Selection(eps=eps, variant=variant)
    (res,) = sa.universal_sets(open_kv(store), [sel], chunk_rows=1024)
    for layer in range(LAYERS):
        for head in range(HEADS):
            k = head_keys(store, layer, head)
            tau = offline_scores(k, variant == "affine")
            ref = np.flatnonzero(tau >= eps)
            got = res[layer, head]
            near = np.abs(tau - eps) < 1e-9  # rows at the threshold itself may go either way
            assert set(got.indices[~near[got.indices]]) == set(ref[~near[ref]])
            np.testing.assert_allclose(got.scores, tau[got.indices], rtol=1e-8, atol=1e-12)
            np.testing.assert_array_equal(got.rows, k[got.indices].astype(np.float32))
            (single,) = sa.universal_sets(np.ascontiguousarray(k.astype(np.float32)), [sel],
                                          chunk_rows=1024)
            np.testing.assert_array_equal(single.indices, got.indices)
            np.testing.assert_allclose(single.scores, got.scores, rtol=1e-12)


def test_blocks_from_raw_files_and_from_zarr_match_the_arrays(tmp_path: Path) -> None:
    raw = make_cache(tmp_path / "raw.zarr", "none")
    packed = make_cache(tmp_path / "zstd.zarr", "zstd")
    want = np.stack([np.asarray(zarr.open_group(str(raw), mode="r")["keys"][f"layer_{lay}"])
                     .reshape(N, HEADS, D) for lay in range(LAYERS)], axis=1)
    for store in (raw, packed):
        src = open_kv(store)
        for a, b in [(0, 700), (700, 2048), (2900, N)]:  # inside, across and at the end
            block = src.read(a, b)
            assert block.rows.shape == (b - a, LAYERS, HEADS, D)
            np.testing.assert_array_equal(block.rows, want[a:b])
    sub = open_kv(raw, layers=[2, 0], heads=[1])  # a subset: read through its columns
    np.testing.assert_array_equal(sub.read(10, 20).rows, want[10:20][:, [2, 0]][:, :, [1]])


def test_a_bad_row_is_still_named_with_its_layer_and_head(tmp_path: Path) -> None:
    store = make_cache(tmp_path / "kv.zarr")
    arr = zarr.open_array(str(store / "keys" / "layer_1"), mode="r+")
    row = np.asarray(arr[777])
    row[1 * D + 3] = np.inf
    arr[777] = row
    with pytest.raises(InvalidInputError, match=r"row 777 \(layer 1, head 1\)"):
        sa.universal_sets(open_kv(store), [sa.Selection(eps=0.1)])


def test_select_never_opens_values_unless_asked(tmp_path: Path) -> None:
    store = make_cache(tmp_path / "kv.zarr")
    for lay in range(LAYERS):  # corrupt every values array: its chunks become garbage
        for chunk in (store / "values" / f"layer_{lay}").rglob("c/*/*"):
            chunk.write_bytes(b"not a chunk")
    shutil.rmtree(store / "values" / "layer_0")  # and one values array is gone entirely
    with pytest.raises(InvalidInputError):
        src = open_kv(store, values=True)
        src.read(0, N)
    out = tmp_path / "out"
    assert cli(["select", str(store), "--eps", "0.05", "--out", str(out), "--quiet"]) == 0
    (clean,) = sa.universal_sets(open_kv(make_cache(tmp_path / "clean.zarr")),
                                 [sa.Selection(eps=0.05)])
    from streamattn.io.cache_outputs import load_cache_selection

    saved = load_cache_selection(out, "plain-eps0.05")
    for lay in range(LAYERS):
        for head in range(HEADS):
            np.testing.assert_array_equal(saved[lay, head].indices, clean[lay, head].indices)
            source = saved[lay, head].certificate["source"]
            assert source["has_values"] is True and source["values_opened"] is False


def test_inspect_says_a_cache_holds_values_without_opening_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    store = make_cache(tmp_path / "kv.zarr")
    shutil.rmtree(store / "values" / "layer_1")  # unreadable values: never touched
    assert cli(["inspect", str(store)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["has_values"] is True and info["values_opened"] is False
    no_values = generate_kv_store(tmp_path / "k.zarr", SyntheticSpec(n=64, d=4, rank=2,
                                  chunk_rows=32), layers=1, heads=2)
    assert open_kv(no_values).describe()["has_values"] is False
    assert open_kv(store).describe()["values_dim"] == 0


def test_the_reader_thread_takes_each_block_s_read_log_digest(tmp_path: Path) -> None:
    import xxhash

    from streamattn.sources import Block
    from streamattn.sources.keys import block_digest

    store = make_cache(tmp_path / "kv.zarr")
    group = zarr.open_group(str(store), mode="r")["keys"]
    src = open_kv(store)
    blocks = list(src.blocks(1024, digests=True))
    assert len(blocks) == 3
    for b in blocks:  # the bytes of every layer's rows, layer after layer
        layers = np.stack([np.asarray(group[f"layer_{lay}"][b.start : b.stop])
                           for lay in range(LAYERS)])
        assert b.digest == xxhash.xxh3_64_intdigest(layers.tobytes())
        assert block_digest(Block(b.start, b.rows)) == b.digest  # computed here: the same
    assert all(b.digest is None for b in src.blocks(1024))
