"""The certified Gram step and pruning bound (operators/gram_step.py) against offline references."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from streamattn.operators.factors import stack_qr
from streamattn.operators.gram_step import (
    GRAM_TOL,
    Frame,
    accumulation_length,
    centred_gram_step,
    gram_and_bounds,
    gram_step,
    make_frame,
    triangular_bounds,
)
from streamattn.operators.leverage import LeverageScores, LeverageSpec
from streamattn.sources import Block
from streamattn.synthetic import SyntheticSpec, synthetic_rows


def offline_scores(x: np.ndarray, affine: bool) -> np.ndarray:
    """Leverage scores from the SVD of the whole float64 matrix (affine: of [1, K])."""
    a = np.asarray(x, dtype=np.float64)
    if affine:
        a = np.hstack([np.ones((a.shape[0], 1)), a])
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    u = u[:, s > 1e-10 * s[0]]
    return np.einsum("ij,ij->i", u, u)


def spread_keys(n: int, d: int, cond: float, offset: float, seed: int) -> np.ndarray:
    """float32 rows whose singular values spread over ``cond``, plus a common offset."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    x = (u * np.logspace(0, -np.log10(cond), d)) @ v.T * np.sqrt(n) + offset
    return x.astype(np.float32)


def fold(x: np.ndarray, eps: float, affine: bool, block: int) -> LeverageScores:
    op = LeverageScores(LeverageSpec(eps, affine))
    for a in range(0, x.shape[0], block):
        op.update(Block(a, x[a : a + block]))
    return op


def solve_rt(r: np.ndarray, b: np.ndarray) -> np.ndarray:
    """R⁻ᵀ B by forward substitution in long double (R upper triangular)."""
    rl = np.asarray(r, dtype=np.longdouble)
    z = np.asarray(b, dtype=np.longdouble).copy()
    for i in range(rl.shape[0]):
        z[i] = (z[i] - rl[:i, i] @ z[:i]) / rl[i, i]
    return z


def exact_tau(r: np.ndarray, x: np.ndarray) -> np.ndarray:
    """xᵀ(RᵀR)⁻¹x per row in long double (an independent route)."""
    z = solve_rt(r, np.asarray(x).T)
    return np.asarray((z * z).sum(axis=0), dtype=np.float64)


def loewner_error(new: np.ndarray, ref: np.ndarray) -> float:
    """‖R_ref⁻ᵀ (R'ᵀR' − R_refᵀR_ref) R_ref⁻¹‖₂, the relative Gram error (long double)."""
    a, b = np.asarray(new, np.longdouble), np.asarray(ref, np.longdouble)
    z = solve_rt(ref, a.T @ a - b.T @ b)
    w = solve_rt(ref, z.T)
    return float(np.linalg.norm(np.asarray(w, dtype=np.float64), 2))


@pytest.mark.parametrize("affine", [False, True])
def test_gram_step_taken_on_well_conditioned_keys_gives_the_offline_set(affine: bool) -> None:
    n, d, eps = 60000, 16, 0.002
    x = synthetic_rows(SyntheticSpec(n=n, d=d, rank=6), 0, n)
    op = fold(x, eps, affine, 4096)
    stats = op.fold_stats
    assert stats["gram_steps"] >= 5 and stats["gram_rows"] >= n // 3, stats
    assert 0 < op.rel_err < 1e-7
    tau = offline_scores(x, affine)
    res = op.result()
    np.testing.assert_array_equal(res["indices"], np.flatnonzero(tau >= eps))
    np.testing.assert_allclose(res["scores"], tau[res["indices"]], rtol=1e-7)
    back = LeverageScores.from_state(op.to_state())
    assert back.rel_err == op.rel_err


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("case", ["ill-conditioned", "offset"])
def test_certificate_refuses_ill_conditioned_or_offset_keys(affine: bool, case: str) -> None:
    n, d, eps = 40000, 12, 0.002
    if case == "ill-conditioned":  # cond(KᵀK) = 1e13
        x = spread_keys(n, d, np.sqrt(1e13), 0.5, seed=1)
    else:  # a common offset 1e6 × the spread
        x = spread_keys(n, d, 10.0, 0.0, seed=2) / np.sqrt(n) + np.float32(1e6)
    op = fold(x, eps, affine, 4096)
    if case == "ill-conditioned" or not affine:
        assert op.fold_stats["gram_steps"] == 0
    tau = offline_scores(x, affine)
    want = np.flatnonzero(tau >= eps)
    got = op.result()["indices"]
    # the offline SVD itself is only accurate to ~u·cond here: compare away from the cut
    near = np.abs(tau - eps) < 1e-6 * eps
    assert set(got) - set(np.flatnonzero(near)) == set(want) - set(np.flatnonzero(near))


