"""SparsityStats against dense numpy, and its operator laws."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

from laws import blocks_of, check_operator_laws, fold
from streamattn.errors import ConfigError
from streamattn.operators.protocol import Operator
from streamattn.operators.sparsity import SparsitySpec, SparsityStats, heavy_counts, k_delta


def dense_reference(logits: np.ndarray, eps: float, delta: float) -> dict[str, np.ndarray]:
    """Per-row statistics of a logit matrix with −inf for masked entries (dense numpy)."""
    out: dict[str, list] = {k: [] for k in ("lse", "count", "kd", "entropy", "max", "std", "n")}
    for row in logits:
        x = row[np.isfinite(row)]
        lse = logsumexp(x)
        p = np.exp(x - lse)
        srt = np.sort(p)[::-1]
        out["lse"].append(lse)
        out["count"].append(int(np.sum(p >= eps)))
        out["kd"].append(int(np.searchsorted(np.cumsum(srt), 1 - delta) + 1))
        out["entropy"].append(float(-(p * np.log(p)).sum()))
        out["max"].append(float(p.max()))
        out["std"].append(float(np.std(x, ddof=1)))
        out["n"].append(x.size)
    return {k: np.asarray(v) for k, v in out.items()}


def test_stats_equal_dense_numpy_with_ranges_and_columns() -> None:
    rng = np.random.default_rng(3)
    n, d, s = 3000, 8, 7
    k = rng.standard_normal((n, 2 * d))  # two heads; the operator reads head 1
    k[11, d:] *= 6.0
    q = 1.5 * rng.standard_normal((s, d))
    lo = rng.integers(0, 1000, size=s).astype(np.int64)
    hi = lo + rng.integers(500, 2000, size=s).astype(np.int64)
    spec = SparsitySpec(q, scale=0.7, top_keys=500, key_lo=lo, key_hi=hi, columns=(d, 2 * d))
    op = fold(lambda: SparsityStats(spec), blocks_of(k, [17, 640, 641, 2500]))
    res = op.result()
    logits = 0.7 * q @ k[:, d:].T
    cols = np.arange(n)
    logits[(cols[None, :] < lo[:, None]) | (cols[None, :] >= hi[:, None])] = -np.inf
    ref = dense_reference(logits, 0.01, 0.5)
    np.testing.assert_allclose(res["lse"], ref["lse"], rtol=1e-12)
    np.testing.assert_array_equal(heavy_counts(res, 0.01), ref["count"])
    kd, exact = k_delta(res, 0.5)
    assert exact.all()
    np.testing.assert_array_equal(kd, ref["kd"])
    np.testing.assert_allclose(res["entropy"], ref["entropy"], rtol=1e-10)
    np.testing.assert_allclose(res["max_prob"], ref["max"], rtol=1e-12)
    np.testing.assert_allclose(res["logit_std"], ref["std"], rtol=1e-10)
    np.testing.assert_array_equal(res["n_keys"], ref["n"])


def test_causal_mode_and_censored_k_delta_bound() -> None:
    rng = np.random.default_rng(4)
    n, d = 2000, 6
    k = rng.standard_normal((n, d))
    q = 0.2 * rng.standard_normal((3, d))  # flat attention: k_δ is large
    pos = np.array([100, 999, 1999], dtype=np.int64)
    spec = SparsitySpec(q, mode="causal", positions=pos, top_keys=100)
    res = fold(lambda: SparsityStats(spec), blocks_of(k, [300, 1200])).result()
    logits = q @ k.T / np.sqrt(d)
    logits[np.arange(n)[None, :] > pos[:, None]] = -np.inf
    ref = dense_reference(logits, 0.01, 0.1)
    kd, exact = k_delta(res, 0.1)
    assert not exact[1:].any()  # more than 100 keys are needed for 90% of flat attention
    assert (kd[1:] <= ref["kd"][1:]).all() and (kd[1:] > 100).all()  # a valid lower bound
    assert exact[0] and kd[0] == ref["kd"][0]  # the top 100 of its 101 keys hold 90%: exact
    np.testing.assert_array_equal(heavy_counts(res, 0.01), ref["count"])
    with pytest.raises(ConfigError, match="top_keys"):
        heavy_counts(res, 0.001)  # 1/eps > M: not exact, refused


def compare(a: dict, b: dict) -> None:
    # logits come from one GEMM per block: another chunking may round them 1 ulp apart
    np.testing.assert_allclose(a["top"], b["top"], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(a["n_keys"], b["n_keys"])
    for key in ("lse", "entropy", "max_prob", "logit_mean", "logit_std"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-10, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_sparsity_stats_laws(data: st.DataObject) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 5))
    x[::41] *= 5.0
    q = rng.standard_normal((4, 5))
    lo = np.array([0, 10, 150, 0], dtype=np.int64)
    hi = np.array([300, 200, 290, 40], dtype=np.int64)
    check_operator_laws(
        lambda: SparsityStats(SparsitySpec(q, top_keys=20, key_lo=lo, key_hi=hi)),
        x,
        compare,
        data,
        make_other_spec=lambda: SparsityStats(SparsitySpec(q, top_keys=21)),
    )
    op = SparsityStats(SparsitySpec(q, top_keys=20)).update(blocks_of(x, [])[0])
    assert type(Operator.from_state(op.to_state())) is SparsityStats
