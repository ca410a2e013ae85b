"""Deterministic synthetic key stores with the structure of real attention keys.

Model: k_j = μ + A z_j + σ g_j for ordinary keys, with a common offset μ (‖μ‖ about
``offset_ratio`` times the typical centred key norm; real keys sit far from the origin),
a rank-``rank`` signal A z_j (z_j ~ N(0, I)), isotropic noise σ g_j, and ``outliers``
planted keys k_j = μ + s·u_j along random unit directions u_j with ‖s·u_j‖ several times
the typical norm: keys that any universal set must contain.

Optional attention structure (every field off by default, so the default store is
unchanged bit for bit): ``values_dim`` > 0 adds a ``values`` array (n × d_v, Gaussian);
``queries`` > 0 adds ``queries`` (s × d) and ``query_positions`` (s,) arrays, queries
q_i = A w_i scaled so the softmax logits β q·k (β = 1/√d) have standard deviation about
``query_logit_std``; ``sinks`` > 0 makes keys 0..sinks−1 attention sinks: small keys
(norm ``sink_norm_ratio`` × typical) along a direction u that a fraction
``sink_query_fraction`` of queries share, so that for those queries the sink logit
exceeds the mean key's logit β q·μ by log(n) + ``sink_logit`` (so the sinks hold a
sizeable share of the softmax mass whatever n is);
``recency`` > 0 adds a rotary-like positional component to keys and queries, so
β q_i·k_j gains recency · mean_m cos(ω_m (i − j)), largest for recent keys.

Rows are generated chunk by chunk from ``numpy.random.default_rng([seed, chunk])``, so
the store is a pure function of the parameters and generation needs memory for one
chunk only, whatever n is. The store is a zarr group with a ``keys`` array; its
attributes record the parameters and the planted outlier indices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.errors import ConfigError
from streamattn.io.outputs import atomic_dir


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of a synthetic key store (every field is recorded in the store)."""

    n: int = 1_048_576
    d: int = 64
    rank: int = 16
    noise: float = 0.1
    offset_ratio: float = 0.6
    outliers: int = 8
    outlier_scale: float = 6.0
    seed: int = 0
    chunk_rows: int = 65536
    dtype: str = "float32"
    compressor: str = "zstd"
    values_dim: int = 0
    queries: int = 0
    query_logit_std: float = 2.0
    sinks: int = 0
    sink_norm_ratio: float = 0.5
    sink_logit: float = 0.0
    sink_query_fraction: float = 0.8
    recency: float = 0.0
    recency_freqs: int = 8

    def check(self) -> None:
        for name in ("n", "d", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"generate.{name} must be >= 1, got {getattr(self, name)}.")
        if not 0 <= self.rank <= self.d:
            raise ConfigError(f"generate.rank must be in [0, d={self.d}], got {self.rank}.")
        if not 0 <= self.outliers <= self.n:
            raise ConfigError(f"generate.outliers must be in [0, n], got {self.outliers}.")
        if self.dtype not in ("float16", "float32", "float64"):
            raise ConfigError(f"generate.dtype must be float16/32/64, got {self.dtype!r}.")
        if self.compressor not in ("zstd", "none"):
            raise ConfigError(
                f"generate.compressor must be 'zstd' or 'none', got {self.compressor!r}."
            )
        for name in ("values_dim", "queries", "sinks", "recency_freqs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"generate.{name} must be >= 0, got {getattr(self, name)}.")
        if self.sinks > self.n:
            raise ConfigError(f"generate.sinks must be <= n, got {self.sinks}.")
        if 2 * self.recency_freqs > self.d and self.recency > 0:
            raise ConfigError("generate.recency_freqs must be <= d / 2 when recency > 0.")
        if not 0 <= self.sink_query_fraction <= 1:
            raise ConfigError("generate.sink_query_fraction must be in [0, 1].")


#: Optional fields: left out of the recorded spec while at their defaults, so stores
#: generated before these fields existed still match ``ensure_store``.
_OPTIONAL_DEFAULTS = {
    "values_dim": 0,
    "queries": 0,
    "query_logit_std": 2.0,
    "sinks": 0,
    "sink_norm_ratio": 0.5,
    "sink_logit": 0.0,
    "sink_query_fraction": 0.8,
    "recency": 0.0,
    "recency_freqs": 8,
}


def spec_record(spec: SyntheticSpec) -> dict[str, Any]:
    """The spec as recorded in the store (optional fields only when not at default)."""
    return {
        k: v
        for k, v in asdict(spec).items()
        if k not in _OPTIONAL_DEFAULTS or v != _OPTIONAL_DEFAULTS[k]
    }


def _attention_model(spec: SyntheticSpec, model: dict[str, np.ndarray]) -> dict[str, Any]:
    """Sink direction, positional basis, frequencies (own RNG stream: keys unchanged).

    The sink direction u is orthogonal to μ, the signal loadings and the positional basis
    where d allows, so ordinary keys have only noise along u.
    """
    rng = np.random.default_rng([spec.seed, 2**31 + 2])
    d, f = spec.d, spec.recency_freqs
    u = rng.standard_normal(d)
    basis = np.linalg.qr(rng.standard_normal((d, max(2 * f, 1))))[0][:, : 2 * f]
    parts = [model["mu"][:, None], model["loadings"], basis if spec.recency > 0 else basis[:, :0]]
    span = np.hstack(parts)
    if span.shape[1] < d:
        qs = np.linalg.qr(span)[0]
        u -= qs @ (qs.T @ u)
    u /= np.linalg.norm(u)
    omegas = np.geomspace(1.0, 1.0 / max(spec.n, 2), f) if f else np.zeros(0)
    beta = 1.0 / np.sqrt(d)
    # beta * (a q_pos) . (a k_pos) = recency * mean_m cos(omega_m (i - j))
    amp = np.sqrt(spec.recency / beta) if spec.recency > 0 else 0.0
    typical = _typical(spec, model["loadings"])
    return {"u": u, "basis": basis, "omegas": omegas, "amp": amp, "typical": typical}


def _positional(spec: SyntheticSpec, model: dict, positions: np.ndarray) -> np.ndarray:
    """Rotary-like features a · B [cos(ω p), sin(ω p)] / √F for the given positions."""
    f = spec.recency_freqs
    angles = np.outer(positions.astype(np.float64), model["omegas"])
    feats = np.hstack([np.cos(angles), np.sin(angles)]) / np.sqrt(f)
    return model["amp"] * feats @ model["basis"].T


def synthetic_queries(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """The ``queries`` (s × d) and their sorted ``query_positions`` in [0, n)."""
    model = _model(spec)
    att = _attention_model(spec, model)
    rng = np.random.default_rng([spec.seed, 2**31 + 3])
    s, beta = spec.queries, 1.0 / np.sqrt(spec.d)
    positions = np.sort(rng.integers(0, spec.n, size=s)).astype(np.int64)
    a = model["loadings"]
    gram = a.T @ a
    # q = A w with w ~ N(0, c^2 I): Var(beta q.(k - mu)) = beta^2 c^2 ||A^T A||_F^2.
    c = spec.query_logit_std / (beta * max(np.linalg.norm(gram), 1e-12))
    q = rng.standard_normal((s, spec.rank)) @ a.T * c
    if spec.sinks:
        # q += g u with g such that beta q.(k_sink - mu) = log(n) + sink_logit (u is
        # orthogonal to mu; k_sink = r u).
        r = spec.sink_norm_ratio * att["typical"]
        aligned = rng.random(s) < spec.sink_query_fraction
        bonus = np.log(spec.n) + spec.sink_logit
        g = (bonus / beta + q @ model["mu"] - r * (q @ att["u"])) / r
        q += np.outer(aligned * g, att["u"])
    if spec.recency > 0:
        q += _positional(spec, att, positions)
    return q, positions


def _typical(spec: SyntheticSpec, loadings: np.ndarray) -> float:
    return float(np.sqrt((loadings**2).sum() + spec.noise**2 * spec.d))


def _model(spec: SyntheticSpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([spec.seed, 2**31])
    d, r = spec.d, spec.rank
    loadings = rng.standard_normal((d, r)) / np.sqrt(max(r, 1)) if r else np.zeros((d, 0))
    typical = np.sqrt((loadings**2).sum() + spec.noise**2 * d)
    mu = rng.standard_normal(d)
    mu *= spec.offset_ratio * typical / np.linalg.norm(mu)
    positions = np.sort(rng.choice(spec.n, size=spec.outliers, replace=False)).astype(np.int64)
    directions = rng.standard_normal((spec.outliers, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return {
        "loadings": loadings,
        "mu": mu,
        "outlier_positions": positions,
        "outlier_rows": mu + spec.outlier_scale * typical * directions,
    }


def synthetic_rows(spec: SyntheticSpec, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of the store, where ``start`` is a multiple of chunk_rows."""
    model = _model(spec)
    out = []
    for c0 in range(start, stop, spec.chunk_rows):
        c1 = min(c0 + spec.chunk_rows, stop, spec.n)
        rng = np.random.default_rng([spec.seed, c0 // spec.chunk_rows])
        z = rng.standard_normal((c1 - c0, spec.rank))
        rows = model["mu"] + z @ model["loadings"].T
        rows += spec.noise * rng.standard_normal((c1 - c0, spec.d))
        pos = model["outlier_positions"]
        hit = (pos >= c0) & (pos < c1)
        if spec.recency > 0 or spec.sinks:
            att = _attention_model(spec, model)
            if spec.recency > 0:
                rows += _positional(spec, att, np.arange(c0, c1))
            if spec.sinks and c0 < spec.sinks:
                k = min(spec.sinks, c1) - c0
                rows[:k] = spec.sink_norm_ratio * att["typical"] * att["u"]
        planted = model["outlier_rows"][hit]
        if spec.sinks:  # outliers are large but not aligned with the sink direction
            u = _attention_model(spec, model)["u"]
            planted = planted - np.outer(planted @ u, u)
        rows[pos[hit] - c0] = planted
        out.append(rows.astype(spec.dtype))
    return np.vstack(out)


def synthetic_values(spec: SyntheticSpec, start: int, stop: int) -> np.ndarray:
    """Value rows ``[start, stop)`` (Gaussian, own RNG stream per chunk)."""
    out = []
    for c0 in range(start, stop, spec.chunk_rows):
        c1 = min(c0 + spec.chunk_rows, stop, spec.n)
        rng = np.random.default_rng([spec.seed, c0 // spec.chunk_rows, 1])
        out.append(rng.standard_normal((c1 - c0, spec.values_dim)).astype(spec.dtype))
    return np.vstack(out)


def generate_store(path: str | Path, spec: SyntheticSpec, *, overwrite: bool = False) -> Path:
    """Write the synthetic store to ``path`` (a zarr group with ``keys``), atomically.

    With ``values_dim`` / ``queries`` set, the group also holds ``values`` (n × d_v),
    ``queries`` (s × d) and ``query_positions`` (s,, int64) arrays.
    """
    import zarr

    spec.check()
    path = Path(path)
    compressors: Any = None if spec.compressor == "none" else "auto"
    with atomic_dir(path, overwrite=overwrite) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        arr = group.create_array(
            "keys",
            shape=(spec.n, spec.d),
            dtype=spec.dtype,
            chunks=(spec.chunk_rows, spec.d),
            compressors=compressors,
        )
        vals = None
        if spec.values_dim:
            vals = group.create_array(
                "values",
                shape=(spec.n, spec.values_dim),
                dtype=spec.dtype,
                chunks=(spec.chunk_rows, spec.values_dim),
                compressors=compressors,
            )
        for c0 in range(0, spec.n, spec.chunk_rows):
            c1 = min(c0 + spec.chunk_rows, spec.n)
            arr[c0:c1] = synthetic_rows(spec, c0, c1)
            if vals is not None:
                vals[c0:c1] = synthetic_values(spec, c0, c1)
        if spec.queries:
            q, qpos = synthetic_queries(spec)
            group.create_array("queries", data=q.astype(spec.dtype))
            group.create_array("query_positions", data=qpos)
        group.attrs.update(
            {
                "generator": "streamattn.synthetic",
                "spec": spec_record(spec),
                "planted_outliers": _model(spec)["outlier_positions"].tolist(),
            }
        )
    return path


def ensure_store(path: str | Path, spec: SyntheticSpec) -> tuple[Path, bool]:
    """Generate the store unless one with the same spec is cached at ``path``.

    Returns the path and whether it was generated now. A cached store made from other
    parameters is refused rather than silently reused or overwritten.
    """
    import zarr

    path = Path(path)
    if path.exists():
        try:
            cached = dict(zarr.open_group(str(path), mode="r").attrs).get("spec")
        except Exception:
            cached = None
        if cached != spec_record(spec):
            raise ConfigError(
                f"{path}: exists but was not generated from this generate spec; delete it or "
                "point input.path elsewhere."
            )
        return path, False
    return generate_store(path, spec), True


def head_spec(spec: SyntheticSpec, layer: int, head: int, heads: int) -> SyntheticSpec:
    """The single-head spec of (layer, head) in a synthetic KV cache (its own seed)."""
    return replace(spec, seed=spec.seed * 1_000_003 + layer * heads + head + 1)


def generate_kv_store(
    path: str | Path,
    spec: SyntheticSpec,
    *,
    layers: int,
    heads: int,
    overwrite: bool = False,
) -> Path:
    """A synthetic multi-layer, multi-head KV cache, written atomically.

    Layout (what ``streamattn.sources.kvcache.open_kv`` reads): a zarr group with arrays
    ``keys/layer_{l}`` of shape ``(n, heads·d)`` (chunks ``(chunk_rows, heads·d)``),
    columns ``[h·d, (h+1)·d)`` holding head ``h``: the single-head store of
    ``head_spec(spec, l, h, heads)`` (``d = spec.d`` is d_head; each head has its own
    offset, low-rank structure and planted outliers). With ``values_dim`` > 0 also
    ``values/layer_{l}`` of shape ``(n, heads·values_dim)``. The group's ``heads``
    attribute declares the split.
    """
    import zarr

    spec.check()
    for name, value in (("layers", layers), ("heads", heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"generate --{name} must be an integer >= 1, got {value!r}.")
    compressors: Any = None if spec.compressor == "none" else "auto"
    specs = [[head_spec(spec, lay, h, heads) for h in range(heads)] for lay in range(layers)]
    with atomic_dir(path, overwrite=overwrite) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        kgroup = root.require_group("keys")
        kgroup.attrs.update({"heads": heads})
        vgroup = root.require_group("values") if spec.values_dim else None
        for lay in range(layers):
            width = heads * spec.d
            karr = kgroup.create_array(
                f"layer_{lay}", shape=(spec.n, width), dtype=spec.dtype,
                chunks=(spec.chunk_rows, width), compressors=compressors,
            )
            varr = None
            if vgroup is not None:
                vwidth = heads * spec.values_dim
                varr = vgroup.create_array(
                    f"layer_{lay}", shape=(spec.n, vwidth), dtype=spec.dtype,
                    chunks=(spec.chunk_rows, vwidth), compressors=compressors,
                )
            for c0 in range(0, spec.n, spec.chunk_rows):
                c1 = min(c0 + spec.chunk_rows, spec.n)
                karr[c0:c1] = np.hstack([synthetic_rows(s, c0, c1) for s in specs[lay]])
                if varr is not None:
                    varr[c0:c1] = np.hstack([synthetic_values(s, c0, c1) for s in specs[lay]])
        root.attrs.update(
            {
                "generator": "streamattn.synthetic.generate_kv_store",
                "spec": spec_record(spec),
                "layers": layers,
                "heads": heads,
                "layout": "keys/layer_{l}: (n, heads*d_head)",
            }
        )
    return Path(path)
