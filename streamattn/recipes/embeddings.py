"""Reduced embeddings: Y = K S (n × m) streamed to zarr, with the map, μᵀS and a quality report.

``reduce_embeddings(source, m=32, method="srht", seed=0, out=...)`` makes one pass over the
keys for an oblivious map (``gaussian``, ``sparse-sign``, ``srht``: S regenerated from the
seed on every worker) and two for a data-aware map (``pca``: top-m principal directions
of the centred keys from a TSQR factor; ``frequent-directions``: the same from a mergeable
FD sketch, with its error bound). Queries use the same map (``project_queries``), so
logits become (Sᵀq)·y_j. Centring commutes with S: (K − 1μᵀ)S = Y − 1(μᵀS), and the
output keeps μᵀS so users centre lazily; softmax ignores the common offset anyway.

Guarantees (precisely): for ``gaussian`` and fixed q, k, |q·k − (Sᵀq)·(Sᵀk)| ≤ ε‖q‖‖k‖ for
all P query–key pairs with probability ≥ 1 − δ when m(ε²/2 − ε³/3)/2 ≥ log(4P/δ)
(m = O(ε⁻² log(N/δ))). The other oblivious maps obey bounds of that form with other
constants, and data-aware maps carry no worst-case logit bound (they are exact on the
retained principal subspace); for every method the *measured* errors are reported.

Quality report (every run): on a query sample (the store's ``queries`` if present, else
random directions with the keys' RMS norm) and a key sample (``sample_keys`` keys by a
keyed hash of the row index), the max and mean normalised logit error
|q·k − (Sᵀq)·(Sᵀk)|/(‖q‖‖k‖) (also for centred keys), and the attention error at scale
β (default 1/√d): the max absolute difference of softmax rows and the total variation
½‖p − p̂‖₁ per row (max and mean), softmax over the key sample computed with logsumexp.
Memory: O(s_q · s_k), never n × n.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.special

from streamattn.errors import ConfigError
from streamattn.io.outputs import atomic_dir, check_writable, write_json_atomic
from streamattn.memory import peak_rss_bytes
from streamattn.operators.frequent_directions import FDSpec, FrequentDirections
from streamattn.operators.projection import (
    DATA_AWARE_METHODS,
    CentredFactor,
    CentredFactorSpec,
    KeyMean,
    KeyMeanSpec,
    ProjectedEmbeddings,
    ProjectionMap,
    ProjectionSpec,
    ProjectionSummary,
    check_map_params,
    fd_principal_directions,
    jl_epsilon,
    keyed_hash,
)
from streamattn.runner import Pass, PassContext, Plan, Recipe, run_recipes
from streamattn.sources import KeySource, open_keys

#: Explicit maps up to this many bytes (float64) are saved with the output; larger
#: oblivious maps are saved as their parameters (regenerated from the seed).
MAX_SAVED_MAP_BYTES = 64 * 2**20
#: Query rows read from a store's ``queries`` array before sampling.
MAX_QUERY_ROWS_READ = 65536
OUT_DTYPES = ("float16", "float32", "float64")

GUARANTEES = {
    "gaussian": (
        "JL (proved): for fixed q, k, |q.k - (S^T q).(S^T k)| <= eps ||q|| ||k|| for all P pairs "
        "with probability >= 1 - delta when m (eps^2/2 - eps^3/3) / 2 >= log(4 P / delta)."
    ),
    "sparse-sign": (
        "Sparse JL (Kane-Nelson): a bound of the JL form with other constants; the "
        "Gaussian-form eps is a reference, the measured errors are what holds here."
    ),
    "srht": (
        "SRHT (Tropp): a bound of the JL form with an extra log(d/delta) factor; the "
        "Gaussian-form eps is a reference, the measured errors are what holds here."
    ),
    "pca": (
        "Data-aware, no worst-case logit bound: exact on the top-m principal subspace of "
        "the centred keys; the error is q^T (I - V V^T) k. Measured errors reported."
    ),
    "frequent-directions": (
        "Data-aware, no worst-case logit bound: top-m directions of the FD estimate C_B of "
        "the centred scatter C, with 0 <= C - C_B <= fd_delta * I (FD guarantee)."
    ),
}


@dataclass(frozen=True)
class ReduceConfig:
    """Settings of one reduced-embedding run (the ``reduce:`` section of a run config).

    m: embedding dimension (1 <= m <= d); method: one of ``METHODS``; seed: non-negative
    integer (oblivious maps and samples); sparsity: non-zeros per row of a sparse-sign
    map; fd_ell: FD sketch rows (default min(d, 2m), must be >= m); sample_keys /
    sample_queries: sizes of the quality-report samples; scale: attention scale (None:
    1/√d); dtype: storage dtype of Y; delta: failure probability in the stated JL ε.
    """

    m: int = 32
    method: str = "srht"
    seed: int = 0
    sparsity: int = 4
    fd_ell: int | None = None
    sample_keys: int = 2048
    sample_queries: int = 256
    scale: float | None = None
    dtype: str = "float32"
    delta: float = 0.01

    def check(self, d: int | None = None) -> None:
        """Raise ConfigError naming the bad setting (``d``: the keys' dimension, if known)."""
        check_map_params(self.m, self.method, self.seed, d)
        for name in ("sparsity", "sample_keys", "sample_queries"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"reduce.{name} must be an integer >= 1, got {v!r}.")
        if self.fd_ell is not None:
            if isinstance(self.fd_ell, bool) or not isinstance(self.fd_ell, int):
                raise ConfigError(f"reduce.fd_ell must be an integer, got {self.fd_ell!r}.")
            if self.fd_ell < self.m:
                raise ConfigError(
                    f"reduce.fd_ell = {self.fd_ell} < m = {self.m}: a Frequent Directions "
                    "sketch with fewer rows than m cannot give m directions."
                )
        if self.scale is not None and not (isinstance(self.scale, float) and self.scale > 0):
            raise ConfigError(f"reduce.scale must be a positive float or null, got {self.scale!r}.")
        if self.dtype not in OUT_DTYPES:
            raise ConfigError(
                f"reduce.dtype must be one of {list(OUT_DTYPES)}, got {self.dtype!r}."
            )
        if not (isinstance(self.delta, float) and 0 < self.delta < 1):
            raise ConfigError(f"reduce.delta must be a float in (0, 1), got {self.delta!r}.")

    def ell(self, d: int) -> int:
        return self.fd_ell if self.fd_ell is not None else min(d, 2 * self.m)


@dataclass
class ReducedEmbeddings:
    """The result of ``reduce_embeddings``.

    Attributes
    ----------
    embeddings : the zarr array Y = K S (n × m) on disk
    map : the ProjectionMap S (``project_queries`` applies it to queries)
    mean : μ, the mean key (float64, d)
    mu_s : μᵀS (float64, m): centred embeddings are Y − μᵀS
    quality : the quality report (logit and attention errors on samples, JL ε, map info)
    report : the whole report written to ``report.json``
    path : the output directory (None when no ``out`` was given: Y is then in memory)
    """

    embeddings: Any
    map: ProjectionMap
    mean: np.ndarray
    mu_s: np.ndarray
    quality: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def project_queries(self, q: np.ndarray) -> np.ndarray:
        """Sᵀq for each query row (float64): logits ≈ project_queries(q) @ Yᵀ."""
        return self.map.project_queries(q)

    def centred(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of the centred embeddings Y − 1(μᵀS), float64."""
        return np.asarray(self.embeddings[start:stop], dtype=np.float64) - self.mu_s


# ---------------------------------------------------------------------- quality report
def sample_queries(
    source: KeySource, count: int, seed: int, rms_norm: float
) -> tuple[np.ndarray, str]:
    """Up to ``count`` query rows: the store's queries (keyed sample) or random directions."""
    if source.queries is not None:
        rows = np.asarray(source.queries[: min(int(source.queries.shape[0]), MAX_QUERY_ROWS_READ)])
        rows = np.asarray(rows, dtype=np.float64)
        if rows.shape[0] > count:
            pick = np.sort(np.argsort(keyed_hash(seed, 0x51, np.arange(rows.shape[0])))[:count])
            rows = rows[pick]
        if not np.isfinite(rows).all():
            raise ConfigError(f"{source.label}: the queries array contains NaN or Inf.")
        return rows, "store queries"
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, 0x51])))
    g = rng.standard_normal((count, source.d))
    g *= rms_norm / np.linalg.norm(g, axis=1, keepdims=True)
    return g, "random directions with the keys' RMS norm"


