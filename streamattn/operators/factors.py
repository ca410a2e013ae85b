"""Float64 QR-type factors shared by the operators (no operator here).

``stack_qr``: the R factor of stacked row blocks (TSQR). ``centred_factor_update`` and
``centred_factor_result``: the factor R of [1, K] folded block by block, and the mean and
centred factor R_c (R_cᵀR_c = Σ (k − μ)(k − μ)ᵀ) read off it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg


def stack_qr(*parts: np.ndarray) -> np.ndarray:
    """The R factor of the vertically stacked parts (float64, economy, min(m, d) × d)."""
    stacked = np.vstack(parts)
    if stacked.shape[0] == 0:
        return stacked
    return scipy.linalg.qr(stacked, mode="r", overwrite_a=True, check_finite=False)[0][
        : min(stacked.shape)
    ]


@dataclass(frozen=True)
class CentredFactorResult:
    """n, the mean μ and R_c, the R factor of the centred keys (R_cᵀR_c = Σ (k−μ)(k−μ)ᵀ)."""

    n: int
    mean: np.ndarray
    r_centred: np.ndarray

    def principal_directions(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(V_m, σ²): top-m right singular vectors of R_c (d × m, sign-fixed) and all σ²."""
        _, s, vt = np.linalg.svd(self.r_centred, full_matrices=True)
        v = vt[:m].T
        flip = np.sign(v[np.argmax(np.abs(v), axis=0), np.arange(v.shape[1])])
        return v * np.where(flip == 0, 1.0, flip), s**2


def centred_factor_update(r: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The TSQR factor of [1, K] after appending ``rows`` (R of [R; 1, X], float64)."""
    x = np.asarray(rows, dtype=np.float64)
    aug = np.hstack([np.ones((x.shape[0], 1)), x])
    return stack_qr(aug) if r.size == 0 else stack_qr(r, aug)


def centred_factor_result(r: np.ndarray, n: int) -> CentredFactorResult:
    """n, μ and R_c read off the factor R of [1, K] (first row (r₀₀, r₀₀ μᵀ))."""
    d = r.shape[1] - 1
    full = np.zeros((d + 1, d + 1))
    full[: r.shape[0]] = r[: d + 1]
    mean = full[0, 1:] / full[0, 0] if n else np.zeros(d)
    return CentredFactorResult(n, mean, full[1:, 1:])
