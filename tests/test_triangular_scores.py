"""Pruning scores by a triangular inverse (no SVD) against the SVD map and offline scores."""

from __future__ import annotations

import numpy as np

from streamattn.operators.leverage import ScoringMap, _triangular_scores, stack_qr


def test_triangular_scores_equal_the_svd_map_on_well_conditioned_factors() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((400, 9)) * np.logspace(0, -3, 9)  # cond 1e3
    r = stack_qr(x)
    got = _triangular_scores(r, x, 1e-10)
    assert got is not None
    want = ScoringMap.from_factor(r, 1e-13, 9).scores(x)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    u, _, _ = np.linalg.svd(x, full_matrices=False)  # offline leverage
    np.testing.assert_allclose(got, np.einsum("ij,ij->i", u, u), rtol=1e-9)


def test_triangular_scores_refuse_where_the_fine_range_could_drop_a_direction() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 6)) * np.logspace(0, -5, 6)  # cond 1e5
    r = stack_qr(x)
    assert _triangular_scores(r, x, 1e-10) is not None
    # rtol = 1e-2: the pruning range cuts at 1e-5·σ_max, within reach of cond 1e5
    assert _triangular_scores(r, x, 1e-2) is None
    assert _triangular_scores(r[:5], x, 1e-10) is None  # not square
    singular = r.copy()
    singular[5, 5] = 0.0
    assert _triangular_scores(singular, x, 1e-10) is None
