"""Key sources generated on the fly from a seed, block by block (no n-sized array).

A ``RowGenerator`` produces the rows of generator chunk c (rows [c·G, (c+1)·G), G =
``chunk_rows``) from ``numpy.random.default_rng([seed, c])`` only, so the content of row j
is a pure function of (seed, j): every read chunking, every prefix length and every
rerun sees the same rows. ``GeneratedSource`` is a ``KeySource`` over a lazy array that
generates the chunks a read covers, so it streams through ``run_operators`` like a store
on disk, with the same validation, and memory for one read block only.

Two generators: ``GaussianRows`` (k_j ~ N(0, σ_k² I_d), the model of docs/architecture.md, note
2.9) and ``SyntheticRows`` (the rows of ``streamattn.synthetic``, identical to the store that
``streamattn generate`` writes for the same spec, so a generated pass and a pass over the
written store can be compared bit for bit).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from streamattn.errors import ConfigError
from streamattn.sources import KeySource
from streamattn.synthetic import SyntheticSpec, synthetic_rows


class RowGenerator(Protocol):
    """Rows of a key matrix, generated per chunk of ``chunk_rows`` rows."""

    @property
    def n(self) -> int: ...
    @property
    def d(self) -> int: ...
    @property
    def chunk_rows(self) -> int: ...
    @property
    def dtype(self) -> str: ...

    def chunk(self, c: int) -> np.ndarray:
        """Rows [c·chunk_rows, min((c+1)·chunk_rows, n)), from (seed, c) only."""
        ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class GaussianRows:
    """k_j ~ N(0, σ_k² I_d) i.i.d.; chunk c from ``default_rng([seed, c])``."""

    n: int
    d: int
    sigma_k: float = 1.0
    seed: int = 0
    chunk_rows: int = 16384
    dtype: str = "float64"

    def __post_init__(self) -> None:
        for name in ("n", "d", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not self.sigma_k > 0:
            raise ConfigError(f"sigma_k must be > 0, got {self.sigma_k}.")

    def chunk(self, c: int) -> np.ndarray:
        a = c * self.chunk_rows
        b = min(a + self.chunk_rows, self.n)
        rng = np.random.default_rng([self.seed, c])
        rows = rng.standard_normal((b - a, self.d))
        if self.sigma_k != 1.0:
            rows *= self.sigma_k
        return rows.astype(self.dtype, copy=False)

    def describe(self) -> dict[str, Any]:
        return {"generator": "gaussian", "n": self.n, "d": self.d, "sigma_k": self.sigma_k,
                "seed": self.seed, "chunk_rows": self.chunk_rows, "dtype": self.dtype}


@dataclass(frozen=True)
class SyntheticRows:
    """The rows of the ``streamattn.synthetic`` store of ``spec`` (chunk = its chunk)."""

    spec: SyntheticSpec

    @property
    def n(self) -> int:
        return self.spec.n

    @property
    def d(self) -> int:
        return self.spec.d

    @property
    def chunk_rows(self) -> int:
        return self.spec.chunk_rows

    @property
    def dtype(self) -> str:
        return self.spec.dtype

    def chunk(self, c: int) -> np.ndarray:
        a = c * self.chunk_rows
        return synthetic_rows(self.spec, a, min(a + self.chunk_rows, self.n))

    def describe(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"generator": "synthetic", **asdict(self.spec)}


class GeneratedArray:
    """A read-only (n, d) array-like whose row slices are generated on demand.

    ``seconds`` accumulates the time spent generating (the "raw read" of a generator).
    """

    def __init__(self, gen: RowGenerator) -> None:
        self.gen = gen
        self.shape = (int(gen.n), int(gen.d))
        self.dtype = np.dtype(gen.dtype)
        self.chunks = (int(gen.chunk_rows), int(gen.d))
        self.seconds = 0.0
        self._lock = threading.Lock()

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a generated array supports row slices a:b only")
        start, stop, _ = key.indices(self.shape[0])
        t0 = time.perf_counter()
        g = self.gen.chunk_rows
        out = np.empty((max(stop - start, 0), self.shape[1]), dtype=self.dtype)
        for c in range(start // g, (stop - 1) // g + 1 if stop > start else 0):
            a, b = max(start, c * g), min(stop, (c + 1) * g)
            out[a - start : b - start] = self.gen.chunk(c)[a - c * g : b - c * g]
        with self._lock:
            self.seconds += time.perf_counter() - t0
        return out


class GeneratedSource(KeySource):
    """A ``KeySource`` whose rows are generated from a seed as they are read."""

    def __init__(self, gen: RowGenerator, *, label: str | None = None) -> None:
        self.array = GeneratedArray(gen)
        super().__init__(self.array, label=label or f"<generated {gen.describe()['generator']}>")
        self.generator = gen

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "generated": self.generator.describe()}
