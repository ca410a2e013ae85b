"""Reduced embeddings Y = K S: seeded oblivious sketches, data-aware maps, and their operators.

Mathematics (docs/architecture.md, note 2.4). For a map S ∈ R^{d×m} the reduced keys are Y = K S
and queries use the same map, so logits become (Sᵀq)·(Sᵀk) = qᵀ S Sᵀ k. The oblivious maps satisfy
E[S Sᵀ] = I:

- ``gaussian``: S_ij ~ N(0, 1/m) i.i.d.
- ``sparse-sign``: each row of S (one input coordinate) has ``s = min(sparsity, m)``
  non-zeros ±1/√s in distinct columns (OSNAP / sparse JL; s = 1 is CountSketch).
- ``srht``: S = (1/√m) D H P on the input padded to d' = 2^⌈log2 d⌉ (D random signs, H the
  unnormalised Sylvester–Hadamard matrix applied by a fast Walsh–Hadamard transform,
  P the selection of m of the d' columns without replacement).

JL guarantee (proved for ``gaussian``, Dasgupta–Gupta + polarisation): for fixed vectors q, k,
P(|⟨Sᵀq, Sᵀk⟩ − ⟨q, k⟩| > ε‖q‖‖k‖) ≤ 4 exp(−m(ε²/2 − ε³/3)/2), so for all P pairs at once
with probability ≥ 1 − δ whenever m(ε²/2 − ε³/3)/2 ≥ log(4P/δ); in particular
m = 6 ε⁻² log(4P/δ) suffices for ε ≤ 1/2, i.e. m = O(ε⁻² log(N/δ)) for N vectors.
``sparse-sign`` and ``srht`` satisfy bounds of the same form with other constants
(Kane–Nelson; Tropp's SRHT analysis adds a log(d/δ) factor); streamattn states the
Gaussian-form ε for them as a reference only and reports the *measured* errors.

Every oblivious map is a pure function of (method, d, m, seed, sparsity): its rows are
generated in blocks of ``MAP_BLOCK`` input coordinates from a Philox counter-based
generator keyed by ``SeedSequence([seed, method tag, block])``, so every worker and every
chunking builds the same S (no global RNG, no ``hash()``).

Chunking independence: Y's rows are bit-identical for every chunking of K. Dense maps are
applied in fixed tiles of ``TILE_ROWS`` rows aligned to global row indices (a block is
zero-padded to whole tiles), so every row is computed by a GEMM of the same shape at the
same position, whatever block it arrived in; the FWHT and sparse products are row-wise
with a fixed order of operations. (Same BLAS library and thread count assumed.)

Operators here:

- :class:`ProjectedEmbeddings`: per block Y_block = K_block S is written into a
  pre-created zarr array at its global rows (disjoint regions: any worker can write its
  own block); the *mergeable* state holds what is a monoid — the column sums (for the mean
  μ and the projected mean μᵀS) and a bottom-k sample of keys by a keyed hash of the row
  index (for the quality report).
- :class:`CentredFactor`: TSQR R factor of [1, K] (float64). Its first row is
  (±√n, ±√n μᵀ), and its trailing d × d block is the R factor of the centred keys K − 1μᵀ
  (the constant column is orthogonalised out first), so PCA needs no normal equations.
- :class:`KeyMean`: count and float64 column sums (the mean for Frequent Directions maps).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse

from streamattn.blas import single_blas_thread
from streamattn.errors import ConfigError
from streamattn.operators.factors import (
    CentredFactorResult,
    centred_factor_result,
    centred_factor_update,
    stack_qr,
)
from streamattn.operators.protocol import Operator, State
from streamattn.sources import Block

OBLIVIOUS_METHODS = ("gaussian", "sparse-sign", "srht")
DATA_AWARE_METHODS = ("pca", "frequent-directions")
METHODS = OBLIVIOUS_METHODS + DATA_AWARE_METHODS
#: Input coordinates per generated block of S (rows of S come from one keyed stream each).
MAP_BLOCK = 4096
#: Rows per GEMM tile; tiles are aligned to global row indices (chunking independence).
TILE_ROWS = 4096
_METHOD_TAG = {"gaussian": 1, "sparse-sign": 2, "srht": 3}
_U64 = np.uint64
_MASK = (1 << 64) - 1


# ---------------------------------------------------------------------- keyed randomness
def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic, vectorised)."""
    z = np.asarray(x, dtype=_U64) + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def keyed_hash(seed: int, stream: int, index: np.ndarray) -> np.ndarray:
    """A 64-bit hash of (seed, stream, index): a pure function, the same on every worker."""
    key = _splitmix64(np.array([(int(seed) * 0x2545F4914F6CDD1D + int(stream)) & _MASK]))
    return _splitmix64(np.asarray(index, dtype=np.int64).astype(_U64) ^ key[0])


