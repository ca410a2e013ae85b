"""Frequent Directions: the covariance bound, its computable form, merges, bad specs."""

from __future__ import annotations

import numpy as np
import pytest

from streamattn.errors import ConfigError
from streamattn.operators.frequent_directions import FDSketch, FDSpec, FrequentDirections
from streamattn.sources import Block
from streamattn.testing.laws import blocks_of, fold, fold_tree


def decaying(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * np.geomspace(10.0, 0.1, d) + 0.5


def check_fd_bound(k: np.ndarray, r: FDSketch) -> None:
    """0 ⪯ KᵀK − BᵀB ⪯ Δ I ≤ (‖K‖²−‖B‖²)/ℓ I ≤ ‖K − K_k‖²/(ℓ−k) I for every k < ℓ."""
    g = k.T @ k
    gap = np.linalg.eigvalsh(g - r.sketch.T @ r.sketch)
    scale = np.linalg.norm(g, 2)
    assert gap.min() >= -1e-10 * scale
    assert gap.max() <= r.delta + 1e-10 * scale
    assert r.delta <= r.delta_bound * (1 + 1e-9) + 1e-10 * scale
    s2 = np.linalg.svd(k, compute_uv=False) ** 2
    for kk in range(r.ell):
        assert r.delta <= s2[kk:].sum() / (r.ell - kk) * (1 + 1e-9) + 1e-10 * scale
    np.testing.assert_allclose(r.fro2, np.sum(k**2), rtol=1e-12)
    assert r.n == k.shape[0]
    assert r.sketch.shape == (r.ell, k.shape[1])


@pytest.mark.parametrize("ell", [1, 3, 8, 20])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_fd_covariance_bound_any_chunking(ell: int, chunk: int) -> None:
    k = decaying(400, 12)
    fd = fold(lambda: FrequentDirections(FDSpec(ell)), blocks_of(k, list(range(chunk, 400, chunk))))
    check_fd_bound(k, fd.result())


@pytest.mark.parametrize("seed", range(4))
def test_fd_merge_trees_keep_the_bound(seed: int) -> None:
    k = decaying(600, 16, seed)
    rng = np.random.default_rng(seed)
    cuts = sorted(rng.choice(np.arange(1, 600), size=12, replace=False).tolist())
    tree = fold_tree(lambda: FrequentDirections(FDSpec(6)), blocks_of(k, cuts), rng)
    check_fd_bound(k, tree.result())


def test_fd_exact_when_rank_below_ell() -> None:
    rng = np.random.default_rng(3)
    k = rng.standard_normal((300, 4)) @ rng.standard_normal((4, 10))
    r = FrequentDirections(FDSpec(6)).update(Block(0, k[:150])).update(Block(150, k[150:]))
    res = r.result()
    assert res.delta <= 1e-9 * np.linalg.norm(k, 2) ** 2
    np.testing.assert_allclose(res.sketch.T @ res.sketch, k.T @ k, atol=1e-8 * res.fro2)


def test_fd_result_does_not_change_state() -> None:
    k = decaying(100, 8)
    fd = FrequentDirections(FDSpec(5)).update(Block(0, k))
    before = {key: v.copy() for key, v in fd.to_state().items()}
    fd.result()
    after = fd.to_state()
    for key, v in before.items():
        np.testing.assert_array_equal(v, after[key])


def test_fd_input_not_modified() -> None:
    k = decaying(50, 8).astype(np.float32)
    copy = k.copy()
    FrequentDirections(FDSpec(3)).update(Block(0, k)).result()
    np.testing.assert_array_equal(k, copy)


@pytest.mark.parametrize("ell", [0, -2, 2.5, True])
def test_fd_bad_ell(ell: object) -> None:
    with pytest.raises(ConfigError, match="ell"):
        FDSpec(ell)  # type: ignore[arg-type]
