"""``universal_set`` end to end: offline equality, budget modes, certificate, input kinds."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from conftest import svd_leverage
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamattn import Selection, open_keys, universal_set, universal_sets
from streamattn.recipes.selection import GUARANTEE
from streamattn.recipes.universal import load_universal_set, save_universal_sets


def keys(n: int = 300, d: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * np.linspace(0.5, 2.0, d) + 1.5
    x[rng.choice(n, 4, replace=False)] *= 12.0
    return x


def offline_top(scores: np.ndarray, budget: int) -> np.ndarray:
    return np.sort(np.lexsort((np.arange(scores.size), -scores))[:budget])


@pytest.mark.parametrize("variant", ["plain", "affine"])
@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 299, 300, 1000])
def test_threshold_set_equals_offline_svd(variant: str, chunk_rows: int) -> None:
    x = keys()
    tau, rank = svd_leverage(x, variant == "affine")
    eps = 0.03
    assert np.min(np.abs(tau - eps)) > 1e-6
    u = universal_set(x, eps=eps, variant=variant, chunk_rows=chunk_rows)
    expected = np.flatnonzero(tau >= eps)
    assert u.indices.dtype == np.int64 and u.scores.dtype == np.float64
    np.testing.assert_array_equal(u.indices, expected)
    np.testing.assert_allclose(u.scores, tau[expected], atol=1e-10)
    np.testing.assert_array_equal(u.rows, x[expected])
    assert len(u) <= rank / eps
    assert u.certificate["numerical_rank"] == rank
    assert u.certificate["chunk_rows"] == chunk_rows
    assert all(int(j) in u for j in expected)


@settings(max_examples=15, deadline=None)
@given(chunk_rows=st.integers(1, 320), variant=st.sampled_from(["plain", "affine"]))
def test_result_does_not_depend_on_chunking(chunk_rows: int, variant: str) -> None:
    x = keys(seed=1)
    ref = universal_set(x, eps=0.02, variant=variant, chunk_rows=300)
    got = universal_set(x, eps=0.02, variant=variant, chunk_rows=chunk_rows)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-10)
    topr = universal_set(x, budget=9, variant=variant, chunk_rows=300)
    topg = universal_set(x, budget=9, variant=variant, chunk_rows=chunk_rows)
    np.testing.assert_array_equal(topg.indices, topr.indices)


def outlier_keys(n: int = 2000, d: int = 8, heavy: int = 0, seed: int = 3) -> np.ndarray:
    """Gaussian keys; ``heavy`` rows along fresh directions get scores close to 1."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    rows = rng.choice(n, heavy, replace=False)
    x[rows] = 200.0 * rng.standard_normal((heavy, d))
    return x


@pytest.mark.parametrize(
    ("heavy", "budget", "passes"),
    # d = 8, B = 4: pass-1 threshold 8 / (4·4) = 0.5. Six heavy keys (scores ≈ 0.9) reach it:
    # one pass. Without heavy keys every score is ≈ d/n ≪ 0.5: a second pass is needed.
    [(6, 4, 1), (0, 4, 2), (0, 150, 2), (6, 1, 2)],
)
@pytest.mark.parametrize("variant", ["plain", "affine"])
def test_budget_equals_offline_top_b(heavy: int, budget: int, passes: int, variant: str) -> None:
    x = outlier_keys(heavy=heavy)
    tau, _ = svd_leverage(x, variant == "affine")
    u = universal_set(x, budget=budget, variant=variant, chunk_rows=333)
    expected = offline_top(tau, budget)
    np.testing.assert_array_equal(u.indices, expected)
    np.testing.assert_allclose(u.scores, tau[expected], atol=1e-10)
    np.testing.assert_array_equal(u.rows, x[expected])
    c = u.certificate
    assert c["passes"] == passes
    assert c["mode"] == "budget" and c["budget"] == budget
    assert c["eps_equivalent"] == pytest.approx(tau[expected].min(), abs=1e-10)


