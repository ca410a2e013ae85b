"""ℓp universal sets (f(x) = |x|^p attention, any p > 0) from out-of-core Lewis weights.

Mathematics (docs/architecture.md, note 2.2; Kannan, Bhattacharyya, Kacham, Woodruff, arXiv
2410.05462; Cohen & Peng 2015). For f(x) = |x|^p the share of key j under query q is
A_qj = |q·k_j|^p / Σ_l |q·k_l|^p. With the ℓp Lewis weights w of K (Σ w = r = rank K):

- p ≤ 2: A_qj ≤ w_j for every q, so U = {j : w_j ≥ ε} and |U| ≤ r/ε;
- p ≥ 2: A_qj ≤ r^{p/2−1} w_j (Hölder; r ≤ d, so this is at most d^{p/2−1} w_j), so
  U = {j : r^{p/2−1} w_j ≥ ε} and |U| ≤ r^{p/2}/ε.

Either way A_qj ≥ ε ⇒ j ∈ U, for every query. The weights come from the iteration of
:mod:`streamattn.operators.lewis` (Cohen–Peng for p ≤ 3.5, damped above), one pass of
the store per iteration (plus one first pass for the unweighted factor), with the per-row
weights in two zarr arrays in a work directory (never an n-sized array in memory).
The iteration stops when the largest change of log w in a pass is ≤ ``tol``.

What is certified, and why.

- **Cohen–Peng (β = 1, p ≤ 3.5, c = |p/2 − 1| ≤ 3/4).** T is a sup-norm contraction with
  factor c, so after a step that moved log w by δ the fixed point is within
  m = c·δ/(1 − c) in log of the iterate; the set uses the inflated bound e^m·bound_j ≥ ε
  (``weights_log_error_bound`` = m), so the approximation cannot drop a key.
- **Damped (p > 3.5).** Its rate (p−2)/(p+2) is only a *local* spectral radius, not a
  sup-norm contraction, and an error margin derived from it is not a bound (it was exceeded
  by 1.4–2× in tests). So no margin on the weights is claimed
  (``weights_log_error_bound`` = None). Instead the set is certified by an inequality that
  holds for **any** positive weights v, proved here. Let p ≥ 2, M = Kᵀ V^{1−2/p} K and
  σ_j(v) = k_jᵀ M⁺ k_j. For any query q, Cauchy–Schwarz in the M metric gives
  (q·k_j)² ≤ σ_j(v) · qᵀMq, and Hölder with exponents p/(p−2) and p/2 gives
  qᵀMq = Σ_l v_l^{1−2/p} (q·k_l)² ≤ (Σ_l v_l)^{1−2/p} (Σ_l |q·k_l|^p)^{2/p}. Raising to
  p/2: A_qj = |q·k_j|^p / Σ_l |q·k_l|^p ≤ b_j(v) := σ_j(v)^{p/2} (Σ_l v_l)^{p/2−1}.
  (At the fixed point σ^{p/2} = w and Σw = rank, which is the bound above.) One extra pass
  computes b_j(v) at the final iterate v, and U = {j : b_j(v) ≥ ε}; |U| ≤ Σ_j b_j(v)/ε,
  which the certificate reports. Only float64 rounding of σ remains, covered by a relative
  allowance of ``ROUND_SLACK`` (scores are compared as b_j·(1 + ROUND_SLACK) ≥ ε).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.errors import ConfigError, StreamattnError
from streamattn.operators.leverage import DEFAULT_RTOL
from streamattn.operators.lewis import (
    LewisPass,
    LewisPassSpec,
    contraction_factor,
    damping,
)
from streamattn.recipes.selection import SOFTMAX_NOTE, Selection, check_p, check_selection
from streamattn.results import UniversalSet, versions
from streamattn.runner import Pass, PassContext, Plan, Recipe, run_recipes

#: Default convergence tolerance on max_j |log w_j^{(k+1)} − log w_j^{(k)}|.
DEFAULT_TOL = 1e-9
DEFAULT_MAX_ITER = 200
#: Candidates are collected during every pass down to e^{-COLLECT_SLACK} × the threshold.
COLLECT_SLACK = 0.25
#: Relative allowance for float64 rounding of the a-posteriori bound b_j(v) (damped runs).
ROUND_SLACK = 1e-9


class LewisConvergenceError(StreamattnError):
    """The Lewis iteration did not reach its tolerance within ``max_iter`` passes."""


def bound_factor(p: float, rank: int) -> float:
    """bound_j / w_j: 1 for p ≤ 2, rank^{p/2 − 1} for p ≥ 2."""
    return 1.0 if p <= 2 else float(max(rank, 1)) ** (p / 2.0 - 1.0)


def _scores_text(p: float, beta: float) -> str:
    if beta != 1.0:
        return "bound_j = sigma_j(v)^(p/2) (sum v)^(p/2-1), v the final weights"
    return "bound_j = w_j" if p <= 2 else "bound_j = rank^(p/2-1) w_j"


def _size_bound(
    p: float, beta: float, rank: int, inflate: float, eps: float, factor: float,
    res: dict[str, Any],
) -> float:
    """|U| <= sum_j bound_j / eps (damped: the certificate pass's sum, rounding allowed)."""
    if beta != 1.0:
        return factor * float(res["sum_weights"]) * (1.0 + ROUND_SLACK) / eps
    return (rank if p <= 2 else rank ** (p / 2.0)) * inflate / eps


def _no_convergence(
    p: float, beta: float, c: float, history: list[float], tol: float, max_iter: int
) -> str:
    """The error of a run that did not reach ``tol``: which method, its rate, what to do."""
    last = history[-1]
    if beta == 1.0 and 0 < c < 1 and last > 0:
        need = len(history) + math.log(last / tol) / math.log(1.0 / c)
        why = (f"Cohen-Peng contracts only by c = |p/2 - 1| = {c:.3g} per pass, so about "
               f"{need:.0f} passes are needed in all")
    elif beta == 1.0:
        why = f"Cohen-Peng's rate is c = |p/2 - 1| = {c:.3g}"
    else:
        why = (f"the damped fixed point (beta = {beta:.3g}, local rate (p-2)/(p+2) = {c:.3g}; "
               "global convergence is not proved) did not settle")
    return (
        f"l_p Lewis weights (p = {p:g}) did not converge within max_iter = {max_iter} "
        f"passes: last max |log change| = {last:.3g} > tol = {tol:g}; {why}. Raise max_iter "
        "or tol."
    )


def guarantee_text(p: float, beta: float = 1.0) -> str:
    if beta != 1.0:
        return (
            f"For f(x) = |x|^{p:g} attention, A_qj <= b_j(v) = sigma_j(v)^(p/2) (sum_l v_l)^"
            "(p/2-1) for every query q and any positive weights v (Cauchy-Schwarz and Hoelder),"
            " evaluated at the final iterate v: every key that any query weights >= eps is in"
            " U, and |U| <= sum_j b_j(v)/eps."
        )
    if p <= 2:
        return (
            f"For f(x) = |x|^{p:g} attention, A_qj = |q.k_j|^p / sum_l |q.k_l|^p <= w_j (l_p "
            "Lewis weight) for every query q, so every key that any query weights >= eps is "
            "in U, and |U| <= rank/eps."
        )
    return (
        f"For f(x) = |x|^{p:g} attention, A_qj <= rank^(p/2-1) w_j (w the l_p Lewis "
        "weights, by Hoelder) for every query q, so every key that any query weights >= eps "
        "is in U, and |U| <= rank^(p/2)/eps <= d^(p/2)/eps."
    )


def _weights_array(path: Path, n: int, rows: int) -> str:
    import zarr

    zarr.create_array(
        store=str(path), shape=(n,), chunks=(rows,), dtype="float64", fill_value=0.0,
        overwrite=True,
    )
    return str(path)


def lp_universal_set(
    source: Any,
    eps: float,
    *,
    p: float,
    variant: str = "plain",
    rtol: float = DEFAULT_RTOL,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    workdir: str | Path | None = None,
    chunk_rows: int | None = None,
    engine: str = "local",
    progress: bool = False,
    array: str | None = None,
    **engine_options: Any,
) -> UniversalSet:
    """The ℓp universal set {j : bound_j ≥ eps} from Lewis weights, out of core.

    Parameters
    ----------
    source : a ``KeySource`` or anything ``open_keys`` accepts.
    eps : threshold in (0, 1].
    p : the exponent of f(x) = |x|^p, any p > 0 (p = 2 gives leverage scores).
    variant : ``"plain"`` or ``"affine"`` (keys augmented with a constant 1).
    tol : stop when max_j |log(w_j new / w_j old)| ≤ tol.
    max_iter : most update passes before :class:`LewisConvergenceError`.
    workdir : where the per-row weight arrays live (``lewis_weights_{0,1}.zarr``; the
        final weights are named in the certificate). Default: a temporary directory,
        removed afterwards.

    Returns
    -------
    UniversalSet with ``scores`` = bound_j (w_j for p ≤ 2, rank^{p/2−1} w_j for p ≥ 2) and
    a certificate: method, β, iterations, passes, convergence history, Σw, error margin,
    size bound.

    Examples
    --------
    >>> k = np.random.default_rng(0).standard_normal((500, 4))
    >>> k[3] *= 40.0
    >>> u = lp_universal_set(k, 0.3, p=1.0)
    >>> 3 in u, abs(u.certificate["sum_weights"] - 4) < 1e-6
    (True, True)
    """
    recipe = LewisSet(Selection(eps, variant, None, rtol, check_p(p)), tol=tol,
                      max_iter=max_iter, workdir=workdir)
    (out,) = run_recipes(source, [recipe], chunk_rows=chunk_rows, engine=engine,
                         progress=progress, array=array, **engine_options).results
    result: UniversalSet = out
    return result


class LewisSet(Recipe[UniversalSet]):
    """The l_p universal set of one p != 2 request: a factor pass, one pass per Lewis
    iteration (weights in two zarr arrays in a work directory), and a candidate pass when
    the collected candidates cannot be trusted. Not resumable (the passes write the
    weight arrays); single-head stores only."""

    on_cache = "refuse"

    def __init__(self, sel: Selection, *, tol: float = DEFAULT_TOL,
                 max_iter: int = DEFAULT_MAX_ITER, workdir: str | Path | None = None) -> None:
        p = check_p(sel.p)
        check_selection(sel.eps, sel.variant, None)
        if sel.eps is None:
            raise ConfigError("p != 2 universal sets need eps (budget mode supports p = 2 only).")
        if not (isinstance(tol, float) and 0 < tol < 1):
            raise ConfigError(f"tol must be a float in (0, 1), got {tol!r}.")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ConfigError(f"max_iter must be an integer >= 1, got {max_iter!r}.")
        self.sel, self.p, self.eps = sel, p, float(sel.eps)
        self.tol, self.max_iter, self.workdir = tol, max_iter, workdir

    def describe(self) -> str:
        return f"the l_p universal set (p = {self.p:g})"

    def plan(self, ctx: PassContext) -> Plan[UniversalSet]:
        own_dir = self.workdir is None
        wdir = (Path(tempfile.mkdtemp(prefix="streamattn-lewis-")) if self.workdir is None
                else Path(self.workdir))
        try:
            return (yield from self._plan(ctx, wdir, own_dir))
        finally:
            if own_dir:
                shutil.rmtree(wdir, ignore_errors=True)

    def _plan(self, ctx: PassContext, wdir: Path, own_dir: bool) -> Plan[UniversalSet]:
        src, rows = ctx.source, ctx.chunk_rows
        p, eps, tol, max_iter = self.p, self.eps, self.tol, self.max_iter
        variant, rtol = self.sel.variant, self.sel.rtol
        affine = variant == "affine"
        beta = damping(p)
        c = contraction_factor(p, beta)
        wdir.mkdir(parents=True, exist_ok=True)
        paths = [_weights_array(wdir / f"lewis_weights_{i}.zarr", src.n, rows) for i in (0, 1)]
        history: list[float] = []

        def one_pass(spec: LewisPassSpec, what: str) -> Plan[dict[str, Any]]:
            done = yield Pass({"lewis": LewisPass(spec)}, what, resumable=False)
            out: dict[str, Any] = done["lewis"].result()
            return out

        first = yield from one_pass(
            LewisPassSpec(p, np.zeros((0, 0)), affine=affine, rtol=rtol), "lewis factor"
        )
        rank = first["scoring_map"].rank
        shift = first["shift"]  # affine: the mean, subtracted before every later product
        factor = bound_factor(p, rank)
        t_w = eps / factor  # the threshold on w itself
        collect = t_w * math.exp(-COLLECT_SLACK)
        cap = int(4 * math.exp(COLLECT_SLACK) * max(rank, 1) / t_w) + 16
        smap, res, k = first["scoring_map"], first, 0
        converged = False
        while k < max_iter:
            k += 1
            spec = LewisPassSpec(
                p,
                smap.w,
                weights_in=paths[(k - 1) % 2] if k > 1 else "",
                weights_out=paths[k % 2],
                beta=beta,
                collect=collect,
                cap=cap,
                affine=affine, shift=shift,
                rtol=rtol,
            )
            res = yield from one_pass(spec, f"lewis iteration {k}")
            smap = res["scoring_map"]
            history.append(res["max_log_change"])
            if res["max_log_change"] <= tol:
                converged = True
                break
        if not converged:
            raise LewisConvergenceError(_no_convergence(p, beta, c, history, tol, max_iter))
        final = paths[k % 2]
        passes = k + 1
        margin: float | None = None
        if beta != 1.0:  # damped: certify by the a-posteriori bound b_j(v), one pass
            g = float(res["sum_weights"]) ** (p / 2.0 - 1.0)
            t_s = eps / (g * (1.0 + ROUND_SLACK))  # threshold on sigma_j(v)^(p/2)
            cap = int(4 * max(rank, 1) ** (p / 2.0) / eps) + 16
            while True:
                res = yield from one_pass(
                    LewisPassSpec(p, smap.w, weights_in=final, beta=1.0, collect=t_s,
                                  cap=cap, affine=affine, shift=shift, rtol=rtol),
                    "lewis certificate",
                )
                passes += 1
                if not res["overflow"]:
                    break
                cap = int(res["count"]) + 1
            factor = g
            t_w = t_s
        else:
            margin = c * history[-1] / (1.0 - c)
        if margin is not None and (res["overflow"] or margin > COLLECT_SLACK):
            res = yield from one_pass(
                LewisPassSpec(
                    p,
                    np.zeros((0, 0)),
                    weights_in=final,
                    collect=t_w * math.exp(-margin),
                    cap=int(res["sum_weights"] / (t_w * math.exp(-margin))) + 1,
                    affine=affine, shift=shift,
                    rtol=rtol,
                ),
                "lewis candidates",
            )
            passes += 1
        inflate = math.exp(margin) if margin is not None else 1.0
        keep = np.flatnonzero(res["weights"] * inflate >= t_w)
        scores = factor * res["weights"][keep]
        smap0 = first["scoring_map"]
        cert: dict[str, Any] = {
            "n": src.n,
            "d": src.d,
            "dtype": str(src.dtype),
            "numerical_rank": rank,
            "rank_rtol": rtol,
            "rank_abs_tol": smap0.abs_tol,
            "sigma_max": smap0.sigma_max,
            "chunk_rows": rows,
            "factorisation": "TSQR (Householder, float64) of the reweighted rows, "
            "pseudo-inverse on the numerical range",
            "softmax": SOFTMAX_NOTE,
            "source": src.describe(),
            "versions": versions(),
        }
        cert.update(
            {
                "mode": "threshold",
                "eps": eps,
                "budget": None,
                "variant": variant,
                "p": p,
                "selected": int(keep.size),
                "scores": _scores_text(p, beta),
                "bound_factor": factor,
                "method": "cohen-peng" if beta == 1.0 else "damped fixed point",
                "certified_by": "sup-norm contraction of Cohen-Peng: weights within "
                "weights_log_error_bound in log" if beta == 1.0 else "a-posteriori bound "
                "b_j(v) = sigma_j(v)^(p/2) (sum v)^(p/2-1) >= A_qj for every q, any v > 0 "
                "(Cauchy-Schwarz + Hoelder; proof in streamattn.recipes.lp); no error "
                "margin on the weights is claimed",
                "round_slack": ROUND_SLACK if beta != 1.0 else 0.0,
                "update": f"w <- w^(1-beta) * sigma(w)^(beta*p/2), beta = {beta:g}",
                "beta": beta,
                "contraction_factor": c,
                "contraction_proven": beta == 1.0,
                "convergence_criterion": f"max_j |log(w_j new / w_j old)| <= {tol:g}",
                "iterations": k,
                "passes": passes,
                "max_log_change_history": history,
                "final_max_rel_change": math.expm1(history[-1]),
                "weights_log_error_bound": margin,
                "sum_weights": res["sum_weights"],
                "sum_weights_note": "sum_j w_j = rank at the fixed point",
                "sum_scores_selected": float(scores.sum()),
                "size_bound": _size_bound(p, beta, rank, inflate, eps, factor, res),
                "guarantee": guarantee_text(p, beta),
                "weights_path": None if own_dir else final,
                "engine": ctx.engine,
            }
        )
        cert["size_bound_holds"] = bool(keep.size <= cert["size_bound"] + 1e-9)
        return UniversalSet.from_candidates(res, keep, scores, src.dtype, cert)


def softmax_entry_bound(n: int, bq: float, bk: float, scale: float = 1.0) -> float:
    """Largest possible softmax entry when ‖q‖ ≤ bq and every ‖k_j − c‖ ≤ bk (any common c).

    A_qj = e^{s q·k_j} / Σ_l e^{s q·k_l} with |s q·(k − c)| ≤ s·bq·bk for every key, and
    softmax ignores the common offset c, so A_qj ≤ e^{s·bq·bk} / (n·e^{−s·bq·bk}) =
    e^{2·s·bq·bk}/n. When this is < eps, *no* query with ‖q‖ ≤ bq gives any key a share
    ≥ eps: the empty set is a universal set. Nothing smaller than all n keys can be
    guaranteed without such a bound (keys on a circle, tests/test_softmax_bounds.py).

    Examples
    --------
    >>> round(softmax_entry_bound(10**6, bq=2.0, bk=2.0, scale=0.5), 6)
    5.5e-05
    """
    if n < 1 or bq < 0 or bk < 0 or scale < 0:
        raise ConfigError(f"need n >= 1 and bq, bk, scale >= 0; got {n}, {bq}, {bk}, {scale}.")
    return float(math.exp(min(0.0, 2.0 * scale * bq * bk - math.log(n))))

