"""The leverage operators against the mathematics (docs/architecture.md, note 2.1), on small seeded
data.

Checked: the one-pass candidate set equals the offline SVD set {τ ≥ ε} for any chunking
(hypothesis); candidates never exceed rank/ε at any step; Cauchy–Schwarz bound A_qj ≤ τ_j
for x² attention, with equality at the adversarial query q = G⁺k_j (and for (q·k + c)²
with the affine scores); the affine score equals 1/n + centred leverage; accuracy on an
ill-conditioned fixture; numerical rank on rank-deficient input; TopScores = offline top-B.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import svd_leverage
from hypothesis import given, settings
from hypothesis import strategies as st

from streamattn.operators import LeverageScores, LeverageSpec, TopScores, TopScoresSpec
from streamattn.operators.protocol import Operator
from streamattn.sources import Block
from streamattn.testing.laws import blocks_of, fold

#: Score tolerance on well-conditioned data (scores lie in [0, 1]).
SCORE_ATOL = 1e-10


def planted_keys(n: int = 400, d: int = 6, seed: int = 0, offset: float = 3.0) -> np.ndarray:
    """Gaussian keys with anisotropic scales, a common offset and a few heavy outliers."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * np.linspace(0.5, 3.0, d) + offset
    heavy = rng.choice(n, size=5, replace=False)
    x[heavy] += 25.0 * rng.standard_normal((5, d))
    return x


def away_from(scores: np.ndarray, eps: float, gap: float = 1e-6) -> None:
    """Guard: no reference score sits at the threshold (where rounding decides)."""
    assert np.min(np.abs(scores - eps)) > gap, "fixture has a score at the threshold"


def run(x: np.ndarray, eps: float, affine: bool, cuts: list[int]) -> dict:
    return fold(lambda: LeverageScores(LeverageSpec(eps, affine)), blocks_of(x, cuts)).result()


@settings(max_examples=30, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 399), max_size=12),
    affine=st.booleans(),
    eps=st.sampled_from([0.02, 0.05, 0.2]),
)
def test_one_pass_set_equals_offline_svd_for_any_chunking(
    cuts: list[int], affine: bool, eps: float
) -> None:
    x = planted_keys()
    tau, rank = svd_leverage(x, affine)
    away_from(tau, eps)
    res = run(x, eps, affine, cuts)
    expected = np.flatnonzero(tau >= eps)
    np.testing.assert_array_equal(res["indices"], expected)
    np.testing.assert_allclose(res["scores"], tau[expected], rtol=0, atol=SCORE_ATOL)
    np.testing.assert_array_equal(res["rows"], x[expected])
    assert res["scoring_map"].rank == rank == (7 if affine else 6)
    assert expected.size <= rank / eps
    assert res["n"] == 400


