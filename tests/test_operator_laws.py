"""The monoid laws for every operator (see tests/laws.py). One test per operator family."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from laws import check_operator_laws
from streamattn.operators import LeverageScores, LeverageSpec, TopScores, TopScoresSpec
from streamattn.operators.frequent_directions import FDSpec, FrequentDirections
from streamattn.operators.lewis import LewisPass, LewisPassSpec


def keys(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) @ np.diag(np.linspace(1, 5, d)) + 2.0
    x[::37] *= 8.0  # some heavy rows so the candidate sets are not trivial
    return x


def compare_scored(a: dict, b: dict) -> None:
    np.testing.assert_array_equal(a["indices"], b["indices"])
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(a["rows"], b["rows"])
    assert a["n"] == b["n"]


@settings(max_examples=25, deadline=None)
@given(data=st.data(), affine=st.booleans())
def test_leverage_scores_laws(data: st.DataObject, affine: bool) -> None:
    x = keys(300, 6)
    vals = np.random.default_rng(1).standard_normal((300, 3))
    check_operator_laws(
        lambda: LeverageScores(LeverageSpec(0.05, affine)),
        x,
        compare_scored,
        data,
        values=vals,
        make_other_spec=lambda: LeverageScores(LeverageSpec(0.06, affine)),
    )


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_top_scores_laws(data: st.DataObject) -> None:
    x = keys(300, 6)
    w = np.random.default_rng(2).standard_normal((6, 6))
    check_operator_laws(
        lambda: TopScores(TopScoresSpec(17, w)),
        x,
        compare_scored,
        data,
        make_other_spec=lambda: TopScores(TopScoresSpec(17, w * 2)),
    )

@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_frequent_directions_laws(data: st.DataObject) -> None:
    """FD sketches depend on the chunking; the law is that every result keeps the bound."""
    x = keys(200, 8)
    gram = x.T @ x
    scale = float(np.linalg.norm(gram, 2))

    def compare(a, b) -> None:  # type: ignore[no-untyped-def]
        for r in (a, b):
            gap = np.linalg.eigvalsh(gram - r.sketch.T @ r.sketch)
            assert gap.min() >= -1e-10 * scale
            assert gap.max() <= r.delta + 1e-10 * scale
            assert r.delta <= r.delta_bound * (1 + 1e-9) + 1e-10 * scale
        assert a.n == b.n and a.sketch.shape == b.sketch.shape
        np.testing.assert_allclose(a.fro2, b.fro2, rtol=1e-12)

    check_operator_laws(
        lambda: FrequentDirections(FDSpec(4)),
        x,
        compare,
        data,
        make_other_spec=lambda: FrequentDirections(FDSpec(5)),
    )


@settings(max_examples=20, deadline=None)
@given(data=st.data(), first=st.booleans(), cap=st.sampled_from([3, 10_000]))
def test_lewis_pass_laws(data: st.DataObject, first: bool, cap: int) -> None:
    """A Lewis pass (p = 3): next factor, stats and candidates; weights read from zarr."""
    import tempfile

    import zarr

    from streamattn.operators.leverage import ScoringMap, stack_qr

    x = keys(120, 4)
    w_in = np.random.default_rng(5).uniform(0.01, 0.2, 120)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/w.zarr"
        zarr.create_array(path, data=w_in, chunks=(16,))
        w_map = ScoringMap.from_factor(stack_qr(x), 1e-10, 4).w
        spec = LewisPassSpec(
            3.0,
            np.zeros((0, 0)) if first else w_map,
            weights_in="" if first else path,
            collect=0.05,
            cap=cap,  # 3: the overflow flag must not depend on chunking or merge order
        )

        def compare(a, b) -> None:  # type: ignore[no-untyped-def]
            np.testing.assert_array_equal(a["indices"], b["indices"])
            np.testing.assert_allclose(a["weights"], b["weights"], rtol=1e-12)
            np.testing.assert_array_equal(a["rows"], b["rows"])
            np.testing.assert_allclose(a["sum_weights"], b["sum_weights"], rtol=1e-12)
            assert a["max_log_change"] == pytest.approx(b["max_log_change"], rel=1e-12)
            assert a["count"] == b["count"] and a["overflow"] == b["overflow"]
            np.testing.assert_allclose(a["scoring_map"].w @ a["scoring_map"].w.T,
                                       b["scoring_map"].w @ b["scoring_map"].w.T,
                                       rtol=1e-8, atol=1e-12)

        check_operator_laws(
            lambda: LewisPass(spec),
            x,
            compare,
            data,
            make_other_spec=lambda: LewisPass(LewisPassSpec(1.0, spec.w_map)),
        )


# New operators: add a test above this line calling check_operator_laws.
