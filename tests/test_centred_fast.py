"""The centred fast factor update (affine variant) against Householder QR and offline SVD."""

from __future__ import annotations

import numpy as np
import pytest

from streamattn.operators.factors import centred_factor_result, centred_factor_update
from streamattn.operators.leverage import (
    PIECE_ROWS,
    LeverageScores,
    LeverageSpec,
    ScoringMap,
    centred_fast_update,
)
from streamattn.sources import Block


def keys(n: int, d: int, cond: float, offset: float, seed: int) -> np.ndarray:
    """Rows with singular values spread over ``cond`` plus a common offset (float64)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (u * np.logspace(0, -np.log10(cond), d)) @ v.T * np.sqrt(n) + offset


def offline_affine_scores(x: np.ndarray) -> np.ndarray:
    """1/n + centred leverage, from the SVD of the centred keys (an independent route)."""
    c = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(c, full_matrices=False)
    u = u[:, s > 1e-10 * s[0]]
    return 1.0 / x.shape[0] + np.einsum("ij,ij->i", u, u)


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e6])
def test_centred_step_matches_householder_and_bounds_hold(offset: float) -> None:
    d = 10
    x = keys(3 * PIECE_ROWS + 77, d, cond=1e6, offset=offset, seed=1)  # cond(KᵀK) = 1e12
    r0 = centred_factor_update(np.zeros((0, d + 1)), x[:300])
    step = centred_fast_update(r0, x[300:])
    assert step is not None  # the fast path is taken on this data
    ref = centred_factor_update(r0, x[300:])
    got, want = centred_factor_result(step.r, x.shape[0]), centred_factor_result(ref, x.shape[0])
    np.testing.assert_allclose(got.mean, x.mean(axis=0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12, atol=1e-9)
    # same centred scatter: scores through the fast factor are as close to the offline
    # SVD as Householder's (both inherit the seed factor's ~u·offset/spread error)
    tau = offline_affine_scores(x)
    err_fast = np.abs(ScoringMap.from_centred(got, 1e-10).scores(x) - tau).max()
    err_hh = np.abs(ScoringMap.from_centred(want, 1e-10).scores(x) - tau).max()
    assert err_fast <= 2 * err_hh + 1e-12
    if offset <= 1e3:
        assert err_fast < 1e-8
    # the by-product bounds are affine scores against the first 300 rows: ≥ the final ones
    assert np.all(step.bounds * (1 + step.rel_err) >= tau[300:])
    c_old = x[300:] - x[:300].mean(axis=0)
    _, s, vt = np.linalg.svd(x[:300] - x[:300].mean(axis=0), full_matrices=False)
    ref_bound = 1 / 300 + np.sum(np.square(c_old @ (vt.T / s)), axis=1)
    # the seed factor of raw [1, K] carries ~u·offset/spread relative error (Householder)
    if offset <= 1e3:  # at 1e6 the float64 keys themselves are rounded at that level
        np.testing.assert_allclose(step.bounds, ref_bound, rtol=1e-4)
    seed_map = ScoringMap.from_centred(centred_factor_result(r0, 300), 1e-10)
    seed_scores = seed_map.scores(x[300:])
    if offset <= 1e3:  # δ (μ's rounding, ∝ |μ|·‖R_c⁻¹‖) stays small
        np.testing.assert_allclose(step.bounds, seed_scores, rtol=1e-5)
    assert np.all(step.bounds * (1 + step.rel_err) >= seed_scores)


def test_centred_step_refuses_singular_or_growing_blocks() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 4)) + 5.0
    r = centred_factor_update(np.zeros((0, 5)), x)
    assert centred_fast_update(r, x) is not None
    assert centred_fast_update(r[:3], x) is None  # not square yet
    flat = x.copy()
    flat[:, 3] = 5.0  # a constant column: R_c singular
    assert centred_fast_update(centred_factor_update(np.zeros((0, 5)), flat), x) is None
    wide = x.mean(axis=0) + 1e3 * (x - x.mean(axis=0))
    assert centred_fast_update(r, wide) is None  # growth ‖Y‖² too large


@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_affine_operator_on_large_blocks_equals_offline_svd(offset: float) -> None:
    d = 12
    x = keys(6 * PIECE_ROWS, d, cond=3e6, offset=offset, seed=3)  # cond(KᵀK) ≈ 1e13
    x[::997] += 30.0 * np.sqrt(x.shape[0]) * 1e-3  # heavy rows in every span
    x = x.astype(np.float32).astype(np.float64)
    tau = offline_affine_scores(x)
    eps = 0.004
    assert np.min(np.abs(tau - eps)) > 1e-6
    for cuts in ([x.shape[0]], [700, 5000, 9000, x.shape[0]]):
        op = LeverageScores(LeverageSpec(eps, affine=True))
        start = 0
        for stop in cuts:
            op.update(Block(start, x[start:stop]))
            start = stop
        res = op.result()
        np.testing.assert_array_equal(res["indices"], np.flatnonzero(tau >= eps))
        np.testing.assert_allclose(res["scores"], tau[tau >= eps], rtol=1e-6)
