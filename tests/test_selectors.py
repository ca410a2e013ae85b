"""Selectors: budgets, determinism, causality, exactness, and the x² guarantee as measured."""

from __future__ import annotations

import numpy as np
import pytest

from streamattn.errors import ConfigError
from streamattn.operators.ground_truth import GroundTruth, GroundTruthSpec
from streamattn.recipes.evaluate import set_metrics
from streamattn.recipes.selectors import (
    KeySet,
    hybrid,
    largest_norm,
    leverage_top,
    observed_heavy_hitters,
    sinks_window,
    uniform_random,
    universal_threshold,
)
from streamattn.sources import Block

N, D = 500, 6
BUDGETS = [1, 5, 16, 64]


def keys(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((N, D)) @ np.diag(np.linspace(0.5, 2.0, D)) + 1.5
    k[[17, 250, 499]] *= 6.0
    return k


def offline_leverage(k: np.ndarray, affine: bool) -> np.ndarray:
    x = np.hstack([k, np.ones((len(k), 1))]) if affine else k
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    u = u[:, s > 1e-10 * s[0]]
    return (u**2).sum(axis=1)


def check_budgets(sets: list[KeySet], budgets: list[int]) -> None:
    assert [s.budget for s in sets] == budgets
    for ks in sets:
        assert ks.indices.dtype == np.int64
        assert np.all(np.diff(ks.indices) > 0)  # sorted, unique
        assert len(ks.for_query()) == ks.budget  # exactly B keys for a global query
        assert int(ks.sizes()[0]) == ks.budget


def test_random_is_seeded_exact_and_nested() -> None:
    a = uniform_random(N, BUDGETS, seed=3)
    b = uniform_random(N, BUDGETS, seed=3)
    c = uniform_random(N, BUDGETS, seed=4)
    check_budgets(a, BUDGETS)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.indices, y.indices)
    assert not np.array_equal(a[-1].indices, c[-1].indices)
    assert set(a[1].indices) <= set(a[2].indices) <= set(a[3].indices)


@pytest.mark.parametrize("variant", ["plain", "affine"])
def test_leverage_top_is_the_offline_top_b(variant: str) -> None:
    k = keys()
    sets = leverage_top(k, BUDGETS, variant, chunk_rows=64)
    check_budgets(sets, BUDGETS)
    tau = offline_leverage(k, variant == "affine")
    for ks in sets:
        expect = np.sort(np.lexsort((np.arange(N), -tau))[: ks.budget])
        np.testing.assert_array_equal(ks.indices, expect)


def test_largest_norm_is_exact() -> None:
    k = keys(1)
    sets = largest_norm(k, BUDGETS, chunk_rows=37)
    check_budgets(sets, BUDGETS)
    norms = (k**2).sum(axis=1)
    for ks in sets:
        np.testing.assert_array_equal(
            ks.indices, np.sort(np.lexsort((np.arange(N), -norms))[: ks.budget])
        )


def test_sinks_window_global_and_causal() -> None:
    sets = sinks_window(N, BUDGETS, sinks=4)
    check_budgets(sets, BUDGETS)
    b64 = sets[-1]
    np.testing.assert_array_equal(b64.for_query(), np.r_[0:4, N - 60 : N])
    for pos in [0, 2, 3, 10, 63, 64, 200, N - 1]:
        got = b64.for_query(pos)
        assert got.size == 0 or got.max() <= pos  # never a future key
        assert got.size == min(64, pos + 1)  # B keys once the prefix is long enough
        assert int(b64.sizes(np.array([pos]))[0]) == got.size
        assert set(range(min(4, pos + 1))) <= set(got)  # the sinks
        assert pos in got  # the most recent key


def test_hybrid_sinks_window_and_leverage() -> None:
    k = keys(2)
    sets = hybrid(k, BUDGETS, sinks=4, window_fraction=0.5, chunk_rows=100)
    check_budgets(sets, BUDGETS)
    tau = offline_leverage(k, True)
    ks = sets[-1]  # B = 64: 4 sinks, 30 recent, 30 by affine leverage
    assert ks.window == 30
    full = ks.for_query()
    assert set(range(4)) <= set(full) and set(range(N - 30, N)) <= set(full)
    far = np.setdiff1d(ks.indices, np.arange(4))
    ranked = [j for j in np.lexsort((np.arange(N), -tau)) if 4 <= j < N - 30][:30]
    np.testing.assert_array_equal(far, np.sort(ranked))
    for pos in [5, 100, 300]:
        got = ks.for_query(pos)
        assert got.max() <= pos and got.size <= 64


def test_heavy_hitters_need_queries_and_match_dense() -> None:
    k = keys(3) / 3
    q = np.random.default_rng(9).standard_normal((7, D))
    sets = observed_heavy_hitters(k, BUDGETS, q, chunk_rows=77)
    check_budgets(sets, BUDGETS)
    lw = q @ k.T / np.sqrt(D)
    a = np.exp(lw - np.logaddexp.reduce(lw, axis=1)[:, None]).sum(axis=0)
    for ks in sets:
        np.testing.assert_array_equal(
            ks.indices, np.sort(np.lexsort((np.arange(N), -a))[: ks.budget])
        )


def test_budget_validation() -> None:
    with pytest.raises(ConfigError, match="budget"):
        uniform_random(N, [0])
    with pytest.raises(ConfigError, match="budget"):
        sinks_window(N, [N + 1])


def _x2_truth(k: np.ndarray, q: np.ndarray, eps: float) -> dict:
    spec = GroundTruthSpec(q, eps=eps, kind="power", p=2.0)
    op = GroundTruth(spec)
    for a in range(0, len(k), 128):
        op.update(Block(a, k[a : a + 128]))
    return op.result()


def test_x2_universal_set_has_recall_one_and_the_metric_can_fail() -> None:
    """The LevAttention guarantee, measured: every x² share >= eps is in U_eps."""
    k = keys(4)
    eps = 0.02
    u = universal_threshold(k, eps, "plain", chunk_rows=128)
    assert len(u.indices) >= 3
    g = k.T @ k
    rng = np.random.default_rng(0)
    adversarial = np.linalg.pinv(g) @ k[u.indices].T  # q = G^+ k_j maximises j's share
    q = np.vstack([rng.standard_normal((40, D)), adversarial.T])
    truth = _x2_truth(k, q, eps)
    assert np.count_nonzero(truth["counts"]) >= len(u.indices)  # many queries have heavy keys
    met = set_metrics(u, truth, np.zeros(len(q)), None, np.full(len(q), N - 1))
    ok = np.isfinite(met["recall"])
    assert ok.sum() >= len(u.indices)
    assert np.all(met["recall"][ok] == 1.0)
    # a set that misses one heavy key is caught by the metric
    heavy_keys = np.unique(truth["indices"][truth["indices"] >= 0])
    missing = KeySet("broken", None, np.setdiff1d(u.indices, heavy_keys[:1]), N)
    met_bad = set_metrics(missing, truth, np.zeros(len(q)), None, np.full(len(q), N - 1))
    assert np.nanmin(met_bad["recall"]) < 1.0
