"""Large d: ridge universal sets against a Frequent Directions sketch, and a JL-sketched path.

Mathematics (docs/architecture.md, notes 2.1 and 2.6). With G = KᵀK and λ > 0 the ridge leverage
score is τ^λ_j = k_jᵀ (G + λI)⁻¹ k_j. Cauchy–Schwarz in the G + λI metric gives, for every query q,

    A_qj = (q·k_j)² / ‖Kq‖² ≤ τ^λ_j · (1 + λ‖q‖²/‖Kq‖²),

so A_qj ≥ ε ⇒ τ^λ_j ≥ ε / (1 + λ‖q‖²/‖Kq‖²): a *ridge-type* statement, weaker than the
exact p = 2 one (τ^λ ≤ τ), and never called exact. No d × d factor is needed: with an
ℓ-row Frequent Directions sketch B (0 ⪯ G − BᵀB ⪯ Δ·I, :mod:`frequent_directions`) and
B = U S Vᵀ,

    τ̂_j = k_jᵀ (BᵀB + λI)⁻¹ k_j = (‖k_j‖² − Σ_i s_i²/(s_i² + λ)·(v_i·k_j)²) / λ ≥ τ^λ_j,

since BᵀB ⪯ G; the cost is O(ℓ·d) per row.

One pass (:class:`RidgeFD`). The state is an FD sketch of the rows so far plus the
candidate rows with τ̂ ≥ ε against the *current* sketch. A row dropped at time t had
τ̂_t < ε, hence τ^λ against the Gram of the rows seen by then is < ε, hence (rows only add
to G) its final τ^λ is < ε: the result is a superset of the exact ridge set
{j : τ^λ_j ≥ ε}, for any chunking and any merge tree (the set itself depends on them,
the superset property does not). Candidates number at most Σ_j τ̂_j / ε ≤ S/ε with
S = Σ_{i ≤ ℓ} (s_i² + Δ)/(s_i² + λ) + (d − ℓ)·Δ/λ (from G ⪯ BᵀB + ΔI), reported.
λ may be absolute (``lam``) or relative (``lam_rel`` × ‖K‖_F²/d of the rows seen so far);
both only grow, which only lowers scores, so pruning stays safe. Prefer ``lam_rel``: then
Δ/λ ≤ d/(ℓ·lam_rel) at every step (Δ ≤ ‖K‖_F²/ℓ), so S ≤ d·max(1, d/(ℓ·lam_rel)) and the
candidate memory is bounded independently of n; with an absolute λ, Δ/λ grows with n.

Sketched scores (``streamattn.recipes.ridge.ridge_universal_set`` with ``sketch_eps``): a
second pass scores every row as τ̃_j = ‖k_jᵀ M^{−1/2} Π‖², M = BᵀB + λI, Π a d × m
Gaussian N(0, 1/m) matrix drawn from ``seed``. For each row, P(|τ̃_j − τ̂_j| > ε'·τ̂_j) ≤
2·exp(−m(ε'²/2 − ε'³/3)/2) (Dasgupta & Gupta 2003), so with m = ⌈4·ln(2n/δ)/(ε'²/2 −
ε'³/3)⌉ every row is within (1 ± ε') of τ̂ with probability ≥ 1 − δ. The pass keeps τ̃_j ≥
(1 − ε')·ε, so with that probability no row with τ̂_j ≥ ε (in particular none of the exact
ridge set) is missed. The per-row cost is O(d·m) instead of O(d·ℓ): a gain only when m <
ℓ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamattn.errors import ConfigError
from streamattn.operators.candidates import (
    candidate_state,
    load_candidates,
    merge_scored,
    stack_values,
)
from streamattn.operators.frequent_directions import FDSketch, FDSpec, FrequentDirections
from streamattn.operators.protocol import Operator, State
from streamattn.sources import Block


@dataclass(frozen=True)
class RidgeMap:
    """τ̂(k) = kᵀ(BᵀB + λI)⁻¹k from the SVD of an FD sketch, in O(ℓ·d) per row."""

    v: np.ndarray  # d × r right singular vectors of B
    shrink: np.ndarray  # s_i² / (s_i² + λ)
    lam: float

    @classmethod
    def from_sketch(cls, b: np.ndarray, lam: float) -> RidgeMap:
        d = b.shape[1]
        if b.shape[0] == 0 or not np.any(b):
            return cls(np.zeros((d, 0)), np.zeros(0), lam)
        _, s, vt = np.linalg.svd(b, full_matrices=False)
        keep = s > 0
        s2 = s[keep] ** 2
        return cls(vt[keep].T, s2 / (s2 + lam), lam)

    def scores(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.v
        sq = np.einsum("ij,ij->i", x, x) - (y * y) @ self.shrink
        return np.maximum(sq, 0.0) / self.lam

    def inverse_sqrt_times(self, pi: np.ndarray) -> np.ndarray:
        """(BᵀB + λI)^{−1/2} Π, without a d × d matrix."""
        factor = 1.0 - np.sqrt(1.0 - self.shrink)  # 1 − √(λ/(s² + λ))
        return (pi - self.v @ (factor[:, None] * (self.v.T @ pi))) / math.sqrt(self.lam)


def effective_bound(sketch: FDSketch, lam: float, d: int) -> float:
    """S ≥ Σ_j τ̂_j: Σ_i (s_i² + Δ)/(s_i² + λ) + (d − rank B)·Δ/λ (G ⪯ BᵀB + ΔI)."""
    s2 = np.linalg.svd(sketch.sketch, compute_uv=False) ** 2
    s2 = s2[s2 > 0]
    return float(np.sum((s2 + sketch.delta) / (s2 + lam)) + (d - s2.size) * sketch.delta / lam)


@dataclass(frozen=True)
class RidgeFDSpec:
    """One-pass ridge set against an ℓ-row FD sketch: keep rows with τ̂ ≥ ``threshold``.

    λ = ``lam`` + ``lam_rel`` · ‖K‖_F² / d (‖K‖_F² of the rows folded so far); λ > 0.
    """

    ell: int
    threshold: float
    lam: float = 0.0
    lam_rel: float = 0.0


class RidgeFD(Operator[RidgeFDSpec, dict[str, Any]]):
    """Superset of the exact ridge set {j : τ^λ_j ≥ threshold} in one pass, no d × d matrix.

    Memory: O(ℓ·d + (S/threshold)·d) floats (S as in :func:`effective_bound`), any n.
    """

    family = "ridge-fd"
    Spec = RidgeFDSpec

    def __init__(self, spec: RidgeFDSpec) -> None:
        super().__init__(spec)
        if spec.lam < 0 or spec.lam_rel < 0 or spec.lam + spec.lam_rel <= 0:
            raise ConfigError(
                f"ridge lambda must be > 0: give lam > 0 or lam_rel > 0, got lam = {spec.lam}, "
                f"lam_rel = {spec.lam_rel}."
            )
        self.fd = FrequentDirections(FDSpec(spec.ell))
        self.idx = np.zeros(0, dtype=np.int64)
        self.rows = np.zeros((0, 0))
        self.values: np.ndarray | None = None

    def lam(self, fro2: float, d: int) -> float:
        return self.spec.lam + self.spec.lam_rel * fro2 / d

    def _ridge_map(self) -> RidgeMap:
        sk = self.fd.result()
        return RidgeMap.from_sketch(sk.sketch, self.lam(sk.fro2, sk.sketch.shape[1]))

    def _prune(self, idx: np.ndarray, rows: np.ndarray, values: np.ndarray | None) -> None:
        keep = self._ridge_map().scores(rows) >= self.spec.threshold
        order = np.argsort(idx[keep], kind="stable")
        self.idx, self.rows = idx[keep][order], rows[keep][order]
        self.values = None if values is None else values[keep][order]

    def _update(self, block: Block) -> None:
        x = np.asarray(block.rows, dtype=np.float64)
        if self.rows.size == 0 and self.idx.size == 0:
            self.rows = np.zeros((0, x.shape[1]))
            if block.values is not None:
                self.values = np.zeros((0, block.values.shape[1]))
        self.fd.update(block)
        values = None
        if self.values is not None and block.values is not None:
            values = np.vstack([self.values, np.asarray(block.values, np.float64)])
        idx = np.arange(block.start, block.stop, dtype=np.int64)
        self._prune(np.concatenate([self.idx, idx]), np.vstack([self.rows, x]), values)

    def _merge(self, other: RidgeFD) -> None:
        self.fd.merge(other.fd)
        self._prune(
            np.concatenate([self.idx, other.idx]), np.vstack([self.rows, other.rows]),
            stack_values(self.values, other.values),
        )

    def _state(self) -> State:
        out: State = {f"fd.{k}": v for k, v in self.fd.to_state().items()}
        out.update(candidate_state(self.idx, self.rows, self.values))
        return out

    def _load(self, state: State) -> None:
        fd = Operator.from_state({k[3:]: v for k, v in state.items() if k.startswith("fd.")})
        assert isinstance(fd, FrequentDirections)
        self.fd = fd
        self.idx, self.rows, self.values = load_candidates(state)

    def result(self) -> dict[str, Any]:
        """Candidates with their final τ̂ (≥ τ^λ), the sketch, λ and the size bound S/ε."""
        sk = self.fd.result()
        d = sk.sketch.shape[1]
        lam = self.lam(sk.fro2, d) if d else self.spec.lam
        rmap = RidgeMap.from_sketch(sk.sketch, lam) if d else None
        scores = rmap.scores(self.rows) if rmap is not None and self.idx.size else np.zeros(0)
        return {
            "indices": self.idx.copy(),
            "scores": scores,
            "rows": self.rows.copy(),
            "values": None if self.values is None else self.values.copy(),
            "sketch": sk,
            "lam": lam,
            "ridge_map": rmap,
            "sum_scores_bound": effective_bound(sk, lam, d) if d else 0.0,
            "n": self.n_rows,
        }

    def nbytes_bound(self, d: int, d_values: int = 0) -> int:
        """Candidates ≤ S/threshold ≤ d·max(1, Δ/λ)/threshold, and Δ/λ ≤ d/(ℓ·lam_rel)
        (Δ ≤ ‖K‖_F²/ℓ): bounded in n when ``lam_rel`` > 0. With an absolute λ only, Δ/λ
        grows with the data; the bound below then assumes Δ ≤ λ·d/ℓ."""
        ratio = d / self.spec.ell / (self.spec.lam_rel if self.spec.lam_rel > 0 else 1.0)
        count = int(d * max(1.0, ratio) / self.spec.threshold) + 1
        return self.fd.nbytes_bound(d) + 8 * count * (d + d_values + 1)


@dataclass(frozen=True)
class SketchedScoresSpec:
    """Keep rows with ‖k·w‖² ≥ ``threshold`` for a fixed d × m map ``w``."""

    w: np.ndarray
    threshold: float


class SketchedScores(Operator[SketchedScoresSpec, dict[str, Any]]):
    """Mergeable threshold collector for a fixed scoring map (the JL-sketched pass).

    Memory: O(|kept| · d + d·m); |kept| ≤ Σ_j ‖k_j w‖² / threshold.
    """

    family = "sketched-scores"
    Spec = SketchedScoresSpec

    def __init__(self, spec: SketchedScoresSpec) -> None:
        super().__init__(spec)
        self.idx = np.zeros(0, dtype=np.int64)
        self.scores = np.zeros(0)
        self.rows = np.zeros((0, spec.w.shape[0]))
        self.values: np.ndarray | None = None
        self.total = 0.0

    def _update(self, block: Block) -> None:
        x = np.asarray(block.rows, dtype=np.float64)
        y = x @ self.spec.w
        s = np.einsum("ij,ij->i", y, y)
        self.total += float(s.sum())
        sel = np.flatnonzero(s >= self.spec.threshold)
        vals = None if block.values is None else np.asarray(block.values[sel], np.float64)
        self._add(block.start + sel.astype(np.int64), s[sel], x[sel], vals)

    def _add(self, idx: np.ndarray, s: np.ndarray, rows: np.ndarray, vals: Any) -> None:
        if vals is not None and self.values is None and self.idx.size == 0:
            self.values = np.zeros((0, vals.shape[1]))
        self.idx, self.scores, self.rows, self.values = merge_scored(
            (self.idx, self.scores, self.rows, self.values), (idx, s, rows, vals))

    def _merge(self, other: SketchedScores) -> None:
        self.total += other.total
        self._add(other.idx, other.scores, other.rows, other.values)

    def _state(self) -> State:
        return {"scores": self.scores, "total": np.array(self.total),
                **candidate_state(self.idx, self.rows, self.values)}

    def _load(self, state: State) -> None:
        self.idx, self.rows, self.values = load_candidates(state)
        self.scores = np.array(state["scores"], dtype=np.float64)
        self.total = float(state["total"])

    def result(self) -> dict[str, Any]:
        return {
            "indices": self.idx.copy(),
            "scores": self.scores.copy(),
            "rows": self.rows.copy(),
            "values": None if self.values is None else self.values.copy(),
            "sum_scores": self.total,
            "n": self.n_rows,
        }

    def nbytes_bound(self, d: int) -> int:
        return self.spec.w.nbytes  # plus the kept rows, bounded by Σ scores / threshold


def jl_dimension(n: int, eps: float, delta: float) -> int:
    """m with P(some of n rows' squared norms leaves (1 ± eps)) ≤ delta (Dasgupta–Gupta)."""
    return math.ceil(4.0 * math.log(2.0 * n / delta) / (eps**2 / 2.0 - eps**3 / 3.0))
