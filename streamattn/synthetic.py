"""Deterministic synthetic key stores with the structure of real attention keys.

Model: k_j = μ + A z_j + σ g_j for ordinary keys, with a common offset μ (‖μ‖ about
``offset_ratio`` times the typical centred key norm; real keys sit far from the origin),
a rank-``rank`` signal A z_j (z_j ~ N(0, I)), isotropic noise σ g_j, and ``outliers``
planted keys k_j = μ + s·u_j along random unit directions u_j with ‖s·u_j‖ several times
the typical norm: keys that any universal set must contain.

Rows are generated chunk by chunk from ``numpy.random.default_rng([seed, chunk])``, so
the store is a pure function of the parameters and generation needs memory for one
chunk only, whatever n is. The store is a zarr group with a ``keys`` array; its
attributes record the parameters and the planted outlier indices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.errors import ConfigError
from streamattn.outputs import atomic_dir


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
        rows[pos[hit] - c0] = model["outlier_rows"][hit]
        out.append(rows.astype(spec.dtype))
    return np.vstack(out)


def generate_store(path: str | Path, spec: SyntheticSpec, *, overwrite: bool = False) -> Path:
    """Write the synthetic store to ``path`` (a zarr group with ``keys``), atomically."""
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
        for c0 in range(0, spec.n, spec.chunk_rows):
            c1 = min(c0 + spec.chunk_rows, spec.n)
            arr[c0:c1] = synthetic_rows(spec, c0, c1)
        group.attrs.update(
            {
                "generator": "streamattn.synthetic",
                "spec": asdict(spec),
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
        if cached != asdict(spec):
            raise ConfigError(
                f"{path}: exists but was not generated from this generate spec; delete it or "
                "point input.path elsewhere."
            )
        return path, False
    return generate_store(path, spec), True
