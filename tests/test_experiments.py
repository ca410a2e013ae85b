"""Experiments: generated sources, gaussian-sparsity, scaling, real-sparsity, the CLI."""

from __future__ import annotations

import csv
import filecmp
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scipy.special import logsumexp

from streamattn.cli.main import main
from streamattn.errors import ConfigError, InvalidInputError
from streamattn.experiments import EXPERIMENTS, load_config, run_experiment, shipped_config
from streamattn.experiments.generated import GaussianRows, GeneratedSource, SyntheticRows
from streamattn.sources import open_keys
from streamattn.synthetic import SyntheticSpec, generate_store

REPO = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------- sources
def test_generated_rows_do_not_depend_on_the_read_chunking() -> None:
    src = GeneratedSource(GaussianRows(5000, 4, sigma_k=2.0, seed=3, chunk_rows=700))
    whole = np.vstack([b.rows for b in src.blocks(5000)])
    pieces = np.vstack([b.rows for b in src.blocks(333, prefetch=0)])
    np.testing.assert_array_equal(whole, pieces)
    prefix = GeneratedSource(GaussianRows(1234, 4, sigma_k=2.0, seed=3, chunk_rows=700))
    np.testing.assert_array_equal(prefix.read(0, 1234).rows, whole[:1234])
    assert abs(whole.std() - 2.0) < 0.05


def test_synthetic_rows_equal_the_written_store(tmp_path: Path) -> None:
    spec = SyntheticSpec(n=3000, d=8, rank=3, outliers=2, chunk_rows=512, compressor="none")
    store = generate_store(tmp_path / "k.zarr", spec)
    disk = open_keys(store).read(0, 3000).rows
    gen = GeneratedSource(SyntheticRows(spec)).read(0, 3000).rows
    np.testing.assert_array_equal(gen, disk)


# ---------------------------------------------------------------------- gaussian-sparsity
GAUSS_SMALL = {
    "n": [4096, 16384, 65536], "d": [16, 32], "sigma": [1.0, 2.0, 5.0],
    "eps": [0.01, 0.001], "delta": 0.9, "queries": 64, "seed": 1, "chunk_rows": 4096,
}


@pytest.fixture(scope="module")
def gauss_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("gauss")
    cfg = write_yaml(tmp / "g.yaml", GAUSS_SMALL)
    run_experiment("gaussian-sparsity", cfg, tmp / "out")
    return tmp


def test_gaussian_counts_agree_with_the_prediction_in_regime(gauss_run: Path) -> None:
    rows = read_csv(gauss_run / "out" / "results.csv")
    for col in ("n", "d", "sigma", "eps", "measured_heavy_per_query",
                "predicted_heavy_per_query", "in_regime"):
        assert col in rows[0]
    inside = [r for r in rows if r["in_regime"] == "true"]
    assert len(inside) >= 4
    for r in inside:
        m, p = float(r["measured_heavy_per_query"]), float(r["predicted_heavy_per_query"])
        assert abs(m - p) <= 0.1 * p, r
    # σ = 5 at n <= 2^16 is beyond σ² ≈ 2 ln n: out of regime, and the prediction is off
    far = [r for r in rows if float(r["sigma"]) == 5.0 and r["eps"] == "0.01"]
    assert all(r["in_regime"] == "false" for r in far)
    assert all(float(r["measured_heavy_per_query"]) > 1.5 * float(r["predicted_heavy_per_query"])
               for r in far)
    report = (gauss_run / "out" / "report.md").read_text()
    assert "the normaliser is off" in report and "heavy_vs_n.png" in report


def test_gaussian_counts_equal_a_dense_computation(gauss_run: Path) -> None:
    """One row recomputed independently: dense keys, dense softmax, numpy counts."""
    from streamattn.experiments.gaussian import base_queries

    n, d, sigma, eps = 4096, 16, 2.0, 0.001
    keys = np.vstack([GaussianRows(n, d, 1.0, 1, 4096).chunk(c) for c in range(1)])
    q = base_queries(1, 64, d) * sigma  # β = 1/√d, σ_k = 1: σ_q = σ
    logits = q @ keys.T / math.sqrt(d)
    p = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
    expected = float(np.mean(np.sum(p >= eps, axis=1)))
    rows = read_csv(gauss_run / "out" / "results.csv")
    (row,) = [r for r in rows if (r["n"], r["d"], r["sigma"], r["eps"])
              == (str(n), str(d), str(sigma), str(eps))]
    assert float(row["measured_heavy_per_query"]) == expected


