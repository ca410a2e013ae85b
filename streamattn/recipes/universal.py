"""The LevAttention universal set (p = 2): threshold and budget modes, with a certificate.

``universal_set(source, eps=...)`` returns U_ε = {j : τ_j ≥ ε} exactly, in one pass
(see :mod:`streamattn.operators.leverage` for the mathematics). ``budget=B`` returns the
top-B keys by leverage instead (ties broken by the smaller index), exactly: one pass
when the B-th largest score turns out to be at least the pass's pruning threshold,
otherwise a second pass with the final factor. The certificate says which.

What is guaranteed: for f(x) = x² attention (plain) or (q·k + c)² attention (affine),
every key that any query weights ≥ ε is in U_ε, and |U_ε| ≤ rank/ε. Softmax attention
has no worst-case universal set: for softmax, leverage selection is a heuristic whose
coverage must be measured, not claimed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamattn.operators.leverage import (
    DEFAULT_RTOL,
    LeverageScores,
    LeverageSpec,
    ScoringMap,
    TopScoresSpec,
)
from streamattn.operators.screened_top import ScreenedTopScores
from streamattn.recipes.lp import LewisSet
from streamattn.recipes.selection import (
    BUDGET_NOTE,
    GUARANTEE,
    SOFTMAX_NOTE,
    Selection,
)
from streamattn.results import MultiHeadResult, UniversalSet, versions
from streamattn.runner import Outcome, Pass, PassContext, Plan, Recipe, run_recipes
from streamattn.sources import KeySource, open_keys

#: How the factor behind each variant's scores is computed (certificate field).
FACTORISATION = {
    "plain": "float64 QR-type factor: Householder QR, then preconditioned Cholesky updates "
    "R <- chol(I + Y^T Y) R, Y = X R^-1 (cond(R) <= 1e8, growth <= 1e4, else Householder); "
    "pseudo-inverse on the numerical range",
    "affine": "float64 Householder TSQR of [1, K]: the mean and the centred factor R_c "
    "(R_c^T R_c = scatter); scores 1/n + |(k - mu) R_c^+|^2, numerical rank, sigma_max and "
    "rank_abs_tol of R_c (independent of a common key offset); numerical_rank counts the "
    "constant direction too",
}


def _certificate(
    source: KeySource,
    smap: ScoringMap,
    *,
    eps: float | None,
    variant: str,
    budget: int | None,
    chunk_rows: int,
    rtol: float,
    passes: int,
    scores: np.ndarray,
    threshold: float,
) -> dict[str, Any]:
    cert: dict[str, Any] = {
        "mode": "budget" if budget is not None else "threshold",
        "eps": eps,
        "budget": budget,
        "variant": variant,
        "n": source.n,
        "d": source.d,
        "dtype": str(source.dtype),
        "selected": int(scores.size),
        "numerical_rank": smap.rank,
        "rank_rtol": rtol,
        "rank_abs_tol": smap.abs_tol,
        "sigma_max": smap.sigma_max,
        "sigma_min_kept": smap.sigma_min_kept,
        "sum_scores_selected": float(scores.sum()),
        "sum_scores_all_rows": smap.rank,
        "sum_scores_all_rows_note": "sum_j tau_j = trace(G^+ G) = numerical rank, exactly",
        "pruning_threshold": threshold,
        "chunk_rows": chunk_rows,
        "passes": passes,
        "factorisation": FACTORISATION[variant],
        "guarantee": GUARANTEE[variant],
        "softmax": SOFTMAX_NOTE,
        "source": source.describe(),
        "versions": versions(),
    }
    if budget is None:
        assert eps is not None
        cert["size_bound"] = smap.rank / eps
        cert["size_bound_holds"] = bool(scores.size <= smap.rank / eps + 1e-9)
    else:
        cert["budget_note"] = BUDGET_NOTE
        cert["eps_equivalent"] = float(scores.min()) if scores.size else None
    return cert


class LeverageSet(Recipe[UniversalSet]):
    """One p = 2 universal set: a leverage pass, then (budget mode, only when pass 1 cannot
    certify the top-B) a top-B pass with the final scoring map."""

    def __init__(self, sel: Selection) -> None:
        self.sel = sel

    def describe(self) -> str:
        return f"the p = 2 universal set {self.sel}"

    def plan(self, ctx: PassContext) -> Plan[UniversalSet]:
        sel, src = self.sel, ctx.source
        t = sel.pruning_threshold(src.d)
        affine = sel.variant == "affine"
        done = yield Pass({"leverage": LeverageScores(LeverageSpec(t, affine, sel.rtol))},
                          "leverage")
        first = done["leverage"].result()
        second = None
        if needs_second_pass(sel, t, first):
            assert sel.budget is not None
            smap = first["scoring_map"]
            top = ScreenedTopScores(TopScoresSpec(sel.budget, smap.w, affine, smap.shift,
                                                  smap.offset))
            done = yield Pass({"top-B": top}, "top-B")
            second = done["top-B"].result()
        return finish_selection(src, sel, t, first, second, chunk_rows=ctx.chunk_rows,
                                engine=ctx.engine)


def selection_recipe(sel: Selection) -> Recipe[UniversalSet]:
    """The recipe of one request: leverage scores (p = 2) or Lewis weights (p != 2)."""
    return LeverageSet(sel) if sel.p == 2 else LewisSet(sel)


def universal_sets_outcome(
    source: Any,
    selections: list[Selection],
    *,
    array: str | None = None,
    **run: Any,
) -> Outcome[Any]:
    """``universal_sets`` with the runner's report (reads, projected and measured memory)."""
    src = open_keys(source, array=array)
    for sel in selections:
        sel.check(src.n)
    return run_recipes(src, [selection_recipe(sel) for sel in selections], **run)


