"""Budget mode's second pass with float32 screening: same top-B as exact scoring.

``ScreenedTopScores`` discards a row by a certified float32 upper bound of its score and
scores the rest exactly; these tests check the bound against float64 scores on
adversarial inputs (large common offsets, ill-conditioned maps, float16, tiny and huge
magnitudes), the top-B against an offline float64 ranking and against ``TopScores``, that
screening really skips exact work, and the operator laws.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamattn as sa
from streamattn.operators import leverage
from streamattn.operators.leverage import TopScores, TopScoresSpec
from streamattn.operators.screened_top import ScreenedTopScores
from streamattn.sources import Block
from streamattn.testing.laws import check_operator_laws


def exact(x: np.ndarray, spec: TopScoresSpec) -> np.ndarray:
    z = x.astype(np.float64) - (0.0 if spec.shift is None else spec.shift)
    y = z @ spec.w
    return np.einsum("ij,ij->i", y, y) + spec.offset


def offline_top(scores: np.ndarray, budget: int) -> np.ndarray:
    return np.sort(np.lexsort((np.arange(scores.size), -scores))[:budget])


def cases() -> list[tuple[str, np.ndarray, TopScoresSpec]]:
    rng = np.random.default_rng(7)
    n, d = 6000, 12
    base = rng.standard_normal((n, d))
    w = np.linalg.qr(rng.standard_normal((d, d)))[0] @ np.diag(np.logspace(0, 6, d))
    out = []
    x = (base * 3).astype(np.float32)
    x[::97] *= 20
    out.append(("plain", x, TopScoresSpec(50, w)))
    off = (base + 1e4).astype(np.float32)  # a common offset 1e4 x the spread
    mu = off.astype(np.float64).mean(axis=0)
    out.append(("offset", off, TopScoresSpec(50, w, True, mu, 1.0 / n)))
    out.append(("tiny", (base * 1e-30).astype(np.float32), TopScoresSpec(40, w * 1e15)))
    out.append(("huge", (base * 1e15).astype(np.float32), TopScoresSpec(40, w * 1e-20)))
    out.append(("float16", (base * 2).astype(np.float16), TopScoresSpec(30, w)))
    return out


@pytest.mark.parametrize("name", [c[0] for c in cases()])
def test_bound_is_above_every_exact_score_and_the_top_b_is_exact(name: str) -> None:
    _, x, spec = next(c for c in cases() if c[0] == name)
    op = ScreenedTopScores(spec)
    tau = exact(x, spec)
    bound = op._bounds(x)
    assert np.all(bound >= tau), float(np.max(tau - bound))
    for cut in (700, 2048):
        got = ScreenedTopScores(spec)
        ref = TopScores(spec)
        for a in range(0, x.shape[0], cut):
            block = Block(a, x[a : a + cut])
            got.update(block)
            ref.update(block)
        res, want = got.result(), ref.result()
        np.testing.assert_array_equal(res["indices"], want["indices"])
        np.testing.assert_array_equal(res["indices"], offline_top(tau, spec.budget))
        np.testing.assert_allclose(res["scores"], tau[res["indices"]], rtol=1e-9)
        np.testing.assert_array_equal(res["rows"], want["rows"])


def test_screening_skips_the_exact_scores_of_most_rows(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    _, x, spec = cases()[0]
    scored: list[int] = []
    real = leverage.map_scores

    def counting(rows: np.ndarray, *args: object) -> np.ndarray:
        scored.append(rows.shape[0])
        return real(rows, *args)  # type: ignore[arg-type]

    monkeypatch.setattr("streamattn.operators.screened_top.map_scores", counting)
    op = ScreenedTopScores(spec)
    for a in range(0, x.shape[0], 1000):
        op.update(Block(a, x[a : a + 1000]))
    assert len(scored) == 5 and sum(scored) < 1000  # blocks 2..6: a few rows each


def test_budget_mode_uses_it_and_matches_offline_leverage(tmp_path: object) -> None:
    rng = np.random.default_rng(3)
    k = (rng.standard_normal((5000, 6)) @ np.diag([1, 2, 3, 4, 5, 60]) + 40).astype(np.float32)
    for variant in ("plain", "affine"):
        u = sa.universal_set(k, budget=25, variant=variant, chunk_rows=1000)
        x = k.astype(np.float64)
        if variant == "affine":
            x = np.hstack([np.ones((x.shape[0], 1)), x])
        q = np.linalg.qr(x)[0]
        tau = np.einsum("ij,ij->i", q, q)
        np.testing.assert_array_equal(u.indices, offline_top(tau, 25))
        assert u.certificate["passes"] == 2


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_screened_top_scores_laws(data: st.DataObject) -> None:
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((300, 6)) * np.linspace(1, 5, 6) + 2).astype(np.float32)
    x[::37] *= 8
    w = rng.standard_normal((6, 6))

    def compare(a: dict, b: dict) -> None:
        np.testing.assert_array_equal(a["indices"], b["indices"])
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-9)
        np.testing.assert_array_equal(a["rows"], b["rows"])

    check_operator_laws(lambda: ScreenedTopScores(TopScoresSpec(17, w)), x, compare, data,
                        make_other_spec=lambda: ScreenedTopScores(TopScoresSpec(17, w * 2)))
