"""KV caches as they come: the documented layout with no options, layer/head subsets, keys
only, torch / bfloat16 / transformers / batched inputs, inspect, stacked outputs that
xarray opens, and the kvpress-style handle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr

import streamattn as sa
from streamattn.cli.main import main
from streamattn.decoder_cache import DecoderSpec, write_decoder_cache
from streamattn.errors import ConfigError
from streamattn.io.cache_outputs import load_cache_selection
from streamattn.recipes.key_scores import key_scores
from streamattn.results import MultiHeadResult
from streamattn.sources import open_kv

SPEC = DecoderSpec(n=400, segment=150, layers=3, q_heads=4, kv_heads=2, head_dim=8,
                   chunk_rows=64, layer_ids=(0, 7, 15), seed=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_decoder_cache(tmp_path_factory.mktemp("cache") / "kv.zarr", SPEC)


def dense_leverage(k: np.ndarray) -> np.ndarray:
    u, s, _ = np.linalg.svd(k.astype(np.float64), full_matrices=False)
    u = u[:, s > 1e-10 * s[0]]
    return (u * u).sum(axis=1)


def head_keys(store: Path, layer: int, head: int) -> np.ndarray:
    arr = zarr.open_group(str(store), mode="r")[f"keys/layer_{layer}"][...]
    return np.ascontiguousarray(arr[:, head * 8 : (head + 1) * 8])


def test_layout_opens_with_no_options_real_layer_indices_and_subsets(store: Path) -> None:
    src = sa.open_keys(store)  # heads and head_dim from the array attributes
    assert (src.layer_ids, src.head_ids, src.n, src.d) == ((0, 7, 15), (0, 1), 400, 8)
    assert src.model["causal"] is True and src.segments.starts.tolist() == [0, 150, 300]
    assert src.read(0, 5).values is None  # keys only unless asked
    sub = open_kv(store, layers=[7, 15], heads=[1])
    block = sub.read(60, 130).rows  # crosses a chunk boundary
    for li, lay in enumerate((7, 15)):
        np.testing.assert_array_equal(block[:, li, 0], head_keys(store, lay, 1)[60:130])
    with pytest.raises(ConfigError, match=r"layer 3 is not in the cache; it has layers "
                                          r"\[0, 7, 15\]"):
        open_kv(store, layers=[3])
    with pytest.raises(ConfigError, match="heads is a list of head indices"):
        open_kv(store, heads=2)  # type: ignore[arg-type]


def test_select_budget_64_equals_dense_leverage_per_head_without_reading_values(
    store: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "kv.zarr"
    shutil.copytree(store, broken)
    shutil.rmtree(broken / "values")  # select must never need values/
    (broken / "values").mkdir()
    assert main(["select", str(broken), "--budget", "64", "--out", str(tmp_path / "all"),
                 "--quiet"]) == 0  # no options: every layer and KV head
    every = load_cache_selection(tmp_path / "all", "plain-top64")
    assert (every.layer_ids, every.head_ids) == ((0, 7, 15), (0, 1))
    out = tmp_path / "sel"
    assert main(["select", str(broken), "--budget", "64", "--out", str(out), "--quiet",
                 "--layers", "7,15", "--keep-mask"]) == 0
    res = load_cache_selection(out, "plain-top64")
    assert (res.layer_ids, res.head_ids) == ((7, 15), (0, 1))
    assert res.indices().shape == (2, 2, 64) and res.keep_mask(400).sum() == 2 * 2 * 64
    for (lay, h), u in res:
        tau = dense_leverage(head_keys(store, lay, h))
        want = np.sort(np.lexsort((np.arange(400), -tau))[:64])
        np.testing.assert_array_equal(u.indices, want)
        np.testing.assert_allclose(u.scores, tau[want], rtol=1e-8)
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(out / "result.zarr", group="selection/plain-top64", consolidated=False)
    assert ds["indices"].dims == ("layer", "head", "rank")
    assert ds["keep_mask"].dims == ("layer", "head", "key")
    assert ds["layer"].values.tolist() == [7, 15]
    np.testing.assert_array_equal(ds["indices"].sel(layer=15, head=1).values,
                                  res[15, 1].indices)
    groups = [p for p in (out / "result.zarr").rglob("zarr.json")]
    assert len(groups) < 15  # a handful of arrays, not a group per head
    assert not (out / "state.npz").exists()


def test_inspect_reports_head_counts_and_a_norm_ratio_at_most_one(store: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["inspect", str(store)]) == 0  # no options for the documented layout
    assert len(json.loads(capsys.readouterr().out)["per_head"]) == 3 * 2
    assert main(["inspect", str(store), "--heads", "1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_heads_total"] == 2 and info["query_heads"] == 4
    assert [(p["layer"], p["head"]) for p in info["per_head"]] == [(0, 1), (7, 1), (15, 1)]
    for p in info["per_head"]:
        k = head_keys(store, p["layer"], 1).astype(np.float64)
        norms = np.linalg.norm(k, axis=1)
        want = np.linalg.norm(k.mean(axis=0)) / norms.mean()
        assert p["mean_key_norm_ratio"] == pytest.approx(want, rel=1e-9) and want <= 1
    assert info["sample_mean_key_norm_ratio"] <= 1


def cache_array(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 300, 6)) + 0.5
    x[:, :, ::41] *= 9.0
    return x.astype(np.float32)


def sets_of(src: object, budget: int = 20) -> list[list[list[int]]]:
    res = sa.universal_set(src, budget=budget, variant="affine", chunk_rows=70)
    return [[u.indices.tolist() for u in row] for row in res.items]


def test_dask_and_float16_caches_give_the_numpy_sets() -> None:
    import dask.array as da

    x = cache_array(3)
    assert sets_of(open_kv(da.from_array(x, chunks=(1, 2, 64, 6)))) == sets_of(open_kv(x))
    half = x.astype(np.float16)
    assert sets_of(open_kv(half)) == sets_of(open_kv(half.astype(np.float32)))


def test_torch_bfloat16_transformers_and_batched_inputs_give_the_numpy_sets() -> None:
    torch = pytest.importorskip("torch")
    x = cache_array()
    want = sets_of(open_kv(x))
    assert sets_of(open_kv(torch.from_numpy(x))) == want
    bf = torch.from_numpy(x).to(torch.bfloat16)
    up = bf.float().numpy()  # what bfloat16 holds, upcast block by block by the source
    assert open_kv(bf).dtype == np.float32
    assert sets_of(open_kv(bf)) == sets_of(open_kv(up))
    one = np.ascontiguousarray(x[1, 2])  # a single head, (n, d), through open_keys
    want_one = sa.universal_set(one, budget=20, variant="affine", chunk_rows=70).indices
    for t in (torch.from_numpy(one), torch.from_numpy(one).to(torch.bfloat16)):
        ref = one if t.dtype == torch.float32 else t.float().numpy()
        got = sa.universal_set(sa.open_keys(t), budget=20, variant="affine", chunk_rows=70)
        np.testing.assert_array_equal(got.indices, sa.universal_set(
            ref, budget=20, variant="affine", chunk_rows=70).indices)
    assert want_one.size == 20
    batched = np.stack([cache_array(1), x])  # (B, L, H, n, d)
    assert sets_of(open_kv(batched, batch=1)) == want
    with pytest.raises(ConfigError, match="batch axis of size 2"):
        open_kv(batched)
    legacy = tuple((torch.from_numpy(np.stack([cache_array(1)[lay], x[lay]])),
                    torch.from_numpy(np.stack([cache_array(2)[lay], x[lay]])))
                   for lay in range(2))  # per layer (k, v), each (batch, kv_heads, seq, d)
    assert sets_of(open_kv(legacy, batch=1)) == want
    src = open_kv(legacy, batch=1, values=True, heads=[2])
    np.testing.assert_array_equal(src.read(0, 5).values[:, 1, 0], x[1, 2, :5])
    dynamic = SimpleNamespace(layers=[SimpleNamespace(keys=k, values=v) for k, v in legacy])
    assert sets_of(open_kv(dynamic, batch=1)) == want


def test_transformers_dynamic_cache_if_installed() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    x = cache_array()
    cache = transformers.DynamicCache()
    for lay in range(2):
        t = torch.from_numpy(x[lay][None])
        cache.update(t, t, lay)
    assert sets_of(open_kv(cache)) == sets_of(open_kv(x))


def test_kvpress_handle_and_per_key_scores(store: Path) -> None:
    res = sa.universal_set(store, budget=16, variant="affine", chunk_rows=64)
    assert isinstance(res, MultiHeadResult)
    idx, mask = res.indices(), res.keep_mask(400)
    assert idx.shape == (3, 2, 16) and mask.shape == (3, 2, 400)
    scores = key_scores(store, "leverage-affine")
    assert scores.shape == (3, 2, 400)
    for li, lay in enumerate((0, 7, 15)):
        for h in range(2):
            k = head_keys(store, lay, h)
            tau = dense_leverage(np.hstack([k, np.ones((400, 1), np.float32)]))
            np.testing.assert_allclose(scores[li, h], tau, rtol=1e-8, atol=1e-12)
            top = np.sort(np.lexsort((np.arange(400), -scores[li, h]))[:16])
            np.testing.assert_array_equal(idx[li, h], top)
            assert mask[li, h].sum() == 16 and mask[li, h, top].all()
    norms = key_scores(store, "key-norm", layers=[15])
    k = head_keys(store, 15, 1).astype(np.float64)
    np.testing.assert_allclose(norms[0, 1], (k * k).sum(axis=1), rtol=1e-12)
    with pytest.raises(ConfigError, match="not a query-free selector"):
        key_scores(store, "oracle")