def _softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(logits - scipy.special.logsumexp(logits, axis=1, keepdims=True))


def quality_report(
    pmap: ProjectionMap,
    keys: np.ndarray,
    queries: np.ndarray,
    *,
    mean: np.ndarray,
    scale: float,
    stored_dtype: str = "float64",
    delta: float = 0.01,
) -> dict[str, Any]:
    """Logit and attention errors of the map on a query sample × key sample.

    Keys are projected and rounded to ``stored_dtype`` (as Y is stored). Logit error:
    |q·k − (Sᵀq)·(Sᵀk)|/(‖q‖‖k‖), also with centred keys (k − μ against Sᵀk − μᵀS).
    Attention: softmax_j(β q·k_j) over the key sample vs the same from the embeddings;
    max |p − p̂| and total variation ½‖p − p̂‖₁ per query row. O(s_q · s_k) memory.
    """
    k = np.asarray(keys, dtype=np.float64)
    q = np.asarray(queries, dtype=np.float64)
    yk = pmap.apply(k).astype(stored_dtype).astype(np.float64)
    yq = pmap.project_queries(q)
    mu_s = pmap.apply(mean[None, :])[0]
    nq = np.linalg.norm(q, axis=1)[:, None]
    nq = np.where(nq > 0, nq, 1.0)

    def normalised(exact: np.ndarray, approx: np.ndarray, kn: np.ndarray) -> np.ndarray:
        return np.abs(exact - approx) / (nq * np.where(kn > 0, kn, 1.0)[None, :])

    exact = q @ k.T
    approx = yq @ yk.T
    err = normalised(exact, approx, np.linalg.norm(k, axis=1))
    kc = k - mean
    err_c = normalised(q @ kc.T, yq @ (yk - mu_s).T, np.linalg.norm(kc, axis=1))
    p, p_hat = _softmax(scale * exact), _softmax(scale * approx)
    diff = np.abs(p - p_hat)
    tv = 0.5 * diff.sum(axis=1)
    pairs = int(q.shape[0] * k.shape[0])
    eps = jl_epsilon(pmap.m, pairs, delta)
    return {
        "queries": int(q.shape[0]),
        "keys": int(k.shape[0]),
        "scale": scale,
        "logit_error_max": float(err.max()),
        "logit_error_mean": float(err.mean()),
        "centred_logit_error_max": float(err_c.max()),
        "centred_logit_error_mean": float(err_c.mean()),
        "attention_max_abs_error": float(diff.max()),
        "attention_tv_max": float(tv.max()),
        "attention_tv_mean": float(tv.mean()),
        "jl_eps_gaussian_form": eps,
        "jl_delta": delta,
        "jl_pairs": pairs,
        "jl_eps_note": (
            "eps such that a Gaussian map meets the logit error bound for all pairs with "
            "probability >= 1 - delta (None: m too small for any eps <= 1)"
        ),
        "guarantee": GUARANTEES[pmap.method],
    }


