"""Out-of-core solvers for attention kernel regressions (docs/architecture.md, note 2.7).

Problems (A ∈ R^{n×d} on disk, n ≫ d; Song, Yin et al., "Solving Attention Kernel
Regression Problem via Pre-conditioner", arXiv 2308.14304):

- :func:`gram_power`: x* = argmin ‖(AᵀA)^j x − b‖₂, b ∈ R^d;
- :func:`a_gram_power`: x* = argmin ‖A (AᵀA)^j x − b‖₂, b ∈ R^n (streamed with A);
- :func:`attention_kernel`: x* = argmin ‖(exp(β AAᵀ) + λI) x − b‖₂, b ∈ R^n, exp entrywise.

Every pass over A is a set of operators (``streamattn.operators.solve_ops``) run by
the runner (``streamattn.runner.run_pass``: block size, memory budget, engine), so the local
and Dask engines give the same answer; one engine session (e.g. one Dask cluster) serves
every pass of a solve.

Methods and what they guarantee (G = AᵀA, κ = cond(A), u = 2⁻⁵³):

- ``direct`` (first two problems): one TSQR pass gives R (RᵀR = G, Householder, never
  the normal equations) — for ``a_gram_power`` the factor of [A, b], whose last column is
  Qᵀb. Then x = (R⁻¹R⁻ᵀ)^j b, resp. x = (R⁻¹R⁻ᵀ)^j R⁻¹ Qᵀb: 2j (+1) triangular solves.
  Accuracy (first order): each triangular solve and the TSQR are backward stable, so the
  relative error of x is ≲ 2j·c_d·u·κ^{2j} with c_d a small multiple of d — the
  condition number of the problem itself (cond((AᵀA)^j) = κ^{2j}); ``info["error_bound"]``
  reports 2j·d·u·κ^{2j} with κ from R. With κ^{2j} ≥ 1/u no digit is guaranteed.
- ``sketch-precondition`` (the paper's route): one pass for SA (Gaussian/SRHT/CountSketch,
  seeded by (seed, global row)), R_s = qr(SA).R; then, for each factor of G⁻¹ in
  x = G^{-j} b (resp. G^{-(j+1)} Aᵀb, Aᵀb fused into the sketch pass), preconditioned CG on
  G y = c with preconditioner (R_sᵀR_s)⁻¹, i.e. CG on R_s⁻ᵀ G R_s⁻¹, whose condition
  number is cond(A R_s⁻¹)² ≤ ((1 + √(d/m) + t/√m)/(1 − √(d/m) − t/√m))² with probability
  ≥ 1 − 2e^{−t²/2} for the Gaussian sketch — independent of κ. One pass over A per CG
  iteration (:class:`GramMatvec`). Each stage stops when its preconditioned residual
  ‖R_s⁻ᵀ(c − Gy)‖ ≤ tol·‖R_s⁻ᵀc‖; stage errors propagate through later stages, so the
  final relative error is ≲ j·κ^{2j}·tol (first order). ``compare=True`` also runs plain CG
  on the same stages (same tolerance on its own residual) and reports its iterations.
- exp kernel: CG on K + λI, K = exp(β AAᵀ) (PSD by the Schur product theorem), one pass
  over A per product (:class:`ExpKernelMatvec`, tiles, never n × n), preconditioned by a
  randomized Nyström approximation of rank s (Frangella, Tropp, Udell 2023: K Ω in one
  pass, shift ν = √n·u·‖KΩ‖, P⁻¹ = (λ̂_s + λ) U(Λ̂ + λ)⁻¹Uᵀ + (I − UUᵀ)). For λ > 0 and
  s ≳ the effective dimension the preconditioned condition number is O(1) with high
  probability (their Theorem 5.1); for λ = 0 there is no such bound — the iterations are
  measured, not promised.

Reported in ``SolveResult.info``: method, passes over A, iterations, residual
‖Mx − b‖/‖b‖ (computed against A by extra passes when ``verify``), a backward-error
estimate, and the unpreconditioned comparison when asked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg

from streamattn.errors import ConfigError, InvalidInputError
from streamattn.operators.protocol import Operator
from streamattn.operators.solve_ops import (
    DEFAULT_TILE,
    SKETCH_METHODS,
    ExpKernelMatvec,
    ExpKernelMatvecSpec,
    GramMatvec,
    GramMatvecSpec,
    LeastSquaresResidual,
    LeastSquaresResidualSpec,
    RowSketch,
    RowSketchSpec,
    TallSkinnyQR,
    TallSkinnyQRSpec,
)
from streamattn.runner import run_pass, session
from streamattn.sources import KeySource, open_keys

METHODS = ("direct", "sketch-precondition")
KERNEL_METHODS = ("nystrom-pcg", "cg")
EPS = float(np.finfo(np.float64).eps)
#: exp(x) overflows float64 above ~709.78; the kernel refuses β·max‖a_i‖² beyond this.
EXP_LIMIT = 700.0


@dataclass(frozen=True)
class SolveResult:
    """The solution ``x`` (float64) and ``info`` (method, passes, iterations, residual, ...)."""

    x: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- inputs
def _check_j(j: Any) -> int:
    if isinstance(j, bool) or not isinstance(j, (int, np.integer)):
        raise ConfigError(f"j (the power of AᵀA) must be an integer >= 1, got {j!r}.")
    if j < 1:
        raise ConfigError(f"j (the power of AᵀA) must be >= 1, got {j}.")
    return int(j)


def _load_vector(b: Any, what: str) -> tuple[Any, str]:
    """b as an array-like (numpy, memmap of a .npy, zarr array) and its label."""
    if isinstance(b, (str, Path)):
        path = Path(b)
        if not path.exists():
            raise InvalidInputError(f"{what} {path}: no such file or directory.")
        if path.is_file():
            if path.suffix != ".npy":
                raise InvalidInputError(f"{what} {path}: expected a .npy file or a zarr array.")
            try:
                return np.load(path, mmap_mode="r", allow_pickle=False), str(path)
            except Exception as exc:
                raise InvalidInputError(f"{what} {path}: cannot read as .npy: {exc}") from exc
        import zarr

        try:
            node = zarr.open(str(path), mode="r")
        except Exception as exc:
            raise InvalidInputError(f"{what} {path}: not a readable zarr array: {exc}") from exc
        if not isinstance(node, zarr.Array):
            raise InvalidInputError(f"{what} {path}: is a zarr group; pass the array itself.")
        return node, str(path)
    if not hasattr(b, "shape") or not hasattr(b, "dtype"):
        b = np.asarray(b)
    return b, f"<{type(b).__name__}>"


def _check_float(b: Any, label: str) -> None:
    if np.dtype(b.dtype).kind != "f":
        raise InvalidInputError(f"{label}: b has dtype {b.dtype}; expected a float array.")


def _small_rhs(b: Any, d: int) -> np.ndarray:
    arr, label = _load_vector(b, "b")
    shape = tuple(int(s) for s in arr.shape)
    if shape not in ((d,), (d, 1)):
        raise InvalidInputError(
            f"{label}: b has shape {shape}; gram_power needs b in R^d, shape ({d},), "
            f"to match A's d = {d} columns."
        )
    _check_float(arr, label)
    out = np.asarray(arr[...], dtype=np.float64).reshape(d)
    if not np.isfinite(out).all():
        i = int(np.flatnonzero(~np.isfinite(out))[0])
        raise InvalidInputError(f"{label}: b[{i}] is NaN or Inf; every entry must be finite.")
    return out


def _key_source(src: KeySource, b: Any | None = None, b_label: str = "") -> KeySource:
    """A over its own store (keys only), or A with b as its single value column."""
    if b is None:
        return KeySource(src.keys, label=src.label, path=src.path, array_name=src.array_name)
    return KeySource(src.keys, label=f"{src.label} with b = {b_label}", values=b)


class _Column:
    """A 1-D array-like (zarr, memmap) seen as an (n, 1) column, read lazily by row range."""

    def __init__(self, arr: Any) -> None:
        self.arr = arr
        self.shape = (int(arr.shape[0]), 1)
        self.dtype = np.dtype(arr.dtype)
        self.ndim = 2
        chunks = getattr(arr, "chunks", None)
        if chunks is not None and not isinstance(chunks[0], tuple):
            self.chunks = (int(chunks[0]), 1)

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols = (key, slice(None)) if not isinstance(key, tuple) else key
        return np.asarray(self.arr[rows])[:, None][:, cols]


def _tall_rhs(src: KeySource, b: Any) -> KeySource:
    arr, label = _load_vector(b, "b")
    shape = tuple(int(s) for s in arr.shape)
    if shape not in ((src.n,), (src.n, 1)):
        raise InvalidInputError(
            f"{label}: b has shape {shape}; this problem needs b in R^n, shape ({src.n},), "
            f"one entry per row of A ({src.label}, n = {src.n})."
        )
    _check_float(arr, label)
    column = _Column(arr) if shape == (src.n,) else arr
    return _key_source(src, column, label)


def _open_a(a: Any) -> KeySource:
    src = open_keys(a)
    if not isinstance(src, KeySource):
        raise InvalidInputError(
            "A must be a single (n, d) matrix (a KV cache with several heads was given)."
        )
    return src


@dataclass
class _Passes:
    """Runs passes with fixed engine settings and counts them."""

    engine: str
    chunk_rows: int | None
    options: dict[str, Any]
    count: int = 0

    def run(self, source: KeySource, ops: Sequence[Operator], what: str) -> list[Operator]:
        self.count += 1
        return run_pass(
            source, ops, engine=self.engine, chunk_rows=self.chunk_rows,
            description=what, **self.options,
        )


# ---------------------------------------------------------------------- linear algebra
def _tri_solve(r: np.ndarray, c: np.ndarray, trans: bool) -> np.ndarray:
    return scipy.linalg.solve_triangular(r, c, trans=1 if trans else 0, check_finite=False)


def _gram_inverse_power(r: np.ndarray, c: np.ndarray, j: int) -> np.ndarray:
    """(RᵀR)^{-j} c by 2j triangular solves."""
    y = c
    for _ in range(j):
        y = _tri_solve(r, _tri_solve(r, y, trans=True), trans=False)
    return y


def _check_factor(r: np.ndarray, label: str, what: str) -> tuple[float, float]:
    """(σ_max, cond) of R; refuse a numerically singular factor."""
    s = np.linalg.svd(r, compute_uv=False)
    if s.size == 0 or s[0] == 0 or s[-1] <= s[0] * r.shape[0] * EPS:
        cond = float("inf") if s.size == 0 or s[-1] == 0 else float(s[0] / s[-1])
        raise InvalidInputError(
            f"{label}: A is numerically rank deficient ({what} has cond {cond:.3g} >= "
            f"d/u = {r.shape[0] / EPS:.3g}); (AᵀA)^j is singular. Remove dependent columns."
        )
    return float(s[0]), float(s[0] / s[-1])


@dataclass(frozen=True)
class CGRun:
    """One CG solve: iterations, whether it reached ``tol``, the final relative residual."""

    iterations: int
    converged: bool
    residual: float


def pcg(
    matvec: Callable[[np.ndarray], np.ndarray],
    c: np.ndarray,
    *,
    precond: Callable[[np.ndarray], np.ndarray] | None,
    tol: float,
    max_iter: int,
    x0: np.ndarray | None = None,
    measure: str = "preconditioned",
) -> tuple[np.ndarray, CGRun]:
    """(Preconditioned) conjugate gradients on a symmetric positive definite system.

    ``measure="preconditioned"``: stop when √(rᵀP⁻¹r) ≤ tol·√(cᵀP⁻¹c) (the residual of the
    preconditioned system; the plain residual without a preconditioner);
    ``measure="residual"``: stop when the recurrence residual ‖r‖ ≤ tol‖c‖.
    One ``matvec`` per iteration.
    """
    apply_p = precond if precond is not None else (lambda v: v)
    x = np.zeros_like(c) if x0 is None else x0.copy()
    r = c - matvec(x) if x0 is not None else c.copy()
    z = apply_p(r)
    rz = float(np.vdot(r, z))
    by_residual = measure == "residual"

    def size(r_: np.ndarray, rz_: float) -> float:
        return float(np.linalg.norm(r_)) if by_residual else float(np.sqrt(max(rz_, 0.0)))

    ref = size(c, float(np.vdot(c, apply_p(c))))
    if ref == 0.0:
        return np.zeros_like(c), CGRun(0, True, 0.0)
    p = z.copy()
    it = 0
    rel = size(r, rz) / ref
    while rel > tol and it < max_iter:
        q = matvec(p)
        pq = float(np.vdot(p, q))
        if pq <= 0:
            break  # breakdown: p is (numerically) in the null space
        alpha = rz / pq
        x += alpha * p
        r -= alpha * q
        z = apply_p(r)
        rz_new = float(np.vdot(r, z))
        p = z + (rz_new / rz) * p
        rz = rz_new
        it += 1
        rel = size(r, rz) / ref
    return x, CGRun(it, rel <= tol, rel)


# ---------------------------------------------------------------------- (AᵀA)^j problems
def _gram_matvec(passes: _Passes, source: KeySource) -> Callable[[np.ndarray], np.ndarray]:
    def matvec(v: np.ndarray) -> np.ndarray:
        (op,) = passes.run(source, [GramMatvec(GramMatvecSpec(v.reshape(-1, 1)))], "AᵀA v")
        return np.asarray(op.result()["atav"][:, 0])

    return matvec


def _stages(
    matvec: Callable[[np.ndarray], np.ndarray],
    c: np.ndarray,
    stages: int,
    precond: Callable[[np.ndarray], np.ndarray] | None,
    tol: float,
    max_iter: int,
) -> tuple[np.ndarray, list[CGRun]]:
    runs = []
    y = c
    for _ in range(stages):
        y, run = pcg(matvec, y, precond=precond, tol=tol, max_iter=max_iter)
        runs.append(run)
    return y, runs


def _check_options(method: str, sketch: str, sketch_size: int | None, tol: float) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {list(METHODS)}.")
    if sketch not in SKETCH_METHODS:
        raise ConfigError(f"unknown sketch {sketch!r}; choose one of {list(SKETCH_METHODS)}.")
    if sketch_size is not None and (isinstance(sketch_size, bool) or sketch_size < 1):
        raise ConfigError(f"sketch_size must be an integer >= 1, got {sketch_size!r}.")
    if not (0 < tol < 1):
        raise ConfigError(f"tol must lie in (0, 1), got {tol!r}.")


def _solve_gram_family(
    problem: str,
    a: Any,
    b: Any,
    j: Any,
    *,
    method: str,
    sketch: str,
    sketch_size: int | None,
    seed: int,
    tol: float,
    max_iter: int | None,
    compare: bool,
    verify: bool,
    engine: str,
    chunk_rows: int | None,
    engine_options: dict[str, Any],
) -> SolveResult:
    j = _check_j(j)
    _check_options(method, sketch, sketch_size, tol)
    t0 = time.perf_counter()
    src = _open_a(a)
    n, d = src.n, src.d
    plain = _key_source(src)
    tall = problem == "a-gram-power"
    with_b = _tall_rhs(src, b) if tall else None
    small_b = None if tall else _small_rhs(b, d)
    passes = _Passes(engine, chunk_rows, engine_options)
    info: dict[str, Any] = {"problem": problem, "method": method, "j": j, "n": n, "d": d}
    stages = j + 1 if tall else j
    cap = int(max_iter) if max_iter is not None else max(100, 10 * d)

    if method == "direct":
        factor_src = with_b if with_b is not None else plain
        (qr_op,) = passes.run(factor_src, [TallSkinnyQR(TallSkinnyQRSpec(with_rhs=tall))], "TSQR")
        r_full = qr_op.result()
        r = r_full[:d, :d]
        smax, cond = _check_factor(r, src.label, "its R factor")
        if tall:
            x = _gram_inverse_power(r, _tri_solve(r, r_full[:d, d], trans=False), j)
            info["ls_residual_norm_from_factor"] = float(abs(r_full[d, d]))
        else:
            assert small_b is not None
            x = _gram_inverse_power(r, small_b, j)
        info["iterations"] = 0
        info["cond_A"] = cond
        info["error_bound"] = 2 * j * d * EPS * cond ** (2 * j)
        info["error_bound_note"] = (
            "first-order relative error bound 2j·d·u·cond(A)^{2j} (backward-stable TSQR and "
            "triangular solves); the problem's own condition number is cond(A)^{2j}"
        )
    else:
        m = int(sketch_size) if sketch_size is not None else 8 * d
        if m < d:
            raise ConfigError(f"sketch_size m = {m} must be >= d = {d} to embed range(A).")
        ops: list[Operator] = [RowSketch(RowSketchSpec(sketch, m, int(seed), n))]
        sketch_src = plain
        if tall:
            ops.append(LeastSquaresResidual(LeastSquaresResidualSpec(np.zeros(d))))
            assert with_b is not None
            sketch_src = with_b
        done = passes.run(sketch_src, ops, "sketch")
        sa = done[0].result()
        rs = scipy.linalg.qr(sa, mode="r", check_finite=False)[0][:d]
        smax, cond_s = _check_factor(rs, src.label, "the sketch factor qr(SA).R")
        c = -done[1].result()["atr"] if tall else small_b
        assert c is not None

        def precond(v: np.ndarray) -> np.ndarray:
            return _tri_solve(rs, _tri_solve(rs, v, trans=True), trans=False)

        matvec = _gram_matvec(passes, plain)
        before = passes.count
        x, runs = _stages(matvec, c, stages, precond, tol, cap)
        info["iterations"] = sum(run.iterations for run in runs)
        info["stage_iterations"] = [run.iterations for run in runs]
        info["converged"] = all(run.converged for run in runs)
        info["solve_passes"] = passes.count - before
        info["sketch"] = {"method": sketch, "m": m, "seed": int(seed)}
        info["cond_A_estimate"] = cond_s
        info["tol"] = tol
        info["error_bound_note"] = (
            "first-order relative error ≲ j·cond(A)^{2j}·tol (stage errors propagate); "
            "iterations independent of cond(A) (subspace embedding)"
        )
        if compare:
            unpre = _Passes(engine, chunk_rows, engine_options)
            _, plain_runs = _stages(_gram_matvec(unpre, plain), c, stages, None, tol, cap)
            info["unpreconditioned"] = {
                "iterations": sum(run.iterations for run in plain_runs),
                "stage_iterations": [run.iterations for run in plain_runs],
                "converged": all(run.converged for run in plain_runs),
                "passes": unpre.count,
                "max_iter": cap,
            }
    info["passes"] = passes.count
    info["seconds"] = time.perf_counter() - t0
    if verify:
        info.update(_verify_gram(problem, passes, plain, with_b, small_b, x, j, smax))
        info["passes_with_verify"] = passes.count
    return SolveResult(np.asarray(x, dtype=np.float64), info)


def _verify_gram(
    problem: str,
    passes: _Passes,
    plain: KeySource,
    with_b: KeySource | None,
    small_b: np.ndarray | None,
    x: np.ndarray,
    j: int,
    smax: float,
) -> dict[str, Any]:
    """Residual ‖Mx − b‖/‖b‖ against A itself and a normwise backward-error estimate.

    gram_power (square system): Rigal–Gaches η = ‖r‖ / (‖M‖‖x‖ + ‖b‖), exact for the
    2-norm with ‖M‖ = σ_max(A)^{2j}, here from the factor (exact for ``direct``, within the
    sketch's distortion for ``sketch-precondition``). a_gram_power (least squares):
    Stewart's E = −r rᵀ M/‖r‖² makes x an exact LS solution of M + E, so
    ‖Mᵀr‖/(‖M‖‖r‖) bounds the relative backward error (0 residual: η as above).
    """
    matvec = _gram_matvec(passes, plain)
    w = x
    for _ in range(j):
        w = matvec(w)
    norm_m = smax ** (2 * j)
    # Rounding floor of evaluating r = Mx − b in float64 (≈ u‖M‖‖x‖/‖b‖): a residual
    # below it cannot be resolved, however accurate x is.
    floor = EPS * norm_m * (smax if problem == "a-gram-power" else 1.0) * float(np.linalg.norm(x))
    if problem == "gram-power":
        assert small_b is not None
        r_norm = float(np.linalg.norm(w - small_b))
        b_norm = float(np.linalg.norm(small_b))
        eta = r_norm / (norm_m * float(np.linalg.norm(x)) + b_norm)
        return {
            "residual": r_norm / b_norm if b_norm else r_norm,
            "residual_rounding_floor": floor / b_norm if b_norm else floor,
            "backward_error": eta,
        }
    assert with_b is not None
    (res,) = passes.run(with_b, [LeastSquaresResidual(LeastSquaresResidualSpec(w))], "residual")
    out = res.result()
    r_norm, b_norm = np.sqrt(out["r_norm_sq"]), np.sqrt(out["b_norm_sq"])
    norm_m *= smax
    mtr = out["atr"]
    for _ in range(j):
        mtr = matvec(mtr)
    if r_norm > 0:
        eta = float(np.linalg.norm(mtr)) / (norm_m * r_norm)
    else:
        eta = 0.0
    return {
        "residual": float(r_norm / b_norm) if b_norm else float(r_norm),
        "residual_rounding_floor": floor / b_norm if b_norm else floor,
        "normal_residual": float(np.linalg.norm(mtr)),
        "backward_error": eta,
    }


def gram_power(
    a: Any,
    b: Any,
    j: int = 1,
    *,
    method: str = "direct",
    sketch: str = "gaussian",
    sketch_size: int | None = None,
    seed: int = 0,
    tol: float = 1e-12,
    max_iter: int | None = None,
    compare: bool = False,
    verify: bool = True,
    engine: str = "local",
    chunk_rows: int | None = None,
    **engine_options: Any,
) -> SolveResult:
    """x* = argmin ‖(AᵀA)^j x − b‖₂ for A ∈ R^{n×d} streamed, b ∈ R^d.

    Parameters
    ----------
    a
        A path (.npy, zarr), or a numpy / zarr / dask array of shape (n, d).
    b
        The right-hand side, shape (d,) (array or .npy path).
    j
        The power, an integer >= 1.
    method
        ``"direct"`` (one TSQR pass + 2j triangular solves) or ``"sketch-precondition"``
        (one sketch pass, then one pass per CG iteration).
    sketch, sketch_size, seed
        Sketch-precondition: ``gaussian`` / ``srht`` / ``countsketch``, m rows (default
        8d), its seed.
    tol, max_iter
        CG stopping tolerance per stage (preconditioned residual) and iteration cap
        (default max(100, 10d)).
    compare
        Also run unpreconditioned CG on the same stages; ``info["unpreconditioned"]``.
    verify
        Compute the residual against A (j more passes) and a backward-error estimate.
    engine, chunk_rows, engine_options
        As for :func:`streamattn.run_operators` (``engine="dask"``, ``scheduler=...``).

    Examples
    --------
    >>> import numpy as np
    >>> a = np.random.default_rng(0).standard_normal((500, 4))
    >>> res = gram_power(a, np.ones(4), j=2)
    >>> bool(np.allclose(np.linalg.matrix_power(a.T @ a, 2) @ res.x, 1.0))
    True
    """
    with session(engine, **engine_options) as options:
        return _solve_gram_family(
            "gram-power", a, b, j, method=method, sketch=sketch, sketch_size=sketch_size,
            seed=seed, tol=tol, max_iter=max_iter, compare=compare, verify=verify,
            engine=engine, chunk_rows=chunk_rows, engine_options=options,
        )


def a_gram_power(
    a: Any,
    b: Any,
    j: int = 1,
    *,
    method: str = "direct",
    sketch: str = "gaussian",
    sketch_size: int | None = None,
    seed: int = 0,
    tol: float = 1e-12,
    max_iter: int | None = None,
    compare: bool = False,
    verify: bool = True,
    engine: str = "local",
    chunk_rows: int | None = None,
    **engine_options: Any,
) -> SolveResult:
    """x* = argmin ‖A (AᵀA)^j x − b‖₂ for A ∈ R^{n×d} and b ∈ R^n streamed together.

    ``b``: a numpy array, a .npy path or a zarr array (path or object) with n entries.
    ``direct`` factors [A, b] in one pass (Qᵀb from the last column); the minimal residual
    ``info["ls_residual_norm_from_factor"]`` = |R[d, d]|. Other parameters as in
    :func:`gram_power`; ``sketch-precondition`` solves j + 1 stages (Aᵀb is fused into
    the sketch pass). A full-column-rank A is required: x* = (AᵀA)^{-(j+1)} Aᵀb.
    """
    with session(engine, **engine_options) as options:
        return _solve_gram_family(
            "a-gram-power", a, b, j, method=method, sketch=sketch, sketch_size=sketch_size,
            seed=seed, tol=tol, max_iter=max_iter, compare=compare, verify=verify,
            engine=engine, chunk_rows=chunk_rows, engine_options=options,
        )


# ---------------------------------------------------------------------- exp(β AAᵀ)
def kernel_matvec_bound(n: int, d: int, k: int = 1, tile: int = DEFAULT_TILE,
                        itemsize: int = 8) -> int:
    """``ExpKernelMatvec.nbytes_bound`` for an n × d row side and k vectors (no data needed)."""
    op = ExpKernelMatvec(
        ExpKernelMatvecSpec(np.zeros((0, d)), np.zeros((0, k)), 1.0, tile)
    )
    return op.nbytes_bound(d) + n * d * itemsize + 3 * 8 * n * k


@dataclass(frozen=True)
class NystromPreconditioner:
    """P⁻¹ v = (λ̂_s + μ) U (Λ̂ + μ)⁻¹ Uᵀv + (v − UUᵀv) from a rank-s Nyström K̂ = UΛ̂Uᵀ."""

    u: np.ndarray
    lam: np.ndarray
    mu: float

    def __call__(self, v: np.ndarray) -> np.ndarray:
        if self.lam.size == 0:
            return v.copy()
        coef = self.u.T @ v
        scale = (self.lam[-1] + self.mu) / (self.lam + self.mu)
        return self.u @ (scale * coef) + (v - self.u @ coef)


def nystrom(y: np.ndarray, omega: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, Λ̂) of the stabilised Nyström approximation from Y = KΩ (Ω orthonormal).

    Tropp et al. (2017) / Frangella et al. (2023) Alg. 2.1: Y_ν = Y + νΩ with
    ν = √n·u·‖Y‖₂, C = chol(ΩᵀY_ν), B = Y_ν C⁻¹ = U Σ Vᵀ, Λ̂ = max(Σ² − ν, 0); directions
    with Λ̂ = 0 are dropped. K̂ = UΛ̂Uᵀ ⪯ K.
    """
    n = y.shape[0]
    nu = np.sqrt(n) * EPS * float(np.linalg.norm(y, 2))
    y_nu = y + nu * omega
    core = omega.T @ y_nu
    core = (core + core.T) / 2
    try:
        c = scipy.linalg.cholesky(core, lower=False)
    except np.linalg.LinAlgError:
        w = np.linalg.eigvalsh(core)
        shift = max(0.0, -float(w[0])) + nu + 10 * EPS * float(w[-1])
        c = scipy.linalg.cholesky(core + shift * np.eye(core.shape[0]), lower=False)
    bmat = scipy.linalg.solve_triangular(c, y_nu.T, trans=1, check_finite=False).T
    u, s, _ = np.linalg.svd(bmat, full_matrices=False)
    lam = np.maximum(s**2 - nu, 0.0)
    keep = lam > lam[0] * 1e-14 if lam.size and lam[0] > 0 else np.zeros(lam.size, bool)
    return u[:, keep], lam[keep]


def attention_kernel(
    a: Any,
    b: Any,
    *,
    beta: float = 1.0,
    ridge: float = 0.0,
    method: str = "nystrom-pcg",
    rank: int = 100,
    seed: int = 0,
    tol: float = 1e-8,
    max_iter: int = 500,
    compare: bool = False,
    verify: bool = True,
    tile: int = DEFAULT_TILE,
    engine: str = "local",
    chunk_rows: int | None = None,
    **engine_options: Any,
) -> SolveResult:
    """x* = argmin ‖(exp(β AAᵀ) + λI) x − b‖₂ by (preconditioned) CG, matrix-free.

    K = exp(β AAᵀ) entrywise is PSD (Schur product theorem); K + λI is solved by CG, one
    pass over A per product (:class:`~streamattn.operators.solve_ops.ExpKernelMatvec`),
    never an n × n array. ``method="nystrom-pcg"`` (default) preconditions with a rank-
    ``rank`` randomized Nyström approximation (one extra pass for KΩ, Ω seeded by
    ``seed``); ``"cg"`` is plain CG. ``ridge`` = λ ≥ 0 (λ > 0: the preconditioned
    condition number is O(1) w.h.p. for rank ≳ the effective dimension; λ = 0: measured
    only). Stops at the recurrence residual ‖b − (K + λI)x‖ ≤ tol·‖b‖; ``verify``
    recomputes the true residual with one more pass.

    Memory: A's rows (n × d, the row side of every product, read once in the first
    pass), O(rank) vectors of length n, two tiles of ``tile × tile`` float64 — see
    :func:`kernel_matvec_bound`. ``compare=True`` also runs plain CG.
    """
    with session(engine, **engine_options) as options:
        return _attention_kernel(
            a, b, beta=beta, ridge=ridge, method=method, rank=rank, seed=seed, tol=tol,
            max_iter=max_iter, compare=compare, verify=verify, tile=tile, engine=engine,
            chunk_rows=chunk_rows, engine_options=options,
        )


def _attention_kernel(
    a: Any, b: Any, *, beta: float, ridge: float, method: str, rank: int, seed: int,
    tol: float, max_iter: int, compare: bool, verify: bool, tile: int, engine: str,
    chunk_rows: int | None, engine_options: dict[str, Any],
) -> SolveResult:
    if method not in KERNEL_METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {list(KERNEL_METHODS)}.")
    if not np.isfinite(beta) or beta <= 0:
        raise ConfigError(f"beta must be a finite number > 0, got {beta!r}.")
    if not np.isfinite(ridge) or ridge < 0:
        raise ConfigError(f"ridge (λ) must be a finite number >= 0, got {ridge!r}.")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ConfigError(f"rank must be an integer >= 1, got {rank!r}.")
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ConfigError(f"tile must be an integer >= 1, got {tile!r}.")
    if not (0 < tol < 1):
        raise ConfigError(f"tol must lie in (0, 1), got {tol!r}.")
    t0 = time.perf_counter()
    src = _open_a(a)
    n, d = src.n, src.d
    with_b = _tall_rhs(src, b)
    passes = _Passes(engine, chunk_rows, engine_options)
    # The row side: A itself, read once (validated, NaN/Inf named by row); b with it.
    blocks = list(with_b.blocks(chunk_rows))
    passes.count += 1
    rows = np.concatenate([blk.rows for blk in blocks])
    bvec = np.concatenate([np.asarray(blk.values, np.float64)[:, 0] for blk in blocks])
    del blocks
    top = float(beta) * float(np.max(np.einsum("ij,ij->i", rows, rows, dtype=np.float64)))
    if top > EXP_LIMIT:
        raise InvalidInputError(
            f"{src.label}: β·max‖a_i‖² = {top:.4g} > {EXP_LIMIT}; exp(β AAᵀ) overflows "
            "float64. Lower beta (or scale A)."
        )
    plain = _key_source(src)

    def kernel(p: _Passes, v: np.ndarray) -> np.ndarray:
        v2 = v.reshape(n, -1)
        spec = ExpKernelMatvecSpec(rows, v2, float(beta), int(tile))
        (op,) = p.run(plain, [ExpKernelMatvec(spec)], "exp(βAAᵀ) v")
        out = np.asarray(op.result()) + ridge * v2
        return out.reshape(v.shape)

    info: dict[str, Any] = {
        "problem": "attention-kernel", "method": method, "n": n, "d": d,
        "beta": float(beta), "ridge": float(ridge), "tol": tol,
        "max_abs_logit_bound": top,
        "nbytes_bound_per_product": kernel_matvec_bound(
            n, d, rank if method == "nystrom-pcg" else 1, tile, rows.dtype.itemsize
        ),
    }
    precond = None
    if method == "nystrom-pcg":
        s = min(int(rank), n)
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([int(seed), 14])))
        omega = np.linalg.qr(rng.standard_normal((n, s)))[0]
        y = kernel(passes, omega) - ridge * omega
        u, lam = nystrom(y, omega)
        precond = NystromPreconditioner(u, lam, float(ridge))
        info["rank"] = s
        info["nystrom_rank_kept"] = int(lam.size)
        info["nystrom_eigs"] = [float(lam[0]), float(lam[-1])] if lam.size else []
        info["seed"] = int(seed)
    before = passes.count
    x, run = pcg(lambda v: kernel(passes, v), bvec, precond=precond, tol=tol,
                 max_iter=int(max_iter), measure="residual")
    info["iterations"] = run.iterations
    info["converged"] = run.converged
    info["solve_passes"] = passes.count - before
    info["cg_relative_residual"] = run.residual
    if compare:
        unpre = _Passes(engine, chunk_rows, engine_options)
        _, plain_run = pcg(lambda v: kernel(unpre, v), bvec, precond=None, tol=tol,
                           max_iter=int(max_iter), measure="residual")
        info["unpreconditioned"] = {
            "iterations": plain_run.iterations, "converged": plain_run.converged,
            "residual": plain_run.residual, "passes": unpre.count, "max_iter": int(max_iter),
        }
    info["passes"] = passes.count
    info["seconds"] = time.perf_counter() - t0
    if verify:
        r = kernel(passes, x) - bvec
        b_norm = float(np.linalg.norm(bvec))
        r_norm = float(np.linalg.norm(r))
        info["residual"] = r_norm / b_norm if b_norm else r_norm
        # Rigal–Gaches η = ‖r‖/(‖M‖‖x‖ + ‖b‖) with the lower bound ‖M‖₂ ≥ 1ᵀM1/n
        # (a Rayleigh quotient), so the reported η is an upper bound of the true one.
        norm_lower = float(np.sum(kernel(passes, np.ones(n)))) / n
        info["backward_error"] = r_norm / (norm_lower * float(np.linalg.norm(x)) + b_norm)
        info["passes_with_verify"] = passes.count
    return SolveResult(np.asarray(x, dtype=np.float64), info)


__all__ = [
    "KERNEL_METHODS",
    "METHODS",
    "SolveResult",
    "a_gram_power",
    "attention_kernel",
    "gram_power",
    "kernel_matvec_bound",
    "pcg",
]
