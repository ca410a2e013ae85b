"""``reduce_embeddings`` end to end: Y on disk, chunking independence, quality report, CLI, run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.special
import yaml

from streamattn.cli import main
from streamattn.engines import ENGINES
from streamattn.errors import ConfigError, OutputExistsError
from streamattn.operators.projection import METHODS, ProjectionMap
from streamattn.recipes.embeddings import (
    ReduceConfig,
    load_reduced_embeddings,
    quality_report,
    reduce_embeddings,
)
from streamattn.sources import KeySource


def keys(n: int = 1200, d: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)) @ rng.standard_normal((6, d)) + 0.2 * rng.standard_normal(
        (n, d)
    )
    return (x + 3.0).astype(np.float32)


@pytest.mark.parametrize("method", METHODS)
def test_embeddings_equal_keys_times_the_saved_map(method: str, tmp_path: Path) -> None:
    x = keys()
    res = reduce_embeddings(x, m=8, method=method, seed=3, out=tmp_path / "out", chunk_rows=250)
    y = res.embeddings[...]
    s = res.map.dense()
    assert y.shape == (1200, 8) and y.dtype == np.float32
    np.testing.assert_allclose(y, x.astype(np.float64) @ s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res.mean, x.astype(np.float64).mean(0), rtol=1e-10)
    np.testing.assert_allclose(res.mu_s, res.mean @ s, atol=1e-10)
    np.testing.assert_allclose(res.centred(0, 5), y[:5] - res.mu_s, atol=1e-12)
    q = np.random.default_rng(1).standard_normal((3, 24))
    np.testing.assert_allclose(res.project_queries(q), q @ s, atol=1e-10)
    back = load_reduced_embeddings(tmp_path / "out")
    np.testing.assert_array_equal(back.map.dense(), s)
    np.testing.assert_array_equal(back.embeddings[...], y)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["embeddings"]["map"]["passes"] == (
        2 if method in ("pca", "frequent-directions") else 1
    )
    assert report["embeddings"]["quality"]["keys"] == 1200 > 0


@pytest.mark.parametrize("method", ["gaussian", "sparse-sign", "srht"])
def test_embeddings_on_disk_are_bit_identical_across_chunk_sizes(
    method: str, zarr_store: Any
) -> None:
    """Row-level cuts are covered by tests/test_projection.py (hypothesis); here the store."""
    path = zarr_store(keys(600, 20, seed=2), chunks=100)
    ref = reduce_embeddings(path, m=5, method=method, seed=1, chunk_rows=600).embeddings[...]
    for rows in (13, 257):
        got = reduce_embeddings(path, m=5, method=method, seed=1, chunk_rows=rows)
        np.testing.assert_array_equal(got.embeddings[...], ref)


def test_pca_map_depends_on_chunking_only_through_rounding() -> None:
    x = keys(600, 20, seed=2)
    ref = reduce_embeddings(x, m=5, method="pca", chunk_rows=600).map.dense()
    got = reduce_embeddings(x, m=5, method="pca", chunk_rows=37).map.dense()
    np.testing.assert_allclose(got, ref, atol=1e-9)


def test_pca_with_m_equal_d_is_exact_and_quality_report_matches_brute_force() -> None:
    x = keys(600, 10).astype(np.float64)
    cfg = ReduceConfig(m=10, method="pca", dtype="float64", sample_keys=600)
    res = reduce_embeddings(x, config=cfg)
    assert res.quality["logit_error_max"] < 1e-10
    assert res.quality["attention_tv_max"] < 1e-10
    # a lossy map: the report equals a dense computation on the same samples
    pmap = ProjectionMap("gaussian", 10, 3, seed=5)
    q = np.random.default_rng(2).standard_normal((7, 10)) * 3
    rep = quality_report(pmap, x, q, mean=x.mean(0), scale=0.5)
    s = pmap.dense()
    exact, approx = q @ x.T, (q @ s) @ (x @ s).T
    err = np.abs(exact - approx) / np.outer(np.linalg.norm(q, axis=1), np.linalg.norm(x, axis=1))
    p = scipy.special.softmax(0.5 * exact, axis=1)
    p_hat = scipy.special.softmax(0.5 * approx, axis=1)
    assert rep["logit_error_max"] == pytest.approx(err.max(), rel=1e-10)
    assert rep["logit_error_mean"] == pytest.approx(err.mean(), rel=1e-10)
    assert rep["attention_max_abs_error"] == pytest.approx(np.abs(p - p_hat).max(), rel=1e-8)
    tv = 0.5 * np.abs(p - p_hat).sum(axis=1)
    assert rep["attention_tv_max"] == pytest.approx(tv.max(), rel=1e-8)
    assert rep["attention_tv_mean"] == pytest.approx(tv.mean(), rel=1e-8)


def test_quality_uses_store_queries_and_gaussian_error_is_within_jl(zarr_store: Any) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, 256)).astype(np.float32)
    q = rng.standard_normal((40, 256)).astype(np.float32)
    path = zarr_store(x, chunks=500, queries=q)
    cfg = ReduceConfig(m=200, method="gaussian", seed=2, sample_keys=100, sample_queries=40)
    res = reduce_embeddings(path, config=cfg)
    assert res.quality["query_source"] == "store queries"
    assert res.quality["queries"] == 40 and res.quality["keys"] == 100
    eps = res.quality["jl_eps_gaussian_form"]
    assert eps is not None and res.quality["logit_error_max"] <= eps
    plain = reduce_embeddings(x, config=cfg)
    assert plain.quality["query_source"].startswith("random directions")


def test_frequent_directions_report_carries_a_bound_that_holds() -> None:
    x = keys(900, 16).astype(np.float64)
    res = reduce_embeddings(
        x, config=ReduceConfig(m=4, method="frequent-directions", fd_ell=6), chunk_rows=128
    )
    info = res.report["embeddings"]["map"]
    assert info["fd_ell"] == 6 and info["fd_delta"] <= info["fd_delta_bound"] * (1 + 1e-9)
    xc = x - x.mean(0)
    # the top-m FD directions capture the top-m variance up to m·Δ (Weyl + 0 ⪯ C − C_B ⪯ ΔI)
    v = res.map.dense()
    captured = np.trace(v.T @ xc.T @ xc @ v)
    best = np.sort(np.linalg.eigvalsh(xc.T @ xc))[::-1][:4].sum()
    assert captured >= best - 4 * info["fd_delta"] - 1e-9 * best


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"m": 0}, "must be >= 1"),
        ({"m": 25}, "larger than the key dimension d = 24"),
        ({"method": "umap"}, "unknown reduce method"),
        ({"seed": "7"}, "seed must be a non-negative integer"),
        ({"seed": 0.5}, "seed must be a non-negative integer"),
    ],
)
def test_bad_input_is_refused_before_any_output(kwargs: dict, match: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=match):
        reduce_embeddings(keys(), out=tmp_path / "out", **{"m": 4, **kwargs})
    assert not (tmp_path / "out").exists()


def test_bad_reduce_config_settings() -> None:
    for cfg, match in [
        (ReduceConfig(fd_ell=3, m=4, method="frequent-directions"), "fd_ell = 3 < m = 4"),
        (ReduceConfig(sample_keys=0), "sample_keys"),
        (ReduceConfig(dtype="int8"), "dtype"),
        (ReduceConfig(scale=-1.0), "scale"),
    ]:
        with pytest.raises(ConfigError, match=match):
            cfg.check(64)


def test_existing_output_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "out"
    reduce_embeddings(keys(), m=4, out=out)
    with pytest.raises(OutputExistsError):
        reduce_embeddings(keys(), m=4, out=out)
    reduce_embeddings(keys(), m=4, out=out, overwrite=True, seed=9)
    assert load_reduced_embeddings(out).map.seed == 9


def test_cli_reduce_end_to_end(zarr_store: Any, tmp_path: Path, capsys: Any) -> None:
    x = keys(500, 16)
    path = zarr_store(x, chunks=128)
    out = tmp_path / "emb"
    argv = ["reduce", str(path), "--m", "6", "--method", "srht", "--seed", "0", "--out", str(out)]
    assert main([*argv, "--quiet"]) == 0
    res = load_reduced_embeddings(out)
    np.testing.assert_allclose(
        res.embeddings[...], x.astype(np.float64) @ res.map.dense(), rtol=1e-5, atol=1e-5
    )
    assert main(argv) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["reduce", str(path), "--m", "17", "--out", str(tmp_path / "x")]) == 2
    assert "larger than the key dimension" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


class CountingArray:
    """A numpy array that counts the rows read through ``__getitem__``."""

    def __init__(self, x: np.ndarray) -> None:
        self.x, self.shape, self.dtype, self.rows_read = x, x.shape, x.dtype, 0

    def __getitem__(self, item: Any) -> np.ndarray:
        out = self.x[item]
        self.rows_read += out.shape[0]
        return out


def test_run_with_select_and_reduce_shares_one_read(tmp_path: Path) -> None:
    import argparse

    from streamattn.cli.run import run_select_and_reduce
    from streamattn.config import from_dict, load_config
    from streamattn.recipes.universal import load_universal_set, universal_set

    x = keys(2000, 12).astype(np.float64)
    counting = CountingArray(x)
    src = KeySource(counting, label="<counting>")
    cfg_dict = {
        "select": [{"name": "aff", "eps": 0.05, "variant": "affine"}],
        "reduce": {"m": 5, "method": "sparse-sign", "seed": 4},
        "engine": {"chunk_rows": 300},
        "output": {"dir": str(tmp_path / "run")},
        "progress": False,
    }
    cfg = from_dict(type(load_config(None)), cfg_dict)
    cfg.check()
    named = {s.name: s.selection() for s in cfg.select}
    args = argparse.Namespace(quiet=True, overwrite=False)
    assert run_select_and_reduce(args, cfg, src, named) == 0
    assert counting.rows_read == 2000  # one read for the universal set and the embeddings
    got = load_universal_set(tmp_path / "run", "aff")
    np.testing.assert_array_equal(got.indices, universal_set(x, eps=0.05, variant="affine").indices)
    emb = load_reduced_embeddings(tmp_path / "run")
    np.testing.assert_allclose(emb.embeddings[...], x @ emb.map.dense(), rtol=1e-5, atol=1e-5)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report) >= {"sets", "embeddings", "config"}
    assert report["config"]["reduce"]["method"] == "sparse-sign"


def test_streamattn_run_config_with_reduce(tmp_path: Path, zarr_store: Any) -> None:
    path = zarr_store(keys(700, 8), chunks=100)
    config = {
        "input": {"path": str(path)},
        "select": [{"name": "plain", "eps": 0.1}],
        "reduce": {"m": 3, "method": "pca"},
        "output": {"dir": str(tmp_path / "out")},
        "progress": False,
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "c.yaml"), "--quiet"]) == 0
    assert (tmp_path / "out" / "result.zarr").is_dir()
    assert load_reduced_embeddings(tmp_path / "out").embeddings.shape == (700, 3)
    config["reduce"]["mm"] = 3
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "c.yaml"), "--quiet"]) == 2  # typo refused


@pytest.mark.skipif("dask" not in ENGINES, reason="no Dask engine registered")
@pytest.mark.parametrize("method", ["srht", "gaussian"])
def test_dask_engine_writes_the_same_embeddings(method: str, zarr_store: Any) -> None:
    path = zarr_store(keys(1000, 16), chunks=200)
    local = reduce_embeddings(path, m=4, method=method, seed=5, chunk_rows=200)
    dask = reduce_embeddings(
        path, m=4, method=method, seed=5, chunk_rows=200, engine="dask", scheduler="threads"
    )
    np.testing.assert_array_equal(dask.embeddings[...], local.embeddings[...])
    np.testing.assert_allclose(dask.mu_s, local.mu_s, rtol=1e-12)
    assert dask.quality == local.quality


@pytest.mark.skipif("dask" not in ENGINES, reason="no Dask engine registered")
def test_dask_local_cluster_processes_regenerate_the_same_map(zarr_store: Any) -> None:
    """Worker processes rebuild S from the seed and write their own blocks of Y."""
    path = zarr_store(keys(800, 16), chunks=200)
    local = reduce_embeddings(path, m=4, method="gaussian", seed=6, chunk_rows=200)
    dask = reduce_embeddings(
        path,
        m=4,
        method="gaussian",
        seed=6,
        chunk_rows=200,
        engine="dask",
        scheduler="local-cluster",
        n_workers=2,
        threads_per_worker=1,
        dashboard=False,
    )
    np.testing.assert_array_equal(dask.embeddings[...], local.embeddings[...])
    np.testing.assert_array_equal(dask.map.dense(), local.map.dense())