# ---------------------------------------------------------------------- the map
def map_plan(d: int, cfg: ReduceConfig) -> Plan[tuple[ProjectionMap, dict[str, Any]]]:
    """The map S: regenerated from the seed, or from a first pass for data-aware methods."""
    m = cfg.m
    if cfg.method not in DATA_AWARE_METHODS:
        return ProjectionMap(cfg.method, d, m, cfg.seed, cfg.sparsity), {"passes": 1}
    if cfg.method == "pca":
        done = yield Pass({"pca": CentredFactor(CentredFactorSpec())}, "pca")
        factor = done["pca"].result()
        v, s2 = factor.principal_directions(m)
        info = {
            "passes": 2,
            "first_pass": "TSQR of [1, K] (float64); map = top-m right singular vectors of R_c",
            "explained_variance_fraction": float(s2[:m].sum() / s2.sum()) if s2.sum() else 1.0,
        }
        return ProjectionMap("pca", d, m, matrix=v), info
    ell = cfg.ell(d)
    done = yield Pass({"fd": FrequentDirections(FDSpec(ell)), "mean": KeyMean(KeyMeanSpec())},
                      "fd")
    sketch = done["fd"].result()
    mean = done["mean"].result()["mean"]
    v, w = fd_principal_directions(sketch.sketch, mean, sketch.n, m)
    info = {
        "passes": 2,
        "first_pass": "Frequent Directions sketch B and the mean; map = top-m eigenvectors "
        "of B^T B - n mu mu^T",
        "fd_ell": ell,
        "fd_delta": sketch.delta,
        "fd_delta_bound": sketch.delta_bound,
        "fd_guarantee": "0 <= C - (B^T B - n mu mu^T) <= fd_delta * I, C the centred scatter "
        "(fd_delta <= (||K||_F^2 - ||B||_F^2)/ell <= ||K - K_k||_F^2/(ell - k))",
        "fd_top_eigenvalues": w[:m],
    }
    return ProjectionMap("frequent-directions", d, m, matrix=v), info


