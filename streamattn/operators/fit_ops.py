"""Streaming passes of the one-layer attention fit, one operator per pass kind.

Mathematics: docs/architecture.md, note 2.8.

The loss (Song et al., "tensor and SVM tricks" paper) is
L(X, Y) = Σ_{j0} ‖softmax(A1[j0] X A2ᵀ) A3 Y − B[j0]‖², X, Y ∈ R^{d×d}, the Kronecker
matrix A1 ⊗ A2 (n² × d²) never formed: its block j0 applied to x = vec(X) is A1[j0] X A2ᵀ.
The pass streams the rows of A1 with the rows of B as the block's values; the keys A2 and
values A3 (n × d each) are spec arrays. A block is processed in tiles of ``tile`` query
rows, so the largest temporary is ``tile × n`` logits (memory O(tile·n + n·d² + d⁴)),
never n × n. Softmax rows are computed with their own maximum subtracted (logsumexp).

For a row with softmax s, features f = s A3 and residual r = f Y − B[j0], the Jacobian
of r_i with respect to X_pq is A1[j0, p]·U[q, i] with
U = A2ᵀ diag(s) (W − 1 hᵀ), W = A3 Y, h = f Y (the softmax derivative s ∘ (v − s·v)), so
U[q, i] = (s (A2 ⊙ W))[q, i] − (s A2)[q] h[i] — one GEMM of the tile's softmax with the
row-wise Kronecker product A2 ⊙ W (n × d²).

- :class:`AttentionFeatures`: F = softmax(A1 X A2ᵀ) A3 folded into the TSQR factor of
  [F, B] (2d columns, float64): Y*(X) = R_FF⁺ R_FB and min_Y L(X, Y) = ‖R_BB‖_F².
- :class:`AttentionGaussNewton`: at (X, Y*(X)), JᵀJ (d² × d²), Jᵀr, the loss, and
  Σ_i (QᵀJ_i)ᵀ(QᵀJ_i) with Q = F R_FF⁻¹ the orthonormal basis of range(F): Kaufman's
  variable-projection Gauss–Newton matrix is JᵀJ − Σ_i (QᵀJ_i)ᵀ(QᵀJ_i).
- :class:`AttentionLossGradient`: L(X, Y), ∂L/∂X = A1ᵀ (S ∘ (G A3ᵀ − c1ᵀ)) A2 with
  G = 2 R Yᵀ, c = rowsum(F ∘ G), and ∂L/∂Y = 2 FᵀR (the plain first-order baselines).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from streamattn.blas import single_blas_thread
from streamattn.operators.protocol import Operator, State
from streamattn.operators.solve_ops import StackedQR
from streamattn.sources import Block

#: Query rows per tile: the tile's logits are tile × n float64.
DEFAULT_FIT_TILE = 256


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 with the row maximum subtracted (in place)."""
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def _tiles(block: Block, tile: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(A1 rows, B rows) of the block in float64 tiles of at most ``tile`` rows."""
    if block.values is None:
        raise ValueError("the attention fit passes need B streamed as the block's values")
    out = []
    for a in range(0, block.rows.shape[0], tile):
        b = min(a + tile, block.rows.shape[0])
        out.append(
            (
                np.asarray(block.rows[a:b], dtype=np.float64),
                np.asarray(block.values[a:b], dtype=np.float64),
            )
        )
    return out


def _softmax_tile(a1: np.ndarray, x: np.ndarray, a2: np.ndarray) -> np.ndarray:
    return softmax_rows((a1 @ x) @ a2.T)


class _Additive(Operator):
    """Operators whose state is a dict of arrays that add under merge."""

    _keys: tuple[str, ...] = ()

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.acc: dict[str, np.ndarray] = {}

    def _add(self, parts: dict[str, np.ndarray]) -> None:
        for k, v in parts.items():
            self.acc[k] = v if k not in self.acc else self.acc[k] + v

    def _merge(self, other: Any) -> None:
        self._add(other.acc)

    def _state(self) -> State:
        return dict(self.acc)

    def _load(self, state: State) -> None:
        self.acc = {k: np.array(v, dtype=np.float64) for k, v in state.items()}


# ---------------------------------------------------------------------- features + TSQR
@dataclass(frozen=True)
class AttentionFeaturesSpec:
    """X (d × d), keys A2 (n × d), values A3 (n × d), query rows per tile."""

    x: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    tile: int = DEFAULT_FIT_TILE


class AttentionFeatures(StackedQR):
    """TSQR factor of [F, B] with F = softmax(A1 X A2ᵀ) A3 (rows of A1 streamed with B).

    Householder (``stack_qr``), float64: R_FF⁺ R_FB is the least-squares Y for this X
    without the normal equations, and ‖R_BB‖_F² the minimal loss. Memory:
    O(tile·n + d²) beyond the spec arrays.
    """

    family = "attention-features"
    Spec = AttentionFeaturesSpec
    spec: AttentionFeaturesSpec

    def _update(self, block: Block) -> None:
        sp = self.spec
        with single_blas_thread():
            for a1, b in _tiles(block, int(sp.tile)):
                f = _softmax_tile(a1, sp.x, sp.keys) @ sp.values
                self._fold_rows(np.hstack([f, b]))

    def result(self) -> np.ndarray:
        return self._square(self.r.shape[1] if self.r.size else 2 * self.spec.x.shape[0])

    def nbytes_bound(self, d: int) -> int:
        n = self.spec.keys.shape[0]
        t = int(self.spec.tile)
        return 8 * (2 * t * n + t * 4 * d + 3 * (2 * d) ** 2)


# ---------------------------------------------------------------------- Gauss–Newton
@dataclass(frozen=True)
class AttentionGaussNewtonSpec:
    """X, Y (d × d), keys A2, values A3 (n × d), ``q_map`` W with Q = F W (d × d), tile."""

    x: np.ndarray
    y: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    q_map: np.ndarray
    tile: int = DEFAULT_FIT_TILE


class AttentionGaussNewton(_Additive):
    """JᵀJ, Jᵀr, loss and the projected part Σ_i (QᵀJ_i)ᵀ(QᵀJ_i), summed over query rows.

    Per tile of t rows: the softmax (t × n), U (t × d × d) from one GEMM with the n × d²
    row-wise Kronecker product A2 ⊙ (A3 Y), then d⁴-sized contractions. Work per pass
    O(n²d² + n d⁴); memory O(t·n + n·d² + d⁵).
    """

    family = "attention-gauss-newton"
    Spec = AttentionGaussNewtonSpec
    spec: AttentionGaussNewtonSpec

    def __init__(self, spec: AttentionGaussNewtonSpec) -> None:
        super().__init__(spec)
        self._kron: np.ndarray | None = None

    def _kron_rows(self) -> np.ndarray:
        if self._kron is None:
            w = self.spec.values @ self.spec.y
            a2 = self.spec.keys
            self._kron = (a2[:, :, None] * w[:, None, :]).reshape(a2.shape[0], -1)
        return self._kron

    def _update(self, block: Block) -> None:
        with single_blas_thread():
            self._fold(block)

    def _fold(self, block: Block) -> None:
        sp = self.spec
        d = sp.x.shape[0]
        kron = self._kron_rows()
        for a1, b in _tiles(block, int(sp.tile)):
            t = a1.shape[0]
            s = _softmax_tile(a1, sp.x, sp.keys)
            f = s @ sp.values
            h = f @ sp.y
            res = h - b
            u = (s @ kron).reshape(t, d, d) - (s @ sp.keys)[:, :, None] * h[:, None, :]
            del s
            q = f @ sp.q_map
            # J[(j, i), (p, q)] = a1[j, p] u[j, q, i]
            uu = np.einsum("jqi,jsi->jqs", u, u).reshape(t, d * d)
            pp = (a1[:, :, None] * a1[:, None, :]).reshape(t, d * d)
            jtj = (pp.T @ uu).reshape(d, d, d, d).transpose(0, 2, 1, 3).reshape(d * d, d * d)
            jtr = np.einsum("jp,jqi,ji->pq", a1, u, res).reshape(d * d)
            qa = (q[:, :, None] * a1[:, None, :]).reshape(t, d * d)  # (j, a·p)
            qtj = np.einsum("jz,jqi->izq", qa, u).reshape(d, d, d, d)  # (i, a, p, q)
            self._add(
                {
                    "jtj": jtj,
                    "jtr": jtr,
                    "qtj": qtj.reshape(d, d, d * d),
                    "loss": np.array([float(np.sum(res * res))]),
                }
            )

    def result(self) -> dict[str, Any]:
        d = self.spec.x.shape[0]
        if not self.acc:
            z = np.zeros((d * d, d * d))
            return {"jtj": z, "jtr": np.zeros(d * d), "projected": z.copy(), "loss": 0.0}
        qtj = self.acc["qtj"]
        projected = np.einsum("iaz,iaw->zw", qtj, qtj)
        return {
            "jtj": self.acc["jtj"].copy(),
            "jtr": self.acc["jtr"].copy(),
            "projected": projected,
            "loss": float(self.acc["loss"][0]),
        }

    def nbytes_bound(self, d: int) -> int:
        n = self.spec.keys.shape[0]
        t = int(self.spec.tile)
        d2 = d * d
        return 8 * (2 * t * n + n * d2 + 6 * t * d2 + 4 * d2 * d2 + 2 * d * d2 * d)


# ---------------------------------------------------------------------- loss + gradient
@dataclass(frozen=True)
class AttentionLossGradientSpec:
    """X, Y (d × d), keys A2, values A3 (n × d), tile."""

    x: np.ndarray
    y: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    tile: int = DEFAULT_FIT_TILE


class AttentionLossGradient(_Additive):
    """L(X, Y), ∂L/∂X and ∂L/∂Y summed over query rows (exact, through the softmax).

    Memory O(tile·n + d²); work per pass O(n²d).
    """

    family = "attention-loss-gradient"
    Spec = AttentionLossGradientSpec
    spec: AttentionLossGradientSpec

    def _update(self, block: Block) -> None:
        with single_blas_thread():
            self._fold(block)

    def _fold(self, block: Block) -> None:
        sp = self.spec
        for a1, b in _tiles(block, int(sp.tile)):
            s = _softmax_tile(a1, sp.x, sp.keys)
            f = s @ sp.values
            res = f @ sp.y - b
            g = 2.0 * res @ sp.y.T  # dL/df
            c = np.einsum("ij,ij->i", f, g)
            dz = s * (g @ sp.values.T - c[:, None])
            self._add(
                {
                    "grad_x": a1.T @ (dz @ sp.keys),
                    "grad_y": 2.0 * f.T @ res,
                    "loss": np.array([float(np.sum(res * res))]),
                }
            )

    def result(self) -> dict[str, Any]:
        d = self.spec.x.shape[0]
        if not self.acc:
            return {"loss": 0.0, "grad_x": np.zeros((d, d)), "grad_y": np.zeros((d, d))}
        return {
            "loss": float(self.acc["loss"][0]),
            "grad_x": self.acc["grad_x"].copy(),
            "grad_y": self.acc["grad_y"].copy(),
        }

    def nbytes_bound(self, d: int) -> int:
        n = self.spec.keys.shape[0]
        t = int(self.spec.tile)
        return 8 * (3 * t * n + 6 * d * d + 4 * t * d)


__all__ = [
    "AttentionFeatures",
    "AttentionFeaturesSpec",
    "AttentionGaussNewton",
    "AttentionGaussNewtonSpec",
    "AttentionLossGradient",
    "AttentionLossGradientSpec",
    "softmax_rows",
]
