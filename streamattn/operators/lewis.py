"""ℓp Lewis weights out of core: one streaming pass per fixed-point iteration.

Mathematics (docs/architecture.md, note 2.2; Lewis 1978; Cohen & Peng, "ℓp row sampling by Lewis
weights", STOC 2015). For keys k_j and p > 0 the ℓp Lewis weights are the unique w ≥ 0 with

    w_j = τ_j(W^{1/2−1/p} K)   ⇔   w_j^{2/p} = σ_j(w) := k_jᵀ (Kᵀ W^{1−2/p} K)⁺ k_j,

and Σ_j w_j = rank(K). Writing x = log w and T(x) = (p/2)·log σ(w), the iteration here is

    x ← (1 − β)·x + β·T(x),   i.e.   w ← w^{1−β} · σ(w)^{βp/2}.

- β = 1 is the Cohen–Peng iteration, used for p ≤ 3.5: T is a contraction of the sup-norm of
  log w with factor c = |p/2 − 1| < 1, so it converges from any start, and after a step
  that moved log w by δ (sup-norm) the limit is within c·δ/(1 − c) of the new iterate.
- β = 4/(p + 2) (a damped iteration), used for p > 3.5: from p = 4 on Cohen–Peng can
  oscillate, and just below 4 its factor |p/2 − 1| → 1 makes it too slow. The
  Jacobian of T is −(p/2 − 1)·S with S = diag(σ)⁻¹ H diag(w^{1−2/p}), H the entrywise
  square of K M⁺ Kᵀ (PSD by the Schur product theorem): S is row-stochastic and similar to
  a PSD matrix, so its eigenvalues lie in [0, 1] and those of the damped map's Jacobian
  in [1 − βp/2, 1 − β] = ±(p − 2)/(p + 2). The fixed point is therefore *locally* linearly
  attractive with rate (p − 2)/(p + 2) (Ostrowski); global convergence is not proved here,
  it is demonstrated by the tests (p = 4, 5, 8) and checked on every run (the change must
  fall below ``tol`` within ``max_iter`` passes, else an error). The high-precision methods
  with global proofs for p ≥ 4 are Fazel–Lee–Padmanabhan–Sidford (SODA 2022) and the
  one-sided-then-round scheme of Apers–Gribling–Sidford (2024); this damped map is
  simpler and, on the tested inputs, converges at the predicted rate. Because the rate is
  not a sup-norm contraction, no error margin on the weights is derived from it: the ℓp
  recipe certifies damped runs by an a-posteriori bound valid for any weights
  (:mod:`streamattn.recipes.lp`).

The tempting update w ← τ(W^{1/2−1/p} K)^{p/2} is *not* this iteration for p ≠ 2: its fixed
points satisfy w_j^{2/p} = τ_j(W^{1/2−1/p} K) = w_j^{1−2/p} σ_j(w), i.e. w_j^{4/p − 1} = σ_j,
which is not the Lewis equation and does not sum to the rank (tests/test_lewis.py).

Out of core. Each pass is one :class:`LewisPass` operator run by any engine: for a block
it reads the previous weights w_k of those rows from a zarr array (``weights_in``; the
first pass uses w_0 = 1 and reads nothing), computes σ(w_k) with the scoring map of the
previous pass's factor, writes w_{k+1} to another zarr array (``weights_out``) at the same
rows, and folds the reweighted rows W_{k+1}^{1/2−1/p} K into a TSQR factor (float64), which
gives the map for the next pass. So an iteration costs one read of the keys plus one read
and one write of n weights; memory is O(d² + candidates), never O(n). Writes are
idempotent (a recomputed block writes the same numbers) and go to disjoint rows; the
engine's blocks should align with the weight arrays' chunks (the orchestration in
:mod:`streamattn.recipes.lp` creates them so) when several workers write at once.

Candidate rows with w_{k+1} ≥ ``collect`` are kept (with their rows) while there are at
most ``cap`` of them; past that the pass only records that it overflowed (a flag that is
the same for every chunking and merge tree), so state memory is bounded by ``cap`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamattn.operators.candidates import candidate_state, load_candidates, merge_scored
from streamattn.operators.factors import centred_factor_result, centred_factor_update
from streamattn.operators.leverage import (
    DEFAULT_RTOL,
    ScoringMap,
    augment,
    fast_factor_update,
    stack_qr,
)
from streamattn.operators.protocol import Operator, State
from streamattn.sources import Block

#: Above this p the damped iteration is used: Cohen–Peng's factor |p/2 − 1| > 3/4 makes it
#: too slow near p = 4 (p = 3.9: c = 0.95, ~400 passes for tol 1e-9) and it can oscillate
#: from p = 4 on.
DAMPED_FROM_P = 3.5


def damping(p: float) -> float:
    """β of the iteration: 1 (Cohen–Peng) for p ≤ 3.5, 4/(p + 2) above."""
    return 1.0 if p <= DAMPED_FROM_P else 4.0 / (p + 2.0)


def contraction_factor(p: float, beta: float) -> float:
    """Rate of the iteration: a global sup-norm contraction for β = 1, p < 4; local otherwise."""
    if beta == 1.0:
        return abs(p / 2.0 - 1.0)
    return max(abs(1.0 - beta), abs(1.0 - beta * p / 2.0))


def reweight_scale(w: np.ndarray, p: float) -> np.ndarray:
    """w^{1/2 − 1/p} per row, 0 where w = 0 (only zero rows get w = 0)."""
    out = np.zeros_like(w)
    pos = w > 0
    out[pos] = w[pos] ** (0.5 - 1.0 / p)
    return out


def lewis_update(w: np.ndarray, sigma: np.ndarray, p: float, beta: float) -> np.ndarray:
    """w^{1−β} σ^{βp/2} (0 where σ = 0: a zero row has weight 0)."""
    out = np.zeros_like(sigma)
    pos = sigma > 0
    out[pos] = np.exp((1.0 - beta) * np.log(w[pos]) + beta * (p / 2.0) * np.log(sigma[pos]))
    return out


@dataclass(frozen=True)
class LewisPassSpec:
    """One pass of the Lewis iteration.

    Parameters
    ----------
    p : the ℓp exponent, p > 0.
    w_map : d × r scoring map of the previous factor (σ(k) = ‖k w_map‖²); an empty (0 × 0)
        map marks the first pass (w stays 1, only the factor is built).
    weights_in, weights_out : zarr array paths of w_k and w_{k+1} ("" = all ones / no write).
    beta : damping (1 = Cohen–Peng).
    collect : keep candidate rows with w_{k+1} ≥ collect (0: keep none).
    cap : most candidate rows held before the pass records an overflow instead.
    affine : augment keys with a constant 1 (shift-invariant variant).
    rtol : numerical-rank tolerance of the factor's pseudo-inverse.
    shift : affine only: subtract this d-vector from every key before appending the 1.
        [K − 1μᵀ, 1] = [K, 1]·T with T invertible, and Lewis weights depend only on the
        column space, so the weights are the same for any shift; a shift near the mean
        keeps a common offset ≫ the spread out of the factor's conditioning. Empty on
        the first pass, which folds [1, K] by Householder QR (the centred factor of
        :mod:`streamattn.operators.factors`, exact for any offset) and reports the mean
        as the shift for every later pass.
    """

    p: float
    w_map: np.ndarray
    weights_in: str = ""
    weights_out: str = ""
    beta: float = 1.0
    collect: float = 0.0
    cap: int = 0
    affine: bool = False
    rtol: float = DEFAULT_RTOL
    shift: np.ndarray = field(default_factory=lambda: np.zeros(0))


class LewisPass(Operator[LewisPassSpec, dict[str, Any]]):
    """One fused pass: new weights from the previous map, and the next reweighted factor.

    Memory: O(d² + cap · d) floats, independent of n.
    """

    family = "lewis-pass"
    Spec = LewisPassSpec

    def __init__(self, spec: LewisPassSpec) -> None:
        super().__init__(spec)
        self.r = np.zeros((0, 0))
        self.stats = np.zeros(3)  # sum of w_{k+1}, max |log w_{k+1}/w_k|, max w_{k+1}
        self.count = 0  # rows with w_{k+1} >= collect (also when not kept)
        self.idx = np.zeros(0, dtype=np.int64)
        self.weights = np.zeros(0)
        self.rows = np.zeros((0, 0))
        self.values: np.ndarray | None = None
        self._arrays: dict[str, Any] = {}

    def _array(self, path: str, mode: str) -> Any:
        key = f"{mode}:{path}"
        if key not in self._arrays:
            import zarr

            self._arrays[key] = zarr.open_array(path, mode=mode)
        return self._arrays[key]

    def _centring(self) -> bool:
        """Affine first pass: fold [1, K] (unit weights) to read the mean off the factor."""
        return self.spec.affine and not self.spec.w_map.size and not self.spec.shift.size

    def _update(self, block: Block) -> None:
        spec = self.spec
        if self._centring():
            if self.r.size == 0:
                self.r = np.zeros((0, block.rows.shape[1] + 1))
            self.r = centred_factor_update(self.r, block.rows)
            self._fold_stats(np.array([float(block.rows.shape[0]), 0.0, 1.0]))
            return
        rows = np.asarray(block.rows, dtype=np.float64)
        x = augment(rows - spec.shift if spec.shift.size else rows, spec.affine)
        if self.r.size == 0:
            self.r = np.zeros((0, x.shape[1]))
            self.rows = np.zeros((0, block.rows.shape[1]))
            if block.values is not None:
                self.values = np.zeros((0, block.values.shape[1]))
        m = x.shape[0]
        w_old = (
            np.asarray(self._array(spec.weights_in, "r")[block.start : block.stop], np.float64)
            if spec.weights_in
            else np.ones(m)
        )
        if spec.w_map.size:
            y = x @ spec.w_map
            sigma = np.einsum("ij,ij->i", y, y)
            w_new = lewis_update(w_old, sigma, spec.p, spec.beta)
            moved = (w_new > 0) & (w_old > 0)
            change = np.abs(np.log(w_new[moved] / w_old[moved]))
            if np.any((w_new > 0) != (w_old > 0)):
                change = np.append(change, np.inf)
        else:
            w_new, change = w_old, np.zeros(0)
        if spec.weights_out:
            self._array(spec.weights_out, "r+")[block.start : block.stop] = w_new
        xs = x * reweight_scale(w_new, spec.p)[:, None]
        # The leverage operator's preconditioned Cholesky update when it is as accurate as
        # Householder (well-conditioned factor, moderate growth), else TSQR.
        fast = fast_factor_update(self.r, xs)
        self.r = fast.r if fast is not None else stack_qr(self.r, xs)
        self._fold_stats(
            np.array([w_new.sum(), change.max(initial=0.0), w_new.max(initial=0.0)]),
        )
        if spec.collect > 0:
            sel = np.flatnonzero(w_new >= spec.collect)
            self._collect(
                int(sel.size),
                block.start + sel.astype(np.int64),
                w_new[sel],
                np.asarray(block.rows[sel], dtype=np.float64),
                None if block.values is None else np.asarray(block.values[sel], np.float64),
            )

    def _fold_stats(self, other: np.ndarray) -> None:
        self.stats = np.array(
            [self.stats[0] + other[0], max(self.stats[1], other[1]), max(self.stats[2], other[2])]
        )

    def _collect(
        self,
        count: int,
        idx: np.ndarray,
        w: np.ndarray,
        rows: np.ndarray,
        values: np.ndarray | None,
    ) -> None:
        self.count += count
        if self.count > self.spec.cap:
            self.idx, self.weights = np.zeros(0, dtype=np.int64), np.zeros(0)
            self.rows = self.rows[:0]
            self.values = None if self.values is None else self.values[:0]
            return
        self.idx, self.weights, self.rows, self.values = merge_scored(
            (self.idx, self.weights, self.rows, self.values), (idx, w, rows, values))

    def _merge(self, other: LewisPass) -> None:
        self.r = stack_qr(self.r, other.r)
        self._fold_stats(other.stats)
        if self.spec.collect > 0:
            self._collect(other.count, other.idx, other.weights, other.rows, other.values)

    def _state(self) -> State:
        out: State = {
            "r": self.r,
            "stats": self.stats,
            "count": np.array(self.count, dtype=np.int64),
            "weights": self.weights,
            **candidate_state(self.idx, self.rows, self.values),
        }
        return out

    def _load(self, state: State) -> None:
        self.r = np.array(state["r"], dtype=np.float64)
        self.stats = np.array(state["stats"], dtype=np.float64)
        self.count = int(state["count"])
        self.idx, self.rows, self.values = load_candidates(state)
        self.weights = np.array(state["weights"], dtype=np.float64)

    def result(self) -> dict[str, Any]:
        """Next scoring map, Σw, max log-change, candidates (``overflow`` if > cap)."""
        dim = self.r.shape[1]
        shift = self.spec.shift
        factor = self.r
        if self._centring():  # the factor of [K − μ, 1] is diag(R_c, √n): rows ⟂ the ones
            cf = centred_factor_result(self.r, self.n_rows)
            factor = np.zeros((dim, dim))
            factor[: dim - 1, : dim - 1] = cf.r_centred
            factor[dim - 1, dim - 1] = np.sqrt(cf.n)
            shift = cf.mean
        return {
            "scoring_map": ScoringMap.from_factor(factor, self.spec.rtol, dim),
            "shift": shift.copy(),
            "sum_weights": float(self.stats[0]),
            "max_log_change": float(self.stats[1]),
            "max_weight": float(self.stats[2]),
            "count": self.count,
            "overflow": self.count > self.spec.cap,
            "indices": self.idx.copy(),
            "weights": self.weights.copy(),
            "rows": self.rows.copy(),
            "values": None if self.values is None else self.values.copy(),
            "n": self.n_rows,
        }

    def nbytes_bound(self, d: int) -> int:
        dim = d + 1 if self.spec.affine else d
        return 8 * (2 * dim * dim + (self.spec.cap + 1) * (d + 2)) + self.spec.w_map.nbytes
