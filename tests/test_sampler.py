"""Leverage samplers against dense references (scipy generalized eigenproblems, offline SVD)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

import streamattn as sa
from streamattn.cli.main import main
from streamattn.errors import ConfigError, IncompatibleMergeError
from streamattn.operators.sampler import (
    LeverageSampler,
    TreeShape,
    merge_reduce_delta_bound,
    online_delta_bound,
    size_bound,
)
from streamattn.recipes.samplers import load_sample, plan_spec
from streamattn.testing.laws import blocks_of, fold, fold_tree


def keys(kind: str, n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        x = rng.standard_normal((n, d)) @ np.diag(np.linspace(1.0, 4.0, d))
    elif kind == "student-t":
        x = rng.standard_t(2.5, (n, d))
    else:  # low rank + noise + a few huge outliers
        x = rng.standard_normal((n, 2)) @ rng.standard_normal((2, d)) + 0.05 * rng.standard_normal(
            (n, d)
        )
        x[rng.choice(n, 5, replace=False)] *= 60.0
    return x + 1.5


def dense_error(x: np.ndarray, res: dict, affine: bool) -> float:
    """Reference: max |λ| of the generalized eigenproblem (G̃ − G) v = λ G v."""
    def aug(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        return np.hstack([a, np.ones((a.shape[0], 1))]) if affine else a

    k, s = aug(x), aug(res["rows"])
    g = k.T @ k
    gt = (s * res["weights"][:, None]).T @ s
    assert np.array_equal(res["rows"], x[res["indices"]])
    return float(np.abs(scipy.linalg.eigh(gt - g, g, eigvals_only=True)).max())


def spec_for(method: str, variant: str, n: int, d: int, seed: int, eps: float = 0.5,
             delta: float = 0.1):
    return plan_spec(n, d, eps=eps, delta=delta, method=method, variant=variant, seed=seed,
                     leaf_rows=None if method == "online" else 512, fan_in=4)


# ---------------------------------------------------------------------------- the bound
@pytest.mark.parametrize("method", ["online", "merge-reduce"])
@pytest.mark.parametrize("variant", ["plain", "affine"])
def test_spectral_bound_over_seeds_chunkings_and_trees(method: str, variant: str) -> None:
    """Failures over many seeds stay within what δ allows (binomial 99.9 % quantile)."""
    n, d, eps, delta = (3000, 3, 0.5, 0.1) if method == "online" else (12000, 3, 0.5, 0.1)
    trials = failures = 0
    rng = np.random.default_rng(7)
    for seed in range(8):
        for kind in ("gaussian", "student-t", "low-rank-outliers"):
            x = keys(kind, n, d, seed)
            spec = spec_for(method, variant, n, d, seed, eps, delta)
            blocks = blocks_of(x, rng.integers(1, n, 5).tolist())
            if method == "merge-reduce" and seed % 2:
                op = fold_tree(lambda s=spec: LeverageSampler(s), blocks, rng)
            else:
                op = fold(lambda s=spec: LeverageSampler(s), blocks)
            res = op.result()
            assert res["certificate"]["delta_bound"] <= delta * (1 + 1e-9)
            assert len(res["indices"]) < n  # it samples
            trials += 1
            failures += dense_error(x, res, variant == "affine") > eps
    assert failures <= scipy.stats.binom.ppf(0.999, trials, delta)


def test_dask_engine_same_merge_reduce_sample_and_online_union_bound() -> None:
    x = keys("gaussian", 9000, 4, 3)
    kw = dict(eps=0.5, delta=0.1, seed=5, leaf_rows=512)
    local = sa.leverage_sample(x, method="merge-reduce", chunk_rows=1000, **kw)
    dask = sa.leverage_sample(x, method="merge-reduce", chunk_rows=700, engine="dask",
                              scheduler="threads", split_every=3, **kw)
    np.testing.assert_array_equal(local.indices, dask.indices)
    np.testing.assert_array_equal(local.weights, dask.weights)
    kw.pop("leaf_rows")
    online = sa.leverage_sample(x, method="online", chunk_rows=1500, engine="dask",
                                scheduler="threads", blocks_per_task=1, check=True, **kw)
    cert = online.certificate
    assert cert["parts"] == 6
    assert cert["delta_bound"] <= 0.1 * (1 + 1e-9)  # c was planned for the blocks as parts
    assert cert["spectral_error"] <= 0.5
    assert cert["spectral_error"] == pytest.approx(
        dense_error(x, {"rows": online.rows, "weights": online.weights,
                        "indices": online.indices}, False), rel=1e-6)


# ---------------------------------------------------------------------------- same sample
@pytest.mark.parametrize("variant", ["plain", "affine"])
def test_online_same_sample_for_every_chunking(variant: str) -> None:
    x = keys("student-t", 2500, 4, 1)
    spec = spec_for("online", variant, 2500, 4, 3)
    ref = fold(lambda: LeverageSampler(spec), blocks_of(x, [])).result()
    for cuts in ([1], [7, 900, 901, 2000], list(range(50, 2500, 97))):
        got = fold(lambda: LeverageSampler(spec), blocks_of(x, cuts)).result()
        np.testing.assert_array_equal(got["indices"], ref["indices"])
        np.testing.assert_array_equal(got["weights"], ref["weights"])
    other = fold(lambda: LeverageSampler(spec_for("online", variant, 2500, 4, 4)),
                 blocks_of(x, [])).result()
    assert not np.array_equal(other["indices"], ref["indices"])  # the seed matters


def test_online_decisions_are_row_by_row_against_the_sample_so_far() -> None:
    """Independent re-implementation with one dense solve per row (CMP's algorithm)."""
    from streamattn.operators.projection import keyed_uniform
    from streamattn.operators.sampler import ONLINE_STREAM

    x = keys("gaussian", 600, 3, 2)
    spec = spec_for("online", "plain", 600, 3, 9)
    got = fold(lambda: LeverageSampler(spec), blocks_of(x, [100, 350])).result()
    u = keyed_uniform(spec.seed, ONLINE_STREAM, np.arange(600))
    g = np.zeros((3, 3))
    kept, weights = [], []
    for j in range(600):
        k = x[j]
        if np.linalg.matrix_rank(g) < 3 and np.linalg.matrix_rank(g + np.outer(k, k)) > \
                np.linalg.matrix_rank(g):
            p = 1.0
        else:
            p = min(1.0, spec.c * min(1.0, (1 + spec.eps) * float(k @ np.linalg.pinv(g) @ k)))
        if u[j] < p:
            kept.append(j)
            weights.append(1 / p)
            g += np.outer(k, k) / p
    np.testing.assert_array_equal(got["indices"], kept)
    np.testing.assert_allclose(got["weights"], weights, rtol=1e-9)


def test_merged_online_state_refuses_more_rows() -> None:
    x = keys("gaussian", 400, 3, 0)
    spec = spec_for("online", "plain", 400, 3, 0)
    a = fold(lambda: LeverageSampler(spec), blocks_of(x[:200], []))
    b = LeverageSampler(spec).update(blocks_of(x, [200])[1])
    a.merge(b)
    assert a.result()["certificate"]["parts"] == 2
    with pytest.raises(IncompatibleMergeError, match="several parts"):
        a.update(sa.Block(400, x[:10]))


# ---------------------------------------------------------------------------- size
def online_leverage_sum(x: np.ndarray) -> float:
    """Σ_j min(1, k_jᵀ G_{<j}⁺ k_j) (1 for a new direction), dense."""
    g = np.zeros((x.shape[1], x.shape[1]))
    total = 0.0
    for k in x:
        r = np.linalg.matrix_rank(g)
        if np.linalg.matrix_rank(g + np.outer(k, k)) > r:
            total += 1.0
        else:
            total += min(1.0, float(k @ np.linalg.pinv(g) @ k))
        g += np.outer(k, k)
    return total


def test_kept_rows_within_the_stated_bounds_as_n_grows_16x() -> None:
    d, eps = 3, 0.5
    for n in (4000, 64000):
        x = keys("gaussian", n, d, 0)
        s = sa.leverage_sample(x, eps=eps, delta=0.1, method="merge-reduce", leaf_rows=1024)
        assert len(s) <= s.certificate["size_bound"]
        assert s.certificate["size_bound"] == size_bound(s.certificate["c"] * d, 0.1)
        # the bound depends on n only through the tree height in c: ≈ linear in the height
        h = s.certificate["root_height"]
        assert s.certificate["c"] <= sa.leverage_sample(
            x[:1024], eps=eps, delta=0.1, method="merge-reduce", leaf_rows=1024
        ).certificate["c"] * (1 + h * 4.0)
    for n in (250, 4000):
        x = keys("gaussian", n, d, 1)
        s = sa.leverage_sample(x, eps=eps, delta=0.1, method="online")
        c = s.certificate["c"]
        law = c * (1 + eps) / (1 - eps) * online_leverage_sum(x)
        assert len(s) <= size_bound(law, 0.1)


@pytest.mark.parametrize("method", ["online", "merge-reduce"])
def test_planned_c_meets_delta_for_the_tree_it_builds(method: str) -> None:
    for n in (1000, 70000, 300000, 5_000_000):
        for eps in (0.1, 0.25, 0.5):
            spec = plan_spec(n, 16, eps=eps, delta=0.01, method=method, variant="plain", seed=0)
            if method == "online":
                assert online_delta_bound(spec.c, eps, 16) <= 0.01 * (1 + 1e-9)
            else:
                shape = TreeShape.for_rows(n, spec.leaf_rows, spec.fan_in)
                assert merge_reduce_delta_bound(spec.c, eps, 16, shape)[0] <= 0.01


def test_online_ridge_bound_and_log_det_size_law() -> None:
    """λ > 0: (1 ± ε)(G + λI) (dense check) and kept ≤ c(1+ε)/(1−ε)·ln det(I + G/λ)/ln 2."""
    eps, lam = 0.5, 50.0
    for n in (500, 4000):
        x = keys("student-t", n, 3, 2)
        s = sa.leverage_sample(x, eps=eps, delta=0.1, method="online", ridge=lam, seed=1)
        g = x.T @ x + lam * np.eye(3)
        gt = (s.rows * s.weights[:, None]).T @ s.rows + lam * np.eye(3)
        assert np.abs(scipy.linalg.eigh(gt - g, g, eigvals_only=True)).max() <= eps
        logdet = np.linalg.slogdet(np.eye(3) + x.T @ x / lam)[1]
        law = s.certificate["c"] * (1 + eps) / (1 - eps) * logdet / np.log(2)
        assert len(s) <= size_bound(law, 0.1)
        assert s.certificate["ridge"] == lam
    with pytest.raises(ConfigError, match="ridge"):
        sa.leverage_sample(keys("gaussian", 100, 3, 0), method="merge-reduce", ridge=1.0)


@pytest.mark.parametrize("method", ["online", "merge-reduce"])
def test_state_stays_within_the_projected_memory(method: str) -> None:
    n, d = 40000, 4
    x = keys("student-t", n, d, 3)
    spec = plan_spec(n, d, eps=0.5, delta=0.05, method=method, variant="plain", seed=0,
                     leaf_rows=None if method == "online" else 1024)
    op = LeverageSampler(spec)
    peak = 0
    for block in blocks_of(x, list(range(1500, n, 1500))):
        op.update(block)
        peak = max(peak, sum(v.nbytes for v in op.to_state().values()))
    assert peak <= op.nbytes_bound(d)


def test_bounds_are_the_documented_formulas() -> None:
    c, eps, dim = 200.0, 0.3, 5
    assert online_delta_bound(c, eps, dim) == pytest.approx(
        2 * dim * np.exp(-c * eps**2 / (2 * (1 + eps / 3))))
    assert online_delta_bound(c, eps, dim, parts=4) == pytest.approx(
        5 * online_delta_bound(c, eps, dim))
    g = 1.5 / 1.3  # certifying eps = 0.5 from scores inflated by 1 + 0.3
    assert online_delta_bound(c, 0.5, dim, inflation=0.3) == pytest.approx(
        2 * dim * np.exp(-(0.125) / (g / c + g * 0.5 / (3 * c))))
    # a single leaf: exact leverage at the root, alpha = 0 is allowed
    one = TreeShape.for_rows(100, 1000, 4)
    assert one.root_height == 0 and sum(one.counts) == 0
    assert merge_reduce_delta_bound(c, eps, dim, one)[0] == pytest.approx(
        online_delta_bound(c, eps, dim))
    shape = TreeShape.for_rows(4 * 4 * 1000 + 1500, 1000, 4)  # one height-2 node + 2 leaves
    assert shape.root_height == 3 and shape.counts == (18, 4, 1)
    delta, alpha = merge_reduce_delta_bound(c, eps, dim, shape)
    r = (1 + alpha) / c

    def tail(t: float, var: float) -> float:
        return float(np.exp(-(t * t / 2) / (var + r * t / 3)))

    manual = 2 * dim * tail(eps, (1 + 3 * (1 + alpha) ** 2) / c) + sum(
        cnt * 2 * dim * tail(alpha, (1 + h * (1 + alpha) ** 2) / c)
        for h, cnt in enumerate(shape.counts))
    assert delta == pytest.approx(min(1.0, manual), rel=1e-9)


# ---------------------------------------------------------------------------- uses
@pytest.mark.parametrize("variant", ["plain", "affine"])
def test_x2_normalisers_random_and_adversarial_queries(variant: str) -> None:
    x = keys("low-rank-outliers", 20000, 6, 2)
    s = sa.leverage_sample(x, eps=0.25, delta=0.05, method="merge-reduce", variant=variant,
                           seed=1, check=True)
    assert s.certificate["spectral_error"] <= 0.25
    g = x.T @ x
    tau = np.einsum("ij,ji->i", x, np.linalg.solve(g, x.T))
    rng = np.random.default_rng(0)
    adversarial = (np.linalg.pinv(g) @ x[np.argsort(tau)[-20:]].T).T  # q = G⁺ k_j
    queries = np.vstack([rng.standard_normal((50, 6)), adversarial])
    offsets = [0.0] if variant == "plain" else [0.0, -3.0, 40.0]
    for c in offsets:
        exact = ((queries @ x.T + c) ** 2).sum(axis=1)
        ratio = s.normaliser(queries, offset=c) / exact
        assert np.all(np.abs(ratio - 1) <= 0.25)
        # every x² attention entry to a factor 1/(1 ± ε)
        j = np.argsort(tau)[-1]
        entry = (queries @ x[j] + c) ** 2
        assert np.all(entry / s.normaliser(queries, c) <= entry / exact / (1 - 0.25) + 1e-15)


@pytest.mark.parametrize("variant", ["plain", "affine"])
def test_approximate_leverage_and_universal_set_without_false_negatives(
    variant: str, reference_leverage
) -> None:
    x = keys("low-rank-outliers", 8000, 5, 4)
    eps = 0.25
    s = sa.leverage_sample(x, eps=eps, method="online", variant=variant, seed=2, check=True)
    assert s.certificate["spectral_error"] <= eps
    tau, _ = reference_leverage(x, affine=variant == "affine")
    approx = s.leverage(x)
    assert np.all(approx >= tau / (1 + eps) * (1 - 1e-9))
    assert np.all(approx <= tau / (1 - eps) * (1 + 1e-9))
    exact = sa.universal_set(x, 0.01, variant=variant)
    u = sa.approximate_universal_set(x, s, 0.01, chunk_rows=999)
    assert set(exact.indices.tolist()) <= set(u.indices.tolist())
    assert len(u) <= u.certificate["size_bound"]
    np.testing.assert_allclose(u.scores, approx[u.indices], rtol=1e-9)


def test_one_pass_pca_captures_the_proved_share_of_variance() -> None:
    x = keys("gaussian", 20000, 8, 5) @ np.random.default_rng(1).standard_normal((8, 8))
    eps, m = 0.25, 3
    s = sa.leverage_sample(x, eps=eps, method="merge-reduce", variant="affine", seed=3)
    pmap, _ = s.pca(m)
    xc = x - x.mean(0)
    scatter = xc.T @ xc
    top = np.linalg.eigvalsh(scatter)[::-1][:m].sum()
    v = pmap.dense()
    captured = np.trace(v.T @ scatter @ v)
    assert captured >= (1 - eps) / (1 + eps) * top
    assert captured <= top * (1 + 1e-9)


def test_one_sampler_per_head_in_one_read_equals_single_head_samples() -> None:
    rng = np.random.default_rng(3)
    cache = rng.standard_normal((2, 2, 3000, 4)) * np.array([1.0, 3.0])[:, None, None, None]
    res = sa.leverage_sample(cache, eps=0.5, method="merge-reduce", heads=2, seed=4,
                             leaf_rows=256, check=True)
    assert isinstance(res, sa.MultiHeadResult) and len(res) == 4
    for (lay, h), s in res:
        alone = sa.leverage_sample(np.ascontiguousarray(cache[lay, h]), eps=0.5,
                                   method="merge-reduce", seed=4, leaf_rows=256)
        np.testing.assert_array_equal(s.indices, alone.indices)
        np.testing.assert_array_equal(s.weights, alone.weights)
        assert s.certificate["spectral_error"] <= 0.5


# ---------------------------------------------------------------------------- boundary
def test_bad_settings_are_one_clear_error() -> None:
    x = keys("gaussian", 100, 3, 0)
    with pytest.raises(ConfigError, match="method"):
        sa.leverage_sample(x, method="reservoir")
    with pytest.raises(ConfigError, match="eps"):
        sa.leverage_sample(x, eps=1.5)
    with pytest.raises(ConfigError, match="variant"):
        sa.leverage_sample(x, variant="centred")


def test_cli_sample_and_run_config_section(tmp_path: Path) -> None:
    store = tmp_path / "k.npy"
    x = keys("gaussian", 5000, 4, 0).astype(np.float32)
    np.save(store, x)
    out = tmp_path / "out"
    assert main(["sample", str(store), "--eps", "0.25", "--out", str(out), "--check",
                 "--method", "merge-reduce", "--quiet"]) == 0
    back = load_sample(out)
    again = sa.leverage_sample(store, eps=0.25, method="merge-reduce")
    np.testing.assert_array_equal(back.indices, again.indices)
    np.testing.assert_array_equal(back.weights, again.weights)
    assert back.rows.dtype == np.float32
    report = json.loads((out / "report.json").read_text())
    cert = report["samples"]["sample"]["certificate"]
    assert cert["eps"] == 0.25 and cert["spectral_error"] <= 0.25
    assert main(["sample", str(store), "--out", str(out), "--quiet"]) == 2  # exists
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"input: {{path: {store}}}\nselect: []\noutput: {{dir: {tmp_path / 'run'}}}\n"
                   "progress: false\nsample: {eps: 0.5, method: online, variant: affine}\n")
    assert main(["run", str(cfg), "--quiet"]) == 0
    assert load_sample(tmp_path / "run" / "sample").certificate["variant"] == "affine"
    bad = tmp_path / "bad.yaml"
    bad.write_text("sample: {eps: 0.5, methd: online}\n")
    assert main(["run", str(bad), "--quiet"]) == 2