def test_gram_step_error_is_within_its_certificate() -> None:
    rng = np.random.default_rng(3)
    for cond, m in [(10.0, 4000), (1e3, 3000), (1e4, 500)]:
        x = spread_keys(40000, 10, cond, 3.0, seed=int(cond))
        r = stack_qr(x[:30000].astype(np.float64))
        block = x[30000 : 30000 + m]
        frame = make_frame(r, k=int(rng.integers(0, 4)))
        assert frame is not None
        gram, _, _, xx, _ = gram_and_bounds(block, frame)
        step = gram_step(frame, gram, float(xx.sum()), m, tol=1.0)
        assert step is not None
        new, delta = step
        ref = stack_qr(r, block.astype(np.float64))  # Householder QR: the offline reference
        err = loewner_error(new, ref)
        assert err <= delta, (cond, err, delta)
        assert delta < 1e-6


def test_accumulation_length_and_default_tolerance() -> None:
    assert accumulation_length(65536) == 128 + 16 + 32 + 2
    assert accumulation_length(1) == 128 + 16 + 1 + 2
    assert GRAM_TOL <= 1e-9


def adversarial_cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, factor R, rows) for the pruning bound."""
    rng = np.random.default_rng(7)
    d = 8
    cases = []
    # an ill-conditioned factor (cond(R) = 1e7) and rows along its extreme directions
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s = np.logspace(4, -3, d)
    r = stack_qr((np.linalg.qr(rng.standard_normal((4 * d, d)))[0] * s) @ v.T)
    _, _, vt = np.linalg.svd(r)
    big, small = vt[0], vt[-1]
    rows = np.vstack([
        1e8 * big + 1.0 * small,  # huge S component, tiny residual: cancellation
        1e8 * big + 1e-3 * small,
        small, -small, big, vt[1] + vt[-2],
        1e8 * big, 1e8 * big,  # duplicated rows
        rng.standard_normal((40, d)) * np.logspace(0, 8, d),
        1e6 + rng.standard_normal((10, d)),  # huge offset
    ])
    cases.append(("ill-conditioned", r, rows))
    # keys with a huge common offset: R has one enormous direction
    x = rng.standard_normal((200, d)) + 1e6
    r2 = stack_qr(x)
    _, _, vt2 = np.linalg.svd(r2)
    rows2 = np.vstack([x[:20], 1e6 + rng.standard_normal((20, d)), vt2[-1], 1e6 * vt2[0] + vt2[-1]])
    cases.append(("offset", r2, rows2))
    # a factor from duplicated rows plus a few others (nearly rank-deficient directions)
    x3 = np.vstack([np.repeat(rng.standard_normal((3, d)), 30, axis=0),
                    1e-4 * rng.standard_normal((d, d))])
    r3 = stack_qr(x3)
    _, _, vt3 = np.linalg.svd(r3)
    cases.append(("duplicated", r3, np.vstack([x3, vt3[-1], 1e3 * vt3[0] + vt3[-1]])))
    cases.append(("cancellation", *cancellation_case()))
    return cases


@pytest.mark.parametrize("k", [0, 1, 3, 6])
def test_pruning_bound_dominates_the_exact_score(k: int) -> None:
    for name, r, rows in adversarial_cases():
        frame = make_frame(r, k=k)
        assert frame is not None, name
        _, _, s, _, split = gram_and_bounds(rows, frame)
        assert split == (rows.shape[0] if frame.k else 0)
        tau = exact_tau(r, rows)
        assert np.all(s**2 >= tau), (name, k, np.min(s**2 / tau))
        if k == frame.k and k and name != "cancellation":
            # and it is not vacuous: within a modest factor for some rows
            assert np.min(s**2 / tau) < 10.0, name


def cancellation_case() -> tuple[np.ndarray, np.ndarray]:
    """cond(R) = 1e10 and rows A·v_max + v_min: the v_min part (1e8 of τ) is below the
    rounding of ‖x‖² − ‖V_Sᵀx‖² (A² u ≈ 1), so only the allowance keeps it in the bound."""
    rng = np.random.default_rng(11)
    d = 6
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    r = stack_qr((np.linalg.qr(rng.standard_normal((4 * d, d)))[0] * np.logspace(6, -4, d)) @ v.T)
    _, _, vt = np.linalg.svd(r)
    amp = rng.uniform(1e7, 1e8, 64) * rng.choice([-1.0, 1.0], 64)
    return r, amp[:, None] * vt[0] + vt[-1]


def test_dropping_the_allowance_is_caught() -> None:
    """A planted bug (no cancellation allowance) fails the same check the real bound passes."""
    r, rows = cancellation_case()
    frame = make_frame(r, k=1)
    assert frame is not None and frame.k == 1
    tau = exact_tau(r, rows)
    _, _, s_ok, _, _ = gram_and_bounds(rows, frame)
    assert np.all(s_ok**2 >= tau)
    bug = dataclasses.replace(frame, res_allow=0.0)
    _, _, s_bug, _, _ = gram_and_bounds(rows, bug)
    assert np.any(s_bug**2 < tau)  # misses the residual along the smallest direction


def centred_setup(seen: int, seed: int) -> tuple[np.ndarray, np.ndarray, Any, Frame]:
    """30000 offset keys (d = 6), the factor of [1, K] of the first ``seen`` and its frame."""
    from streamattn.operators.factors import centred_factor_result, centred_factor_update

    x = spread_keys(30000, 6, 30.0, 50.0, seed=seed)
    r = centred_factor_update(np.zeros((0, 7)), x[:seen])
    cf = centred_factor_result(r, seen)
    frame = make_frame(cf.r_centred, k=2)
    assert frame is not None
    return x, r, cf, frame


def test_centred_gram_step_matches_householder_and_its_certificate() -> None:
    from streamattn.operators.factors import centred_factor_update

    x, r, cf, frame = centred_setup(25000, seed=5)
    block = x[25000:]
    zz, zsum, _, xx, _ = gram_and_bounds(block, frame, cf.mean)
    step = centred_gram_step(frame, abs(float(r[0, 0])), cf.mean, zz, zsum, float(xx.sum()),
                             block.shape[0], tol=1.0)
    assert step is not None
    new, delta = step
    ref = centred_factor_update(r, block)
    assert loewner_error(new, ref) <= delta < 1e-6


def test_triangular_bound_dominates_the_exact_score_and_is_tight() -> None:
    for name, r, rows in adversarial_cases():
        frame = make_frame(r, k=0)
        assert frame is not None, name
        s = triangular_bounds(frame, np.asarray(rows, dtype=np.float64))
        tau = exact_tau(r, rows)
        assert np.all(s**2 >= tau), (name, np.min(s**2 / tau))
        if name != "cancellation":  # ‖fl(xT)‖ itself, up to its small allowances
            assert np.max(s**2 / tau) < 1.0 + 1e-6, name


def test_dropping_the_triangular_allowance_is_caught() -> None:
    """A planted bug (‖fl(xT)‖ with no allowance) fails the check the real bound passes."""
    r, rows = cancellation_case()
    frame = make_frame(r, k=0)
    assert frame is not None
    y = np.asarray(rows, dtype=np.float64) @ frame.rinv
    tau = exact_tau(r, rows)
    assert np.any(np.einsum("ij,ij->i", y, y) < tau * (1 - 1e-12))
    assert np.all(triangular_bounds(frame, np.asarray(rows, dtype=np.float64)) ** 2 >= tau)


def test_heavily_admitting_gram_steps_rescore_and_give_the_offline_set() -> None:
    # spread spectrum and a threshold close to the typical score: the norm / split bound
    # admits many rows, the triangular second stage drops most of them again
    n, d, block = 40000, 8, 4000
    x = spread_keys(n, d, 1e2, 1.0, seed=9)
    eps = 3.0 * d / n
    op = fold(x, eps, False, block)
    stats = op.fold_stats
    assert stats["gram_steps"] >= 5 and stats["rescored_rows"] > 1.5 * stats["admitted_rows"]
    tau = offline_scores(x, False)
    np.testing.assert_array_equal(op.result()["indices"], np.flatnonzero(tau >= eps))


@pytest.mark.parametrize("method", ["gaussian", "srht", "sparse-sign"])
def test_projection_of_float32_rows_is_bit_identical_to_their_float64_copy(method: str) -> None:
    """The tile-by-tile float32 → float64 conversion (no copy of the block) changes no bit."""
    from streamattn.blas import single_blas_thread
    from streamattn.operators.projection import TILE_ROWS, ProjectionMap

    x = (np.random.default_rng(4).standard_normal((2 * TILE_ROWS + 77, 24)) * 5 + 2).astype(
        np.float32)
    pm = ProjectionMap(method, 24, 8, seed=2)
    for start, lo, hi in [(0, 0, x.shape[0]), (123, 5, TILE_ROWS + 9), (TILE_ROWS, 0, 3)]:
        want = pm.apply(x[lo:hi].astype(np.float64), start)
        with single_blas_thread():
            got = pm.apply(x[lo:hi], start)
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.add.reduce(x, axis=0, dtype=np.float64),
                                  x.astype(np.float64).sum(axis=0))
