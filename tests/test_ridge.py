"""Large d: ridge sets against an FD sketch and the JL-sketched path are supersets of the
exact ridge set; the scores are upper bounds; the ridge-type guarantee holds; merges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from streamattn.engines import ENGINES
from streamattn.errors import ConfigError
from streamattn.operators.frequent_directions import FDSpec, FrequentDirections
from streamattn.operators.ridge import RidgeFD, RidgeFDSpec, RidgeMap, jl_dimension
from streamattn.recipes.ridge import ridge_universal_set
from streamattn.sources import Block
from streamattn.testing.laws import blocks_of, fold, fold_tree


def keys(n: int = 1500, d: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((n, d)) * np.geomspace(5.0, 0.05, d) + 0.3
    k[:: n // 10] *= 15.0  # heavy rows that the ridge set must hold
    return k


def exact_ridge(k: np.ndarray, lam: float) -> np.ndarray:
    g = k.T @ k + lam * np.eye(k.shape[1])
    return np.einsum("ij,ji->i", k, np.linalg.solve(g, k.T))


def lam_of(k: np.ndarray, lam_rel: float) -> float:
    return lam_rel * float(np.sum(k**2)) / k.shape[1]


@pytest.mark.parametrize("ell", [4, 8, 16])
@pytest.mark.parametrize("lam_rel", [0.05, 0.5])
@pytest.mark.parametrize("chunk", [97, 1500])
def test_fd_ridge_set_is_a_superset_with_upper_bound_scores(
    ell: int, lam_rel: float, chunk: int
) -> None:
    k = keys()
    eps = 0.05
    u = ridge_universal_set(k, eps, ell=ell, lam_rel=lam_rel, chunk_rows=chunk)
    tau = exact_ridge(k, lam_of(k, lam_rel))
    exact = np.flatnonzero(tau >= eps)
    assert exact.size >= 5  # not vacuous
    assert set(exact.tolist()) <= set(u.indices.tolist())
    assert np.all(u.scores >= tau[u.indices] * (1 - 1e-9))
    assert np.all(u.scores >= eps)
    c = u.certificate
    assert c["lam"] == pytest.approx(lam_of(k, lam_rel), rel=1e-12)
    assert len(u) <= c["size_bound"] and c["exact"] is False
    # the FD statement in the certificate holds
    assert c["fd_delta"] <= c["fd_delta_bound"] * (1 + 1e-9)


def test_ridge_guarantee_for_queries() -> None:
    """A_qj ≥ eps·(1 + λ‖q‖²/‖Kq‖²) ⇒ j ∈ U, for random and adversarial q = (G+λI)⁻¹k_j."""
    k = keys(800, 12, seed=3)
    eps, lam_rel = 0.05, 0.1
    u = ridge_universal_set(k, eps, ell=6, lam_rel=lam_rel, chunk_rows=100)
    lam = lam_of(k, lam_rel)
    rng = np.random.default_rng(1)
    q = np.vstack(
        [rng.standard_normal((500, 12)),
         np.linalg.solve(k.T @ k + lam * np.eye(12), k[::40].T).T]
    )
    kq = q @ k.T
    a = kq**2 / np.sum(kq**2, axis=1, keepdims=True)
    inflate = 1 + lam * np.sum(q**2, axis=1) / np.sum(kq**2, axis=1)
    hits = np.unique(np.nonzero(a >= eps * inflate[:, None])[1])
    assert hits.size >= 3
    assert set(hits.tolist()) <= set(u.indices.tolist())


def test_ridge_map_equals_the_explicit_inverse() -> None:
    rng = np.random.default_rng(2)
    b = rng.standard_normal((5, 9))
    x = rng.standard_normal((20, 9))
    rmap = RidgeMap.from_sketch(b, 0.7)
    m = b.T @ b + 0.7 * np.eye(9)
    np.testing.assert_allclose(rmap.scores(x), np.einsum("ij,ji->i", x, np.linalg.solve(m, x.T)),
                               rtol=1e-10)
    pi = rng.standard_normal((9, 4))
    evals, evecs = np.linalg.eigh(m)
    inv_sqrt = evecs @ np.diag(evals**-0.5) @ evecs.T
    np.testing.assert_allclose(rmap.inverse_sqrt_times(pi), inv_sqrt @ pi, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_merge_trees_keep_the_superset(seed: int) -> None:
    k = keys(900, 16, seed)
    rng = np.random.default_rng(seed)
    cuts = sorted(rng.choice(np.arange(1, 900), 10, replace=False).tolist())
    spec = RidgeFDSpec(ell=6, threshold=0.05, lam_rel=0.2)
    tree = fold_tree(lambda: RidgeFD(spec), blocks_of(k, cuts), rng).result()
    seq = fold(lambda: RidgeFD(spec), blocks_of(k, cuts)).result()
    tau = exact_ridge(k, lam_of(k, 0.2))
    for res in (tree, seq):
        assert set(np.flatnonzero(tau >= 0.05).tolist()) <= set(res["indices"].tolist())
        assert np.all(res["scores"] >= tau[res["indices"]] * (1 - 1e-9))
        sk = res["sketch"]
        gap = np.linalg.eigvalsh(k.T @ k - sk.sketch.T @ sk.sketch)
        assert gap.min() >= -1e-9 * sk.fro2 and gap.max() <= sk.delta * (1 + 1e-9) + 1e-9


def test_sketched_path_misses_nothing_and_is_within_its_factor() -> None:
    k = keys(1200, 20, seed=5)
    eps, eps_jl, lam_rel = 0.05, 0.5, 0.1
    u = ridge_universal_set(k, eps, ell=8, lam_rel=lam_rel, sketch_eps=eps_jl, delta=1e-3,
                            seed=7, chunk_rows=128)
    c = u.certificate
    assert c["sketch_m"] == jl_dimension(1200, eps_jl, 1e-3)
    tau = exact_ridge(k, lam_of(k, lam_rel))
    assert set(np.flatnonzero(tau >= eps).tolist()) <= set(u.indices.tolist())
    # the (1 ± ε') statement, checked on every row against the unsketched τ̂
    fd = FrequentDirections(FDSpec(8))
    for a in range(0, 1200, 128):
        fd.update(Block(a, k[a : a + 128]))
    rmap = RidgeMap.from_sketch(fd.result().sketch, c["lam"])
    tau_hat = rmap.scores(k)
    pi = np.random.default_rng(7).standard_normal((20, c["sketch_m"])) / np.sqrt(c["sketch_m"])
    sketched = np.sum((k @ rmap.inverse_sqrt_times(pi)) ** 2, axis=1)
    assert np.all(np.abs(sketched - tau_hat) <= eps_jl * tau_hat)
    np.testing.assert_array_equal(u.indices, np.flatnonzero(sketched >= (1 - eps_jl) * eps))
    assert set(np.flatnonzero(tau_hat >= eps).tolist()) <= set(u.indices.tolist())


def test_values_follow_the_selected_rows(tmp_path: Path) -> None:
    k = keys(600, 10)
    v = np.arange(1200.0).reshape(600, 2)
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    g.create_array("keys", data=k, chunks=(100, 10))
    g.create_array("values", data=v, chunks=(100, 2))
    u = ridge_universal_set(str(tmp_path / "s.zarr"), 0.1, ell=4, lam_rel=0.2)
    assert len(u) >= 1
    np.testing.assert_array_equal(u.values, v[u.indices])
    np.testing.assert_array_equal(u.rows, k[u.indices])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": 0.0, "ell": 4}, "eps"),
        ({"eps": 0.1, "ell": 0}, "ell"),
        ({"eps": 0.1, "ell": 4, "lam_rel": 0.0}, "lambda"),
        ({"eps": 0.1, "ell": 4, "sketch_eps": 1.5}, "sketch_eps"),
        ({"eps": 0.1, "ell": 4, "delta": 0.0}, "delta"),
    ],
)
def test_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ridge_universal_set(keys(100, 4), **kwargs)


@pytest.mark.skipif("dask" not in ENGINES, reason="the Dask engine (issue 3) is not registered")
@pytest.mark.parametrize("sketch_eps", [None, 0.5])
def test_local_equals_dask(sketch_eps: float | None, tmp_path: Path) -> None:
    k = keys(800, 12, seed=4)
    path = tmp_path / "k.zarr"
    zarr.create_array(str(path), data=k, chunks=(100, 12))
    kw = dict(ell=6, lam_rel=0.2, sketch_eps=sketch_eps, chunk_rows=100)
    local = ridge_universal_set(str(path), 0.05, **kw)
    dask = ridge_universal_set(str(path), 0.05, engine="dask", scheduler="threads", **kw)
    tau = exact_ridge(k, lam_of(k, 0.2))
    # FD sketches depend on the merge tree, so the two sets may differ; both keep the
    # guarantee against the exact ridge scores, and the same run repeated is deterministic.
    for u, engine in ((local, "local"), (dask, "dask")):
        assert set(np.flatnonzero(tau >= 0.05).tolist()) <= set(u.indices.tolist())
        if sketch_eps is None:  # FD scores upper-bound the ridge scores (no JL sketch)
            assert np.all(u.scores >= tau[u.indices] * (1 - 1e-9))
        assert u.certificate["engine"] == engine
    again = ridge_universal_set(str(path), 0.05, engine="dask", scheduler="threads", **kw)
    np.testing.assert_array_equal(again.indices, dask.indices)
    # with ell > d the sketch keeps every direction (no shrinkage): both engines must then
    # give the exact ridge set and scores, so a Dask-only regression cannot hide
    exact = dict(kw, ell=13, sketch_eps=None)
    for engine in ("local", "dask"):
        u = ridge_universal_set(str(path), 0.05, engine=engine, scheduler="threads", **exact) \
            if engine == "dask" else ridge_universal_set(str(path), 0.05, **exact)
        np.testing.assert_array_equal(u.indices, np.flatnonzero(tau >= 0.05))
        np.testing.assert_allclose(u.scores, tau[u.indices], rtol=1e-9)