def keyed_uniform(seed: int, stream: int, index: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) floats keyed by (seed, stream, index) (53 bits of ``keyed_hash``)."""
    return (keyed_hash(seed, stream, index) >> _U64(11)).astype(np.float64) * 2.0**-53


def _block_rng(seed: int, tag: int, block: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, tag, block])))


# ---------------------------------------------------------------------- validation
def check_map_params(m: Any, method: Any, seed: Any, d: int | None = None) -> None:
    """Validate (m, method, seed) at the boundary; ConfigError naming the bad setting."""
    if method not in METHODS:
        raise ConfigError(f"unknown reduce method {method!r}; choose one of {list(METHODS)}.")
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
        raise ConfigError(f"m (the embedding dimension) must be an integer, got {m!r}.")
    if m < 1:
        raise ConfigError(f"m (the embedding dimension) must be >= 1, got {m}.")
    if d is not None and m > d:
        raise ConfigError(
            f"m = {m} is larger than the key dimension d = {d}: the reduced embedding would "
            "be bigger than the keys and can only add error; use the keys themselves, or "
            f"choose m <= {d}."
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.")


# ---------------------------------------------------------------------- the maps
def next_pow2(d: int) -> int:
    return 1 << max(0, int(d - 1).bit_length())


def fwht(x: np.ndarray) -> np.ndarray:
    """Unnormalised fast Walsh–Hadamard transform of each row: x ↦ x H (Sylvester order).

    ``x`` has a power-of-two number of columns d'. The rows are transposed once so that
    each of the log2(d') butterfly passes — a reshape to (d'/2h, 2, h, rows), one add and
    one subtract — runs over long contiguous runs. Every element sees the same operations
    in the same order whatever the other rows are: the result of a row does not depend on
    the block it came in.
    """
    b, n = x.shape
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two width, got {n}")
    y = np.array(x.T, dtype=np.float64, order="C")
    h = 1
    while h < n:
        y = y.reshape(n // (2 * h), 2, h, b)
        top, bottom = y[:, 0], y[:, 1]
        y = np.stack([top + bottom, top - bottom], axis=1)
        h *= 2
    return np.ascontiguousarray(y.reshape(n, b).T)


def srht_apply(x: np.ndarray, signs: np.ndarray, cols: np.ndarray, m: int) -> np.ndarray:
    """x S for S = D H P / √m by the fast transform: pad to d', sign, FWHT, select, scale."""
    padded = np.zeros((x.shape[0], signs.size))
    padded[:, : x.shape[1]] = x * signs[: x.shape[1]]
    return fwht(padded)[:, cols] / np.sqrt(m)


@functools.lru_cache(maxsize=16)
def _gaussian(d: int, m: int, seed: int) -> np.ndarray:
    blocks = [
        _block_rng(seed, _METHOD_TAG["gaussian"], i).standard_normal((min(MAP_BLOCK, d - a), m))
        for i, a in enumerate(range(0, d, MAP_BLOCK))
    ]
    s = np.vstack(blocks) / np.sqrt(m)
    s.flags.writeable = False
    return s


@functools.lru_cache(maxsize=16)
def _sparse_sign(d: int, m: int, seed: int, sparsity: int) -> scipy.sparse.csr_matrix:
    """Sᵀ (m × d, CSR): row i of S has s non-zeros ±1/√s at distinct columns."""
    s = min(sparsity, m)
    cols, signs = [], []
    for i, a in enumerate(range(0, d, MAP_BLOCK)):
        rows = min(MAP_BLOCK, d - a)
        rng = _block_rng(seed, _METHOD_TAG["sparse-sign"], i)
        keys = rng.random((rows, m))
        cols.append(
            np.argpartition(keys, s - 1, axis=1)[:, :s]
            if s < m
            else np.tile(np.arange(m), (rows, 1))
        )
        signs.append(rng.integers(0, 2, size=(rows, s)) * 2.0 - 1.0)
    col = np.vstack(cols).ravel()
    row = np.repeat(np.arange(d), s)
    val = np.vstack(signs).ravel() / np.sqrt(s)
    return scipy.sparse.csr_matrix((val, (col, row)), shape=(m, d))