@pytest.mark.parametrize("low_rank", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_candidates_bounded_by_rank_over_eps_at_every_step(affine: bool, low_rank: bool) -> None:
    x = planted_keys(n=600, seed=3)
    if low_rank:  # exactly rank 3 in 6 columns: the pruning margin must stay negligible
        x = x[:, :3] @ np.random.default_rng(3).standard_normal((3, 6))
    eps = 0.01
    op = LeverageScores(LeverageSpec(eps, affine))
    dim = x.shape[1] + affine
    tau_final, _ = svd_leverage(x, affine)
    for block in blocks_of(x, list(range(1, 600, 7))):
        op.update(block)
        _, rank = svd_leverage(x[: block.stop], affine)
        assert op.idx.size <= rank / eps <= dim / eps
        # no false negatives so far: every row seen whose *final* score is >= eps is kept
        seen = np.flatnonzero(tau_final[: block.stop] >= eps)
        assert np.isin(seen, op.idx).all()


def attention_shares(q: np.ndarray, x: np.ndarray, c: np.ndarray | float = 0.0) -> np.ndarray:
    """(q·k_l + c)² / Σ_l (q·k_l + c)² for each query row of q (one offset per query)."""
    logits = (q @ x.T + np.reshape(c, (-1, 1))) ** 2
    return logits / logits.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("affine", [False, True])
def test_no_query_gives_a_key_more_than_its_score(affine: bool) -> None:
    x = planted_keys(n=300, d=5, seed=7)
    eps = 0.05
    res = run(x, eps, affine, [50, 51, 170])
    tau, _ = svd_leverage(x, affine)
    away_from(tau, eps)
    a = np.hstack([x, np.ones((300, 1))]) if affine else x
    g_pinv = np.linalg.pinv(a.T @ a)
    rng = np.random.default_rng(11)
    # adversarial queries q~ = G~^+ k~_j (share of key j is exactly tau_j), plus random ones
    adversarial = (g_pinv @ a.T).T
    random_q = rng.standard_normal((200, a.shape[1])) * rng.exponential(5.0, (200, 1))
    qs = np.vstack([adversarial, random_q])
    if affine:  # the last coordinate is the common offset c of (q.k + c)^2
        shares = attention_shares(qs[:, :-1], x, qs[:, -1])
    else:
        shares = attention_shares(qs, x)
    assert (shares <= tau[None, :] + 1e-9).all()
    # the bound is attained at the adversarial query: the scores are tight, not just bounds
    np.testing.assert_allclose(np.diag(shares[:300]), tau, rtol=1e-8, atol=1e-12)
    heavy = np.unique(np.nonzero(shares >= eps)[1])
    assert heavy.size > 0
    assert np.isin(heavy, res["indices"]).all()


def test_affine_equals_inverse_n_plus_centred_leverage() -> None:
    x = planted_keys(n=250, d=4, seed=5, offset=10.0)
    res = run(x, 1e-6, True, [100, 200])  # a tiny threshold keeps (almost) every row
    mu = x.mean(axis=0)
    c = x - mu
    scatter = c.T @ c
    formula = 1.0 / 250 + np.einsum("ij,jk,ik->i", c, np.linalg.inv(scatter), c)
    np.testing.assert_array_equal(res["indices"], np.arange(250))
    np.testing.assert_allclose(res["scores"], formula, rtol=1e-9, atol=0)
    assert res["scoring_map"].rank == 5
    np.testing.assert_allclose(res["scores"].sum(), 5.0, rtol=1e-10)


@pytest.mark.parametrize("ratio", [10.0, 200.0, 1e4, 1e6])
def test_affine_is_shift_invariant_and_plain_is_not(ratio: float) -> None:
    x = planted_keys(n=200, d=4, seed=9, offset=0.0)
    direction = np.array([40.0, -25.0, 10.0, 5.0])
    shift = direction * ratio * np.linalg.norm(x, axis=1).mean() / np.linalg.norm(direction)
    a0 = run(x, 1e-6, True, [77])["scores"]
    a1 = run(x + shift, 1e-6, True, [77])["scores"]
    # centring rounds at u * |shift| / |centred key|: ~1e-10 relative at ratio 1e6
    np.testing.assert_allclose(a0, a1, rtol=1e-7)
    np.testing.assert_allclose(a0.sum(), 5.0, rtol=1e-10)  # = rank of [K, 1], any shift
    p0 = run(x, 1e-6, False, [77])["scores"]
    p1 = run(x + shift, 1e-6, False, [77])["scores"]
    assert np.max(np.abs(p0 - p1)) > 1e-2


def ill_conditioned(n: int = 500, d: int = 8, seed: int = 2) -> np.ndarray:
    """K = U diag(logspace(0, -6)) Vᵀ · 1e3 + offset: cond(K) ≈ 1e6 (cond(KᵀK) ≈ 1e12)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    k = 1e3 * (u * np.logspace(0, -6, d)) @ v.T
    return k + 0.05 * rng.standard_normal(d)  # common offset, small against σ_max


@pytest.mark.parametrize("affine", [False, True])
def test_ill_conditioned_fixture_matches_svd(affine: bool) -> None:
    x = ill_conditioned()
    s = np.linalg.svd(x, compute_uv=False)
    assert 1e5 < s[0] / s[-1] < 1e7
    tau, rank = svd_leverage(x, affine)
    assert rank == 8 + affine
    res = run(x, 1e-9, affine, [3, 64, 65, 300])
    np.testing.assert_array_equal(res["indices"], np.flatnonzero(tau >= 1e-9))
    # stated tolerance: |Δτ| <= 1e-8 (≈ cond(K) · 1e-14) on scores in [0, 1]
    np.testing.assert_allclose(res["scores"], tau[res["indices"]], rtol=0, atol=1e-8)
    np.testing.assert_allclose(res["scores"].sum(), rank, rtol=1e-9)
    # the normal equations in float64 lose this accuracy (why TSQR is used)
    g = x.T @ x
    normal = np.einsum("ij,jk,ik->i", x, np.linalg.inv(g), x)
    assert affine or np.max(np.abs(normal - tau)) > 1e-8


@pytest.mark.parametrize(
    ("case", "expected_rank"),
    [("n<d", 5), ("duplicated rows", 6), ("low-rank columns", 3), ("zero rows", 6)],
)
def test_rank_deficient_inputs(case: str, expected_rank: int) -> None:
    rng = np.random.default_rng(4)
    if case == "n<d":
        x = rng.standard_normal((5, 9))
    elif case == "duplicated rows":
        base = rng.standard_normal((40, 6))
        x = np.vstack([base, base[:10], base[:10]])
    elif case == "low-rank columns":
        x = rng.standard_normal((80, 3)) @ rng.standard_normal((3, 7))
    else:
        x = np.vstack([rng.standard_normal((30, 6)), np.zeros((10, 6))])
    tau, rank = svd_leverage(x)
    assert rank == expected_rank
    eps = 0.04
    away_from(tau, eps, gap=1e-8)
    for cuts in ([], [1, 2, 3], list(range(1, len(x)))):
        res = run(x, eps, False, cuts)
        assert res["scoring_map"].rank == expected_rank
        np.testing.assert_array_equal(res["indices"], np.flatnonzero(tau >= eps))
        np.testing.assert_allclose(res["scores"], tau[res["indices"]], atol=1e-9)
    if case == "duplicated rows":  # each copy of a tripled row has a third of its score
        np.testing.assert_allclose(tau[40:50], tau[:10], atol=1e-12)
    if case == "n<d":  # every key is a standalone direction
        np.testing.assert_allclose(tau, 1.0, atol=1e-12)


def test_state_round_trip_mid_stream_continues_identically() -> None:
    x = planted_keys(n=300, seed=8)
    vals = np.random.default_rng(1).standard_normal((300, 2)).astype(np.float32)
    blocks = blocks_of(x, [90, 200], vals)
    a = LeverageScores(LeverageSpec(0.03, True))
    a.update(blocks[0])
    b = Operator.from_state(a.to_state())
    for op in (a, b):
        for block in blocks[1:]:
            op.update(block)
    ra, rb = a.result(), b.result()
    np.testing.assert_array_equal(ra["indices"], rb["indices"])
    np.testing.assert_array_equal(ra["scores"], rb["scores"])
    np.testing.assert_array_equal(ra["values"], vals[ra["indices"]])


def offline_top(scores: np.ndarray, budget: int) -> np.ndarray:
    """Offline top-B, ties broken by the smaller index, returned sorted."""
    return np.sort(np.lexsort((np.arange(scores.size), -scores))[:budget])


@settings(max_examples=20, deadline=None)
@given(cuts=st.lists(st.integers(1, 299), max_size=8), budget=st.integers(1, 40))
def test_top_scores_equals_offline_top_b_with_ties_by_index(cuts: list[int], budget: int) -> None:
    rng = np.random.default_rng(6)
    base = rng.standard_normal((100, 4))
    x = np.vstack([base, base, base])  # every score appears three times: ties everywhere
    w = rng.standard_normal((4, 4))
    op = fold(lambda: TopScores(TopScoresSpec(budget, w)), blocks_of(x, cuts))
    res = op.result()
    y = base @ w
    scores = np.tile(np.einsum("ij,ij->i", y, y), 3)
    expected = offline_top(scores, budget)
    np.testing.assert_array_equal(res["indices"], expected)
    np.testing.assert_allclose(res["scores"], scores[expected], rtol=1e-12)
    np.testing.assert_array_equal(res["rows"], x[expected])


def test_nbytes_bound_covers_the_state() -> None:
    x = planted_keys(n=500, d=6, seed=12)
    vals = np.ones((500, 3))
    op = LeverageScores(LeverageSpec(0.02, True))
    bound = op.nbytes_bound(6, 3)
    for block in blocks_of(x, list(range(1, 500, 50)), vals):
        op.update(Block(block.start, block.rows, block.values))
        used = sum(v.nbytes for v in op._state().values())
        assert used <= bound


@pytest.mark.parametrize("cuts", [[], [101], [100], list(range(1, 102))])
def test_direction_crossing_the_rank_tolerance_mid_stream_loses_no_key(cuts: list[int]) -> None:
    """A direction below rtol·σ_max after row 100 rises above it with row 101: key 100's
    final score (≈ 0.8) comes from that direction, so pruning must not drop it early."""
    x = np.zeros((102, 2))
    x[:100, 0] = 1000.0
    delta = 0.95e-10 * 1000.0 * np.sqrt(101)  # just below the tolerance after row 100
    x[100] = [1000.0, delta]
    x[101] = [0.0, 0.5 * delta]  # lifts the second singular value above the tolerance
    tau, rank = svd_leverage(x)
    assert rank == 2 and tau[100] == pytest.approx(0.8, abs=1e-3)
    res = run(x, 0.5, False, cuts)
    np.testing.assert_array_equal(res["indices"], [100])
    np.testing.assert_allclose(res["scores"], tau[[100]], rtol=1e-6)
    # and in a merge tree: the block holding row 100 is pruned before the merge
    blocks = blocks_of(x, [*cuts, 101])
    ops = [LeverageScores(LeverageSpec(0.5, False)).update(b) for b in blocks]
    merged = ops[-1]
    for op in ops[:-1]:
        merged = merged.merge(op)
    np.testing.assert_array_equal(merged.result()["indices"], [100])
