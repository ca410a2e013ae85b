"""One-layer attention fit: derivatives against finite differences, planted instances."""

from __future__ import annotations

import numpy as np
import pytest

import streamattn as sa
from streamattn.engines import run_operators
from streamattn.errors import InvalidInputError
from streamattn.operators.fit_ops import (
    AttentionFeatures,
    AttentionFeaturesSpec,
    AttentionGaussNewton,
    AttentionGaussNewtonSpec,
    AttentionLossGradient,
    AttentionLossGradientSpec,
)
from streamattn.sources import KeySource


def dense_attention(a1: np.ndarray, x: np.ndarray, a2: np.ndarray) -> np.ndarray:
    z = a1 @ x @ a2.T
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def planted(n: int, d: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    a1, a2, a3 = (rng.standard_normal((n, d)) for _ in range(3))
    x_star = rng.standard_normal((d, d)) / d
    y_star = rng.standard_normal((d, d))
    b = dense_attention(a1, x_star, a2) @ a3 @ y_star
    return a1, a2, a3, b, x_star, y_star


def one_pass(op, a1, b, chunk_rows=17):  # type: ignore[no-untyped-def]
    (out,) = run_operators(KeySource(a1, values=b), [op], chunk_rows=chunk_rows)
    return out.result()


def test_gradient_and_gauss_newton_against_finite_differences() -> None:
    a1, a2, a3, b, _, _ = planted(40, 3, seed=1)
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((3, 3)) / 3, rng.standard_normal((3, 3))

    def loss(xx: np.ndarray, yy: np.ndarray) -> float:
        return float(np.sum((dense_attention(a1, xx, a2) @ a3 @ yy - b) ** 2))

    out = one_pass(AttentionLossGradient(AttentionLossGradientSpec(x, y, a2, a3, tile=8)), a1, b)
    assert out["loss"] == pytest.approx(loss(x, y), rel=1e-12)
    h = 1e-6
    for p in range(3):
        for q in range(3):
            e = np.zeros((3, 3))
            e[p, q] = h
            fd_x = (loss(x + e, y) - loss(x - e, y)) / (2 * h)
            fd_y = (loss(x, y + e) - loss(x, y - e)) / (2 * h)
            assert out["grad_x"][p, q] == pytest.approx(fd_x, rel=1e-6, abs=1e-6)
            assert out["grad_y"][p, q] == pytest.approx(fd_y, rel=1e-6, abs=1e-6)

    def residual(xv: np.ndarray) -> np.ndarray:
        return (dense_attention(a1, xv.reshape(3, 3), a2) @ a3 @ y - b).ravel()

    jac = np.stack(
        [(residual(x.ravel() + h * e) - residual(x.ravel() - h * e)) / (2 * h) for e in np.eye(9)],
        axis=1,
    )
    f = dense_attention(a1, x, a2) @ a3
    q_basis, r_f = np.linalg.qr(f)
    gn = one_pass(
        AttentionGaussNewton(AttentionGaussNewtonSpec(x, y, a2, a3, np.linalg.inv(r_f), tile=8)),
        a1, b,
    )
    np.testing.assert_allclose(gn["jtj"], jac.T @ jac, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gn["jtr"], jac.T @ residual(x.ravel()), rtol=1e-6, atol=1e-6)
    per_col = jac.reshape(40, 3, 9)
    projected = sum((q_basis.T @ per_col[:, i]).T @ (q_basis.T @ per_col[:, i]) for i in range(3))
    np.testing.assert_allclose(gn["projected"], projected, rtol=1e-6, atol=1e-6)


def test_features_pass_gives_least_squares_y() -> None:
    a1, a2, a3, b, _, _ = planted(60, 4, seed=3)
    x = np.random.default_rng(4).standard_normal((4, 4)) / 4
    r = one_pass(AttentionFeatures(AttentionFeaturesSpec(x, a2, a3, tile=16)), a1, b)
    f = dense_attention(a1, x, a2) @ a3
    y_ref, res, *_ = np.linalg.lstsq(f, b, rcond=None)
    np.testing.assert_allclose(np.linalg.solve(r[:4, :4], r[:4, 4:]), y_ref, rtol=1e-9)
    assert float(np.sum(r[4:, 4:] ** 2)) == pytest.approx(float(res.sum()), rel=1e-9)


def test_planted_instance_is_recovered(tmp_path) -> None:
    a1, a2, a3, b, x_star, _ = planted(300, 4, seed=101)
    paths = []
    for name, arr in [("a1", a1), ("a2", a2), ("a3", a3), ("b", b)]:
        np.save(tmp_path / f"{name}.npy", arr)
        paths.append(str(tmp_path / f"{name}.npy"))
    res = sa.fit.one_layer_attention(*paths, seed=0, chunk_rows=64, tile=32)
    assert res.info["converged"]
    assert res.loss_history[-1] <= 1e-10 * res.loss_history[0]
    assert res.X.shape == res.Y.shape == (4, 4)
    s_fit = dense_attention(a1, res.X, a2)
    assert np.abs(s_fit - dense_attention(a1, x_star, a2)).max() <= 1e-5
    assert len(res.info["time_history"]) == len(res.loss_history)
    # the first-order baseline from the same start decreases the loss but far less
    adam = sa.fit.one_layer_attention(a1, a2, a3, b, seed=0, method="adam", max_iter=50)
    assert adam.loss_history[0] == pytest.approx(res.loss_history[0], rel=1e-12)
    assert adam.loss_history[-1] < adam.loss_history[0]
    assert adam.loss_history[-1] > 1e3 * res.loss_history[-1]


def test_local_equals_dask_fit_pass() -> None:
    a1, a2, a3, b, _, _ = planted(120, 3, seed=5)
    x = np.random.default_rng(6).standard_normal((3, 3)) / 3
    op = AttentionLossGradient(AttentionLossGradientSpec(x, np.eye(3), a2, a3, tile=16))
    local = one_pass(op, a1, b, chunk_rows=25)
    (dk,) = run_operators(KeySource(a1, values=b), [op.empty()], chunk_rows=25, engine="dask",
                          scheduler="threads")
    out = dk.result()
    assert out["loss"] == pytest.approx(local["loss"], rel=1e-12)
    np.testing.assert_allclose(out["grad_x"], local["grad_x"], rtol=1e-10)


def test_fit_bad_inputs() -> None:
    a1, a2, a3, b, _, _ = planted(50, 3, seed=7)
    with pytest.raises(InvalidInputError, match="same number of columns"):
        sa.fit.one_layer_attention(a1, a2[:, :2], a3, b)
    with pytest.raises(InvalidInputError, match="B has shape"):
        sa.fit.one_layer_attention(a1, a2, a3, b[:40])
    with pytest.raises(InvalidInputError, match="same rows"):
        sa.fit.one_layer_attention(a1, a2, a3[:30], b)
    bad = a2.copy()
    bad[11, 0] = np.nan
    with pytest.raises(InvalidInputError, match=r"A2.*row 11"):
        sa.fit.one_layer_attention(a1, bad, a3, b)
    bad_b = b.copy()
    bad_b[9, 1] = np.inf
    with pytest.raises(InvalidInputError, match="row 9"):
        sa.fit.one_layer_attention(a1, a2, a3, bad_b)
