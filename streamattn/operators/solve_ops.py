"""Streaming passes of the kernel-regression solvers: one operator per pass kind.

Mathematics: docs/architecture.md, note 2.7.

Every pass over A ∈ R^{n×d} (and, where needed, b ∈ R^n streamed with it as the block's
value column) is one of these mergeable operators, run by ``streamattn.engines``:

- :class:`TallSkinnyQR`: the R factor of [A] or [A, b] by Householder TSQR in float64
  (``stack_qr`` of operators.factors, shared with the leverage operator:
  R ← qr([R; block]).R; merge stacks two factors).
  Never the normal equations. For [A, b] the last column gives Qᵀb and the least-squares
  residual ‖Aw* − b‖ = |R[d, d]|.
- :class:`RowSketch`: SA ∈ R^{m×d} for a seeded oblivious row sketch S ∈ R^{m×n}. Column j
  of S (the weight of row j) is a pure function of (method, seed, m, j) — keyed hashing, the
  same for every chunking and worker. ``gaussian``: N(0, 1/m) entries by Box–Muller from
  keyed uniforms; ``countsketch``: one ±1 in a keyed bucket; ``srht``: S = P H D/√m over
  n' = 2^⌈log2 n⌉ rows with H[p, j] = (−1)^{popcount(p & j)} evaluated per entry (an
  explicit m × block product, not the fast transform: O(m·n·d) flops like ``gaussian``).
- :class:`GramMatvec`: AᵀA V and the column norms ‖AV‖² for V ∈ R^{d×k}: one CG step.
- :class:`LeastSquaresResidual`: Aᵀ(Az − b), ‖Az − b‖² and ‖b‖² (b the value column).
- :class:`ExpKernelMatvec`: exp(β AAᵀ) V for V ∈ R^{n×k} without the n × n matrix: the
  streamed block A_J (columns J of the kernel) meets every row tile A_I of the row side
  held by the spec, and out[I] += exp(β A_I A_Jᵀ) V[J] tile by tile (tiles of at most
  ``tile × tile`` entries). Memory: the row side (n·d), V and the output (n·k each) and two
  tiles — O(n(d + k) + tile²), never n². I/O: one pass over A per product; the row side
  is the same A, read once by the caller (see ``streamattn.solve.attention_kernel``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse

from streamattn.errors import ConfigError
from streamattn.operators.factors import stack_qr
from streamattn.operators.projection import _block_rng, keyed_hash, keyed_uniform, next_pow2
from streamattn.operators.protocol import Operator, State
from streamattn.sources import Block

SKETCH_METHODS = ("gaussian", "srht", "countsketch")
#: Rows of A per generated piece of a dense sketch (bounds the m × rows weight matrix).
SKETCH_PIECE_ROWS = 4096
#: Default edge of an exp-kernel tile (tile × tile float64 entries, 8 MiB at 1024).
DEFAULT_TILE = 1024
_STREAM_GAUSS_U1, _STREAM_GAUSS_U2, _STREAM_BUCKET, _STREAM_SIGN = 101, 102, 103, 104


def _rows64(block: Block) -> np.ndarray:
    return np.asarray(block.rows, dtype=np.float64)


def _value_column(block: Block, family: str) -> np.ndarray:
    if block.values is None or block.values.shape[1] != 1:
        raise ConfigError(
            f"{family} needs b streamed with A as a single value column (one value per row)."
        )
    return np.asarray(block.values[:, 0], dtype=np.float64)


# ---------------------------------------------------------------------- TSQR
@dataclass(frozen=True)
class TallSkinnyQRSpec:
    """``with_rhs``: factor [A, b] (b the block's single value column) instead of A."""

    with_rhs: bool = False


class StackedQR(Operator):
    """Base of the operators whose state is one float64 TSQR factor R of the rows folded so
    far: rows are stacked under R and re-factored (Householder, ``stack_qr``), two states
    merge by factoring [R_a; R_b], and the result is R padded to a square with zero rows."""

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.r = np.zeros((0, 0))

    def _fold_rows(self, x: np.ndarray) -> None:
        self.r = stack_qr(x) if self.r.size == 0 else stack_qr(self.r, x)

    def _merge(self, other: StackedQR) -> None:
        self.r = stack_qr(self.r, other.r)

    def _state(self) -> State:
        return {"r": self.r}

    def _load(self, state: State) -> None:
        self.r = np.array(state["r"], dtype=np.float64)

    def _square(self, dim: int) -> np.ndarray:
        out = np.zeros((dim, dim))
        out[: self.r.shape[0]] = self.r
        return out


class TallSkinnyQR(StackedQR):
    """One-pass Householder TSQR of [A] or [A, b] in float64.

    The result R (square, upper triangular, (d + r) × (d + r), r = 1 with b) satisfies
    RᵀR = [A, b]ᵀ[A, b] up to the backward error of Householder QR: R is the exact factor
    of [A, b] + Δ with ‖Δ‖_F ≤ c·u·‖[A, b]‖_F (c grows with d and the number of merge
    levels), so cond(R) = cond([A, b]) — squaring is never done. Memory: O((d + 1)²).
    """

    family = "tsqr"
    Spec = TallSkinnyQRSpec
    spec: TallSkinnyQRSpec

    def _update(self, block: Block) -> None:
        x = _rows64(block)
        if self.spec.with_rhs:
            x = np.hstack([x, _value_column(block, self.family)[:, None]])
        self._fold_rows(x)

    def result(self) -> np.ndarray:
        """The square factor (zero rows appended when fewer rows than columns were seen)."""
        return self._square(self.r.shape[1])

    def nbytes_bound(self, d: int) -> int:
        dim = d + int(self.spec.with_rhs)
        return 8 * 3 * dim * dim


# ---------------------------------------------------------------------- row sketches
def srht_rows(n: int, m: int, seed: int) -> np.ndarray:
    """The m Hadamard rows P of the SRHT over n' = 2^⌈log2 n⌉ (sorted, a function of the seed)."""
    npad = next_pow2(n)
    if m > npad:
        raise ConfigError(f"an SRHT sketch has at most n' = {npad} rows; got m = {m}.")
    return np.sort(_block_rng(seed, 7, 0).choice(npad, size=m, replace=False)).astype(np.int64)


def sketch_weights(method: str, m: int, seed: int, n: int, index: np.ndarray) -> np.ndarray:
    """Columns ``index`` of the dense sketch S (m × len(index)), float64.

    Used for ``gaussian`` and ``srht``; a pure function of (method, m, seed, n, index).
    """
    index = np.asarray(index, dtype=np.int64)
    if method == "gaussian":
        flat = (index[None, :] * m + np.arange(m, dtype=np.int64)[:, None]).ravel()
        u1 = keyed_uniform(seed, _STREAM_GAUSS_U1, flat)
        u2 = keyed_uniform(seed, _STREAM_GAUSS_U2, flat)
        z = np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)
        return z.reshape(m, index.size) / np.sqrt(m)
    if method == "srht":
        rows = srht_rows(n, m, seed)
        signs = (keyed_hash(seed, _STREAM_SIGN, index) & np.uint64(1)).astype(np.float64)
        parity = np.bitwise_count(rows[:, None] & index[None, :]) & 1
        return (1.0 - 2.0 * parity) * (1.0 - 2.0 * signs)[None, :] / np.sqrt(m)
    raise ConfigError(f"no dense weights for sketch method {method!r}.")


