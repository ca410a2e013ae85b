"""Shared, generic test fixtures: key stores on disk and an offline leverage reference.

- ``zarr_store(x, ...)``: write an array to a fresh zarr store under ``tmp_path``
  (format 2 or 3, chosen chunking, optional compression, optional ``values``/``queries``
  arrays in a group) and return its path.
- ``reference_leverage(x, affine=False, rtol=1e-10)``: leverage scores and numerical rank
  from a dense float64 SVD of the whole matrix (the offline computation streamed results
  are checked against).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import settings

# CI (`.ci/run` sets HYPOTHESIS_PROFILE=ci): the same examples on every run, so a landing is
# not decided by which random examples a run drew; local runs keep exploring at random.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def svd_leverage(
    x: np.ndarray, affine: bool = False, rtol: float = 1e-10
) -> tuple[np.ndarray, int]:
    """τ_j = ‖U_r[j]‖² from the thin SVD of K (or of [K − 1μᵀ, 1]); rank = #{σ > rtol·σ_max}.

    Affine: [K − 1μᵀ, 1] spans the same column space as [K, 1] (hence the same scores), but a
    common offset ≫ the spread no longer makes it ill-conditioned: augmenting K itself gave
    σ_min/σ_max ≈ 9e-11 < rtol for a 10 × 8 graded input with offset 3e3, i.e. rank 8 where
    the exact rank is 9 (a hypothesis example).
    """
    a = np.asarray(x, dtype=np.float64)
    if affine:
        a = np.hstack([a - a.mean(axis=0), np.ones((a.shape[0], 1))])
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    rank = int(np.count_nonzero(s > rtol * s[0])) if s.size and s[0] > 0 else 0
    return np.einsum("ij,ij->i", u[:, :rank], u[:, :rank]), rank


@pytest.fixture
def reference_leverage() -> Callable[..., tuple[np.ndarray, int]]:
    return svd_leverage


@pytest.fixture
def zarr_store(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``zarr_store(x, chunks=..., zarr_format=3, group=False, ...) -> path``."""
    import zarr

    counter = iter(range(10**6))

    def make(
        x: np.ndarray,
        *,
        chunks: int | None = None,
        zarr_format: int = 3,
        group: bool = False,
        values: np.ndarray | None = None,
        queries: np.ndarray | None = None,
        compressed: bool = True,
        name: str | None = None,
    ) -> Path:
        path = tmp_path / (name or f"store{next(counter)}.zarr")
        rows = chunks or max(1, x.shape[0])
        extra: dict[str, Any] = {} if compressed else {"compressors": None}
        arrays = {"keys": x, "values": values, "queries": queries}
        if not group and values is None and queries is None:
            arr = zarr.create_array(
                str(path),
                shape=x.shape,
                dtype=x.dtype,
                chunks=(rows, *x.shape[1:]),
                zarr_format=zarr_format,
                **extra,
            )
            arr[...] = x
            return path
        root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
        for key, data in arrays.items():
            if data is None:
                continue
            arr = root.create_array(
                key, shape=data.shape, dtype=data.dtype, chunks=(rows, *data.shape[1:]), **extra
            )
            arr[...] = data
        return path

    return make