def test_gaussian_rerun_is_bit_for_bit(gauss_run: Path) -> None:
    run_experiment("gaussian-sparsity", gauss_run / "g.yaml", gauss_run / "again")
    for name in ("results.csv", "kdelta.csv", "fit.csv"):
        assert filecmp.cmp(gauss_run / "out" / name, gauss_run / "again" / name, shallow=False)
    fits = read_csv(gauss_run / "out" / "fit.csv")
    big = [f for f in fits if float(f["sigma"]) == 5.0 and f["C"]]
    small = [f for f in fits if float(f["sigma"]) == 1.0 and f["C"]]
    assert big and small
    assert max(float(f["C"]) for f in big) < min(float(f["C"]) for f in small)


# ---------------------------------------------------------------------- scaling
def test_scaling_quick_config(tmp_path: Path) -> None:
    cfg = REPO / "configs" / "experiments" / "scaling-quick.yaml"
    stores = tmp_path / "stores"
    stores.mkdir()
    data = {**yaml.safe_load(cfg.read_text()), "store_dir": str(stores)}
    path = write_yaml(tmp_path / "q.yaml", data)
    run_experiment("scaling", path, tmp_path / "a")
    rows = read_csv(tmp_path / "a" / "results.csv")
    # a rerun (here of the first row only, to keep the test short) gives the same bytes
    first = write_yaml(tmp_path / "r.yaml", {**data, "n": int(rows[0]["n"]),
                                             "source": rows[0]["source"]})
    run_experiment("scaling", first, tmp_path / "b")
    again = (tmp_path / "b" / "results.csv").read_text().splitlines()
    assert again == (tmp_path / "a" / "results.csv").read_text().splitlines()[:2]
    assert {r["source"] for r in rows} == {"generator", "zarr"}
    by_n: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_n.setdefault(r["n"], []).append({k: v for k, v in r.items() if k != "source"})
    assert all(len(v) == 2 and v[0] == v[1] for v in by_n.values())  # same rows, same results
    assert all(0 < int(r["sample_size"]) <= int(r["sample_size_bound"]) for r in rows)
    meas = read_csv(tmp_path / "a" / "measurements.csv")
    assert all(int(m["peak_rss_bytes"]) > 0 and float(m["seconds"]) > 0 for m in meas)
    assert list(stores.iterdir()) == []  # stores removed after use
    assert (tmp_path / "a" / "scaling.png").stat().st_size > 0


# ---------------------------------------------------------------------- real-sparsity
def make_cache(path: Path, *, n: int = 1500, layers: int = 2, kv: int = 2, hq: int = 4,
               hd: int = 8, segments: tuple[int, ...] = (0, 600, 1100),
               causal: bool = True) -> dict[str, Any]:
    """A small cache in the cache layout, from random data (a sink key per segment)."""
    import zarr

    rng = np.random.default_rng(9)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    window = np.zeros(n, dtype=np.int64)
    pos = np.zeros(n, dtype=np.int64)
    bounds = [*segments, n]
    for i in range(len(segments)):
        window[bounds[i] : bounds[i + 1]] = i + 5
        pos[bounds[i] : bounds[i + 1]] = np.arange(bounds[i + 1] - bounds[i])
    data: dict[str, Any] = {"window": window}
    for lay in range(layers):
        k = rng.standard_normal((n, kv * hd)).astype(np.float32)
        k[list(segments)] *= 4.0  # heavy first keys
        q = (2.0 * rng.standard_normal((n, hq * hd))).astype(np.float32)
        ka = root.create_array(f"keys/layer_{lay}", data=k, chunks=(256, kv * hd))
        ka.attrs.update({"n_heads": kv, "head_dim": hd, "layer": lay})
        qa = root.create_array(f"queries/layer_{lay}", data=q, chunks=(256, hq * hd))
        qa.attrs.update({"n_heads": hq, "head_dim": hd})
        data[lay] = (k, q)
    root.create_array("tokens/window", data=window, chunks=(500,))
    root.create_array("tokens/pos", data=pos)
    root.attrs["model"] = {"causal": causal, "attn_scaling": 1 / math.sqrt(hd), "name": "rand"}
    return data