@functools.lru_cache(maxsize=16)
def _srht(d: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(signs over d' coordinates, m selected Hadamard columns, sorted)."""
    dp = next_pow2(d)
    tag = _METHOD_TAG["srht"]
    signs = np.concatenate(
        [
            _block_rng(seed, tag, i).integers(0, 2, size=min(MAP_BLOCK, dp - a)) * 2.0 - 1.0
            for i, a in enumerate(range(0, dp, MAP_BLOCK))
        ]
    )
    cols = np.sort(_block_rng(seed, tag, -1 % 2**32).choice(dp, size=m, replace=False))
    signs.flags.writeable = False
    cols.flags.writeable = False
    return signs, cols


@functools.lru_cache(maxsize=16)
def _srht_dense(d: int, m: int, seed: int) -> np.ndarray:
    """The explicit SRHT matrix D H P / √m restricted to the first d rows (d × m)."""
    import scipy.linalg

    signs, cols = _srht(d, m, seed)
    s = signs[:d, None] * scipy.linalg.hadamard(next_pow2(d))[:d][:, cols] / np.sqrt(m)
    s.flags.writeable = False
    return s


@dataclass(frozen=True)
class ProjectionMap:
    """A linear map S ∈ R^{d×m}: Y = K S for keys, Sᵀq for queries.

    Oblivious maps are regenerated from (method, d, m, seed, sparsity); data-aware maps
    (``pca``, ``frequent-directions``) carry their explicit ``matrix``.
    """

    method: str
    d: int
    m: int
    seed: int = 0
    sparsity: int = 4
    matrix: np.ndarray | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_map_params(self.m, self.method, self.seed, self.d)
        if self.method in DATA_AWARE_METHODS:
            if self.matrix is None or self.matrix.shape != (self.d, self.m):
                raise ConfigError(
                    f"a {self.method} map needs its explicit d x m matrix ({self.d} x {self.m})."
                )
        elif self.matrix is not None:
            raise ConfigError(f"{self.method} maps are generated from the seed; drop matrix=.")
        if (
            isinstance(self.sparsity, bool)
            or not isinstance(self.sparsity, int)
            or (self.sparsity < 1)
        ):
            raise ConfigError(f"sparsity must be an integer >= 1, got {self.sparsity!r}.")

    def dense(self) -> np.ndarray:
        """The explicit d × m matrix S (float64); for tests and for saving with outputs."""
        if self.method == "gaussian":
            return np.array(_gaussian(self.d, self.m, self.seed))
        if self.method == "sparse-sign":
            return _sparse_sign(self.d, self.m, self.seed, self.sparsity).T.toarray()
        if self.method == "srht":
            return np.array(_srht_dense(self.d, self.m, self.seed))
        assert self.matrix is not None
        return np.array(self.matrix, dtype=np.float64)

    def apply(self, x: np.ndarray, start: int = 0) -> np.ndarray:
        """Y = x S in float64 for rows at global indices ``start ..``; row-wise deterministic."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ConfigError(f"expected rows of dimension d = {self.d}, got shape {x.shape}.")
        if self.method in ("sparse-sign", "srht") and not (
                self.method == "srht" and not self.uses_fwht):
            x = np.asarray(x, dtype=np.float64)
        if self.method == "sparse-sign":
            st = _sparse_sign(self.d, self.m, self.seed, self.sparsity)
            return np.ascontiguousarray((st @ x.T).T)
        if self.method == "srht" and self.uses_fwht:
            return srht_apply(x, *_srht(self.d, self.m, self.seed), self.m)
        if self.method == "srht":
            s = _srht_dense(self.d, self.m, self.seed)
        elif self.method == "gaussian":
            s = _gaussian(self.d, self.m, self.seed)
        else:
            assert self.matrix is not None
            s = self.matrix
        return tiled_matmul(x, np.ascontiguousarray(s, dtype=np.float64), start)

    @property
    def uses_fwht(self) -> bool:
        """SRHT by the fast transform only when it wins: m > 64·log2(d') (measured).

        The FWHT costs log2(d') numpy passes over the padded rows, a GEMM with the explicit
        d × m matrix about d·m BLAS flops per row; both are row-wise deterministic and
        agree to rounding (tested). The choice depends on (d, m) only, never on a block.
        """
        return self.method == "srht" and self.m > 64 * max(1, next_pow2(self.d).bit_length() - 1)

    def project_queries(self, q: np.ndarray) -> np.ndarray:
        """Sᵀq for each row of ``q`` (s × d → s × m, float64): logits ≈ (Sᵀq)·y_j."""
        return self.apply(np.atleast_2d(np.asarray(q, dtype=np.float64)))

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "d": self.d, "m": self.m}
        if self.method in OBLIVIOUS_METHODS:
            out["seed"] = self.seed
            out["regenerate"] = (
                "streamattn.operators.projection.ProjectionMap(method, d, m, seed, sparsity)"
            )
        if self.method == "sparse-sign":
            out["sparsity"] = min(self.sparsity, self.m)
        if self.method == "srht":
            out["padded_d"] = next_pow2(self.d)
        return out


def tiled_matmul(x: np.ndarray, s: np.ndarray, start: int, tile: int = TILE_ROWS) -> np.ndarray:
    """x @ s computed in GEMMs of fixed shape (tile × d) aligned to global row ``start``.

    Whole tiles inside the block are multiplied in place (a batched ``matmul``: one GEMM per
    tile); the partial tiles at the block's ends are zero-padded to a whole tile with the
    rows at their global offsets. Every row is thus computed by a GEMM of the same shape at
    the same position, so its arithmetic does not depend on the block.
    """
    b, d = x.shape
    out = np.empty((b, s.shape[1]))
    # head: rows up to the first tile boundary; body: whole tiles (no copy); tail: the rest
    head = min(b, (-start) % tile)
    body = (b - head) // tile * tile
    for a, z in ((0, head), (head + body, b)):
        if z > a:
            lo = (start + a) % tile
            buf = np.zeros((tile, d))
            buf[lo : lo + z - a] = x[a:z]
            out[a:z] = np.matmul(buf.reshape(1, tile, d), s)[0, lo : lo + z - a]
    if body and x.dtype == np.float64:
        whole = np.ascontiguousarray(x[head : head + body]).reshape(-1, tile, d)
        out[head : head + body] = np.matmul(whole, s).reshape(body, s.shape[1])
    elif body:  # other dtypes: converted one tile at a time (exact), the same GEMM per tile
        piece = np.empty((tile, d))
        for a in range(head, head + body, tile):
            np.copyto(piece, x[a : a + tile], casting="safe")
            np.matmul(piece, s, out=out[a : a + tile])
    return out


def jl_epsilon(m: int, pairs: int, delta: float) -> float | None:
    """Smallest ε ≤ 1 with m(ε²/2 − ε³/3)/2 ≥ log(4·pairs/δ) (the Gaussian JL bound), or None.

    With probability ≥ 1 − δ, every one of ``pairs`` fixed (q, k) pairs has
    |⟨Sᵀq, Sᵀk⟩ − ⟨q, k⟩| ≤ ε‖q‖‖k‖ for a Gaussian S with m columns.
    """
    need = np.log(4.0 * max(pairs, 1) / delta)
    if m * (1 / 2 - 1 / 3) / 2 < need:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if m * (mid**2 / 2 - mid**3 / 3) / 2 >= need:
            hi = mid
        else:
            lo = mid
    return hi


# ---------------------------------------------------------------------- operators
@dataclass(frozen=True)
class ProjectionSpec:
    """One oblivious or explicit map, where to write Y, and the key sample size.

    ``out_path`` is a zarr array of shape (n, m) created beforehand ("" writes nothing);
    ``matrix`` is the explicit map for data-aware methods (None for oblivious ones).
    """

    method: str
    d: int
    m: int
    seed: int = 0
    sparsity: int = 4
    matrix: np.ndarray | None = None
    out_path: str = ""
    sample_keys: int = 2048

    def projection_map(self) -> ProjectionMap:
        return ProjectionMap(self.method, self.d, self.m, self.seed, self.sparsity, self.matrix)


@dataclass(frozen=True)
class ProjectionSummary:
    """The mergeable part of a projection pass.

    Attributes
    ----------
    n : rows folded
    mean : μ, the mean key (float64, d)
    mu_s : μᵀS (float64, m): centred embeddings are Y − 1(μᵀS)
    sample_index, sample_rows : a uniform sample of ``sample_keys`` keys, chosen by the
        smallest keyed hash of the row index (the same sample for any chunking)
    projection_map : the map S
    """

    n: int
    mean: np.ndarray
    mu_s: np.ndarray
    sample_index: np.ndarray
    sample_rows: np.ndarray
    projection_map: ProjectionMap


class ProjectedEmbeddings(Operator[ProjectionSpec, ProjectionSummary]):
    """Y = K S written block by block; mean and a key sample kept as the mergeable state.

    ``update`` writes Y_block = K_block S into rows [start, stop) of ``spec.out_path`` (a
    side effect on disjoint regions; idempotent, so re-running a block rewrites the same
    values) and folds the column sums and the key sample. Memory: O(d·m + sample_keys·d).
    """

    family = "projection"
    concurrent_updates = True
    Spec = ProjectionSpec

    def __init__(self, spec: ProjectionSpec) -> None:
        super().__init__(spec)
        self.map = spec.projection_map()
        self.col_sum = np.zeros(spec.d)
        self.sample_index = np.zeros(0, dtype=np.int64)
        self.sample_prio = np.zeros(0, dtype=np.uint64)
        self.sample_rows = np.zeros((0, spec.d))
        self._out: Any = None

    def _target(self) -> Any:
        if self._out is None:
            import zarr

            self._out = zarr.open_array(self.spec.out_path, mode="r+")
        return self._out

    def _keep_sample(self, idx: np.ndarray, prio: np.ndarray, rows: np.ndarray) -> None:
        order = np.lexsort((idx, prio))[: self.spec.sample_keys]
        order = order[np.argsort(idx[order], kind="stable")]
        self.sample_index, self.sample_prio, self.sample_rows = idx[order], prio[order], rows[order]

    def _update(self, block: Block) -> None:
        """Y for the block (BLAS on one thread, float64 tiles converted one at a time), the
        column sums (float64 accumulation of the block's own dtype, no float64 copy of the
        block) and the bottom-k sample rows."""
        x = block.rows
        if self.spec.out_path:
            with single_blas_thread():
                y = self.map.apply(x, block.start)
            target = self._target()
            target[block.start : block.stop] = y.astype(target.dtype)
        self.col_sum = self.col_sum + np.add.reduce(x, axis=0, dtype=np.float64)
        idx = np.arange(block.start, block.stop, dtype=np.int64)
        prio = keyed_hash(self.spec.seed, 0x5A4D, idx)
        k = self.spec.sample_keys
        if idx.size > k:  # only rows that can enter the bottom-k are copied
            cut = np.partition(prio, k - 1)[k - 1]
            sel = np.flatnonzero(prio <= cut)
            idx, prio, x = idx[sel], prio[sel], x[sel]
        self._keep_sample(
            np.concatenate([self.sample_index, idx]),
            np.concatenate([self.sample_prio, prio]),
            np.vstack([self.sample_rows, np.asarray(x, dtype=np.float64)]),
        )

    def _merge(self, other: ProjectedEmbeddings) -> None:
        self.col_sum = self.col_sum + other.col_sum
        self._keep_sample(
            np.concatenate([self.sample_index, other.sample_index]),
            np.concatenate([self.sample_prio, other.sample_prio]),
            np.vstack([self.sample_rows, other.sample_rows]),
        )

    def _state(self) -> State:
        return {
            "col_sum": self.col_sum,
            "sample_index": self.sample_index,
            "sample_prio": self.sample_prio,
            "sample_rows": self.sample_rows,
        }

    def _load(self, state: State) -> None:
        self.col_sum = np.array(state["col_sum"], dtype=np.float64)
        self.sample_index = np.array(state["sample_index"], dtype=np.int64)
        self.sample_prio = np.array(state["sample_prio"], dtype=np.uint64)
        self.sample_rows = np.array(state["sample_rows"], dtype=np.float64)

    def result(self) -> ProjectionSummary:
        n = self.n_rows
        mean = self.col_sum / n if n else np.zeros(self.spec.d)
        mu_s = self.map.apply(mean[None, :])[0]
        return ProjectionSummary(
            n, mean, mu_s, self.sample_index.copy(), self.sample_rows.copy(), self.map
        )

    def nbytes_bound(self, d: int) -> int:
        matrix = 0 if self.spec.method == "srht" else 8 * d * self.spec.m
        return matrix + 8 * (d + self.spec.sample_keys * (d + 2))


@dataclass(frozen=True)
class CentredFactorSpec:
    """TSQR of [1, K]; no parameters beyond the dimension check done by the source."""


class CentredFactor(Operator[CentredFactorSpec, CentredFactorResult]):
    """One-pass TSQR R factor of [1, K] (float64): the mean and the centred factor.

    R = qr([1, K]).R has first row (r₀₀, r₀₀ μᵀ) with |r₀₀| = √n, and its trailing block
    is the R factor of K − 1μᵀ: PCA of the centred keys without forming KᵀK.
    Memory: O(d²).
    """

    family = "centred-factor"
    Spec = CentredFactorSpec

    def __init__(self, spec: CentredFactorSpec) -> None:
        super().__init__(spec)
        self.r = np.zeros((0, 0))

    def _update(self, block: Block) -> None:
        self.r = centred_factor_update(self.r, block.rows)

    def _merge(self, other: CentredFactor) -> None:
        self.r = stack_qr(self.r, other.r)

    def _state(self) -> State:
        return {"r": self.r}

    def _load(self, state: State) -> None:
        self.r = np.array(state["r"], dtype=np.float64)

    def result(self) -> CentredFactorResult:
        return centred_factor_result(self.r, self.n_rows)

    def nbytes_bound(self, d: int) -> int:
        return 8 * 2 * (d + 1) ** 2


@dataclass(frozen=True)
class KeyMeanSpec:
    """Count and float64 column sums; no parameters."""


class KeyMean(Operator[KeyMeanSpec, dict[str, Any]]):
    """The mean key μ in one pass (float64 column sums). Memory: O(d)."""

    family = "key-mean"
    Spec = KeyMeanSpec

    def __init__(self, spec: KeyMeanSpec) -> None:
        super().__init__(spec)
        self.col_sum = np.zeros(0)

    def _update(self, block: Block) -> None:
        s = np.asarray(block.rows, dtype=np.float64).sum(axis=0)
        self.col_sum = s if self.col_sum.size == 0 else self.col_sum + s

    def _merge(self, other: KeyMean) -> None:
        self.col_sum = self.col_sum + other.col_sum

    def _state(self) -> State:
        return {"col_sum": self.col_sum}

    def _load(self, state: State) -> None:
        self.col_sum = np.array(state["col_sum"], dtype=np.float64)

    def result(self) -> dict[str, Any]:
        n = self.n_rows
        return {"n": n, "mean": self.col_sum / n if n else self.col_sum.copy()}

    def nbytes_bound(self, d: int) -> int:
        return 8 * d


def fd_principal_directions(
    sketch: np.ndarray, mean: np.ndarray, n: int, m: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-m eigenvectors of BᵀB − n μμᵀ (the FD estimate of the centred scatter).

    The estimate lives in span(rows of B, μ): with Q an orthonormal basis of that span
    (≤ ℓ + 1 columns) the d × d problem reduces to a small symmetric one. Returns the
    d × m map (sign-fixed) and the estimated eigenvalues (descending).
    """
    basis = np.linalg.qr(np.vstack([sketch, mean[None, :]]).T)[0]
    bq = sketch @ basis
    mq = basis.T @ mean
    small = bq.T @ bq - n * np.outer(mq, mq)
    w, e = np.linalg.eigh((small + small.T) / 2)
    order = np.argsort(w)[::-1]
    v = basis @ e[:, order[:m]]
    flip = np.sign(v[np.argmax(np.abs(v), axis=0), np.arange(v.shape[1])])
    return v * np.where(flip == 0, 1.0, flip), w[order]
