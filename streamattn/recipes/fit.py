"""One-layer attention regression (Song et al., tensor and SVM tricks paper).

Mathematics: docs/architecture.md, note 2.8.

Fit X, Y ∈ R^{d×d} to minimise
L(X, Y) = Σ_{j0, i0} (⟨softmax(A1[j0] X A2ᵀ), A3 Y_{*,i0}⟩ − B[j0, i0])²
        = ‖softmax(A1 X A2ᵀ) A3 Y − B‖_F²  (softmax per row),
with A1 ⊗ A2 (n² × d²) never formed: its j0-th block applied to vec(X) is A1[j0] X A2ᵀ.

Method ``gauss-newton`` (default): alternate Y and X as one variable-projection method.
Given X, Y is the exact least-squares solution Y*(X) = argmin ‖F Y − B‖_F with
F = softmax(A1 X A2ᵀ) A3, from the TSQR factor of [F, B] (one pass). X takes a
Levenberg–Marquardt-damped Gauss–Newton step on the reduced loss L(X, Y*(X)) with
Kaufman's projected Jacobian (the part of J orthogonal to the Y directions), and a step
is accepted only if the reduced loss decreases (else the damping grows: a line search on
the trust region). Passes per iteration: one for JᵀJ, Jᵀr (exact, through the softmax,
blockwise over the rows j0, memory O(tile·n + n·d² + d⁴)), and one per trial step for
the new Y and loss. For zero-residual (planted) problems Gauss–Newton converges
quadratically near the solution; it is a local method (no global guarantee).

Methods ``adam`` and ``gd`` (fixed step) are the first-order baselines from the same
start, on (X, Y) jointly, one loss-and-gradient pass per iteration.

A1 (with B) is streamed in row blocks through the runner (``streamattn.runner.run_pass``,
one engine session for the whole fit); A2 and A3
are read once and held (n·d floats each); the n × n attention is never held, only
``tile × n`` logits at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg

from streamattn.errors import ConfigError, InvalidInputError
from streamattn.operators.fit_ops import (
    DEFAULT_FIT_TILE,
    AttentionFeatures,
    AttentionFeaturesSpec,
    AttentionGaussNewton,
    AttentionGaussNewtonSpec,
    AttentionLossGradient,
    AttentionLossGradientSpec,
    softmax_rows,
)
from streamattn.runner import run_pass, session
from streamattn.sources import KeySource, open_keys

FIT_METHODS = ("gauss-newton", "adam", "gd")
#: Relative rank tolerance for the least-squares Y (pseudo-inverse of R_FF).
Y_RTOL = 1e-12


@dataclass(frozen=True)
class FitResult:
    """Fitted X, Y; loss per iteration (index 0: the start); ``info`` (method, times, ...)."""

    X: np.ndarray
    Y: np.ndarray
    loss_history: list[float]
    info: dict[str, Any] = field(default_factory=dict)


def _matrix(a: Any, what: str) -> KeySource:
    try:
        src = open_keys(a)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{what}: {exc}") from exc
    if not isinstance(src, KeySource):
        raise InvalidInputError(f"{what} must be a single (n, d) matrix.")
    src.label = f"{what} {src.label}"
    return src


def _read_all(src: KeySource) -> np.ndarray:
    """Every row, validated (NaN/Inf named by row), as float64."""
    return np.concatenate([np.asarray(b.rows, np.float64) for b in src.blocks()])


@dataclass
class _Problem:
    source: KeySource  # A1 with B as values
    a2: np.ndarray
    a3: np.ndarray
    d: int
    tile: int
    engine: str
    chunk_rows: int | None
    options: dict[str, Any]
    passes: int = 0

    def run(self, op: Any) -> Any:
        self.passes += 1
        (out,) = run_pass(
            self.source, [op], engine=self.engine, chunk_rows=self.chunk_rows, **self.options
        )
        return out.result()

    def y_and_loss(self, x: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """Y*(X), min_Y L(X, Y) and R_FF (the factor of F) from one TSQR pass."""
        r = self.run(AttentionFeatures(AttentionFeaturesSpec(x, self.a2, self.a3, self.tile)))
        d = self.d
        rff, rfb, rbb = r[:d, :d], r[:d, d:], r[d:, d:]
        u, s, vt = np.linalg.svd(rff)
        keep = s > (s[0] * Y_RTOL if s.size and s[0] > 0 else np.inf)
        y = vt[keep].T @ ((u[:, keep].T @ rfb) / s[keep][:, None])
        # residual: ‖R_FF Y − R_FB‖² (zero on the range) + ‖R_BB‖²
        loss = float(np.sum((rff @ y - rfb) ** 2) + np.sum(rbb**2))
        return y, loss, rff

    def loss_grad(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        return self.run(
            AttentionLossGradient(AttentionLossGradientSpec(x, y, self.a2, self.a3, self.tile))
        )


def _open_problem(
    a1: Any, a2: Any, a3: Any, b: Any, tile: int, engine: str, chunk_rows: int | None,
    options: dict[str, Any],
) -> _Problem:
    s1 = _matrix(a1, "A1")
    s2, s3 = _matrix(a2, "A2"), _matrix(a3, "A3")
    sb = _matrix(b, "B")
    d = s1.d
    if s2.d != d or s3.d != d:
        raise InvalidInputError(
            f"A1, A2, A3 must have the same number of columns d (X, Y are d × d); got "
            f"A1 {s1.n}×{s1.d}, A2 {s2.n}×{s2.d}, A3 {s3.n}×{s3.d}."
        )
    if s2.n != s3.n:
        raise InvalidInputError(
            f"A2 (keys, {s2.n} rows) and A3 (values, {s3.n} rows) must have the same rows."
        )
    if (sb.n, sb.d) != (s1.n, d):
        raise InvalidInputError(
            f"B has shape ({sb.n}, {sb.d}); expected ({s1.n}, {d}): one row per row of A1 "
            "and d columns (Y is d × d)."
        )
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ConfigError(f"tile must be an integer >= 1, got {tile!r}.")
    source = KeySource(s1.keys, label=f"{s1.label} (values: {sb.label})", values=sb.keys)
    return _Problem(source, _read_all(s2), _read_all(s3), d, int(tile), engine, chunk_rows,
                    options)


def attention_matrix(a1: np.ndarray, x: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """softmax(A1 X A2ᵀ) (rows of A1 × rows of A2), dense: for checks on small problems."""
    return softmax_rows(np.asarray(a1, np.float64) @ x @ np.asarray(a2, np.float64).T)


def one_layer_attention(
    a1: Any,
    a2: Any,
    a3: Any,
    b: Any,
    seed: int = 0,
    *,
    method: str = "gauss-newton",
    x0: np.ndarray | None = None,
    init_scale: float = 0.1,
    rtol: float = 1e-12,
    gtol: float = 0.0,
    max_iter: int = 100,
    restarts: int = 20,
    patience: int = 10,
    lr: float = 1e-2,
    target_loss: float | None = None,
    tile: int = DEFAULT_FIT_TILE,
    engine: str = "local",
    chunk_rows: int | None = None,
    **engine_options: Any,
) -> FitResult:
    """Fit softmax(A1 X A2ᵀ) A3 Y ≈ B by variable projection Gauss–Newton (or Adam / GD).

    Parameters
    ----------
    a1, a2, a3, b
        A1 (n1 × d, queries, streamed with B), A2 and A3 (n × d, keys and values, held),
        B (n1 × d): paths (.npy / zarr) or numpy / zarr / dask arrays.
    seed
        Seeds the start X0 = init_scale · N(0, 1)/d (when ``x0`` is not given).
    method
        ``"gauss-newton"`` (default), ``"adam"`` or ``"gd"`` (fixed step ``lr``).
    rtol, gtol
        Stop when loss ≤ rtol · initial loss, or ‖∂L/∂X‖ ≤ gtol · initial ‖∂L/∂X‖.
    max_iter
        Iteration cap per start (accepted Gauss–Newton steps, or first-order steps).
    restarts, patience
        Gauss–Newton only (a heuristic globalisation; the loss is not convex): a start
        whose loss has not halved over the last ``patience`` accepted steps is abandoned
        for a new seeded start X0 (same law, the generator continued from ``seed``), at
        most ``restarts`` starts in all; the best start is returned.
    lr
        Step size of Adam / GD.
    target_loss
        Also stop once the loss is ≤ this (to time the methods to the same loss).
    tile, engine, chunk_rows, engine_options
        Query rows per tile (memory tile·n) and the engine settings of every pass.

    Returns
    -------
    FitResult
        ``loss_history[k]`` is the loss after iteration k (k = 0: the start, with the
        least-squares Y for Gauss–Newton and the same start for the baselines);
        ``info["time_history"]`` the seconds since the start at each entry.
    """
    with session(engine, **engine_options) as options:
        return _one_layer_attention(
            a1, a2, a3, b, seed, method=method, x0=x0, init_scale=init_scale, rtol=rtol,
            gtol=gtol, max_iter=max_iter, restarts=restarts, patience=patience, lr=lr,
            target_loss=target_loss, tile=tile, engine=engine, chunk_rows=chunk_rows,
            engine_options=options,
        )


def _one_layer_attention(
    a1: Any, a2: Any, a3: Any, b: Any, seed: int, *, method: str, x0: np.ndarray | None,
    init_scale: float, rtol: float, gtol: float, max_iter: int, restarts: int, patience: int,
    lr: float, target_loss: float | None, tile: int, engine: str, chunk_rows: int | None,
    engine_options: dict[str, Any],
) -> FitResult:
    if method not in FIT_METHODS:
        raise ConfigError(f"unknown fit method {method!r}; choose one of {list(FIT_METHODS)}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
        raise ConfigError(f"max_iter must be an integer >= 0, got {max_iter!r}.")
    if not (0 <= rtol < 1) or gtol < 0:
        raise ConfigError(f"rtol must lie in [0, 1) and gtol be >= 0; got {rtol!r}, {gtol!r}.")
    if isinstance(restarts, bool) or not isinstance(restarts, (int, np.integer)) or restarts < 1:
        raise ConfigError(f"restarts must be an integer >= 1, got {restarts!r}.")
    t0 = time.perf_counter()
    prob = _open_problem(a1, a2, a3, b, tile, engine, chunk_rows, engine_options)
    d = prob.d
    rng = np.random.default_rng(seed)

    def start() -> np.ndarray:
        return init_scale * rng.standard_normal((d, d)) / d

    if x0 is None:
        x = start()
    else:
        x = np.array(x0, dtype=np.float64)
        if x.shape != (d, d) or not np.isfinite(x).all():
            raise InvalidInputError(f"x0 must be a finite {d} × {d} array, got {x.shape}.")
    y, loss, rff = prob.y_and_loss(x)
    history, times = [loss], [time.perf_counter() - t0]
    target = rtol * loss
    if target_loss is not None:
        target = max(target, float(target_loss))
    info: dict[str, Any] = {"method": method, "seed": int(seed), "n1": prob.source.n,
                            "n": prob.a2.shape[0], "d": d}
    if method == "gauss-newton":
        best: tuple[float, np.ndarray, np.ndarray] | None = None
        starts = 0
        extra: dict[str, Any] = {}
        for starts in range(1, int(restarts) + 1):
            if starts > 1:
                x = start()
                y, loss, rff = prob.y_and_loss(x)
                history.append(loss)
                times.append(time.perf_counter() - t0)
            x, y, converged, extra = _gauss_newton(prob, x, y, rff, history, times, t0,
                                                   target, gtol, int(max_iter), int(patience))
            if best is None or history[-1] < best[0]:
                best = (history[-1], x, y)
            if converged:
                break
        assert best is not None
        _, x, y = best
        extra["starts"] = starts
        info.update(extra)
    else:
        x, y, converged = _first_order(prob, x, y, history, times, t0, target, gtol,
                                       int(max_iter), method, float(lr))
    info.update(
        iterations=len(history) - 1, passes=prob.passes, seconds=time.perf_counter() - t0,
        converged=converged, initial_loss=history[0], final_loss=history[-1],
        relative_loss=history[-1] / history[0] if history[0] else 0.0, time_history=times,
    )
    return FitResult(x, y, history, info)


def _gauss_newton(
    prob: _Problem, x: np.ndarray, y: np.ndarray, rff: np.ndarray, history: list[float],
    times: list[float], t0: float, target: float, gtol: float, max_iter: int, patience: int,
) -> tuple[np.ndarray, np.ndarray, bool, dict[str, Any]]:
    d = prob.d
    loss = history[-1]
    mine = [loss]
    damping = 1e-3
    g0 = None
    rejected = 0
    for _ in range(max_iter):
        if loss <= target:
            return x, y, True, {"rejected_steps": rejected}
        q_map = _orthonormal_map(rff)
        gn = prob.run(
            AttentionGaussNewton(AttentionGaussNewtonSpec(x, y, prob.a2, prob.a3, q_map,
                                                          prob.tile))
        )
        h = gn["jtj"] - gn["projected"]
        h = (h + h.T) / 2
        grad = gn["jtr"]
        gnorm = float(np.linalg.norm(grad))
        g0 = gnorm if g0 is None else g0
        if gnorm == 0 or (gtol > 0 and gnorm <= gtol * g0):
            return x, y, True, {"rejected_steps": rejected}
        scale = max(float(np.max(np.diag(h))), np.finfo(float).tiny)
        for _attempt in range(30):
            step = -scipy.linalg.solve(h + damping * scale * np.eye(d * d), grad,
                                       assume_a="sym")
            x_new = x + step.reshape(d, d)
            y_new, loss_new, rff_new = prob.y_and_loss(x_new)
            if loss_new < loss:
                damping = max(damping / 3.0, 1e-12)
                break
            damping *= 4.0
            rejected += 1
        else:
            return x, y, False, {"rejected_steps": rejected, "stalled": True}
        x, y, loss, rff = x_new, y_new, loss_new, rff_new
        history.append(loss)
        mine.append(loss)
        times.append(time.perf_counter() - t0)
        if len(mine) > patience and loss > 0.5 * mine[-1 - patience] and loss > target:
            return x, y, False, {"rejected_steps": rejected, "stalled": True}
    return x, y, loss <= target, {"rejected_steps": rejected}


def _orthonormal_map(rff: np.ndarray) -> np.ndarray:
    """W with Q = F W an orthonormal basis of range(F): V_r Σ_r⁻¹ from the SVD of R_FF."""
    _, s, vt = np.linalg.svd(rff)
    keep = s > (s[0] * Y_RTOL if s.size and s[0] > 0 else np.inf)
    w = np.zeros_like(rff)
    w[:, : int(keep.sum())] = vt[keep].T / s[keep]
    return w


def _first_order(
    prob: _Problem, x: np.ndarray, y: np.ndarray, history: list[float], times: list[float],
    t0: float, target: float, gtol: float, max_iter: int, method: str, lr: float,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Adam (β1 = 0.9, β2 = 0.999, ε = 1e-12) or fixed-step GD on (X, Y) jointly."""
    m = [np.zeros_like(x), np.zeros_like(y)]
    v = [np.zeros_like(x), np.zeros_like(y)]
    g0 = None
    for k in range(1, max_iter + 1):
        out = prob.loss_grad(x, y)
        if k > 1:
            history.append(out["loss"])
            times.append(time.perf_counter() - t0)
        if out["loss"] <= target:
            return x, y, True
        grads = [out["grad_x"], out["grad_y"]]
        gnorm = float(np.linalg.norm(grads[0]))
        g0 = gnorm if g0 is None else g0
        if gtol > 0 and gnorm <= gtol * g0:
            return x, y, True
        params = [x, y]
        for i in range(2):
            if method == "adam":
                m[i] = 0.9 * m[i] + 0.1 * grads[i]
                v[i] = 0.999 * v[i] + 0.001 * grads[i] ** 2
                mh, vh = m[i] / (1 - 0.9**k), v[i] / (1 - 0.999**k)
                params[i] = params[i] - lr * mh / (np.sqrt(vh) + 1e-12)
            else:
                params[i] = params[i] - lr * grads[i]
        x, y = params
    out = prob.loss_grad(x, y)
    history.append(out["loss"])
    times.append(time.perf_counter() - t0)
    return x, y, out["loss"] <= target


__all__ = ["FIT_METHODS", "FitResult", "attention_matrix", "one_layer_attention"]
