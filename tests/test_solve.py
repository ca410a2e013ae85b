"""Kernel-regression solvers against dense float64 references (SVD of A, numpy solves)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

import streamattn as sa
from streamattn.errors import ConfigError, InvalidInputError
from streamattn.operators.solve_ops import (
    ExpKernelMatvec,
    ExpKernelMatvecSpec,
    RowSketch,
    RowSketchSpec,
    sketch_weights,
)
from streamattn.sources import Block


def conditioned(n: int, d: int, cond: float, seed: int = 0) -> np.ndarray:
    """A = U diag(σ) Vᵀ with σ log-spaced from 1 to 1/cond (U, V random orthonormal)."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((n, d)))[0]
    v = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return (u * np.logspace(0, -np.log10(cond), d)) @ v.T


def svd_gram_power(a: np.ndarray, b: np.ndarray, j: int) -> np.ndarray:
    _, s, vt = np.linalg.svd(a, full_matrices=False)
    return vt.T @ ((vt @ b) / s ** (2 * j))


def svd_a_gram_power(a: np.ndarray, b: np.ndarray, j: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    return vt.T @ ((u.T @ b) / s ** (2 * j + 1))


def rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("j", [1, 2])
@pytest.mark.parametrize(
    "method,sketch", [("direct", "gaussian"), ("sketch-precondition", "gaussian"),
                      ("sketch-precondition", "srht"), ("sketch-precondition", "countsketch")]
)
def test_gram_power_matches_svd_reference(j: int, method: str, sketch: str) -> None:
    a = conditioned(1500, 8, 10.0) * 3.0
    b = np.random.default_rng(1).standard_normal(8)
    size = 200 if sketch == "countsketch" else None  # CountSketch embeds with m = O(d²)
    res = sa.solve.gram_power(a, b, j, method=method, sketch=sketch, sketch_size=size,
                              chunk_rows=400)
    assert res.x.dtype == np.float64
    assert rel(res.x, svd_gram_power(a, b, j)) <= 1e-8
    assert res.info["residual"] <= 1e-8
    assert res.info["backward_error"] <= 1e-12
    assert res.info["method"] == method
    if method == "direct":
        assert res.info["passes"] == 1 and res.info["iterations"] == 0
    else:
        assert res.info["passes"] == 1 + res.info["iterations"]


@pytest.mark.parametrize("j", [1, 2])
@pytest.mark.parametrize("method", ["direct", "sketch-precondition"])
def test_a_gram_power_matches_svd_reference(j: int, method: str, tmp_path) -> None:
    a = conditioned(1200, 6, 20.0, seed=3)
    b = np.random.default_rng(4).standard_normal(1200)
    path = tmp_path / "b.npy"
    np.save(path, b)
    res = sa.solve.a_gram_power(a, str(path), j, method=method, chunk_rows=250)
    ref = svd_a_gram_power(a, b, j)
    assert rel(res.x, ref) <= 1e-8
    lsq = np.linalg.norm(a @ np.linalg.lstsq(a, b, rcond=None)[0] - b) / np.linalg.norm(b)
    assert res.info["residual"] == pytest.approx(lsq, rel=1e-8)
    if method == "direct":
        assert res.info["ls_residual_norm_from_factor"] == pytest.approx(
            lsq * np.linalg.norm(b), rel=1e-10
        )


def test_a_gram_power_b_from_zarr(tmp_path) -> None:
    import zarr

    a = conditioned(600, 5, 5.0, seed=5)
    b = np.random.default_rng(6).standard_normal(600)
    z = zarr.create_array(str(tmp_path / "b.zarr"), shape=(600,), chunks=(128,), dtype="f8")
    z[:] = b
    res = sa.solve.a_gram_power(a, str(tmp_path / "b.zarr"), 1)
    assert rel(res.x, svd_a_gram_power(a, b, 1)) <= 1e-10


def test_preconditioned_iterations_independent_of_condition() -> None:
    b = np.random.default_rng(7).standard_normal(16)
    pre, plain = [], []
    for cond in [1e1, 1e3, 1e6]:
        a = conditioned(2000, 16, cond, seed=8)
        res = sa.solve.gram_power(a, b, 1, method="sketch-precondition", compare=True,
                                  tol=1e-10, verify=False)
        assert res.info["converged"]
        pre.append(res.info["iterations"])
        plain.append(res.info["unpreconditioned"]["iterations"])
    assert max(pre) - min(pre) <= 2, pre
    assert plain[0] < plain[1] < plain[2], plain
    assert plain[2] > 3 * max(pre), (pre, plain)


def test_direct_error_follows_its_bound() -> None:
    b = np.random.default_rng(9).standard_normal(8)
    for cond in [1e2, 1e3]:
        a = conditioned(800, 8, cond, seed=10)
        res = sa.solve.gram_power(a, b, 2)
        assert res.info["cond_A"] == pytest.approx(cond, rel=1e-6)
        assert rel(res.x, svd_gram_power(a, b, 2)) <= max(res.info["error_bound"], 1e-14)


def test_local_equals_dask() -> None:
    a = conditioned(900, 6, 30.0, seed=11)
    b = np.random.default_rng(12).standard_normal(900)
    bd = np.random.default_rng(13).standard_normal(6)
    opts = dict(chunk_rows=200, engine="dask", scheduler="threads")
    for fn, rhs, method in [(sa.solve.a_gram_power, b, "direct"),
                            (sa.solve.gram_power, bd, "sketch-precondition")]:
        local = fn(a, rhs, 2, method=method, chunk_rows=200)
        dask = fn(a, rhs, 2, method=method, **opts)
        np.testing.assert_allclose(dask.x, local.x, rtol=1e-10)
        assert dask.info["passes"] == local.info["passes"]
    k_local = sa.solve.attention_kernel(a, b, ridge=0.1, rank=20, chunk_rows=200, tol=1e-10)
    k_dask = sa.solve.attention_kernel(a, b, ridge=0.1, rank=20, tol=1e-10, **opts)
    np.testing.assert_allclose(k_dask.x, k_local.x, rtol=1e-8)


def test_bad_inputs_get_clear_errors() -> None:
    a = conditioned(300, 4, 3.0)
    with pytest.raises(InvalidInputError, match=r"shape \(5,\).*\(4,\)"):
        sa.solve.gram_power(a, np.ones(5), 1)
    with pytest.raises(InvalidInputError, match=r"b in R\^n, shape \(300,\)"):
        sa.solve.a_gram_power(a, np.ones(299), 1)
    with pytest.raises(ConfigError, match=r"j .* >= 1"):
        sa.solve.gram_power(a, np.ones(4), 0)
    with pytest.raises(ConfigError, match="integer"):
        sa.solve.a_gram_power(a, np.ones(300), 1.5)  # type: ignore[arg-type]
    bad_b = np.ones(4)
    bad_b[2] = np.nan
    with pytest.raises(InvalidInputError, match=r"b\[2\] is NaN"):
        sa.solve.gram_power(a, bad_b, 1)
    bad_a = a.copy()
    bad_a[123, 1] = np.nan
    with pytest.raises(InvalidInputError, match="row 123"):
        sa.solve.gram_power(bad_a, np.ones(4), 1)
    bad_tall = np.ones(300)
    bad_tall[77] = np.inf
    with pytest.raises(InvalidInputError, match="row 77"):
        sa.solve.a_gram_power(a, bad_tall, 1)
    with pytest.raises(InvalidInputError, match="row 77"):
        sa.solve.attention_kernel(a, bad_tall)
    rank_def = np.hstack([a, a[:, :1]])
    with pytest.raises(InvalidInputError, match="rank deficient"):
        sa.solve.gram_power(rank_def, np.ones(5), 1)
    with pytest.raises(ConfigError, match="unknown method"):
        sa.solve.gram_power(a, np.ones(4), 1, method="normal-equations")
    with pytest.raises(InvalidInputError, match="overflows"):
        sa.solve.attention_kernel(a * 500, np.ones(300))


# ---------------------------------------------------------------------- exp kernel
def kernel_problem(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of norm² ≤ 2, so |(AAᵀ)_ij| ≤ 2."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d))
    a *= np.sqrt(2) * rng.uniform(0.5, 1.0, (n, 1)) / np.linalg.norm(a, axis=1, keepdims=True)
    return a, rng.standard_normal(n)


def test_exp_kernel_matvec_matches_dense() -> None:
    a, _ = kernel_problem(300, 5)
    v = np.random.default_rng(1).standard_normal((300, 3))
    op = ExpKernelMatvec(ExpKernelMatvecSpec(a, v, 0.7, tile=64))
    for start in range(0, 300, 111):
        op.update(Block(start, a[start : start + 111]))
    np.testing.assert_allclose(op.result(), np.exp(0.7 * a @ a.T) @ v, rtol=1e-12)


def test_attention_kernel_ridge_matches_dense_solve() -> None:
    a, x_true = kernel_problem(512, 6, seed=2)
    k = np.exp(a @ a.T) + 1e-2 * np.eye(512)
    b = k @ x_true
    res = sa.solve.attention_kernel(a, b, ridge=1e-2, rank=100, tol=1e-8, compare=True,
                                    max_iter=150, chunk_rows=200)
    assert res.info["converged"] and res.info["residual"] <= 1e-7
    assert rel(res.x, np.linalg.solve(k, b)) <= 1e-5
    # plain CG on the same system has not converged after 150 products
    assert not res.info["unpreconditioned"]["converged"]
    assert res.info["iterations"] < res.info["unpreconditioned"]["iterations"] == 150


def test_attention_kernel_without_ridge_reaches_residual() -> None:
    a, x_true = kernel_problem(512, 6, seed=3)
    b = np.exp(a @ a.T) @ x_true
    res = sa.solve.attention_kernel(a, b, rank=150, tol=1e-6, max_iter=400)
    assert res.info["converged"] and res.info["residual"] <= 1e-6
    assert res.info["backward_error"] <= 1e-7


def test_attention_kernel_memory_bound_at_32768() -> None:
    n, d, rank = 32768, 16, 100
    bound = sa.solve.kernel_matvec_bound(n, d, k=rank)
    assert bound < n * n * 8 / 50  # far below one n × n float64 array (8.6 GB)
    assert bound < 200 * 2**20
    # the bound is the operator's own, plus the caller's rows and CG vectors
    op = ExpKernelMatvec(ExpKernelMatvecSpec(np.zeros((n, d)), np.zeros((n, rank))))
    assert bound >= op.nbytes_bound(d)


# ---------------------------------------------------------------------- sketches
def test_srht_weights_match_explicit_hadamard() -> None:
    n, m, seed = 13, 6, 4
    w = sketch_weights("srht", m, seed, n, np.arange(n))
    h = scipy.linalg.hadamard(16)
    from streamattn.operators.solve_ops import srht_rows

    rows = srht_rows(n, m, seed)
    signs = np.sign(w[0] * h[rows[0], :n])  # D recovered from the first row
    np.testing.assert_allclose(w, h[rows][:, :n] * signs[None, :] / np.sqrt(m))
    assert set(np.abs(signs)) == {1.0}


@pytest.mark.parametrize("method", ["gaussian", "srht", "countsketch"])
def test_row_sketch_is_an_embedding(method: str) -> None:
    a = conditioned(3000, 6, 1e4, seed=14)
    m = 400 if method == "countsketch" else 60
    op = RowSketch(RowSketchSpec(method, m, 3, 3000))
    for start in range(0, 3000, 700):
        op.update(Block(start, a[start : start + 700]))
    r = np.linalg.qr(op.result(), mode="r")
    s = np.linalg.svd(a @ np.linalg.inv(r), compute_uv=False)
    assert s[0] / s[-1] < 4.0  # cond(A R⁻¹) = O(1) while cond(A) = 1e4