@pytest.mark.parametrize("causal", [True, False])
def test_real_sparsity_equals_dense_per_head(tmp_path: Path, causal: bool) -> None:
    from streamattn.experiments.real import RealSparsityConfig

    data = make_cache(tmp_path / "c.zarr", causal=causal)
    cfg = write_yaml(tmp_path / "r.yaml", {
        "path": str(tmp_path / "c.zarr"), "queries": 30, "seed": 2, "eps": [0.01],
        "delta": 0.5, "min_keys": 50,
    })
    run_experiment("real-sparsity", cfg, tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert len(rows) == 2 * 4
    # dense reference for layer 1, query head 3 (KV head 1)
    c = load_config("real-sparsity", cfg)
    assert isinstance(c, RealSparsityConfig)
    rng = np.random.default_rng([2, 0x5245414C])
    qrows = np.sort(rng.choice(1500, size=30, replace=False))
    window = data["window"]
    k, q = data[1]
    counts, ent = [], []
    for r in qrows:
        seg = np.flatnonzero(window == window[r])
        keys = seg[seg <= r] if causal else seg
        if keys.size < 50:
            continue
        logit = q[r, 24:32].astype(np.float64) @ k[keys, 8:16].astype(np.float64).T
        logit /= math.sqrt(8)
        p = np.exp(logit - logsumexp(logit))
        counts.append(np.sum(p >= 0.01))
        ent.append(-(p * np.log(p)).sum())
    (row,) = [r for r in rows if r["layer"] == "1" and r["head"] == "3"]
    assert row["kv_head"] == "1" and int(row["queries"]) == len(counts)
    assert float(row["measured_heavy_per_query"]) == pytest.approx(np.mean(counts), rel=1e-12)
    assert float(row["measured_entropy"]) == pytest.approx(np.mean(ent), rel=1e-10)
    run_experiment("real-sparsity", cfg, tmp_path / "again")
    assert filecmp.cmp(tmp_path / "out" / "results.csv", tmp_path / "again" / "results.csv",
                       shallow=False)


def test_without_matplotlib_the_plots_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamattn.experiments.real as real

    monkeypatch.setattr(real, "plots_available", lambda: False)
    make_cache(tmp_path / "c.zarr", n=700, layers=1, segments=(0, 400))
    cfg = write_yaml(tmp_path / "r.yaml", {"path": str(tmp_path / "c.zarr"), "queries": 8,
                                           "eps": 0.01, "delta": 0.5, "min_keys": 50})
    run_experiment("real-sparsity", cfg, tmp_path / "out")
    assert "plots skipped" in (tmp_path / "out" / "report.md").read_text()
    assert not list((tmp_path / "out").glob("*.png"))
    assert (tmp_path / "out" / "results.csv").exists()


def test_real_sparsity_errors(tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path / "r.yaml", {"path": str(tmp_path / "none.zarr")})
    with pytest.raises(InvalidInputError, match="no such KV cache"):
        run_experiment("real-sparsity", cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- CLI, configs
def test_cli_list_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in EXPERIMENTS)
    assert main(["experiment", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    bad = write_yaml(tmp_path / "b.yaml", {**GAUSS_SMALL, "sigmaa": 1.0})
    assert main(["experiment", "gaussian-sparsity", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert "did you mean 'sigma'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="eps"):
        load_config("gaussian-sparsity", write_yaml(tmp_path / "e.yaml", {"eps": [0.0]}))


def test_shipped_configs_are_embedded_and_valid() -> None:
    shipped = sorted((REPO / "configs" / "experiments").glob("*.yaml"))
    assert {p.stem for p in shipped} >= set(EXPERIMENTS)
    for path in shipped:
        embedded = REPO / "streamattn" / "experiments" / "configs" / path.name
        assert embedded.read_bytes() == path.read_bytes(), path.name
        name = "scaling" if path.stem.startswith("scaling") else path.stem
        load_config(name, path)
    for name in EXPERIMENTS:
        assert shipped_config(name).read_bytes() == (
            REPO / "configs" / "experiments" / f"{name}.yaml"
        ).read_bytes()
