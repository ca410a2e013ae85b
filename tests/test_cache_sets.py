"""Operators of the whole-cache evaluation: monoid laws (tests/laws.py) and dense
references for per-key scores, per-query top-B keys and attention restricted to sets."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from laws import check_operator_laws
from streamattn.operators.cache_sets import (
    NO_RANKED,
    ORACLE_RANKED,
    KeyScores,
    KeyScoresSpec,
    QueryTopKeys,
    QueryTopKeysSpec,
    SetAttention,
    SetAttentionSpec,
)
from streamattn.sources import Block

RNG = np.random.default_rng(7)
N, D = 160, 5
K = RNG.standard_normal((N, D))
K[::29] *= 6.0
V = RNG.standard_normal((N, 3))
Q = RNG.standard_normal((5, D))
LO = np.array([0, 10, 40, 100, 0], dtype=np.int64)
HI = np.array([159, 60, 40, 159, 20], dtype=np.int64)
W = RNG.standard_normal((D, 4))
SHIFT = RNG.standard_normal(D)
SCORES = np.vstack([RNG.random(N), np.round(RNG.random(N), 1)])  # the second has ties


def set_spec(window_end: int = 30) -> SetAttentionSpec:
    s = Q.shape[0]
    win = np.tile(np.array([1, 0, 1, 0]), (3, s, 1))
    win[0, :, 0], win[0, :, 1] = LO, LO + 3  # first keys of the interval
    win[0, :, 2], win[0, :, 3] = 25, window_end
    top = QueryTopKeys(QueryTopKeysSpec(Q, budget=12, key_lo=LO, key_hi=HI)).update(
        Block(0, K)).result()["indices"]
    return SetAttentionSpec(
        Q, values_dim=3, key_lo=LO, key_hi=HI, windows=win,
        rank_src=np.array([NO_RANKED, 1, ORACLE_RANKED]),
        rank_t=np.stack([np.full(s, np.inf), np.full(s, 0.7), np.zeros(s)]),
        rank_j=np.stack([np.full(s, -1), np.full(s, 80), np.array([3, 12, 1, 7, 12])]),
        scores=SCORES, oracle=top,
    )


def dense_members(spec: SetAttentionSpec, m: int, i: int) -> np.ndarray:
    """S_{m,i} written from the definition, key by key."""
    out = []
    for j in range(N):
        if not LO[i] <= j <= HI[i]:
            continue
        w = spec.windows[m, i]
        hit = w[0] <= j <= w[1] or w[2] <= j <= w[3]
        src = spec.rank_src[m]
        if src >= 0:
            t, tj = spec.rank_t[m, i], spec.rank_j[m, i]
            hit |= SCORES[src, j] > t or (SCORES[src, j] == t and j <= tj)
        elif src == ORACLE_RANKED:
            hit |= j in spec.oracle[i, : spec.rank_j[m, i]].tolist()
        if hit:
            out.append(j)
    return np.array(out, dtype=np.int64)


def test_set_attention_equals_dense_softmax_over_each_set() -> None:
    spec = set_spec()
    res = SetAttention(spec).update(Block(0, K[:70], V[:70])).merge(
        SetAttention(spec).update(Block(70, K[70:], V[70:]))).result()
    for m in range(3):
        for i in range(Q.shape[0]):
            idx = dense_members(spec, m, i)
            assert res["keys"][m, i] == idx.size
            if idx.size == 0:  # an empty set: no mass, output 0
                assert res["lse"][m, i] == -np.inf and not res["output"][m, i].any()
                continue
            lg = K[idx] @ Q[i] / np.sqrt(D)
            np.testing.assert_allclose(res["lse"][m, i], np.log(np.exp(lg).sum()), rtol=1e-12)
            w = np.exp(lg - lg.max())
            np.testing.assert_allclose(res["output"][m, i], (w / w.sum()) @ V[idx], rtol=1e-10)
            grid = spec.member(m, np.array([[i]]), np.arange(N)[None, :])[0]
            np.testing.assert_array_equal(np.flatnonzero(grid), idx)


def test_query_top_keys_is_the_exact_masked_top_b_with_index_ties() -> None:
    kt = np.repeat(K[:40], 4, axis=0)  # every logit appears four times: ties everywhere
    lo, hi = np.array([0, 30, 100], dtype=np.int64), np.array([159, 90, 101], dtype=np.int64)
    spec = QueryTopKeysSpec(Q[:3], budget=9, key_lo=lo, key_hi=hi)
    op = QueryTopKeys(spec)
    for a in range(0, 160, 23):
        op.update(Block(a, kt[a : a + 23]))
    got = op.result()["indices"]
    for i in range(3):
        lg = kt @ Q[i] / np.sqrt(D)
        cand = sorted(range(lo[i], hi[i] + 1), key=lambda j: (-lg[j], j))[:9]
        want = cand + [-1] * (9 - len(cand))
        assert got[i].tolist() == want


def test_key_scores_are_the_norms_and_map_scores_of_every_key() -> None:
    norm = KeyScores(KeyScoresSpec(N)).update(Block(0, K[:50])).update(Block(50, K[50:]))
    np.testing.assert_allclose(norm.result(), (K * K).sum(axis=1), rtol=1e-12)
    mapped = KeyScores(KeyScoresSpec(N, "map", W, SHIFT, 0.25)).update(Block(0, K))
    y = (K - SHIFT) @ W
    np.testing.assert_allclose(mapped.result(), (y * y).sum(axis=1) + 0.25, rtol=1e-12)


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_key_scores_laws(data: st.DataObject) -> None:
    def make(n: int = N) -> KeyScores:
        return KeyScores(KeyScoresSpec(n, "map", W, SHIFT, 0.5))

    check_operator_laws(make, K, lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12),
                        data, make_other_spec=lambda: make(N + 1))


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_query_top_keys_laws(data: st.DataObject) -> None:
    def make(budget: int = 7) -> QueryTopKeys:
        return QueryTopKeys(QueryTopKeysSpec(Q, budget=budget, key_lo=LO, key_hi=HI))

    def compare(a: dict, b: dict) -> None:
        np.testing.assert_array_equal(a["indices"], b["indices"])
        np.testing.assert_allclose(a["log_weights"], b["log_weights"], rtol=1e-12)

    check_operator_laws(make, K, compare, data, make_other_spec=lambda: make(8))


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_set_attention_laws(data: st.DataObject) -> None:
    def compare(a: dict, b: dict) -> None:
        np.testing.assert_array_equal(a["keys"], b["keys"])
        np.testing.assert_allclose(a["lse"], b["lse"], rtol=1e-12)
        np.testing.assert_allclose(a["output"], b["output"], rtol=1e-9, atol=1e-12)

    check_operator_laws(lambda: SetAttention(set_spec()), K, compare, data, values=V,
                        make_other_spec=lambda: SetAttention(set_spec(31)))
