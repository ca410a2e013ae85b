"""Column selection for d ≫ n: BSS (deterministic) and leverage sampling, spectral + softmax."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special

from streamattn.errors import ConfigError, InvalidInputError
from streamattn.recipes.columns import (
    bss_parameters,
    bss_sparsify,
    column_leverage_sample,
    sparsify_columns,
)


def wide(n: int = 12, d: int = 3000, seed: int = 0, r: float = 0.05) -> np.ndarray:
    """d ≫ n, heavy-tailed column norms, scaled so that ‖XXᵀ‖∞ = r."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * rng.gamma(0.5, size=d)
    x[:, :5] *= 20.0  # a few dominant columns
    return x * np.sqrt(r / np.max(np.abs(x @ x.T)))


def relative_spectrum(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Extreme eigenvalues of M^{+1/2} YYᵀ M^{+1/2} on range(M), M = XXᵀ, by a dense SVD."""
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    keep = s > 1e-6 * s[0]
    w = (u[:, keep] / s[keep]).T
    lam = np.linalg.eigvalsh(w @ y @ y.T @ w.T)
    return float(lam[0]), float(lam[-1])


def softmax_error(x: np.ndarray, y: np.ndarray) -> float:
    a = scipy.special.softmax(x @ x.T, axis=1)
    b = scipy.special.softmax(y @ y.T, axis=1)
    return float(np.max(np.abs(a - b)))


@pytest.mark.parametrize("eps", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("cols_per_block", [97, 3000])
def test_bss_spectral_bound_holds_deterministically(eps: float, cols_per_block: int) -> None:
    x = wide(seed=1)
    sel = bss_sparsify(x, eps=eps, cols_per_block=cols_per_block)
    c = sel.certificate
    lo, hi = relative_spectrum(x, sel.y)
    assert 1 - eps - 1e-9 <= lo and hi <= 1 + eps + 1e-9
    assert c["eps_achieved"] <= c["eps_theory"] + 1e-9 <= eps + 1e-9
    assert abs(max(hi - 1, 1 - lo) - c["eps_achieved"]) < 1e-8
    assert sel.m <= c["m_bound"] == bss_parameters(eps, 12)["steps"]
    assert sel.m < x.shape[1] and np.all(sel.weights > 0)
    np.testing.assert_array_equal(sel.y, x[:, sel.indices] * np.sqrt(sel.weights))
    # the same call twice: deterministic
    again = bss_sparsify(x, eps=eps, cols_per_block=cols_per_block)
    np.testing.assert_array_equal(again.indices, sel.indices)


def test_bss_step_bound_is_o_n_over_eps_squared() -> None:
    for eps in (0.1, 0.3, 0.5):
        p = bss_parameters(eps, 100)
        assert p["eps_theory"] <= eps + 1e-12
        assert p["steps"] <= 4 * 100 / eps**2 + 1  # b = ((1 + sqrt(1 - eps^2)) / eps)^2 <= 4/eps^2


@pytest.mark.parametrize("method", ["bss", "leverage"])
@pytest.mark.parametrize("r", [0.01, 0.05, 0.09])
def test_softmax_error_is_within_o_r(method: str, r: float) -> None:
    """‖D(Y)⁻¹exp(YYᵀ) − D(X)⁻¹exp(XXᵀ)‖∞ ≤ e^{2 ε r} − 1 when ‖XXᵀ‖∞ = r < 0.1."""
    x = wide(seed=2, r=r)
    eps = 0.5
    sel = sparsify_columns(x, method=method, eps=eps, **({"seed": 3} if method != "bss" else {}))
    c = sel.certificate
    assert c["r"] == pytest.approx(r, rel=1e-12) and c["r"] < 0.1
    err = softmax_error(x, sel.y)
    assert c["softmax_error"] == pytest.approx(err, rel=1e-9, abs=1e-15)
    assert err <= c["softmax_bound"] <= np.expm1(2 * eps * r)
    assert c["entrywise_error"] <= c["entrywise_bound"] + 1e-15


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_leverage_sampling_meets_its_bound_for_fixed_seeds(seed: int) -> None:
    x = wide(n=10, d=5000, seed=seed)
    eps = 0.5
    sel = column_leverage_sample(x, eps=eps, delta=0.01, seed=seed, cols_per_block=1000)
    c = sel.certificate
    lo, hi = relative_spectrum(x, sel.y)
    assert 1 - eps <= lo and hi <= 1 + eps
    assert sel.m <= 1.2 * c["m_bound_expected"] and sel.m < 5000
    assert abs(sel.m - c["m_expected"]) < 4 * np.sqrt(c["m_expected"]) + 5
    # the coins are a keyed hash of the column index: any column blocking, same selection
    other = column_leverage_sample(x, eps=eps, delta=0.01, seed=seed, cols_per_block=333)
    np.testing.assert_array_equal(other.indices, sel.indices)
    np.testing.assert_allclose(other.weights, sel.weights, rtol=1e-10)


def test_rank_deficient_and_duplicated_rows_work() -> None:
    x = wide(n=8, d=1500, seed=4)
    x = np.vstack([x, x[:3]])  # rank 8 with n = 11
    for method in ("bss", "leverage"):
        sel = sparsify_columns(x, method=method, eps=0.5)
        assert sel.certificate["rank"] == 8
        lo, hi = relative_spectrum(x, sel.y)
        assert 0.5 - 1e-9 <= lo and hi <= 1.5 + 1e-9


def test_bad_input() -> None:
    x = wide(n=4, d=200)
    with pytest.raises(ConfigError, match="eps must be in"):
        bss_sparsify(x, eps=1.5)
    with pytest.raises(ConfigError, match="unknown column method"):
        sparsify_columns(x, method="random")
    with pytest.raises(ConfigError, match="seed must be"):
        column_leverage_sample(x, seed="1")
    with pytest.raises(ConfigError, match="cols_per_block"):
        bss_sparsify(x, cols_per_block=0)
    bad = x.copy()
    bad[2, 150] = np.nan
    with pytest.raises(InvalidInputError, match="column 150"):
        bss_sparsify(bad, cols_per_block=64)