class Embeddings(Recipe[dict[str, Any]]):
    """Reduced embeddings into ``group_path`` (a zarr group: ``embeddings``, map, mean):
    a map pass for data-aware methods, then the projection pass (not resumable: it
    writes Y as it goes); returns the ``finish_embeddings`` record."""

    on_cache = "refuse"

    def __init__(self, cfg: ReduceConfig, group_path: Path) -> None:
        self.cfg, self.group_path = cfg, group_path

    def describe(self) -> str:
        return "reduced embeddings"

    def plan(self, ctx: PassContext) -> Plan[dict[str, Any]]:
        src, cfg = ctx.source, self.cfg
        assert isinstance(src, KeySource)
        pmap, map_info = yield from map_plan(src.d, cfg)
        out_path = create_embeddings_array(self.group_path, src.n, cfg.m, ctx.chunk_rows,
                                           cfg.dtype)
        done = yield Pass({"reduce": projection_operator(pmap, out_path, cfg)}, "reduce",
                          resumable=False)
        return finish_embeddings(self.group_path, src, done["reduce"].result(), cfg, map_info)


def create_embeddings_array(group_path: Path, n: int, m: int, chunk_rows: int, dtype: str) -> str:
    """Pre-create the (n × m) zarr array Y, chunked like the pass so blocks own whole chunks."""
    import zarr

    root = zarr.open_group(str(group_path), mode="w")
    root.create_array(
        "embeddings", shape=(n, m), dtype=dtype, chunks=(min(chunk_rows, n), m), compressors=None
    )
    return str(group_path / "embeddings")


def projection_operator(
    pmap: ProjectionMap, out_path: str, cfg: ReduceConfig
) -> ProjectedEmbeddings:
    return ProjectedEmbeddings(
        ProjectionSpec(
            pmap.method,
            pmap.d,
            pmap.m,
            pmap.seed,
            pmap.sparsity,
            pmap.matrix,
            out_path,
            cfg.sample_keys,
        )
    )


def finish_embeddings(
    group_path: Path,
    source: KeySource,
    summary: ProjectionSummary,
    cfg: ReduceConfig,
    map_info: dict[str, Any],
) -> dict[str, Any]:
    """Quality report, then map / mean / μᵀS / sample index and attributes into the group."""
    import zarr

    from streamattn.io.outputs import write_arrays
    from streamattn.results import versions

    pmap = summary.projection_map
    rms = float(np.sqrt(np.mean(np.sum(summary.sample_rows**2, axis=1))))
    queries, qsource = sample_queries(source, cfg.sample_queries, cfg.seed, rms)
    scale = cfg.scale if cfg.scale is not None else 1.0 / np.sqrt(source.d)
    quality = quality_report(
        pmap,
        summary.sample_rows,
        queries,
        mean=summary.mean,
        scale=scale,
        stored_dtype=cfg.dtype,
        delta=cfg.delta,
    )
    quality["query_source"] = qsource
    saved = 8 * pmap.d * pmap.m <= MAX_SAVED_MAP_BYTES or pmap.matrix is not None
    info = {
        "map": {**pmap.describe(), **map_info, "matrix_saved": saved},
        "n": summary.n,
        "d": source.d,
        "m": pmap.m,
        "dtype": cfg.dtype,
        "quality": quality,
        "centring": "centred embeddings = embeddings - mu_s (mu_s = mean^T S)",
        "config": asdict(cfg),
        "source": source.describe(),
        "versions": versions(),
    }
    group = zarr.open_group(str(group_path), mode="r+")
    write_arrays(
        group,
        {
            "map": pmap.dense() if saved else None,
            "mean": summary.mean,
            "mu_s": summary.mu_s,
            "sample_index": summary.sample_index,
        },
        info,
    )
    return info


def _temporary_output(holder: list[Any]) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="streamattn-embeddings-"))
    holder.append(tmp)
    return tmp / "out"


