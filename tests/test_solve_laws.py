"""The monoid laws (tests/laws.py) for the solver and fit operators."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamattn.operators.fit_ops import (
    AttentionFeatures,
    AttentionFeaturesSpec,
    AttentionGaussNewton,
    AttentionGaussNewtonSpec,
    AttentionLossGradient,
    AttentionLossGradientSpec,
)
from streamattn.operators.solve_ops import (
    ExpKernelMatvec,
    ExpKernelMatvecSpec,
    GramMatvec,
    GramMatvecSpec,
    LeastSquaresResidual,
    LeastSquaresResidualSpec,
    RowSketch,
    RowSketchSpec,
    TallSkinnyQR,
    TallSkinnyQRSpec,
)
from streamattn.testing.laws import check_operator_laws

RNG = np.random.default_rng(0)
X = RNG.standard_normal((150, 5))
B = RNG.standard_normal((150, 1))


def close(a, b) -> None:  # type: ignore[no-untyped-def]
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            close(a[k], b[k])
    else:
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


def gram_of(a, b) -> None:  # type: ignore[no-untyped-def]
    close(a.T @ a, b.T @ b)


@settings(max_examples=15, deadline=None)
@given(data=st.data(), rhs=st.booleans())
def test_tsqr_laws(data: st.DataObject, rhs: bool) -> None:
    check_operator_laws(
        lambda: TallSkinnyQR(TallSkinnyQRSpec(rhs)), X, gram_of, data, values=B,
        make_other_spec=lambda: TallSkinnyQR(TallSkinnyQRSpec(not rhs)),
    )


@pytest.mark.parametrize("method", ["gaussian", "srht", "countsketch"])
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_row_sketch_laws(data: st.DataObject, method: str) -> None:
    check_operator_laws(
        lambda: RowSketch(RowSketchSpec(method, 12, 1, 150)), X, close, data,
        make_other_spec=lambda: RowSketch(RowSketchSpec(method, 12, 2, 150)),
    )


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_matvec_and_residual_laws(data: st.DataObject) -> None:
    v = RNG.standard_normal((5, 2))
    check_operator_laws(
        lambda: GramMatvec(GramMatvecSpec(v)), X, close, data,
        make_other_spec=lambda: GramMatvec(GramMatvecSpec(2 * v)),
    )
    z = RNG.standard_normal(5)
    check_operator_laws(
        lambda: LeastSquaresResidual(LeastSquaresResidualSpec(z)), X, close, data, values=B,
    )
    rows = X / 3
    w = RNG.standard_normal((150, 2))
    check_operator_laws(
        lambda: ExpKernelMatvec(ExpKernelMatvecSpec(rows, w, 0.5, tile=32)), rows, close, data,
        make_other_spec=lambda: ExpKernelMatvec(ExpKernelMatvecSpec(rows, w, 0.6, tile=32)),
    )


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_fit_operator_laws(data: st.DataObject) -> None:
    d = 3
    a1, a2, a3 = X[:60, :d], X[60:100, :d], X[100:140, :d]
    b = RNG.standard_normal((60, d))
    x, y = RNG.standard_normal((d, d)) / d, RNG.standard_normal((d, d))
    check_operator_laws(
        lambda: AttentionFeatures(AttentionFeaturesSpec(x, a2, a3, tile=8)), a1, gram_of, data,
        values=b,
    )
    check_operator_laws(
        lambda: AttentionGaussNewton(AttentionGaussNewtonSpec(x, y, a2, a3, np.eye(d), 8)),
        a1, close, data, values=b,
    )
    check_operator_laws(
        lambda: AttentionLossGradient(AttentionLossGradientSpec(x, y, a2, a3, tile=8)),
        a1, close, data, values=b,
    )
