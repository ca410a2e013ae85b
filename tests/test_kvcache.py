"""KV caches: every (layer, head) from one read of each block, equal to single-head runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from conftest import svd_leverage

import streamattn as sa
from streamattn.cli.main import main
from streamattn.errors import ConfigError, InvalidInputError
from streamattn.io.cache_outputs import load_cache_selection
from streamattn.operators import LeverageScores, LeverageSpec
from streamattn.operators.multihead import MultiHead
from streamattn.results import MultiHeadResult, UniversalSet
from streamattn.sources import MultiHeadSource, open_kv
from streamattn.synthetic import SyntheticSpec, generate_kv_store, head_spec, synthetic_rows

LAYERS, HEADS, N, D = 2, 3, 600, 6


def cache(seed: int = 0) -> np.ndarray:
    """(layers, heads, n, d) float32 keys with an offset, low rank and a heavy row per head."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((LAYERS, HEADS, N, 3)) @ rng.standard_normal((3, D))
    x += 0.05 * rng.standard_normal((LAYERS, HEADS, N, D)) + 1.5
    for lay in range(LAYERS):
        for h in range(HEADS):
            x[lay, h, 37 * (lay * HEADS + h + 1)] *= 25.0
    return x.astype(np.float32)


class CountingArray:
    """An array wrapper counting reads (``__getitem__`` calls)."""

    def __init__(self, arr: Any) -> None:
        self.arr = arr
        self.shape = arr.shape
        self.dtype = arr.dtype
        self.chunks = getattr(arr, "chunks", None)
        self.reads = 0

    def __getitem__(self, key: Any) -> np.ndarray:
        self.reads += 1
        return np.asarray(self.arr[key])


SELECTIONS = [sa.Selection(eps=0.05), sa.Selection(eps=0.02, variant="affine")]


def assert_same_set(a: UniversalSet, b: UniversalSet) -> None:
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.rows, b.rows)


def assert_offline(u: UniversalSet, rows: np.ndarray, eps: float) -> None:
    """The set against the independent reference: a dense SVD of the head's keys."""
    tau, _ = svd_leverage(np.asarray(rows, dtype=np.float64))
    np.testing.assert_array_equal(u.indices, np.flatnonzero(tau >= eps))
    np.testing.assert_allclose(u.scores, tau[u.indices], rtol=1e-7, atol=1e-9)