def reduce_embeddings(
    source: Any,
    m: int = 32,
    method: str = "srht",
    seed: int = 0,
    *,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    chunk_rows: int | None = None,
    engine: str = "local",
    progress: bool = False,
    array: str | None = None,
    config: ReduceConfig | None = None,
    **engine_options: Any,
) -> ReducedEmbeddings:
    """Reduced embeddings Y = K S of a key store, streamed to ``OUT/embeddings.zarr``.

    Parameters
    ----------
    source
        A ``KeySource`` or anything ``open_keys`` accepts.
    m, method, seed
        Embedding dimension (1 <= m <= d), map (``gaussian``, ``sparse-sign``, ``srht``,
        ``pca``, ``frequent-directions``) and seed (a non-negative int). Ignored when
        ``config`` (a full :class:`ReduceConfig`) is given.
    out
        Output directory (``embeddings.zarr`` + ``report.json``, written atomically);
        None: Y is returned as an in-memory zarr array (for inputs whose n × m fits in
        memory) and no files remain.
    chunk_rows, engine, progress, engine_options
        As for ``run_operators``; Y is chunked like the pass.

    Returns
    -------
    ReducedEmbeddings
        ``.embeddings`` (zarr n × m), ``.map``, ``.project_queries(Q)``, ``.mu_s``,
        ``.quality``.

    Examples
    --------
    >>> import numpy as np
    >>> k = np.random.default_rng(0).standard_normal((2000, 64))
    >>> r = reduce_embeddings(k, m=16, method="gaussian", seed=1)
    >>> r.embeddings.shape, r.quality["logit_error_max"] < 1.5
    ((2000, 16), True)
    >>> bool(np.allclose(r.embeddings[:5], k[:5] @ r.map.dense(), atol=1e-5))
    True
    """
    cfg = config if config is not None else ReduceConfig(m=m, method=method, seed=seed)
    src = open_keys(source, array=array)
    cfg.check(src.d)
    if chunk_rows is not None and chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}.")
    holder: list[Any] = []
    target = Path(out) if out is not None else _temporary_output(holder)
    check_writable(target, overwrite)
    t0 = time.perf_counter()
    with atomic_dir(target, overwrite=overwrite) as tmp:
        outcome = run_recipes(src, [Embeddings(cfg, tmp / "embeddings.zarr")],
                              chunk_rows=chunk_rows, engine=engine, progress=progress,
                              **engine_options)
        (info,) = outcome.results
        rows = outcome.report.chunk_rows
        report = {
            "command": "reduce",
            "engine": engine,
            "chunk_rows": rows,
            "seconds": time.perf_counter() - t0,
            "peak_rss_bytes": peak_rss_bytes(),
            "embeddings": info,
            "plan": outcome.report.as_dict(),
        }
        write_json_atomic(tmp / "report.json", report)
    result = load_reduced_embeddings(target)
    result.report = report
    if holder:  # no ``out``: Y is copied into an in-memory zarr array, the files removed
        import zarr

        memory = zarr.create_array(
            zarr.storage.MemoryStore(),
            shape=result.embeddings.shape,
            dtype=cfg.dtype,
            chunks=result.embeddings.chunks,
        )
        memory[...] = result.embeddings[...]
        shutil.rmtree(holder[0], ignore_errors=True)
        result.embeddings, result.path = memory, None
    return result


def load_reduced_embeddings(out: str | os.PathLike[str]) -> ReducedEmbeddings:
    """Open ``OUT/embeddings.zarr`` written by ``reduce_embeddings`` (read-only)."""
    import zarr

    from streamattn.errors import InvalidInputError

    path = Path(out) / "embeddings.zarr"
    try:
        group: Any = zarr.open_group(str(path), mode="r")
        attrs: dict[str, Any] = dict(group.attrs)
        desc = attrs["map"]
    except (FileNotFoundError, KeyError) as exc:
        raise InvalidInputError(f"{path}: not a reduced-embeddings output ({exc}).") from exc
    if desc["method"] in DATA_AWARE_METHODS:
        pmap = ProjectionMap(desc["method"], desc["d"], desc["m"], matrix=group["map"][...])
    else:
        pmap = ProjectionMap(
            desc["method"], desc["d"], desc["m"], desc["seed"], desc.get("sparsity", 4)
        )
    return ReducedEmbeddings(
        embeddings=group["embeddings"],
        map=pmap,
        mean=group["mean"][...],
        mu_s=group["mu_s"][...],
        quality=attrs["quality"],
        report={},
        path=Path(out),
    )
