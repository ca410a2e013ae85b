"""The monoid laws for every operator (see tests/laws.py). One test per operator family."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamattn.operators import LeverageScores, LeverageSpec, TopScores, TopScoresSpec
from streamattn.operators.frequent_directions import FDSpec, FrequentDirections
from streamattn.operators.lewis import LewisPass, LewisPassSpec
from streamattn.operators.ridge import RidgeFD, RidgeFDSpec, SketchedScores, SketchedScoresSpec
from streamattn.testing.laws import check_operator_laws


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


def _attention_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    k = keys(200, 5) / 3.0
    v = rng.standard_normal((200, 3))
    q = rng.standard_normal((4, 5))
    pos = np.array([0, 30, 120, 199], dtype=np.int64)
    return k, v, q, pos


def compare_ground_truth(a: dict, b: dict) -> None:
    np.testing.assert_array_equal(a["indices"], b["indices"])
    np.testing.assert_allclose(a["lse"], b["lse"], rtol=1e-12)
    np.testing.assert_allclose(a["weights"], b["weights"], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(a["output"], b["output"], rtol=1e-9, atol=1e-12)
    assert a["n"] == b["n"] and a["dropped"] == b["dropped"] == 0


@settings(max_examples=20, deadline=None)
@given(data=st.data(), kind=st.sampled_from(["softmax", "power"]), causal=st.booleans())
def test_ground_truth_laws(data: st.DataObject, kind: str, causal: bool) -> None:
    from streamattn.operators.ground_truth import GroundTruth, GroundTruthSpec

    k, v, q, pos = _attention_data()
    mode = "causal" if causal else "global"

    def make(eps: float = 0.02) -> GroundTruth:
        return GroundTruth(GroundTruthSpec(
            q, eps=eps, kind=kind, mode=mode, positions=pos if causal else None, values_dim=3
        ))

    check_operator_laws(make, k, compare_ground_truth, data, values=v,
                        make_other_spec=lambda: make(0.03))


@settings(max_examples=15, deadline=None)
@given(data=st.data(), causal=st.booleans())
def test_observed_attention_top_laws(data: st.DataObject, causal: bool) -> None:
    from streamattn.operators.ground_truth import ObservedAttentionSpec, ObservedAttentionTop

    k, _, q, pos = _attention_data()
    lse = np.full(q.shape[0], 3.0)
    mode = "causal" if causal else "global"

    def make(budget: int = 9) -> ObservedAttentionTop:
        return ObservedAttentionTop(ObservedAttentionSpec(
            q, mode=mode, positions=pos if causal else None, lse=lse, budget=budget
        ))

    def compare(a: dict, b: dict) -> None:
        np.testing.assert_array_equal(a["indices"], b["indices"])
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-12)

    check_operator_laws(make, k, compare, data, make_other_spec=lambda: make(10))


@settings(max_examples=15, deadline=None)
@given(data=st.data(), causal=st.booleans())
def test_restricted_attention_laws(data: st.DataObject, causal: bool) -> None:
    from streamattn.operators.ground_truth import RestrictedAttention, RestrictedAttentionSpec

    k, v, q, pos = _attention_data()

    def make(window: int = 16) -> RestrictedAttention:
        return RestrictedAttention(RestrictedAttentionSpec(
            q, mode="causal" if causal else "global", positions=pos if causal else None,
            values_dim=3, set_indices=np.array([0, 1, 7, 150, 2, 3], dtype=np.int64),
            set_offsets=np.array([0, 4, 6]), set_windows=np.array([0, window]), n_keys=200,
        ))

    def compare(a: dict, b: dict) -> None:
        np.testing.assert_allclose(a["lse"], b["lse"], rtol=1e-12)
        np.testing.assert_allclose(a["output"], b["output"], rtol=1e-9, atol=1e-12)

    check_operator_laws(make, k, compare, data, values=v, make_other_spec=lambda: make(17))


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_multi_head_laws(data: st.DataObject) -> None:
    from streamattn.operators.multihead import MultiHead

    x = np.stack([keys(200, 5, seed=s) for s in range(4)], axis=1).reshape(200, 2, 2, 5)

    def make(t: float = 0.05) -> MultiHead:
        return MultiHead.of(
            [[LeverageScores(LeverageSpec(t, affine=(lay + h) % 2 == 1)) for h in range(2)]
             for lay in range(2)]
        )

    def compare(a: list, b: list) -> None:
        for ra, rb in zip(a, b, strict=True):
            for ha, hb in zip(ra, rb, strict=True):
                compare_scored(ha, hb)

    check_operator_laws(make, x, compare, data, make_other_spec=lambda: make(0.06))


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_ridge_fd_laws(data: st.DataObject) -> None:
    """FD-based ridge sets depend on the chunking; every result must be a superset of the
    exact ridge set with scores that upper-bound the exact ridge scores."""
    x = keys(200, 8)
    lam = 0.3 * float(np.sum(x**2)) / 8
    tau = np.einsum("ij,ji->i", x, np.linalg.solve(x.T @ x + lam * np.eye(8), x.T))
    exact = set(np.flatnonzero(tau >= 0.05).tolist())
    assert exact

    def compare(a, b) -> None:  # type: ignore[no-untyped-def]
        for r in (a, b):
            assert exact <= set(r["indices"].tolist())
            assert np.all(r["scores"] >= tau[r["indices"]] * (1 - 1e-9))
            np.testing.assert_array_equal(r["rows"], x[r["indices"]])
        assert a["n"] == b["n"]
        assert a["lam"] == pytest.approx(b["lam"], rel=1e-12)

    check_operator_laws(
        lambda: RidgeFD(RidgeFDSpec(4, 0.05, lam_rel=0.3)),
        x,
        compare,
        data,
        make_other_spec=lambda: RidgeFD(RidgeFDSpec(5, 0.05, lam_rel=0.3)),
    )


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_sketched_scores_laws(data: st.DataObject) -> None:
    x = keys(200, 6)
    w = np.random.default_rng(3).standard_normal((6, 3)) / 40.0

    def compare(a, b) -> None:  # type: ignore[no-untyped-def]
        np.testing.assert_array_equal(a["indices"], b["indices"])
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-12)
        np.testing.assert_array_equal(a["rows"], b["rows"])
        assert a["sum_scores"] == pytest.approx(b["sum_scores"], rel=1e-12)

    check_operator_laws(
        lambda: SketchedScores(SketchedScoresSpec(w, 0.5)),
        x,
        compare,
        data,
        make_other_spec=lambda: SketchedScores(SketchedScoresSpec(w, 0.6)),
    )


@settings(max_examples=20, deadline=None)
@given(data=st.data(), method=st.sampled_from(["gaussian", "sparse-sign", "srht"]))
def test_projected_embeddings_laws(data: st.DataObject, method: str) -> None:
    from streamattn.operators.projection import ProjectedEmbeddings, ProjectionSpec

    x = keys(250, 6)

    def compare(a, b) -> None:  # type: ignore[no-untyped-def]
        assert a.n == b.n
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12)
        np.testing.assert_allclose(a.mu_s, b.mu_s, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(a.sample_index, b.sample_index)
        np.testing.assert_array_equal(a.sample_rows, b.sample_rows)

    check_operator_laws(
        lambda: ProjectedEmbeddings(ProjectionSpec(method, 6, 3, seed=1, sample_keys=40)),
        x,
        compare,
        data,
        make_other_spec=lambda: ProjectedEmbeddings(ProjectionSpec(method, 6, 3, seed=2)),
    )


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_centred_factor_and_key_mean_laws(data: st.DataObject) -> None:
    from streamattn.operators.projection import (
        CentredFactor,
        CentredFactorSpec,
        KeyMean,
        KeyMeanSpec,
    )

    x = keys(200, 5)

    def compare_factor(a, b) -> None:  # type: ignore[no-untyped-def]
        assert a.n == b.n
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-10)
        gram = a.r_centred.T @ a.r_centred
        np.testing.assert_allclose(gram, b.r_centred.T @ b.r_centred, rtol=1e-9, atol=1e-9)

    def compare_mean(a, b) -> None:  # type: ignore[no-untyped-def]
        assert a["n"] == b["n"]
        np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-12)

    check_operator_laws(lambda: CentredFactor(CentredFactorSpec()), x, compare_factor, data)
    check_operator_laws(lambda: KeyMean(KeyMeanSpec()), x, compare_mean, data)


@settings(max_examples=20, deadline=None)
@given(data=st.data(), method=st.sampled_from(["online", "merge-reduce"]), affine=st.booleans())
def test_leverage_sampler_laws(data: st.DataObject, method: str, affine: bool) -> None:
    """Merge-reduce: the same sample for every chunking and merge tree. Online: the same
    sample for every chunking of one sequential part; a merge tree is a union of parts."""
    from streamattn.operators.sampler import LeverageSampler, SamplerSpec

    x = keys(300, 4)
    variant = "affine" if affine else "plain"

    def make(seed: int = 1) -> LeverageSampler:
        return LeverageSampler(SamplerSpec(method, 2.0, 0.5, 0.1, variant, seed, leaf_rows=40,
                                           fan_in=2))

    def compare(a: dict, b: dict) -> None:
        assert a["n"] == b["n"]
        for r in (a, b):
            np.testing.assert_array_equal(r["rows"], x[r["indices"]])
            assert np.all(r["weights"] >= 1.0) and 0 < r["indices"].size < 300
        if method == "merge-reduce" or a["certificate"]["parts"] == b["certificate"]["parts"] == 1:
            np.testing.assert_array_equal(a["indices"], b["indices"])
            np.testing.assert_array_equal(a["weights"], b["weights"])

    check_operator_laws(make, x, compare, data, make_other_spec=lambda: make(2))


@settings(max_examples=15, deadline=None)
@given(data=st.data(), affine=st.booleans())
def test_approx_leverage_laws(data: st.DataObject, affine: bool) -> None:
    from streamattn.operators.sampler import ApproxLeverage, ApproxLeverageSpec

    x = keys(200, 5)
    w = np.random.default_rng(4).standard_normal((5, 5)) / 40.0
    vals = np.random.default_rng(1).standard_normal((200, 2))
    shift, offset = (x.mean(0), 1 / 200) if affine else (None, 0.0)

    def compare(a, b) -> None:  # type: ignore[no-untyped-def]
        np.testing.assert_array_equal(a["indices"], b["indices"])
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-12)
        np.testing.assert_array_equal(a["rows"], b["rows"])
        np.testing.assert_array_equal(a["values"], b["values"])
        assert a["sum_scores"] == pytest.approx(b["sum_scores"], rel=1e-12)

    check_operator_laws(
        lambda: ApproxLeverage(ApproxLeverageSpec(w, 0.5, shift, offset)),
        x,
        compare,
        data,
        values=vals,
        make_other_spec=lambda: ApproxLeverage(ApproxLeverageSpec(w, 0.6, shift, offset)),
    )


# New operators: add a test above this line calling check_operator_laws.
