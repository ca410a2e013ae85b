"""The fast factor update (preconditioned Cholesky, threaded pieces) against Householder QR."""

from __future__ import annotations

import numpy as np
import pytest

from streamattn.operators.leverage import (
    PIECE_ROWS,
    LeverageScores,
    LeverageSpec,
    ScoringMap,
    augment,
    fast_factor_update,
    stack_qr,
)
from streamattn.sources import Block


def ill_conditioned(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    """cond(K) ≈ 1e6 with a common offset (float64)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (u * np.logspace(0, -6, d)) @ v.T * 1e3 + 0.5


def svd_scores(x: np.ndarray, affine: bool) -> np.ndarray:
    u, s, _ = np.linalg.svd(augment(x, affine), full_matrices=False)
    u = u[:, s > 1e-10 * s[0]]
    return np.einsum("ij,ij->i", u, u)


@pytest.mark.parametrize("affine", [False, True])
def test_fast_update_matches_householder_on_large_ill_conditioned_blocks(affine: bool) -> None:
    x = ill_conditioned(3 * PIECE_ROWS + 123)  # several pieces, split across threads
    head = augment(x[:200], affine)
    r0 = stack_qr(head)
    step = fast_factor_update(r0, augment(x[200:], affine))  # any rows, augmented or not
    assert step is not None
    ref = stack_qr(r0, augment(x[200:], affine))
    # same Gram, hence the same scores: compare scores, not the (sign-ambiguous) factors
    dim = ref.shape[1]
    got = ScoringMap.from_factor(step.r, 1e-10, dim).scores(augment(x, affine))
    want = ScoringMap.from_factor(ref, 1e-10, dim).scores(augment(x, affine))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got, svd_scores(x, affine), rtol=0, atol=1e-8)
    # the free bounds are scores against the old factor: never below the final score
    assert np.all(step.bounds * (1 + step.rel_err) >= got[200:])


def test_fast_update_refuses_singular_or_missing_factor() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 4))
    assert fast_factor_update(np.zeros((0, 4)), x) is None
    r = np.triu(rng.standard_normal((4, 4))) + 3 * np.eye(4)
    assert fast_factor_update(r, x) is not None
    for tiny in (0.0, 1e-12):  # singular, or beyond FAST_COND_LIMIT: Householder instead
        bad = r.copy()
        bad[3, 3] = tiny
        assert fast_factor_update(bad, x) is None
    assert fast_factor_update(r, 1e4 * x) is None  # growth ‖Y‖² too large


@pytest.mark.parametrize("affine", [False, True])
def test_operator_on_large_blocks_equals_offline_svd(affine: bool) -> None:
    x = ill_conditioned(2 * PIECE_ROWS * 3, d=12, seed=3)
    x[::997] *= 40.0  # heavy rows, some of them inside each threaded span
    x = x.astype(np.float32)  # the store's dtype; the reference scores the same numbers
    tau = svd_scores(x.astype(np.float64), affine)
    eps = 0.005
    assert np.min(np.abs(tau - eps)) > 1e-7
    for cuts in ([x.shape[0]], [5000, 9000, x.shape[0]]):
        op = LeverageScores(LeverageSpec(eps, affine))
        start = 0
        for stop in cuts:
            op.update(Block(start, x[start:stop]))
            start = stop
        res = op.result()
        np.testing.assert_array_equal(res["indices"], np.flatnonzero(tau >= eps))
        np.testing.assert_allclose(res["scores"], tau[res["indices"]], rtol=0, atol=1e-8)
