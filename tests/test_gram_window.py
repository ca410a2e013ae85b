"""Gram windows: several blocks folded against one certified frame, then one certified step.

References are independent: Householder QR of all rows (long-double Loewner error), the
offline SVD of the whole matrix, and an uninterrupted pass for resume.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from test_gram_step import centred_setup, fold, loewner_error, offline_scores, spread_keys

from streamattn.operators.factors import centred_factor_update, stack_qr
from streamattn.operators.gram_step import (
    LONG_SYRK_ROWS,
    PIECE_ROWS,
    SYRK_ROWS,
    accumulation_length,
    centred_gram_step,
    cholesky_upper,
    gamma,
    gram_and_bounds,
    gram_step,
    make_frame,
    serial_rows,
    split_rows,
    sum_length,
    symmetric_from_upper,
    upper,
    window_length,
)
from streamattn.operators.leverage import LeverageScores, LeverageSpec
from streamattn.operators.multihead import MultiHead
from streamattn.sources import Block


def gaussian_keys(n: int, d: int, seed: int, offset: float = 0.0) -> np.ndarray:
    """float32 Gaussian rows with column scales in [0.5, 2]: the Gram step's bound prunes
    them well (a common offset does too in the affine variant, which centres)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d) + offset).astype(np.float32)


@pytest.mark.parametrize("m", [1, 2047, 2048, 4096, 5000, 6145, 65536, 100000, 131072, 2**20])
def test_row_spans_stay_within_the_accumulation_length(m: int) -> None:
    spans = split_rows(m)
    assert spans[0][0] == 0 and spans[-1][1] == m
    assert all(b == c for (_, b), (c, _) in itertools.pairwise(spans))
    per_span = max(-(-(b - a) // PIECE_ROWS) for a, b in spans)
    longest = SYRK_ROWS + -(-PIECE_ROWS // SYRK_ROWS) + per_span + len(spans)
    assert longest <= accumulation_length(m)
    with serial_rows():
        assert split_rows(m) == [(0, m)]


def test_a_window_of_several_calls_is_within_its_certificate() -> None:
    x = spread_keys(40000, 10, 1e3, 3.0, seed=11)
    r = stack_qr(x[:30000].astype(np.float64))
    frame = make_frame(r, k=2)
    assert frame is not None
    sizes = [700, 1300, 64, 2500, 900]
    gram, fro2, a = np.zeros((10, 10)), 0.0, 30000
    for m in sizes:
        g, _, _, xx, _ = gram_and_bounds(x[a : a + m], frame)
        gram, fro2, a = gram + g, fro2 + float(xx.sum()), a + m
    total = sum(sizes)
    step = gram_step(frame, gram, fro2, total, tol=1.0, length=window_length(max(sizes), 5))
    assert step is not None
    new, delta = step
    ref = stack_qr(r, x[30000:a].astype(np.float64))
    assert loewner_error(new, ref) <= delta < 1e-6
    assert window_length(2500, 5) == window_length(2500, 1) + 4


def test_long_syrk_calls_are_within_their_certificate() -> None:
    x = spread_keys(50000, 12, 10.0, 1.0, seed=13)
    r = stack_qr(x[:30000].astype(np.float64))
    frame = make_frame(r, k=1)
    assert frame is not None
    block = x[30000:]
    gram, _, _, xx, _ = gram_and_bounds(block, frame, syrk_rows=LONG_SYRK_ROWS)
    step = gram_step(frame, gram, float(xx.sum()), block.shape[0], tol=1.0,
                     length=window_length(block.shape[0], 1, LONG_SYRK_ROWS))
    assert step is not None
    new, delta = step
    assert loewner_error(new, stack_qr(r, block.astype(np.float64))) <= delta < 1e-6
    # the longer sums are in the certificate: the same Gram certified with L for 128-row
    # calls would claim less than it must
    short = gram_step(frame, gram, float(xx.sum()), block.shape[0], tol=1.0)
    assert short is not None and short[1] < delta


def test_windows_take_long_syrk_calls_on_well_conditioned_keys() -> None:
    n, d, eps = 200000, 8, 0.01
    x = gaussian_keys(n, d, seed=14)
    op = LeverageScores(LeverageSpec(eps))
    long_rows = 0
    for a in range(0, n, 8192):
        op.update(Block(a, x[a : a + 8192]))
        if op._window is not None and op._window.syrk_rows == LONG_SYRK_ROWS:
            long_rows += 8192
    assert long_rows >= n // 4
    tau = offline_scores(x, False)
    np.testing.assert_array_equal(op.result()["indices"], np.flatnonzero(tau >= eps))


def test_a_stream_start_folds_as_many_rows_as_its_certificate_allows() -> None:
    # κ(R) ≈ 30: the first 65536-row blocks are too large for one certified Gram step, so
    # the step takes the largest piece whose predicted δ fits (else they would go by TRMM)
    n, d, eps, block = 200000, 32, 0.01, 65536
    x = spread_keys(n, d, 30.0, 0.0, seed=16)
    op = LeverageScores(LeverageSpec(eps))
    partial = 0
    for a in range(0, n, block):
        before = op.fold_stats["gram_steps"]
        op.update(Block(a, x[a : a + block]))
        partial += op.fold_stats["gram_steps"] - before > 1  # several pieces in one block
    stats = op.fold_stats
    assert partial >= 1 and stats["trmm_rows"] <= 4096, stats
    tau = offline_scores(x, False)
    np.testing.assert_array_equal(op.result()["indices"], np.flatnonzero(tau >= eps))


def test_a_centred_window_is_within_its_certificate() -> None:
    x, r, cf, frame = centred_setup(24000, seed=12)
    zz, zsum, fro2 = np.zeros((6, 6)), np.zeros(6), 0.0
    for a in range(24000, 30000, 1500):
        g, s, _, xx, _ = gram_and_bounds(x[a : a + 1500], frame, cf.mean)
        zz, zsum, fro2 = zz + g, zsum + s, fro2 + float(xx.sum())
    step = centred_gram_step(frame, abs(float(r[0, 0])), cf.mean, zz, zsum, fro2, 6000,
                             tol=1.0, length=window_length(1500, 4))
    assert step is not None
    new, delta = step
    assert loewner_error(new, centred_factor_update(r, x[24000:])) <= delta < 1e-6


@pytest.mark.parametrize("affine", [False, True])
def test_windows_span_blocks_and_give_the_offline_set(affine: bool) -> None:
    n, d, eps = 60000, 16, 0.01
    x = gaussian_keys(n, d, seed=3, offset=5.0 if affine else 0.0)
    op = fold(x, eps, affine, 1024)
    steps = op.fold_stats["gram_steps"]
    assert steps >= 20 and op._flushes <= steps // 3, (steps, op._flushes)
    tau = offline_scores(x, affine)
    res = op.result()
    np.testing.assert_array_equal(res["indices"], np.flatnonzero(tau >= eps))
    np.testing.assert_allclose(res["scores"], tau[res["indices"]], rtol=1e-7)
    assert 0 < op.rel_err < 1e-7


@pytest.mark.parametrize("affine", [False, True])
def test_resume_inside_an_open_window_is_bit_identical(affine: bool) -> None:
    n, d, eps, block = 40000, 12, 0.01, 1000
    x = gaussian_keys(n, d, seed=4, offset=2.0 if affine else 0.0)
    whole = fold(x, eps, affine, block)
    op = LeverageScores(LeverageSpec(eps, affine))
    resumed_inside = 0
    for a in range(0, n, block):
        if op._window is not None and op._window.calls >= 2:
            op = LeverageScores.from_state(op.to_state())  # a checkpoint, then a resume
            resumed_inside += 1
        op.update(Block(a, x[a : a + block]))
    assert resumed_inside >= 3
    got, want = op.result(), whole.result()
    np.testing.assert_array_equal(got["indices"], want["indices"])
    np.testing.assert_array_equal(got["scores"], want["scores"])
    np.testing.assert_array_equal(op.r, whole.r)


def test_merge_of_operators_with_open_windows_leaves_the_other_unchanged() -> None:
    n, d, eps, block = 40000, 10, 0.01, 800
    x = gaussian_keys(n, d, seed=6)
    left = fold(x[: n // 2], eps, False, block)
    right = LeverageScores(LeverageSpec(eps))
    for a in range(n // 2, n, block):
        right.update(Block(a, x[a : a + block]))
    assert left._window is not None and right._window is not None
    before = right.to_state()
    left.merge(right)
    after = right.to_state()
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    tau = offline_scores(x, False)
    np.testing.assert_array_equal(left.result()["indices"], np.flatnonzero(tau >= eps))


def test_a_block_that_breaks_the_certificate_closes_the_window_without_it() -> None:
    # well-conditioned rows, then one block 300× larger: the window cannot take it
    n, d, eps, block = 30000, 8, 0.004, 1000
    x = spread_keys(n, d, 3.0, 0.0, seed=8)
    x[20000:21000] *= 300.0
    op = LeverageScores(LeverageSpec(eps))
    closed_without = False
    for a in range(0, n, block):
        win = op._window
        op.update(Block(a, x[a : a + block]))
        if a == 20000:
            closed_without = win is not None and op.fold_stats["trmm_rows"] > 0
    assert closed_without and op.fold_stats["gram_steps"] > 0
    tau = offline_scores(x, False)
    np.testing.assert_array_equal(op.result()["indices"], np.flatnonzero(tau >= eps))


@pytest.mark.parametrize("affine", [False, True])
def test_heads_folded_side_by_side_equal_each_head_alone(affine: bool) -> None:
    n, layers, heads, d, eps, block = 12000, 2, 3, 8, 0.01, 1500
    rng = np.random.default_rng(21)
    x = (rng.standard_normal((n, layers, heads, d)) * rng.uniform(0.5, 3.0, (1, 1, 1, d))
         ).astype(np.float32)
    x[:, 1, 2] += 40.0  # one head with an offset
    multi = MultiHead.of([[LeverageScores(LeverageSpec(eps, affine)) for _ in range(heads)]
                          for _ in range(layers)])
    for a in range(0, n, block):
        multi.update(Block(a, x[a : a + block]))
    got = multi.result()
    for layer in range(layers):
        for h in range(heads):
            alone = LeverageScores(LeverageSpec(eps, affine))
            with serial_rows():
                for a in range(0, n, block):
                    alone.update(Block(a, x[a : a + block, layer, h]))
            want = alone.result()
            np.testing.assert_array_equal(got[layer][h]["indices"], want["indices"])
            np.testing.assert_array_equal(got[layer][h]["scores"], want["scores"])
            tau = offline_scores(x[:, layer, h], affine)
            near = np.abs(tau - eps) < 1e-9
            assert (set(want["indices"]) ^ set(np.flatnonzero(tau >= eps))) <= set(
                np.flatnonzero(near))


def test_top_scores_heads_side_by_side_equal_each_head_alone() -> None:
    from streamattn.operators.leverage import TopScores, TopScoresSpec

    n, layers, heads, d, budget = 9000, 2, 2, 6, 50
    rng = np.random.default_rng(22)
    x = rng.standard_normal((n, layers, heads, d)).astype(np.float32)
    w = rng.standard_normal((d, d))
    multi = MultiHead.of([[TopScores(TopScoresSpec(budget, w)) for _ in range(heads)]
                          for _ in range(layers)])
    for a in range(0, n, 1000):
        multi.update(Block(a, x[a : a + 1000]))
    got = multi.result()
    for layer in range(layers):
        for h in range(heads):
            s = np.einsum("ij,ij->i", x[:, layer, h].astype(np.float64) @ w,
                          x[:, layer, h].astype(np.float64) @ w)
            want = np.sort(np.argsort(-s, kind="stable")[:budget])
            np.testing.assert_array_equal(np.sort(got[layer][h]["indices"]), want)


def test_work_buffers_are_kept_per_thread_and_only_when_small() -> None:
    import threading

    from streamattn.operators.gram_step import KEEP_WORK_BYTES, work_buffer

    a = work_buffer("test-buffer", 100, 8)
    b = work_buffer("test-buffer", 50, 8)  # a smaller request: the front of the same buffer
    assert b.base is a.base and b.shape == (50, 8)
    other: list[np.ndarray] = []
    t = threading.Thread(target=lambda: other.append(work_buffer("test-buffer", 100, 8)))
    t.start()
    t.join()
    assert other[0].base is not a.base  # each thread has its own
    wide = KEEP_WORK_BYTES // 8 + 1
    first = work_buffer("test-wide", wide, 1)
    assert first.base is None  # a fresh array, not a view of a kept buffer
    assert work_buffer("test-wide", wide, 1) is not first


def test_matrix_helpers_equal_numpy_and_scipy_bit_for_bit() -> None:
    """upper / symmetric_from_upper / cholesky_upper replace np.triu, the triu-based
    symmetrisation and scipy.linalg.cholesky in the per-block kernels: the same values."""
    import scipy.linalg

    rng = np.random.default_rng(3)
    for d in (1, 2, 7, 64):
        a = rng.standard_normal((d, d))
        a[-1, 0] = np.nan  # below the diagonal (the diagonal itself when d = 1): dropped
        assert np.array_equal(upper(a), np.triu(a), equal_nan=True)
        b = rng.standard_normal((d, d))
        assert np.array_equal(symmetric_from_upper(b), np.triu(b) + np.triu(b, 1).T)
        m = b @ b.T + np.eye(d)
        c = cholesky_upper(m)
        assert c is not None
        assert np.array_equal(c, scipy.linalg.cholesky(m, lower=False, check_finite=False))
    indefinite = np.diag([1.0, -1.0, 2.0])
    assert cholesky_upper(indefinite) is None
    with pytest.raises(np.linalg.LinAlgError):
        scipy.linalg.cholesky(indefinite, lower=False)


@pytest.mark.parametrize("syrk_rows", [SYRK_ROWS, LONG_SYRK_ROWS])
def test_column_sums_are_within_their_own_accumulation_length(syrk_rows: int) -> None:
    """The affine step bounds the rounding of fl(Σz) by γ of ``sum_length``: on rows that
    make row-after-row summation lose every small term (one 1 per column, then 2⁻⁵⁴'s),
    the kernel's column sums stay within it, over several pieces, spans and calls."""
    from fractions import Fraction

    d, m, calls = 3, 3 * PIECE_ROWS + 100, 2
    x = np.full((m, d), 2.0**-54)
    x[::PIECE_ROWS] = 1.0  # the first row of every piece
    frame = make_frame(np.eye(d) * 4.0)
    assert frame is not None
    total = np.zeros(d)
    for _ in range(calls):
        total += gram_and_bounds(x, frame, np.zeros(d), 0.0, syrk_rows)[1]
    exact = calls * sum(Fraction(v) for v in x[:, 0])
    err = abs(Fraction(float(total[0])) - exact)
    length = window_length(m, calls, syrk_rows)
    assert float(err) <= gamma(sum_length(length, syrk_rows) + 1) * float(exact)
    if syrk_rows == LONG_SYRK_ROWS:  # one SYRK call per piece: the Gram's own length
        assert sum_length(length, syrk_rows) == length


@pytest.mark.parametrize("syrk_rows", [SYRK_ROWS, LONG_SYRK_ROWS])
def test_gram_sums_are_within_their_accumulation_length(syrk_rows: int) -> None:
    """The SYRK term's premise: every entry of the kernel's fl(XᵀX), summed over SYRK calls,
    pieces, spans and a window's calls, is within γ_L·(|X|ᵀ|X|) of the exact sum, L the
    ``window_length``. Rows built so that row-after-row summation loses every small
    product (a 1 at the start of every SYRK call, then products of 2⁻⁵⁴)."""
    from fractions import Fraction

    d, m, calls = 2, 3 * PIECE_ROWS + 100, 2
    x = np.full((m, d), 2.0**-27)
    x[::syrk_rows] = 1.0
    frame = make_frame(np.eye(d) * 4.0)
    assert frame is not None
    gram = np.zeros((d, d))
    for _ in range(calls):
        gram += gram_and_bounds(x, frame, None, 0.0, syrk_rows)[0]
    exact = calls * sum(Fraction(a) * Fraction(b) for a, b in x)  # all products ≥ 0
    err = abs(Fraction(float(gram[0, 1])) - exact)
    assert float(err) <= gamma(window_length(m, calls, syrk_rows)) * float(exact)
    assert gram[0, 1] == gram[1, 0]
