"""Exact top-B by a fixed scoring map, with rows screened by a certified float32 bound.

The second pass of budget mode (``TopScores``, :mod:`streamattn.operators.leverage`)
scores every row exactly: τ(x) = ‖(x − μ) W‖² + c in float64, a float32 → float64 copy
and a float64 GEMM per block. Once B rows are held, only a row whose score can reach the
B-th held score T can change the top-B; every other row is discarded by an upper bound
computed in float32 (no float64 copy, single-precision GEMM), and only the survivors are
scored exactly in float64, as ``TopScores`` scores them. The result is ``TopScores``'s.

The bound (u = 2⁻²⁴, γ_k = k·u / (1 − k·u), float32 rows x exact). With ẑ = fl(x − μ₃₂)
(μ₃₂ = fl(μ); z = x − μ when there is no shift), ŷ = fl(ẑ W₃₂) and s = fl(‖ŷ‖²):

- ‖ẑ − (x − μ)‖ ≤ u‖μ‖ + u/(1 − u)·‖ẑ‖ =: e (one rounding per entry, and μ₃₂'s);
- ‖ŷ − ẑW‖ ≤ ‖ẑ‖·(u‖W‖_F + γ_d‖W₃₂‖_F) (W₃₂ = fl(W); |fl(a·b) − a·b| ≤ γ_d|a|·|b| for
  any summation order, and ‖|a||B|‖ ≤ ‖a‖‖B‖_F);
- ‖ẑW − (x − μ)W‖ ≤ e‖W‖_F; ‖ẑ‖² ≤ fl(‖ẑ‖²)/(1 − γ_d) and ‖ŷ‖² ≤ s/(1 − γ_r);

so τ(x) ≤ (‖ŷ‖ + δ)² + c with δ the sum of the three error terms, plus absolute terms for
float32 underflow (d·2⁻¹⁴⁹ per product sum). The bound is evaluated in float64 from the
float32 row sums and inflated by 1e-12 for that arithmetic. A row is discarded only when
its bound is < T strictly, so ties at T (decided by the smaller index) are scored
exactly. Rows of another dtype than float16/float32, blocks before B rows are held, and
non-finite bounds (float32 overflow) take the exact path for the whole block.
"""

from __future__ import annotations

import numpy as np

from streamattn.blas import single_blas_thread
from streamattn.operators.leverage import PIECE_ROWS, TopScores, map_scores
from streamattn.sources import Block

U32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff of float32, 2^-24
TINY32 = 2.0**-149  # the smallest float32 subnormal: the absolute underflow error


def _gamma(k: int) -> float:
    return k * U32 / (1 - k * U32)


class ScreenedTopScores(TopScores):
    """``TopScores`` (same spec, state and result) with float32-screened exact scoring.

    Memory: ``TopScores``'s bound plus float32 buffers of ``PIECE_ROWS × (d + r)``.
    """

    family = "screened-top-scores"

    def _screen_constants(self, d: int) -> tuple[np.ndarray, np.ndarray | None, float, float,
                                                  float]:
        """W₃₂, μ₃₂ and the per-row error factors (see the module docstring)."""
        w = np.asarray(self.spec.w, dtype=np.float64)
        w32 = w.astype(np.float32)
        r = w.shape[1]
        wf = float(np.linalg.norm(w))
        w32f = float(np.linalg.norm(w32.astype(np.float64)))
        shift = None if self.spec.shift is None else np.asarray(self.spec.shift, np.float64)
        mu32 = None if shift is None else shift.astype(np.float32)
        # δ = ‖ẑ‖·rel + absolute, rel = u‖W‖_F + γ_d‖W₃₂‖_F (+ u/(1−u)·‖W‖_F with a shift)
        rel = U32 * wf + _gamma(d) * w32f
        absolute = np.sqrt(r) * d * TINY32 * (1.0 + float(np.abs(w32).max(initial=0.0)))
        if shift is not None:
            rel += U32 / (1 - U32) * wf
            absolute += U32 * float(np.linalg.norm(shift)) * wf
        return w32, mu32, rel, absolute, float(r)

    def _bounds(self, rows: np.ndarray) -> np.ndarray:
        """An upper bound of τ for every row (float64), from float32 pieces."""
        m, d = rows.shape
        w32, mu32, rel, absolute, r = self._screen_constants(d)
        out = np.empty(m)
        for a in range(0, m, PIECE_ROWS):
            z = np.asarray(rows[a : a + PIECE_ROWS], dtype=np.float32)
            if mu32 is not None:
                z = z - mu32
            y = z @ w32
            s = np.einsum("ij,ij->i", y, y).astype(np.float64)
            zn = np.einsum("ij,ij->i", z, z).astype(np.float64)
            ynorm = np.sqrt((s + r * TINY32) / (1 - _gamma(int(r))))
            delta = np.sqrt((zn + d * TINY32) / (1 - _gamma(d))) * rel + absolute
            out[a : a + PIECE_ROWS] = np.square(ynorm + delta)
        out *= 1 + 1e-12
        return out + self.spec.offset

    def _update(self, block: Block) -> None:
        x = block.rows
        budget = self.spec.budget
        if self.idx.size < budget or x.dtype not in (np.float16, np.float32):
            super()._update(block)
            return
        threshold = float(self.scores.min())  # the B-th best held score
        with single_blas_thread():
            bound = self._bounds(x)
            if not np.isfinite(bound).all():
                super()._update(block)
                return
            sel = np.flatnonzero(bound >= threshold)
            if sel.size == 0:
                return
            s = map_scores(x[sel], self.spec.w, self.spec.shift, self.spec.offset)
        values = None
        if self.values is not None and block.values is not None:
            values = np.vstack([self.values, block.values[sel].astype(np.float64)])
        self._keep_top(
            np.concatenate([self.idx, block.start + sel.astype(np.int64)]),
            np.concatenate([self.scores, s]),
            np.vstack([self.rows, x[sel].astype(np.float64)]),
            values,
        )

    def nbytes_bound(self, d: int, d_values: int = 0) -> int:
        r = int(np.asarray(self.spec.w).shape[1])
        return super().nbytes_bound(d, d_values) + 4 * PIECE_ROWS * (2 * d + r) + 24 * PIECE_ROWS
