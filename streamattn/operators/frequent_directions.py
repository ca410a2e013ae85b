"""Frequent Directions: a mergeable ℓ-row sketch B of the key covariance (large d).

Mathematics (Liberty, KDD 2013; Ghashami, Liberty, Phillips, Woodruff, SIAM J. Comput.
2016; mergeability: Agarwal et al., "Mergeable summaries", 2013). The sketch keeps a
buffer of at most 2ℓ rows. When it fills, it is *shrunk*: with the SVD B = U Σ Vᵀ and
δ = σ_ℓ² (the ℓ-th largest squared singular value), B ← diag(√max(σ_i² − δ, 0)) Vᵀ,
which leaves at most ℓ − 1 non-zero rows. Merging stacks the two buffers and shrinks.
With Δ the sum of all the δ subtracted (over every update and merge),

    0 ⪯ KᵀK − BᵀB ⪯ Δ·I,   Δ ≤ (‖K‖_F² − ‖B‖_F²)/ℓ ≤ ‖K − K_k‖_F²/(ℓ − k)  (0 ≤ k < ℓ),

K_k the best rank-k approximation of K. Each shrink lowers ‖B‖_F² by Σ_i min(σ_i², δ) ≥ ℓδ,
which gives the middle inequality, a bound the result can check itself; the right one is
the FD theorem. Both hold for any chunking and any merge tree; the sketch itself
depends on them (FD is not chunking-invariant), its guarantee does not.

Cost: O(n·d·ℓ) time (an SVD of a 2ℓ × d matrix per ℓ rows folded), O(ℓ·d) memory.
Everything is float64.

Examples
--------
>>> import numpy as np
>>> from streamattn.sources import Block
>>> k = np.random.default_rng(0).standard_normal((500, 20))
>>> fd = FrequentDirections(FDSpec(ell=8)).update(Block(0, k))
>>> r = fd.result()
>>> r.sketch.shape
(8, 20)
>>> gap = np.linalg.eigvalsh(k.T @ k - r.sketch.T @ r.sketch)
>>> bool(gap.min() > -1e-8 and gap.max() <= r.delta * (1 + 1e-9))
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamattn.errors import ConfigError
from streamattn.operators.protocol import Operator, State
from streamattn.sources import Block


@dataclass(frozen=True)
class FDSpec:
    """Sketch size ``ell`` (rows of B), an integer >= 1."""

    ell: int

    def __post_init__(self) -> None:
        if isinstance(self.ell, bool) or not isinstance(self.ell, (int, np.integer)):
            raise ConfigError(f"Frequent Directions ell must be an integer, got {self.ell!r}.")
        if self.ell < 1:
            raise ConfigError(f"Frequent Directions ell must be >= 1, got {self.ell}.")


@dataclass(frozen=True)
class FDSketch:
    """The result of a Frequent Directions pass.

    Attributes
    ----------
    sketch : B, ``ell × d`` float64 (zero rows where fewer directions are kept), with
        0 ⪯ KᵀK − BᵀB ⪯ ``delta``·I.
    delta : Δ, the total shrinkage (sum of the subtracted squared singular values).
    fro2 : ‖K‖_F², exactly (float64 sum).
    n : number of rows folded.
    ell : the sketch size.
    """

    sketch: np.ndarray
    delta: float
    fro2: float
    n: int
    ell: int

    @property
    def delta_bound(self) -> float:
        """(‖K‖_F² − ‖B‖_F²)/ℓ, a computable upper bound on ``delta``."""
        return max(0.0, (self.fro2 - float(np.sum(self.sketch**2))) / self.ell)


def shrink(b: np.ndarray, ell: int) -> tuple[np.ndarray, float]:
    """One FD shrink: (B', δ) with B' = √max(Σ² − δ, 0) Vᵀ, δ = σ_ℓ², ≤ ℓ − 1 rows kept."""
    if b.shape[0] < ell:
        return b, 0.0
    _, s, vt = np.linalg.svd(b, full_matrices=False)
    delta = float(s[ell - 1] ** 2) if s.size >= ell else 0.0
    s2 = np.maximum(s[: ell - 1] ** 2 - delta, 0.0)
    keep = int(np.count_nonzero(s2 > 0))
    return np.sqrt(s2[:keep])[:, None] * vt[:keep], delta


class FrequentDirections(Operator[FDSpec, FDSketch]):
    """Mergeable Frequent Directions sketch of the rows (keys) folded so far.

    Memory: at most 2ℓ rows of d float64 (plus the stacking copy), any n.
    """

    family = "frequent-directions"
    Spec = FDSpec

    def __init__(self, spec: FDSpec) -> None:
        super().__init__(spec)
        self.b = np.zeros((0, 0))
        self.delta = 0.0
        self.fro2 = 0.0

    def _absorb(self, rows: np.ndarray) -> None:
        """Append rows, shrinking whenever the buffer reaches 2ℓ rows (then ≤ ℓ − 1 remain)."""
        ell, a = self.spec.ell, 0
        while a < rows.shape[0]:
            take = 2 * ell - self.b.shape[0]
            self.b = np.vstack([self.b, rows[a : a + take]])
            a += take
            if self.b.shape[0] >= 2 * ell:
                self.b, delta = shrink(self.b, ell)
                self.delta += delta

    def _update(self, block: Block) -> None:
        x = np.asarray(block.rows, dtype=np.float64)
        if self.b.size == 0 and self.b.shape[1] != x.shape[1]:
            self.b = np.zeros((0, x.shape[1]))
        self.fro2 += float(np.einsum("ij,ij->", x, x))
        self._absorb(x)

    def _merge(self, other: FrequentDirections) -> None:
        self.fro2 += other.fro2
        self.delta += other.delta
        self._absorb(other.b)

    def _state(self) -> State:
        return {
            "b": self.b,
            "delta": np.array(self.delta, dtype=np.float64),
            "fro2": np.array(self.fro2, dtype=np.float64),
        }

    def _load(self, state: State) -> None:
        self.b = np.array(state["b"], dtype=np.float64)
        self.delta = float(state["delta"])
        self.fro2 = float(state["fro2"])

    def result(self) -> FDSketch:
        """The ℓ-row sketch (a last shrink if more than ℓ rows are buffered)."""
        ell = self.spec.ell
        b, delta = self.b, self.delta
        if b.shape[0] > ell:
            b, extra = shrink(b, ell)
            delta += extra
        out = np.zeros((ell, b.shape[1]))
        out[: b.shape[0]] = b
        return FDSketch(out, float(delta), float(self.fro2), self.n_rows, ell)

    def nbytes_bound(self, d: int) -> int:
        return 8 * (3 * self.spec.ell * d + 2)