def test_budget_ties_broken_by_smaller_index() -> None:
    rng = np.random.default_rng(5)
    base = rng.standard_normal((50, 4))
    x = np.vstack([base] * 4)  # four copies of each key: equal scores
    tau, _ = svd_leverage(x)
    for budget in (1, 3, 6, 50, 111):
        u = universal_set(x, budget=budget, chunk_rows=37)
        # the winners by score, each group of copies cut from the smallest index upward
        order = np.argsort(-tau[:50], kind="stable")
        want = np.sort((order[:, None] + 50 * np.arange(4)).ravel()[:budget])
        np.testing.assert_array_equal(u.indices, want)


@pytest.mark.parametrize("variant", ["plain", "affine"])
def test_eps_and_budget_is_top_b_of_u_eps(variant: str) -> None:
    x = outlier_keys(heavy=6)
    tau, _ = svd_leverage(x, variant == "affine")
    u_eps = np.flatnonzero(tau >= 0.5)
    assert u_eps.size == 6
    for budget, eps in ((3, 0.5), (10, 0.5), (3, 0.001), (500, 0.001)):
        u = universal_set(x, eps=eps, budget=budget, variant=variant)
        inside = np.flatnonzero(tau >= eps)
        expected = np.sort(inside[offline_top(tau[inside], budget)])
        np.testing.assert_array_equal(u.indices, expected)
        assert (u.scores >= eps).all()


def test_certificate_fields() -> None:
    x = keys()
    u = universal_set(x, eps=0.05, variant="affine", chunk_rows=64)
    c = u.certificate
    _, rank = svd_leverage(x, True)
    assert c["eps"] == 0.05 and c["variant"] == "affine" and c["mode"] == "threshold"
    assert (c["n"], c["d"], c["dtype"]) == (300, 5, "float64")
    assert c["numerical_rank"] == rank == 6
    assert c["rank_rtol"] == 1e-10
    assert c["rank_abs_tol"] == pytest.approx(1e-10 * c["sigma_max"])
    # affine: sigma and the rank tolerance are those of the centred keys K - 1 mu^T
    assert c["sigma_max"] == pytest.approx(np.linalg.svd(x - x.mean(axis=0))[1][0])
    assert c["sum_scores_selected"] == pytest.approx(u.scores.sum())
    assert c["chunk_rows"] == 64 and c["passes"] == 1 and c["engine"] == "local"
    assert c["size_bound"] == pytest.approx(rank / 0.05) and c["size_bound_holds"] is True
    assert c["selected"] == len(u)
    assert c["guarantee"] == GUARANTEE["affine"] and "softmax" in c["softmax"].lower()
    assert {"streamattn", "numpy", "scipy", "zarr", "python"} <= set(c["versions"])
    top = universal_set(x, budget=7).certificate
    assert top["mode"] == "budget" and "size_bound" not in top and top["passes"] in (1, 2)