def test_4d_cache_one_read_per_block_and_per_head_equals_single_head_runs() -> None:
    x = cache()
    counted = CountingArray(x)
    results = sa.universal_sets(open_kv(counted), SELECTIONS, chunk_rows=64)
    blocks = -(-N // 64)
    assert counted.reads == blocks  # one read per block serves 2 selections x 6 heads
    for sel, res in zip(SELECTIONS, results, strict=True):
        assert isinstance(res, MultiHeadResult)
        assert (res.layers, res.heads, len(res)) == (LAYERS, HEADS, LAYERS * HEADS)
        for (lay, h), uset in res:
            assert isinstance(uset, UniversalSet)
            single = sa.universal_sets(np.ascontiguousarray(x[lay, h]), [sel], chunk_rows=64)[0]
            assert_same_set(uset, single)
            assert uset.certificate["source"]["layer"] == lay
            assert uset.certificate["source"]["head"] == h
            assert 37 * (lay * HEADS + h + 1) in uset


def test_open_keys_of_a_4d_store_returns_an_indexable_result(tmp_path: Path) -> None:
    x = cache(1)
    np.save(tmp_path / "kv.npy", x)
    src = sa.open_keys(tmp_path / "kv.npy")
    assert isinstance(src, MultiHeadSource)
    res = sa.universal_set(src, eps=0.05, chunk_rows=100)
    assert isinstance(res[1, 2], UniversalSet)
    assert_same_set(res[1, 2], sa.universal_set(np.ascontiguousarray(x[1, 2]), eps=0.05,
                                                 chunk_rows=100))
    for (lay, h), uset in res:
        assert_offline(uset, x[lay, h], 0.05)


def test_layered_zarr_group_reads_each_layer_once_per_block(tmp_path: Path) -> None:
    x = cache(2)
    root = zarr.open_group(str(tmp_path / "kv.zarr"), mode="w")
    keys = root.require_group("keys")
    for lay in range(LAYERS):  # (n, heads * d): head h in columns [h*d, (h+1)*d)
        arr = keys.create_array(f"layer_{lay}", shape=(N, HEADS * D), dtype="float32",
                                chunks=(128, HEADS * D))
        arr[...] = x[lay].transpose(1, 0, 2).reshape(N, HEADS * D)
    src = open_kv(tmp_path / "kv.zarr", n_heads=HEADS)
    assert src.storage_chunk_rows == 128
    counted = [CountingArray(a) for a in src._keys.arrays]
    src._keys = dataclasses.replace(src._keys, arrays=tuple(counted))
    budget = [sa.Selection(budget=4, variant="affine"), *SELECTIONS]
    results = sa.universal_sets(src, budget, chunk_rows=128)
    blocks = -(-N // 128)
    passes = max(u.certificate["passes"] for _, u in results[0])
    assert [c.reads for c in counted] == [passes * blocks] * LAYERS  # not x heads, x selections
    for sel, res in zip(budget, results, strict=True):
        for (lay, h), uset in res:
            single = sa.universal_sets(np.ascontiguousarray(x[lay, h]), [sel], chunk_rows=128)
            assert_same_set(uset, single[0])
            assert uset.certificate["passes"] == single[0].certificate["passes"]


def test_2d_array_with_declared_heads_is_split_by_columns() -> None:
    x = cache(3)[0]  # (heads, n, d)
    wide = x.transpose(1, 0, 2).reshape(N, HEADS * D)
    res = sa.universal_set(open_kv(wide, n_heads=HEADS), eps=0.05, chunk_rows=50)
    assert res.layers == 1
    for h in range(HEADS):
        assert_same_set(res[0, h], sa.universal_set(np.ascontiguousarray(x[h]), eps=0.05,
                                                     chunk_rows=50))
        assert_offline(res[0, h], x[h], 0.05)
    three_d = sa.universal_set(open_kv(x), eps=0.05, chunk_rows=50)  # (heads, n, d)
    for h in range(HEADS):
        assert_same_set(three_d[0, h], res[0, h])


def test_memory_bound_is_heads_times_the_single_head_bound() -> None:
    one = LeverageScores(LeverageSpec(0.05))
    multi = MultiHead.of([[LeverageScores(LeverageSpec(0.05)) for _ in range(HEADS)]
                          for _ in range(LAYERS)])
    assert multi.nbytes_bound(D) == LAYERS * HEADS * one.nbytes_bound(D)


def test_several_operator_families_share_one_read() -> None:
    from streamattn.operators.frequent_directions import FDSpec, FrequentDirections

    x = cache(4)
    counted = CountingArray(x)
    src = open_kv(counted)

    def fd() -> FrequentDirections:
        return FrequentDirections(FDSpec(ell=4))

    lev = MultiHead.of([[LeverageScores(LeverageSpec(0.05)) for _ in range(HEADS)]
                        for _ in range(LAYERS)])
    sketches = MultiHead.of([[fd() for _ in range(HEADS)] for _ in range(LAYERS)])
    sa.run_operators(src, [lev, sketches], chunk_rows=100)
    assert counted.reads == N // 100
    for lay in range(LAYERS):
        for h in range(HEADS):
            rows = np.ascontiguousarray(x[lay, h])
            single_fd = fd()
            single_lev = LeverageScores(LeverageSpec(0.05))
            sa.run_operators(sa.open_keys(rows), [single_lev, single_fd], chunk_rows=100)
            got, want = sketches.ops[lay][h].result(), single_fd.result()
            np.testing.assert_array_equal(got.sketch, want.sketch)
            assert (got.delta, got.fro2, got.n) == (want.delta, want.fro2, want.n)
            np.testing.assert_array_equal(lev.ops[lay][h].result()["indices"],
                                          single_lev.result()["indices"])


def test_generate_layers_heads_cli_writes_a_kv_cache(tmp_path: Path) -> None:
    out = tmp_path / "kv.zarr"
    argv = ["generate", str(out), "--n", "700", "--d", "8", "--rank", "3", "--layers", "2",
            "--heads", "3", "--chunk-rows", "256", "--outliers", "2", "--quiet"]
    assert main(argv) == 0
    src = sa.open_keys(out)
    assert (src.layers, src.heads, src.n, src.d) == (2, 3, 700, 8)
    spec = SyntheticSpec(n=700, d=8, rank=3, chunk_rows=256, outliers=2)
    block = src.read(0, 700).rows
    for lay in range(2):
        for h in range(3):
            np.testing.assert_array_equal(block[:, lay, h],
                                          synthetic_rows(head_spec(spec, lay, h, 3), 0, 700))
    # the CLI selects every head in one run, outputs named <set>/layer_<l>/head_<h>
    cfg = tmp_path / "kv.yaml"
    cfg.write_text(f"input:\n  path: {out}\nselect:\n  - name: s\n    eps: 0.1\n"
                   f"output:\n  dir: {tmp_path / 'res'}\nprogress: false\n")
    assert main(["run", str(cfg), "--quiet"]) == 0
    saved = load_cache_selection(tmp_path / "res", "s")  # stacked (layer, head, rank) arrays
    assert_same_set(saved[1, 2], sa.universal_set(np.ascontiguousarray(block[:, 1, 2]),
                                                  eps=0.1))
    assert_offline(saved[1, 2], block[:, 1, 2], 0.1)
    assert not (tmp_path / "res" / "result.zarr" / "universal_set").exists()


def test_heads_that_do_not_divide_the_width_are_refused(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    wide = np.ones((10, 12), dtype=np.float32)
    with pytest.raises(ConfigError, match=r"n_heads = 5 does not divide the key width 12"):
        open_kv(wide, n_heads=5)
    with pytest.raises(ConfigError, match=r"needs a declared head count"):
        open_kv(wide)
    np.save(tmp_path / "k.npy", wide)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"input:\n  path: {tmp_path / 'k.npy'}\n  n_heads: 5\n"
                   f"output:\n  dir: {tmp_path / 'o'}\n")
    assert main(["run", str(cfg), "--quiet"]) == 2
    assert "n_heads = 5 does not divide the key width 12" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_mixed_dtypes_across_layers_are_refused_naming_the_layers(tmp_path: Path) -> None:
    root = zarr.open_group(str(tmp_path / "kv.zarr"), mode="w")
    keys = root.require_group("keys")
    keys.attrs["heads"] = 2
    for lay, dtype in enumerate(["float32", "float32", "float16"]):
        keys.create_array(f"layer_{lay}", shape=(20, 8), dtype=dtype)[...] = 1.0
    with pytest.raises(InvalidInputError,
                       match=r"mixed dtypes across layers.*layer_0: float32.*layer_2: float16"):
        sa.open_keys(tmp_path / "kv.zarr")


def test_a_layered_group_without_declared_heads_is_refused(tmp_path: Path) -> None:
    root = zarr.open_group(str(tmp_path / "kv.zarr"), mode="w")
    root.require_group("keys").create_array("layer_0", shape=(20, 8), dtype="float32")
    with pytest.raises(ConfigError, match="declared head count"):
        sa.open_keys(tmp_path / "kv.zarr")


def test_nan_in_one_head_names_row_layer_and_head() -> None:
    x = cache(5)
    x[1, 2, 333, 4] = np.nan
    with pytest.raises(InvalidInputError, match=r"key row 333 \(layer 1, head 2\)"):
        sa.universal_set(open_kv(x), eps=0.1, chunk_rows=100)


def test_values_of_a_kv_cache_follow_their_heads(tmp_path: Path) -> None:
    spec = SyntheticSpec(n=500, d=4, rank=2, chunk_rows=128, outliers=2, values_dim=3)
    generate_kv_store(tmp_path / "kv.zarr", spec, layers=1, heads=2)
    assert open_kv(tmp_path / "kv.zarr").read(0, 10).values is None  # keys only by default
    res = sa.universal_set(open_kv(tmp_path / "kv.zarr", values=True), eps=0.1)
    block = open_kv(tmp_path / "kv.zarr", values=True).read(0, 500)
    for h in range(2):
        u = res[0, h]
        np.testing.assert_array_equal(u.values, block.values[u.indices, 0, h])


def test_kv_cache_on_the_dask_engine_equals_local(tmp_path: Path) -> None:
    spec = SyntheticSpec(n=1500, d=5, rank=3, chunk_rows=100, outliers=3, compressor="none")
    store = generate_kv_store(tmp_path / "kv.zarr", spec, layers=2, heads=2)
    sels = [sa.Selection(eps=0.05), sa.Selection(budget=7, variant="affine")]
    local = sa.universal_sets(store, sels, chunk_rows=100)
    dask = sa.universal_sets(store, sels, chunk_rows=100, engine="dask", scheduler="threads")
    for lo, dk in zip(local, dask, strict=True):
        for (lay, h), u in lo:
            np.testing.assert_array_equal(u.indices, dk[lay, h].indices)
            np.testing.assert_allclose(u.scores, dk[lay, h].scores, rtol=1e-9)
    with pytest.raises(ConfigError, match="in-memory cache"):
        sa.universal_set(cache(), eps=0.1, engine="dask", scheduler="threads")
