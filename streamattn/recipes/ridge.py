"""Ridge universal sets for large d (see :mod:`streamattn.operators.ridge` for the maths).

One pass of ``RidgeFD`` (a superset of the exact ridge set, surely), or a Frequent
Directions pass then a pass of JL-sketched scores (with probability >= 1 - delta).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from streamattn.errors import ConfigError
from streamattn.operators.frequent_directions import FDSpec, FrequentDirections
from streamattn.operators.ridge import (
    RidgeFD,
    RidgeFDSpec,
    RidgeMap,
    SketchedScores,
    SketchedScoresSpec,
    effective_bound,
    jl_dimension,
)
from streamattn.recipes.selection import SOFTMAX_NOTE
from streamattn.results import UniversalSet, versions
from streamattn.runner import Pass, PassContext, Plan, Recipe, run_recipes

RIDGE_GUARANTEE = (
    "Ridge-type (weaker than exact): for f(x) = x^2 attention and every query q, "
    "A_qj >= eps * (1 + lam*||q||^2/||Kq||^2) implies j in U, because A_qj <= "
    "tau^lam_j * (1 + lam*||q||^2/||Kq||^2) and the scores used are upper bounds "
    "k_j^T (B^T B + lam I)^-1 k_j >= tau^lam_j (B the FD sketch, B^T B <= K^T K)."
)


def _check(eps: float, ell: int, sketch_eps: float | None, delta: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
        raise ConfigError(f"eps must be in (0, 1], got {eps!r}.")
    FDSpec(ell)
    if sketch_eps is not None and not 0 < sketch_eps < 1:
        raise ConfigError(f"sketch_eps must be in (0, 1), got {sketch_eps!r}.")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}.")


def ridge_universal_set(
    source: Any,
    eps: float,
    *,
    ell: int,
    lam: float = 0.0,
    lam_rel: float = 0.1,
    sketch_eps: float | None = None,
    delta: float = 1e-3,
    seed: int = 0,
    chunk_rows: int | None = None,
    engine: str = "local",
    progress: bool = False,
    array: str | None = None,
    **engine_options: Any,
) -> UniversalSet:
    """Ridge universal set for large d, in bounded memory with no d × d matrix.

    Without ``sketch_eps``: one pass of :class:`RidgeFD`; U ⊇ {j : τ^λ_j ≥ eps} surely.
    With ``sketch_eps`` = ε': an FD pass, then a pass keeping rows whose JL-sketched score
    is ≥ (1 − ε')·eps; U ⊇ {j : τ̂_j ≥ eps} ⊇ {j : τ^λ_j ≥ eps} with probability ≥ 1 − δ.
    λ = ``lam`` + ``lam_rel``·‖K‖_F²/d. The certificate carries λ, the FD error Δ, ℓ, the
    size bound and (sketched path) m, ε', δ and the seed.

    Examples
    --------
    >>> k = np.random.default_rng(0).standard_normal((2000, 32))
    >>> k[11] *= 30.0
    >>> u = ridge_universal_set(k, 0.2, ell=8, lam_rel=0.01)
    >>> 11 in u
    True
    """
    recipe = RidgeSet(eps, ell=ell, lam=lam, lam_rel=lam_rel, sketch_eps=sketch_eps,
                      delta=delta, seed=seed)
    (out,) = run_recipes(source, [recipe], chunk_rows=chunk_rows, engine=engine,
                         progress=progress, array=array, **engine_options).results
    result: UniversalSet = out
    return result


class RidgeSet(Recipe[UniversalSet]):
    """The ridge universal set: one ``RidgeFD`` pass, or an FD pass then a pass of
    JL-sketched scores (``sketch_eps``)."""

    def __init__(self, eps: float, *, ell: int, lam: float = 0.0, lam_rel: float = 0.1,
                 sketch_eps: float | None = None, delta: float = 1e-3, seed: int = 0) -> None:
        _check(eps, ell, sketch_eps, delta)
        self.eps, self.ell, self.lam, self.lam_rel = float(eps), ell, float(lam), float(lam_rel)
        self.sketch_eps, self.delta, self.seed = sketch_eps, delta, seed
        self.spec = RidgeFDSpec(ell, self.eps, self.lam, self.lam_rel)
        RidgeFD(self.spec)  # validates lambda before any read

    def plan(self, ctx: PassContext) -> Plan[UniversalSet]:
        src, rows = ctx.source, ctx.chunk_rows
        eps, ell, lam, lam_rel = self.eps, self.ell, self.lam, self.lam_rel
        sketch_eps, delta, seed = self.sketch_eps, self.delta, self.seed
        op = RidgeFD(self.spec)
        cert: dict[str, Any] = {}
        if sketch_eps is None:
            done = yield Pass({"ridge": op}, "ridge-fd")
            res = done["ridge"].result()
            sk, lam_final = res["sketch"], res["lam"]
            keep = np.flatnonzero(res["scores"] >= eps)
            passes = 1
        else:
            done = yield Pass({"fd": FrequentDirections(FDSpec(ell))}, "frequent directions")
            sk = done["fd"].result()
            lam_final = op.lam(sk.fro2, src.d)
            m = jl_dimension(src.n, sketch_eps, delta)
            pi = np.random.default_rng(seed).standard_normal((src.d, m)) / math.sqrt(m)
            w = RidgeMap.from_sketch(sk.sketch, lam_final).inverse_sqrt_times(pi)
            threshold = (1.0 - sketch_eps) * eps
            done = yield Pass({"scores": SketchedScores(SketchedScoresSpec(w, threshold))},
                              "sketched scores")
            res = done["scores"].result()
            keep = np.arange(res["indices"].size)
            passes = 2
            cert.update(
                {
                    "sketch": "Gaussian JL, entries N(0, 1/m), seeded",
                    "sketch_m": m,
                    "sketch_eps": sketch_eps,
                    "sketch_delta": delta,
                    "seed": seed,
                    "sketch_threshold": threshold,
                    "sketch_statement": (
                        "with probability >= 1 - delta every row's sketched score is within "
                        "(1 +- sketch_eps) of k^T (B^T B + lam I)^-1 k (Dasgupta-Gupta, union "
                        "bound over n rows), so keeping sketched >= (1 - sketch_eps)*eps "
                        "misses no row with that score >= eps"
                    ),
                }
            )
        size_bound = effective_bound(sk, lam_final, src.d) / (eps * (1 - (sketch_eps or 0.0)))
        scores = res["scores"][keep]
        cert.update(
            {
                "mode": "threshold",
                "eps": eps,
                "budget": None,
                "variant": "ridge-fd" if sketch_eps is None else "ridge-fd-sketched",
                "n": src.n,
                "d": src.d,
                "dtype": str(src.dtype),
                "selected": int(keep.size),
                "ell": ell,
                "lam": lam_final,
                "lam_abs": lam,
                "lam_rel": lam_rel,
                "fd_delta": sk.delta,
                "fd_delta_bound": sk.delta_bound,
                "fd_statement": "0 <= K^T K - B^T B <= fd_delta * I",
                "fro2": sk.fro2,
                "scores": "k_j^T (B^T B + lam I)^-1 k_j >= ridge leverage tau^lam_j"
                + ("" if sketch_eps is None else " (JL-sketched, within 1 +- sketch_eps w.h.p.)"),
                "sum_scores_selected": float(scores.sum()),
                "size_bound": size_bound,
                "size_bound_holds": bool(keep.size <= size_bound + 1e-9),
                "numerical_rank": None,
                "rank_rtol": None,
                "passes": passes,
                "chunk_rows": rows,
                "guarantee": RIDGE_GUARANTEE,
                "exact": False,
                "softmax": SOFTMAX_NOTE,
                "source": src.describe(),
                "versions": versions(),
                "engine": ctx.engine,
            }
        )
        return UniversalSet.from_candidates(res, keep, scores, src.dtype, cert)