def test_several_selections_share_one_pass_and_match_single_calls() -> None:
    x = keys(seed=2)
    sels = [Selection(eps=0.05), Selection(eps=0.05, variant="affine"), Selection(budget=5)]
    many = universal_sets(x, sels, chunk_rows=50)
    for sel, got in zip(sels, many, strict=True):
        one = universal_set(x, eps=sel.eps, variant=sel.variant, budget=sel.budget, chunk_rows=50)
        np.testing.assert_array_equal(got.indices, one.indices)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_every_input_kind_gives_the_same_result(dtype, zarr_store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    x = keys(n=200, seed=4).astype(dtype)
    npy = tmp_path / "k.npy"
    np.save(npy, x)
    inputs = {
        "numpy": x,
        "dask": da.from_array(x, chunks=(23, 5)),
        "npy": npy,
        "zarr v2": zarr_store(x, chunks=17, zarr_format=2),
        "zarr v3": zarr_store(x, chunks=17, zarr_format=3),
        "zarr v3 group": zarr_store(x, chunks=40, group=True),
        "open zarr array": open_keys(zarr_store(x, chunks=9)).keys,
    }
    results = {name: universal_set(src, eps=0.05, variant="affine") for name, src in inputs.items()}
    ref = results["numpy"]
    tau, _ = svd_leverage(x.astype(np.float64), True)
    np.testing.assert_array_equal(ref.indices, np.flatnonzero(tau >= 0.05))
    for name, u in results.items():
        np.testing.assert_array_equal(u.indices, ref.indices, err_msg=name)
        np.testing.assert_allclose(u.scores, ref.scores, rtol=1e-10, err_msg=name)
        assert u.rows.dtype == dtype, name
        np.testing.assert_array_equal(u.rows, x[u.indices], err_msg=name)


def test_values_follow_the_selected_keys_and_save_load_round_trip(zarr_store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    x = keys(n=150, seed=6).astype(np.float32)
    v = np.arange(150 * 3, dtype=np.float32).reshape(150, 3)
    path = zarr_store(x, chunks=32, values=v)
    u = universal_set(path, eps=0.04)
    assert u.values is not None
    np.testing.assert_array_equal(u.values, v[u.indices])
    top = universal_set(path, budget=150)
    np.testing.assert_array_equal(top.values, v)
    out = tmp_path / "out"
    save_universal_sets(out, {"a": u, "top": top}, report={"note": "test"})
    back = load_universal_set(out, "a")
    np.testing.assert_array_equal(back.indices, u.indices)
    np.testing.assert_array_equal(back.scores, u.scores)
    np.testing.assert_array_equal(back.rows, u.rows)
    np.testing.assert_array_equal(back.values, u.values)
    assert back.certificate["numerical_rank"] == u.certificate["numerical_rank"]
    assert back.certificate["eps"] == 0.04


def test_one_pass_budget_breaks_ties_by_index() -> None:
    # d = 4, B = 3: pass-1 threshold 4 / 12 = 1/3. Three heavy keys, each stored twice
    # (scores ≈ 1/2 per copy), all reach it: the top-3 is decided in one pass, among ties.
    rng = np.random.default_rng(8)
    x = rng.standard_normal((600, 4))
    heavy = 100.0 * rng.standard_normal((3, 4))
    slots = [[50, 400], [120, 121], [10, 599]]
    for row, (a, b) in zip(heavy, slots, strict=True):
        x[a] = x[b] = row
    tau, _ = svd_leverage(x)
    u = universal_set(x, budget=3, chunk_rows=64)
    assert u.certificate["passes"] == 1
    np.testing.assert_array_equal(u.indices, offline_top(tau, 3))
    order = np.argsort([-tau[a] for a, _ in slots], kind="stable")
    first, second = (slots[i] for i in order[:2])
    assert set(u.indices.tolist()) == {*first, min(second)}


def test_numpy_scalar_settings_and_empty_result(tmp_path) -> None:  # type: ignore[no-untyped-def]
    x = keys(seed=9)
    a = universal_set(x, eps=np.float32(0.05), budget=np.int64(4))
    b = universal_set(x, eps=0.05, budget=4)
    np.testing.assert_array_equal(a.indices, b.indices)
    empty = universal_set(x, eps=1.0)  # no key of a full-rank 300 x 5 matrix has tau = 1
    assert len(empty) == 0 and empty.rows.shape == (0, 5) and empty.indices.dtype == np.int64
    save_universal_sets(tmp_path / "o", {"empty": empty}, report={})
    back = load_universal_set(tmp_path / "o", "empty")
    assert back.indices.shape == (0,) and back.rows.shape == (0, 5)


def test_zarr_v2_group_with_values_equals_v3(zarr_store) -> None:  # type: ignore[no-untyped-def]
    x = keys(n=120, seed=10).astype(np.float32)
    v = np.random.default_rng(0).standard_normal((120, 2)).astype(np.float32)
    u2 = universal_set(zarr_store(x, chunks=11, values=v, zarr_format=2), eps=0.05)
    u3 = universal_set(zarr_store(x, chunks=11, values=v, zarr_format=3), eps=0.05)
    np.testing.assert_array_equal(u2.indices, u3.indices)
    np.testing.assert_array_equal(u2.values, v[u2.indices])
    np.testing.assert_array_equal(u3.values, v[u3.indices])


@settings(max_examples=25, deadline=None)
# offset 3e3 ≫ the graded spread: the old [K, 1] reference lost a direction to its rank cut
@example(seed=65535, shape=(10, 8), structure="graded", scale=1000.0, variant="affine",
         eps=0.7, chunk_rows=1)
@given(
    seed=st.integers(0, 2**16),
    shape=st.tuples(st.integers(1, 60), st.integers(1, 9)),
    structure=st.sampled_from(["gaussian", "low-rank", "duplicates", "graded", "zeros"]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    variant=st.sampled_from(["plain", "affine"]),
    eps=st.sampled_from([0.01, 0.1, 0.3, 0.7]),
    chunk_rows=st.integers(1, 61),
)
def test_random_structured_inputs_match_offline_svd(
    seed: int,
    shape: tuple[int, int],
    structure: str,
    scale: float,
    variant: str,
    eps: float,
    chunk_rows: int,
) -> None:
    rng = np.random.default_rng(seed)
    n, d = shape
    x = rng.standard_normal((n, d))
    if structure == "low-rank" and d > 1:
        r = int(rng.integers(1, d))
        x = rng.standard_normal((n, r)) @ rng.standard_normal((r, d))
    elif structure == "duplicates":
        x = np.vstack([x, x[: n // 2 + 1]])
    elif structure == "graded":
        x = x * np.logspace(0, -5, d) + 3.0 * rng.standard_normal(d)
    elif structure == "zeros":
        x[rng.random(n) < 0.3] = 0.0
    x *= scale
    tau, rank = svd_leverage(x, variant == "affine")
    u = universal_set(x, eps=eps, variant=variant, chunk_rows=chunk_rows)
    # rows within rounding of the threshold may fall either way; no other row may differ
    differ = np.setxor1d(u.indices, np.flatnonzero(tau >= eps))
    assert np.all(np.abs(tau[differ] - eps) < 1e-8)
    assert u.certificate["numerical_rank"] == rank
    assert len(u) <= rank / eps + 1e-9
    budget = int(rng.integers(1, x.shape[0] + 1))
    top = universal_set(x, budget=budget, variant=variant, chunk_rows=chunk_rows)
    kth = np.sort(tau)[::-1][budget - 1]
    differ = np.setxor1d(top.indices, offline_top(tau, budget))
    assert np.all(np.abs(tau[differ] - kth) < 1e-9)  # only near-ties at the cut may differ
    assert len(top) == budget


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("chunk_rows", [1, 3])
def test_affine_identical_keys_have_rank_one(scale: float, chunk_rows: int) -> None:
    """Identical keys: [K, 1] has rank 1 and every τ̃ = 1/n (offline SVD), at any scale.

    The centred factor of identical rows is rounding noise (~1e-20 at scale 1e-3, as a
    hypothesis run found); it must not count as a direction.
    """
    row = scale * np.random.default_rng(3).standard_normal(4)
    x = np.tile(row, (5, 1))
    tau, rank = svd_leverage(x, True)
    assert rank == 1
    u = universal_set(x, eps=0.15, variant="affine", chunk_rows=chunk_rows)
    assert u.certificate["numerical_rank"] == 1
    np.testing.assert_array_equal(u.indices, np.arange(5))
    np.testing.assert_allclose(u.scores, tau, rtol=1e-9)