def universal_sets(
    source: Any,
    selections: list[Selection],
    *,
    chunk_rows: int | None = None,
    engine: str = "local",
    progress: bool = False,
    array: str | None = None,
    checkpoint: Any = None,
    memory_limit: int | str | None = None,
    **engine_options: Any,
) -> list[Any]:
    """Several universal sets from shared passes: one read for every first pass.

    Every selection's first-pass operator sees the same blocks, so the store is read once
    however many sets are asked for. Budget selections whose top-B cannot be certified
    from the first pass share one more pass with their final scoring maps; p != 2
    selections run their Lewis iterations alongside (one read per round for all). Every
    pass runs on the same engine session (e.g. one Dask cluster, started once).

    A KV cache (``streamattn.sources.MultiHeadSource``, a 4-D or per-layer store) gives
    one ``MultiHeadResult`` per selection, indexable as ``result[layer, head]``, from the
    same passes. ``checkpoint`` (a ``streamattn.io.checkpoint.Checkpointer``) makes the
    p = 2 passes resumable; ``memory_limit`` refuses a plan over it before any read.
    """
    return universal_sets_outcome(
        source, selections, array=array, chunk_rows=chunk_rows, engine=engine,
        progress=progress, checkpoint=checkpoint, memory_limit=memory_limit, **engine_options,
    ).results


def needs_second_pass(sel: Selection, threshold: float, first: dict[str, Any]) -> bool:
    """Budget mode: True unless pass 1 (``LeverageScores.result()``) certifies the top-B.

    Every row with final score >= threshold is a candidate (scores only fall as rows are
    added), so the top-B is exact from pass 1 when B candidates reach the threshold, or
    when the threshold is eps itself (U_eps complete, maybe < B keys).
    """
    reached = int(np.count_nonzero(first["scores"] >= threshold))
    return sel.budget is not None and reached < sel.budget and threshold != (sel.eps or 0.0)


def finish_selection(
    source: Any,
    sel: Selection,
    threshold: float,
    first: dict[str, Any],
    second: dict[str, Any] | None,
    *,
    chunk_rows: int,
    engine: str,
) -> UniversalSet:
    """The set and certificate from pass 1's result (and pass 2's top-B, if it ran)."""
    res, t = first, threshold
    floor = sel.eps or 0.0
    if second is not None:
        res = dict(second, scoring_map=first["scoring_map"])
        order = np.flatnonzero(res["scores"] >= floor)
    elif sel.budget is None:
        order = np.flatnonzero(res["scores"] >= t)
    else:
        count = min(sel.budget, int(np.count_nonzero(res["scores"] >= t)))
        order = np.sort(np.lexsort((res["indices"], -res["scores"]))[:count])
    values = res["values"]
    cert = _certificate(
        source,
        res["scoring_map"],
        eps=sel.eps,
        variant=sel.variant,
        budget=sel.budget,
        chunk_rows=chunk_rows,
        rtol=sel.rtol,
        passes=1 if second is None else 2,
        scores=res["scores"][order],
        threshold=t,
    )
    cert["engine"] = engine
    return UniversalSet(
        res["indices"][order],
        res["scores"][order],
        res["rows"][order],
        None if values is None else values[order],
        cert,
    )


