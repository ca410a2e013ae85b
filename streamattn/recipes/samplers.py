"""Leverage samples of a key store: ``leverage_sample`` and what a sample is good for.

``leverage_sample(src, eps=0.25, delta=0.01, method="online" | "merge-reduce",
variant="plain" | "affine", seed=0)`` runs one pass of a
:class:`~streamattn.operators.sampler.LeverageSampler` (the mathematics, proofs and
memory laws are in that module) and returns a :class:`LeverageSample`: row ``indices``,
``weights`` and ``rows`` with G̃ = Σ_s w_s k_s k_sᵀ = (1 ± ε) KᵀK (affine: on [K, 1])
with probability ≥ 1 − δ, and a ``certificate``. ``check=True`` also folds the exact
factor in the same read and records the measured spectral error
max_q |qᵀ(G̃ − G)q| / qᵀGq (a d × d generalized eigenproblem).

Uses, each a corollary of the spectral bound (so each holds with the same 1 − δ):

- x² normalisers: Z(q) = Σ_j (q·k_j)² = qᵀGq, so ``normaliser(q)`` = qᵀG̃q ∈ (1 ± ε)Z(q)
  for every q at once, and every x² attention entry (q·k_j)²/Z(q) to a factor 1/(1 ± ε).
  Affine: Σ_s w_s (q·k_s + c)² = (1 ± ε) Σ_j (q·k_j + c)² for every q and offset c.
- approximate leverage of any row: τ̂ = k̃ᵀG̃⁺k̃ ∈ [τ/(1 + ε), τ/(1 − ε)] (G̃ ⪯ (1+ε)G ⇒
  G̃⁺ ⪰ G⁺/(1+ε) on the common range), so {τ̂ ≥ θ/(1 + ε)} contains the exact universal
  set {τ ≥ θ} (no false negatives) and has at most rank·(1 + ε)/((1 − ε)θ) rows —
  ``approximate_universal_set`` in one more pass, d × d work per row, no TSQR of K.
- one-pass PCA: the top-m principal directions of the sample's weighted centred scatter
  (``pca``) replace the first pass of the two-pass ``pca`` map. No worst-case logit bound
  is claimed (the map is data-aware); the errors against the two-pass map are measured.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamattn.errors import ConfigError, InvalidInputError
from streamattn.operators.leverage import DEFAULT_RTOL, ScoringMap, stack_qr
from streamattn.operators.projection import CentredFactor, CentredFactorResult, CentredFactorSpec
from streamattn.operators.protocol import Operator
from streamattn.operators.sampler import (
    METHODS,
    VARIANTS,
    ApproxLeverage,
    ApproxLeverageSpec,
    LeverageSampler,
    SamplerSpec,
    TreeShape,
    merge_reduce_oversampling,
    online_oversampling,
)
from streamattn.results import MultiHeadResult, UniversalSet, versions
from streamattn.runner import Pass, PassContext, Plan, Recipe, run_pass, run_recipes
from streamattn.sources import KeySource, MultiHeadSource, open_source

__all__ = [
    "LeverageSample",
    "LeverageSampler",
    "LeverageSampling",
    "SampleConfig",
    "approximate_universal_set",
    "leverage_sample",
    "load_sample",
    "save_samples",
    "spectral_error",
]

GUARANTEES = {
    "online": (
        "proved (Cohen-Musco-Pachocki 2016, Thm 3 with lambda = 0; frozen matrix Freedman): "
        "(1-eps) G <= sum_s w_s k_s k_s^T <= (1+eps) G with probability >= 1 - delta_bound; "
        "rows decided one by one in fold order, so the sample is the same for every chunking "
        "of a sequential (local) pass; on Dask each leaf task is an independent part "
        "(union of parts; delta_bound counts them). Size grows like c*dim*log(kappa)."
    ),
    "merge-reduce": (
        "proved (matrix Freedman over the fixed merge tree, see "
        "streamattn.operators.sampler): (1-eps) G <= sum_s w_s k_s k_s^T <= (1+eps) G with "
        "probability >= 1 - delta_bound for the actual tree; the tree and the coins depend "
        "only on global row indices, so the sample is the same for every chunking, engine "
        "and merge order. Expected size <= c*dim."
    ),
}


@dataclass(frozen=True)
class SampleConfig:
    """The ``sample:`` section of a run config (see ``leverage_sample``)."""

    eps: float = 0.25
    delta: float = 0.01
    method: str = "merge-reduce"
    variant: str = "plain"
    seed: int = 0
    check: bool = False
    leaf_rows: int | None = None
    fan_in: int = 8
    rtol: float = DEFAULT_RTOL
    ridge: float = 0.0

    def validate(self) -> None:
        """Raise ConfigError naming the first bad setting (``check`` is a setting here)."""
        check_sample_settings(self.eps, self.delta, self.method, self.variant, self.seed,
                              self.leaf_rows, self.fan_in)
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) or not (
            self.ridge >= 0
        ):
            raise ConfigError(f"sample ridge must be a number >= 0, got {self.ridge!r}.")
        if self.ridge > 0 and (self.method, self.variant) != ("online", "plain"):
            raise ConfigError("sample ridge > 0 is offered for method online, variant plain "
                              f"only (got {self.method}, {self.variant}).")


def check_sample_settings(
    eps: Any, delta: Any, method: Any, variant: Any, seed: Any, leaf_rows: Any, fan_in: Any
) -> None:
    if method not in METHODS:
        raise ConfigError(f"sample method must be one of {list(METHODS)}, got {method!r}.")
    if variant not in VARIANTS:
        raise ConfigError(f"sample variant must be one of {list(VARIANTS)}, got {variant!r}.")
    for name, value in (("eps", eps), ("delta", delta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ConfigError(f"sample {name} must be a number in (0, 1), got {value!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"sample seed must be a non-negative integer, got {seed!r}.")
    if leaf_rows is not None and (isinstance(leaf_rows, bool) or not isinstance(leaf_rows, int)
                                  or leaf_rows < 1):
        raise ConfigError(f"sample leaf_rows must be an integer >= 1, got {leaf_rows!r}.")
    if isinstance(fan_in, bool) or not isinstance(fan_in, int) or fan_in < 2:
        raise ConfigError(f"sample fan_in must be an integer >= 2, got {fan_in!r}.")


@dataclass
class LeverageSample:
    """A weighted key sample with G̃ = Σ_s w_s k̃_s k̃_sᵀ = (1 ± ε)G (k̃ = [k, 1] if affine).

    Attributes
    ----------
    indices : sorted int64 global row indices of the kept keys
    weights : float64 weights w_s ≥ 1 (1/probability, multiplied over merge levels)
    rows : the kept key rows, in the store's dtype
    certificate : method, variant, eps, delta, c, n, d, kept, delta_bound (the failure
        probability the proof gives for this run's tree / parts), eps_bound (the ε it
        certifies at δ), size bounds, and ``spectral_error`` when measured (check=True)
    """

    indices: np.ndarray
    weights: np.ndarray
    rows: np.ndarray
    certificate: dict[str, Any] = field(default_factory=dict)

    @property
    def affine(self) -> bool:
        return self.certificate.get("variant") == "affine"

    def __len__(self) -> int:
        return int(self.indices.size)

    def _augmented(self) -> np.ndarray:
        x = np.asarray(self.rows, dtype=np.float64)
        return np.hstack([x, np.ones((x.shape[0], 1))]) if self.affine else x

    def gram(self) -> np.ndarray:
        """G̃ = Σ_s w_s k̃_s k̃_sᵀ (float64; (d+1)² with the constant last when affine)."""
        x = self._augmented()
        return (x * self.weights[:, None]).T @ x

    def normaliser(self, queries: np.ndarray, offset: float = 0.0) -> np.ndarray:
        """Σ_s w_s (q·k_s + offset)² for each query row: (1 ± ε) Σ_j (q·k_j + offset)².

        ``offset`` must be 0 for the plain variant's guarantee; any offset for affine.
        """
        q = np.atleast_2d(np.asarray(queries, dtype=np.float64))
        logits = q @ np.asarray(self.rows, dtype=np.float64).T + offset
        return (logits**2) @ self.weights

    def scoring_map(self, rtol: float = DEFAULT_RTOL) -> ScoringMap:
        """The map with ‖(x − shift) W‖² + offset = x̃ G̃⁺ x̃ᵀ (plain: no shift, offset 0;
        affine: W from the weighted-centred sample factor, shift μ̃, offset 1/W̃ — the exact
        centred identity for [x, 1], stable when the common offset dwarfs the spread)."""
        x = np.asarray(self.rows, dtype=np.float64)
        d = x.shape[1]
        sw = np.sqrt(self.weights)[:, None]
        if not self.affine:
            return ScoringMap.from_factor(stack_qr(sw * x), rtol, d)
        total = float(self.weights.sum())
        mean = self.weights @ x / total
        wc = ScoringMap.from_factor(stack_qr(sw * (x - mean)), rtol, d)
        return dataclasses.replace(wc, rank=wc.rank + 1, shift=mean, offset=1.0 / total)

    def leverage(self, rows: np.ndarray, rtol: float = DEFAULT_RTOL) -> np.ndarray:
        """Approximate leverage k̃ᵀG̃⁺k̃ of any rows: within [τ/(1 + ε), τ/(1 − ε)]."""
        from streamattn.operators.leverage import map_scores

        smap = self.scoring_map(rtol)
        return map_scores(np.asarray(rows, dtype=np.float64), smap.w, smap.shift, smap.offset)

    def pca(self, m: int) -> tuple[Any, np.ndarray]:
        """(ProjectionMap, μ̃): top-m principal directions of the sample's weighted centred
        scatter and its weighted mean — the one-pass replacement of the ``pca`` first pass."""
        from streamattn.operators.projection import ProjectionMap

        x = np.asarray(self.rows, dtype=np.float64)
        mean = self.weights @ x / float(self.weights.sum())
        r = stack_qr(np.sqrt(self.weights)[:, None] * (x - mean))
        v = CentredFactorResult(len(self), mean, r).principal_directions(m)[0]
        return ProjectionMap("pca", x.shape[1], m, matrix=v), mean


# ---------------------------------------------------------------------------- measurement
def spectral_error(
    sample: LeverageSample, factor: CentredFactorResult, rtol: float = DEFAULT_RTOL
) -> float:
    """max over q of |qᵀ(G̃ − G)q| / qᵀGq, from the exact factor (TSQR of [1, K]).

    Computed as max |λ(Yᵀ Y) − 1| with Y the sample whitened by G's factor on its
    numerical range. Affine: in the basis [1, k − μ], where G = diag(n, S) is well
    conditioned even when the common offset dwarfs the spread (the relative error is
    basis-invariant).
    """
    x = np.asarray(sample.rows, dtype=np.float64)
    sw = np.sqrt(sample.weights)[:, None]
    if sample.affine:
        wc = ScoringMap.from_factor(factor.r_centred, rtol, x.shape[1]).w
        y = np.hstack([sw / math.sqrt(factor.n), sw * ((x - factor.mean) @ wc)])
    else:
        # KᵀK = Sᵀ + n μμᵀ: the factor of [√n μᵀ; R_c]
        r = stack_qr(math.sqrt(factor.n) * factor.mean[None, :], factor.r_centred)
        y = sw * (x @ ScoringMap.from_factor(r, rtol, x.shape[1]).w)
    ev = np.linalg.eigvalsh(y.T @ y) if y.shape[1] else np.zeros(0)
    return float(np.max(np.abs(ev - 1.0))) if ev.size else 0.0


# ---------------------------------------------------------------------------- the recipe
def plan_spec(
    n: int,
    d: int,
    *,
    eps: float,
    delta: float,
    method: str,
    variant: str,
    seed: int,
    parts: int = 1,
    leaf_rows: int | None = None,
    fan_in: int = 8,
    rtol: float = DEFAULT_RTOL,
    ridge: float = 0.0,
) -> SamplerSpec:
    """The sampler for n rows: c from the proved bound for the planned tree / parts.

    Merge-reduce default leaf size: the power of two ≥ 2·c·dim (a leaf halves its rows).
    """
    check_sample_settings(eps, delta, method, variant, seed, leaf_rows, fan_in)
    dim = d + 1 if variant == "affine" else d
    if method == "online":
        c = online_oversampling(eps, delta, dim, parts)
        return SamplerSpec(method, c, eps, delta, variant, seed, rtol=rtol, ridge=ridge,
                           plan_rows=n)
    def c_for(rows: int) -> float:
        return merge_reduce_oversampling(eps, delta, dim, TreeShape.for_rows(max(n, 1), rows,
                                                                             fan_in))

    b = leaf_rows or 1024
    if leaf_rows is None:  # c depends on the tree, the default leaf size on c
        for _ in range(4):
            new = 1 << max(10, math.ceil(math.log2(2 * c_for(b) * dim)))
            if new == b:
                break
            b = new
    return SamplerSpec(method, c_for(b), eps, delta, variant, seed, b, fan_in, rtol, ridge, n)


def _finish(res: dict[str, Any], factor: CentredFactorResult | None, rtol: float,
            seconds: float) -> LeverageSample:
    cert = dict(res["certificate"])
    cert["guarantee"] = GUARANTEES[cert["method"]]
    cert["seconds"] = seconds
    cert["versions"] = versions()
    out = LeverageSample(res["indices"], res["weights"], res["rows"], cert)
    if factor is not None:
        out.certificate["spectral_error"] = spectral_error(out, factor, rtol)
        out.certificate["spectral_error_note"] = (
            "measured: max_q |q^T (G~ - G) q| / q^T G q from the exact factor (same read)"
        )
    return out


def leverage_sample(
    src: Any,
    eps: float = 0.25,
    delta: float = 0.01,
    method: str = "online",
    variant: str = "plain",
    seed: int = 0,
    *,
    check: bool = False,
    chunk_rows: int | None = None,
    engine: str = "local",
    progress: bool = False,
    array: str | None = None,
    heads: int | None = None,
    leaf_rows: int | None = None,
    fan_in: int = 8,
    rtol: float = DEFAULT_RTOL,
    ridge: float = 0.0,
    **engine_options: Any,
) -> LeverageSample | MultiHeadResult:
    """A weighted leverage sample with (1 ± ε) spectral error w.p. ≥ 1 − δ, one pass.

    Parameters
    ----------
    src
        A ``KeySource``/``MultiHeadSource`` or anything ``open_keys`` / ``open_kv`` opens.
        A KV cache gives one sampler per (layer, head) in the same read
        (``MultiHeadResult`` of ``LeverageSample``).
    eps, delta
        Target relative spectral error and failure probability.
    method
        ``"online"`` (CMP online ridge-free leverage sampling: same sample for every
        chunking of a local pass; size grows like log κ) or ``"merge-reduce"`` (a fixed
        merge tree on global row indices: same sample on every chunking, engine and
        merge order; expected size ≤ c·dim).
    variant
        ``"plain"`` (KᵀK) or ``"affine"`` ([K, 1]: every offset c of q·k + c).
    seed
        Key of the coins (SplitMix64 of (seed, level, row index)).
    check
        Also fold the exact TSQR factor in the same read and record the measured
        ``spectral_error`` in the certificate.
    leaf_rows, fan_in
        Merge-reduce tree (default leaf: the power of two ≥ 2·c·dim).
    ridge
        Online, plain only: λ ≥ 0; the bound becomes (1 ± ε)(G + λI) (additive ελ) and
        the size law ln det(I + G/λ) instead of log κ.

    Examples
    --------
    >>> import numpy as np
    >>> k = np.random.default_rng(0).standard_normal((20000, 4))
    >>> s = leverage_sample(k, eps=0.5, method="merge-reduce", check=True)
    >>> s.certificate["spectral_error"] < 0.5, len(s) < 20000
    (True, True)
    """
    check_sample_settings(eps, delta, method, variant, seed, leaf_rows, fan_in)
    source = src if isinstance(src, (KeySource, MultiHeadSource)) else open_source(
        src, array=array, n_heads=heads
    )
    recipe = LeverageSampling(eps, delta, method, variant, seed, check=check,
                              leaf_rows=leaf_rows, fan_in=fan_in, rtol=rtol, ridge=ridge)
    (out,) = run_recipes(source, [recipe], engine=engine, chunk_rows=chunk_rows,
                         progress=progress, **engine_options).results
    result: LeverageSample | MultiHeadResult = out
    return result


class LeverageSampling(Recipe[LeverageSample]):
    """One pass of a ``LeverageSampler`` (planned for the source's n and the engine), with
    the exact ``CentredFactor`` in the same read when ``check``. Lifted to every
    (layer, head) of a cache by the runner (one sampler per head, one read)."""

    def __init__(self, eps: float, delta: float, method: str, variant: str, seed: int, *,
                 check: bool = False, leaf_rows: int | None = None, fan_in: int = 8,
                 rtol: float = DEFAULT_RTOL, ridge: float = 0.0) -> None:
        check_sample_settings(eps, delta, method, variant, seed, leaf_rows, fan_in)
        self.eps, self.delta, self.method, self.variant, self.seed = (
            eps, delta, method, variant, seed)
        self.check, self.leaf_rows, self.fan_in, self.rtol, self.ridge = (
            check, leaf_rows, fan_in, rtol, ridge)

    def plan(self, ctx: PassContext) -> Plan[LeverageSample]:
        n, d = ctx.source.n, ctx.source.d
        # online on Dask: every leaf task is a part; the blocks bound their number
        parts = max(1, -(-n // ctx.chunk_rows)) if (
            ctx.engine == "dask" and self.method == "online") else 1
        spec = plan_spec(n, d, eps=self.eps, delta=self.delta, method=self.method,
                         variant=self.variant, seed=self.seed, parts=parts,
                         leaf_rows=self.leaf_rows, fan_in=self.fan_in, rtol=self.rtol,
                         ridge=self.ridge)
        ops: dict[str, Operator] = {"sampler": LeverageSampler(spec)}
        if self.check:
            ops["factor"] = CentredFactor(CentredFactorSpec())
        t0 = time.perf_counter()
        done = yield Pass(ops, f"sample ({self.method})")
        factor = done["factor"].result() if self.check else None
        return _finish(done["sampler"].result(), factor, self.rtol, time.perf_counter() - t0)


def approximate_universal_set(
    src: Any,
    sample: LeverageSample,
    eps: float,
    *,
    chunk_rows: int | None = None,
    engine: str = "local",
    progress: bool = False,
    array: str | None = None,
    rtol: float = DEFAULT_RTOL,
    **engine_options: Any,
) -> UniversalSet:
    """{j : τ̂_j ≥ eps/(1 + ε_s)} from one pass scoring every row against the sample.

    On the sample's event (prob ≥ 1 − δ) this contains the exact universal set
    {τ_j ≥ eps} (no false negatives) and has ≤ rank·(1 + ε_s)/((1 − ε_s)·eps) rows,
    ε_s the sample's eps. Scores are the approximate τ̂ (not exact leverage).
    """
    source = src if isinstance(src, KeySource) else open_source(src, array=array)
    if isinstance(source, MultiHeadSource):
        raise InvalidInputError(f"{source.label}: approximate_universal_set takes one head.")
    if not 0 < eps <= 1:
        raise ConfigError(f"eps must be in (0, 1], got {eps!r}.")
    eps_s = float(sample.certificate["eps"])
    threshold = eps / (1.0 + eps_s)
    smap = sample.scoring_map(rtol)
    op = ApproxLeverage(ApproxLeverageSpec(smap.w, threshold, smap.shift, smap.offset))
    (done,) = run_pass(source, [op], description="approximate leverage", engine=engine,
                       chunk_rows=chunk_rows, progress=progress, **engine_options)
    res = done.result()
    cert = {
        "eps": eps,
        "threshold": threshold,
        "variant": sample.certificate.get("variant"),
        "mode": "approximate-leverage",
        "passes": 2,
        "n": res["n"],
        "d": source.d,
        "sum_scores": res["sum_scores"],
        "sample_eps": eps_s,
        "sample_delta_bound": sample.certificate.get("delta_bound"),
        "size_bound": (source.d + sample.affine) * (1 + eps_s) / ((1 - eps_s) * eps),
        "guarantee": (
            "proved on the sample's event (prob >= 1 - sample_delta_bound): contains "
            "{tau_j >= eps} (no false negatives); scores are tau-hat in "
            "[tau/(1+eps_s), tau/(1-eps_s)]"
        ),
        "versions": versions(),
    }
    return UniversalSet(res["indices"], res["scores"], res["rows"], res["values"], cert)


# ---------------------------------------------------------------------------- outputs
def save_samples(out: Any, samples: dict[str, LeverageSample], *, report: dict[str, Any],
                 overwrite: bool = False) -> Any:
    """Write ``OUT/result.zarr`` (group ``sample/<name>``: indices, weights, rows; the
    certificate in its attributes) and ``OUT/report.json``, atomically."""
    import zarr

    from streamattn.errors import OutputWriteError
    from streamattn.io.outputs import atomic_dir, write_arrays, write_json_atomic

    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            root = zarr.open_group(str(tmp / "result.zarr"), mode="w")
            root.attrs.update({"streamattn": versions()["streamattn"], "layout": "sample/<name>"})
            for name, s in samples.items():
                write_arrays(root.require_group(f"sample/{name}"),
                             {"indices": s.indices, "weights": s.weights, "rows": s.rows},
                             {"certificate": s.certificate})
            write_json_atomic(tmp / "report.json", report)
    except OSError as exc:
        raise OutputWriteError(
            f"could not write the output {out}: {exc.strerror or exc} ({type(exc).__name__}). "
            f"Nothing was replaced: a previous {out} is intact."
        ) from exc
    return out


def load_sample(out: Any, name: str = "sample") -> LeverageSample:
    """Read back one sample written by ``save_samples``."""
    import zarr

    try:
        group = zarr.open_group(f"{out}/result.zarr", mode="r")[f"sample/{name}"]
    except (KeyError, FileNotFoundError) as exc:
        raise InvalidInputError(f"{out}: no sample named {name!r} in result.zarr.") from exc
    arrays: dict[str, Any] = {k: v[...] for k, v in group.arrays()}  # type: ignore[union-attr]
    cert: dict[str, Any] = dict(group.attrs)["certificate"]  # type: ignore[assignment]
    return LeverageSample(arrays["indices"], arrays["weights"], arrays["rows"], cert)