def countsketch_map(m: int, seed: int, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bucket in [0, m), sign ±1) of each global row in ``index``."""
    index = np.asarray(index, dtype=np.int64)
    bucket = (keyed_hash(seed, _STREAM_BUCKET, index) % np.uint64(m)).astype(np.int64)
    sign = 1.0 - 2.0 * (keyed_hash(seed, _STREAM_SIGN, index) & np.uint64(1)).astype(np.float64)
    return bucket, sign


@dataclass(frozen=True)
class RowSketchSpec:
    """S ∈ R^{m×n} of ``method`` with ``seed``; ``n`` (the rows of A) fixes the SRHT padding."""

    method: str
    m: int
    seed: int
    n: int

    def __post_init__(self) -> None:
        if self.method not in SKETCH_METHODS:
            raise ConfigError(
                f"unknown sketch {self.method!r}; choose one of {list(SKETCH_METHODS)}."
            )
        if isinstance(self.m, bool) or not isinstance(self.m, (int, np.integer)) or self.m < 1:
            raise ConfigError(f"sketch size m must be an integer >= 1, got {self.m!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ConfigError(f"sketch seed must be an integer, got {self.seed!r}.")
        if self.seed < 0:
            raise ConfigError(f"sketch seed must be >= 0, got {self.seed}.")


class RowSketch(Operator):
    """SA for a seeded oblivious sketch S (E[SᵀS] = I), accumulated block by block.

    Subspace embedding (Gaussian, proved): with probability ≥ 1 − 2e^{−t²/2} every singular
    value of S U (U an orthonormal basis of range(A)) lies in [1 − √(d/m) − t/√m,
    1 + √(d/m) + t/√m], so with R = qr(SA).R, cond(A R⁻¹) ≤ (1 + √(d/m) + t/√m) /
    (1 − √(d/m) − t/√m). SRHT and CountSketch embed with m = O(d log d) and O(d²) rows
    (their own constants); streamattn reports the measured iteration counts for them.
    Memory: the m × d sketch and an m × SKETCH_PIECE_ROWS weight piece.
    """

    family = "row-sketch"
    Spec = RowSketchSpec
    spec: RowSketchSpec

    def __init__(self, spec: RowSketchSpec) -> None:
        super().__init__(spec)
        self.sa = np.zeros((0, 0))

    def _update(self, block: Block) -> None:
        x = _rows64(block)
        spec = self.spec
        out = np.zeros((spec.m, x.shape[1])) if self.sa.size == 0 else self.sa
        if spec.method == "countsketch":
            bucket, sign = countsketch_map(spec.m, spec.seed, np.arange(block.start, block.stop))
            s = scipy.sparse.csr_matrix(
                (sign, (bucket, np.arange(x.shape[0]))), shape=(spec.m, x.shape[0])
            )
            out += s @ x
        else:
            for a in range(0, x.shape[0], SKETCH_PIECE_ROWS):
                b = min(a + SKETCH_PIECE_ROWS, x.shape[0])
                idx = np.arange(block.start + a, block.start + b)
                out += sketch_weights(spec.method, spec.m, spec.seed, spec.n, idx) @ x[a:b]
        self.sa = out

    def _merge(self, other: RowSketch) -> None:
        self.sa = self.sa + other.sa

    def _state(self) -> State:
        return {"sa": self.sa}

    def _load(self, state: State) -> None:
        self.sa = np.array(state["sa"], dtype=np.float64)

    def result(self) -> np.ndarray:
        return self.sa.copy()

    def nbytes_bound(self, d: int) -> int:
        piece = SKETCH_PIECE_ROWS if self.spec.method != "countsketch" else 0
        return 8 * (2 * self.spec.m * d + 3 * self.spec.m * piece)


# ---------------------------------------------------------------------- Gram matvec
@dataclass(frozen=True)
class GramMatvecSpec:
    """V ∈ R^{d×k}: the pass returns AᵀA V (d × k) and ‖A V_{:,i}‖² (k)."""

    v: np.ndarray


class GramMatvec(Operator):
    """AᵀA V = Σ_blocks A_Bᵀ (A_B V) in float64, and the squared norms of the columns of AV.

    The Gram matrix is never formed: each block costs two GEMMs with the k columns of V.
    Memory: O(d·k).
    """

    family = "gram-matvec"
    Spec = GramMatvecSpec
    spec: GramMatvecSpec

    def __init__(self, spec: GramMatvecSpec) -> None:
        super().__init__(spec)
        self.atav = np.zeros((0, 0))
        self.norms = np.zeros(0)

    def _update(self, block: Block) -> None:
        x = _rows64(block)
        av = x @ self.spec.v
        atav = x.T @ av
        norms = np.einsum("ij,ij->j", av, av)
        if self.atav.size == 0:
            self.atav, self.norms = atav, norms
        else:
            self.atav += atav
            self.norms += norms

    def _merge(self, other: GramMatvec) -> None:
        self.atav = self.atav + other.atav
        self.norms = self.norms + other.norms

    def _state(self) -> State:
        return {"atav": self.atav, "norms": self.norms}

    def _load(self, state: State) -> None:
        self.atav = np.array(state["atav"], dtype=np.float64)
        self.norms = np.array(state["norms"], dtype=np.float64)

    def result(self) -> dict[str, np.ndarray]:
        return {"atav": self.atav.copy(), "av_norm_sq": self.norms.copy()}

    def nbytes_bound(self, d: int) -> int:
        k = self.spec.v.shape[1]
        return 8 * (self.spec.v.size + 3 * d * k + 2 * k)


# ---------------------------------------------------------------------- LS residual
@dataclass(frozen=True)
class LeastSquaresResidualSpec:
    """z ∈ R^d: the pass returns Aᵀ(Az − b), ‖Az − b‖² and ‖b‖² (b the value column)."""

    z: np.ndarray


class LeastSquaresResidual(Operator):
    """r = Az − b block by block (b streamed with A): Aᵀr, ‖r‖², ‖b‖². Memory: O(d).

    With z = 0 the pass gives −Aᵀb and ‖b‖².
    """

    family = "ls-residual"
    Spec = LeastSquaresResidualSpec
    spec: LeastSquaresResidualSpec

    def __init__(self, spec: LeastSquaresResidualSpec) -> None:
        super().__init__(spec)
        self.atr = np.zeros(0)
        self.sums = np.zeros(0)

    def _update(self, block: Block) -> None:
        x = _rows64(block)
        b = _value_column(block, self.family)
        r = x @ self.spec.z - b
        atr, sums = x.T @ r, np.array([r @ r, b @ b])
        if self.atr.size == 0:
            self.atr, self.sums = atr, sums
        else:
            self.atr += atr
            self.sums += sums

    def _merge(self, other: LeastSquaresResidual) -> None:
        self.atr = self.atr + other.atr
        self.sums = self.sums + other.sums

    def _state(self) -> State:
        return {"atr": self.atr, "sums": self.sums}

    def _load(self, state: State) -> None:
        self.atr = np.array(state["atr"], dtype=np.float64)
        self.sums = np.array(state["sums"], dtype=np.float64)

    def result(self) -> dict[str, Any]:
        sums = self.sums if self.sums.size else np.zeros(2)
        return {"atr": self.atr.copy(), "r_norm_sq": float(sums[0]), "b_norm_sq": float(sums[1])}

    def nbytes_bound(self, d: int) -> int:
        return 8 * (3 * d + 4)


# ---------------------------------------------------------------------- exp kernel
@dataclass(frozen=True)
class ExpKernelMatvecSpec:
    """exp(β · rows · Aᵀ) V: ``rows`` (n × d) is the row side, V (n × k), tile edge ``tile``."""

    rows: np.ndarray
    v: np.ndarray
    beta: float = 1.0
    tile: int = DEFAULT_TILE


class ExpKernelMatvec(Operator):
    """K V for K = exp(β A Aᵀ) (entrywise), one pass over the column blocks A_J.

    For a streamed block J and every row tile I: out[I] += exp(β A_I A_Jᵀ) V[J], the
    logits of at most ``tile × tile`` entries at a time, in float64. The sum over J is the
    monoid (merge adds outputs), so any chunking and any merge tree give K V up to
    rounding. The kernel is PSD (Schur product theorem: exp(G) = Σ_k G^{∘k}/k!).
    Memory (``nbytes_bound``): row side + V + output + two float64 tiles — O(n(d + k) +
    tile²), never n × n.
    """

    family = "exp-kernel-matvec"
    Spec = ExpKernelMatvecSpec
    spec: ExpKernelMatvecSpec

    def __init__(self, spec: ExpKernelMatvecSpec) -> None:
        super().__init__(spec)
        self.out = np.zeros((0, 0))

    def _update(self, block: Block) -> None:
        rows, v, t = self.spec.rows, self.spec.v, int(self.spec.tile)
        n = rows.shape[0]
        if self.out.size == 0:
            self.out = np.zeros((n, v.shape[1]))
        beta = float(self.spec.beta)
        x = block.rows
        buf = np.empty(min(t, n) * min(t, x.shape[0]))  # the one logits tile, reused
        for ja in range(0, x.shape[0], t):
            jb = min(ja + t, x.shape[0])
            xj = np.asarray(x[ja:jb], dtype=np.float64) * beta
            vj = v[block.start + ja : block.start + jb]
            for ia in range(0, n, t):
                ib = min(ia + t, n)
                logits = buf[: (ib - ia) * (jb - ja)].reshape(ib - ia, jb - ja)
                np.matmul(np.asarray(rows[ia:ib], dtype=np.float64), xj.T, out=logits)
                np.exp(logits, out=logits)
                self.out[ia:ib] += logits @ vj

    def _merge(self, other: ExpKernelMatvec) -> None:
        self.out = self.out + other.out

    def _state(self) -> State:
        return {"out": self.out}

    def _load(self, state: State) -> None:
        self.out = np.array(state["out"], dtype=np.float64)

    def result(self) -> np.ndarray:
        if self.out.size == 0:
            return np.zeros((self.spec.rows.shape[0], self.spec.v.shape[1]))
        return self.out.copy()

    def nbytes_bound(self, d: int) -> int:
        n, k = self.spec.v.shape
        t = int(self.spec.tile)
        # row side + V + output (and its merge copy) + the logits tile + converted tiles
        return (
            self.spec.rows.nbytes + self.spec.v.nbytes + 2 * 8 * n * k
            + 8 * t * t + 2 * 8 * t * (d + k)
        )


__all__ = [
    "SKETCH_METHODS",
    "ExpKernelMatvec",
    "ExpKernelMatvecSpec",
    "GramMatvec",
    "GramMatvecSpec",
    "LeastSquaresResidual",
    "LeastSquaresResidualSpec",
    "RowSketch",
    "RowSketchSpec",
    "TallSkinnyQR",
    "TallSkinnyQRSpec",
    "countsketch_map",
    "sketch_weights",
    "srht_rows",
]