def universal_set(
    source: Any,
    eps: float | None = None,
    *,
    variant: str = "plain",
    budget: int | None = None,
    chunk_rows: int | None = None,
    rtol: float = DEFAULT_RTOL,
    engine: str = "local",
    progress: bool = False,
    array: str | None = None,
    p: float = 2.0,
    **engine_options: Any,
) -> UniversalSet | MultiHeadResult:
    """The LevAttention universal set of a key store, exactly, in bounded memory.

    Parameters
    ----------
    source
        A ``KeySource`` or anything ``open_keys`` accepts (path, numpy/zarr/dask array).
    eps
        Threshold mode: return {j : τ_j ≥ eps}, eps in (0, 1].
    variant
        ``"plain"`` (τ_j = k_jᵀ(KᵀK)⁺k_j) or ``"affine"`` (keys augmented with a 1:
        1/n + centred leverage; shift-invariant, the variant that matters for softmax).
    budget
        Budget mode: the top-``budget`` keys by score (ties by the smaller index); with
        ``eps`` too, the top-``budget`` keys of U_eps.
    chunk_rows
        Rows per block; default aligned with the storage chunks (~32 MB blocks).
    rtol
        Numerical-rank tolerance relative to σ_max of K (singular values ≤ rtol·σ_max
        are treated as zero).
    engine
        ``"local"`` (one sequential pass); other engines plug in through ``run_operators``.
    p
        Attention f(x) = |x|^p. p = 2: leverage scores (above). p != 2 (threshold mode):
        ℓp Lewis weights, one pass per fixed-point iteration (see ``streamattn.recipes.lp``).

    Returns
    -------
    UniversalSet
        ``.indices`` sorted int64, ``.scores`` float64, ``.rows``, ``.values``,
        ``.certificate``; for a KV cache, a ``MultiHeadResult`` of them
        (``result[layer, head]``).

    Examples
    --------
    >>> import numpy as np
    >>> k = np.random.default_rng(0).standard_normal((1000, 8))
    >>> k[17] *= 50.0                      # one outlier key
    >>> u = universal_set(k, eps=0.5)
    >>> 17 in u, len(u) <= 8 / 0.5
    (True, True)
    """
    (out,) = universal_sets(
        source,
        [Selection(eps, variant, budget, rtol, p)],
        chunk_rows=chunk_rows,
        engine=engine,
        progress=progress,
        array=array,
        **engine_options,
    )
    return out


def save_universal_sets(
    out: Any,
    sets: dict[str, UniversalSet],
    *,
    report: dict[str, Any],
    overwrite: bool = False,
    extra: Any = None,
) -> Any:
    """Write ``OUT/result.zarr`` (group ``universal_set/<name>``) and ``OUT/report.json``.

    Each set's group holds ``indices``, ``scores``, ``rows`` (and ``values``) with its
    certificate in the attributes. ``extra(tmp)``, if given, adds files (e.g. the saved
    operator states of ``streamattn.io.update``). The whole directory appears atomically; on
    a write error (disk full, permission denied) an existing ``OUT`` stays as it was.
    """
    try:
        _save_universal_sets(out, sets, report=report, overwrite=overwrite, extra=extra)
    except OSError as exc:
        from streamattn.errors import OutputWriteError

        raise OutputWriteError(
            f"could not write the output {out}: {exc.strerror or exc} "
            f"({type(exc).__name__}). Nothing was replaced: a previous {out} is intact."
        ) from exc
    return out


def _save_universal_sets(
    out: Any, sets: dict[str, UniversalSet], *, report: dict[str, Any], overwrite: bool,
    extra: Any,
) -> None:
    import zarr

    from streamattn.io.outputs import atomic_dir, write_arrays, write_json_atomic

    with atomic_dir(out, overwrite=overwrite) as tmp:
        root = zarr.open_group(str(tmp / "result.zarr"), mode="w")
        root.attrs.update(
            {"streamattn": versions()["streamattn"], "layout": "universal_set/<name>"}
        )
        for name, uset in sets.items():
            group = root.require_group(f"universal_set/{name}")
            write_arrays(
                group,
                {
                    "indices": uset.indices,
                    "scores": uset.scores,
                    "rows": uset.rows,
                    "values": uset.values,
                },
                {"certificate": uset.certificate},
                dims={"indices": ["rank"], "scores": ["rank"], "rows": ["rank", "dim"],
                      "values": ["rank", "value_dim"]},
            )
        write_json_atomic(tmp / "report.json", report)
        if extra is not None:
            extra(tmp)


def load_universal_set(out: Any, name: str) -> UniversalSet:
    """Read back one set written by ``save_universal_sets``."""
    import zarr

    from streamattn.errors import InvalidInputError

    try:
        group: Any = zarr.open_group(f"{out}/result.zarr", mode="r")[f"universal_set/{name}"]
    except (KeyError, FileNotFoundError) as exc:
        head = _stacked_head(out, name)  # a KV cache's "<set>/layer_{l}/head_{h}"
        if head is not None:
            return head
        raise InvalidInputError(f"{out}: no universal set named {name!r} in result.zarr.") from exc
    arrays = {k: v[...] for k, v in group.arrays()}
    return UniversalSet(
        arrays["indices"],
        arrays["scores"],
        arrays["rows"],
        arrays.get("values"),
        dict(group.attrs)["certificate"],
    )


def _stacked_head(out: Any, name: str) -> UniversalSet | None:
    """One head of a stacked cache selection (``streamattn.io.cache_outputs``), if present."""
    import re

    m = re.fullmatch(r"(.+)/layer_(\d+)/head_(\d+)", name)
    if m is None:
        return None
    from streamattn.errors import InvalidInputError
    from streamattn.io.cache_outputs import load_cache_selection

    try:
        res = load_cache_selection(out, m.group(1))
        head: UniversalSet = res[int(m.group(2)), int(m.group(3))]
        return head
    except (InvalidInputError, KeyError):
        return None
