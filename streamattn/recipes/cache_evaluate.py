"""``streamattn evaluate`` on a whole KV cache: every chosen layer × query head, the
attention the model computed, in three passes over the cache.

Queries are ``queries.count`` rows of the cache sampled with ``queries.seed`` (the same
rows for every layer and head); query head h of layer l is row r of ``queries/layer_l``,
columns of head h, and it attends with KV head h // (H_q / H_kv) (GQA). Each mask of
``attention.modes`` (``streamattn.masks``: global, causal, native, local:W) gives each
query row its key interval. All query heads sharing a KV head, and all masks, are one
query batch of that head's operators, so one read of a layer's keys serves all of them.

Passes (a ``Recipe`` run as-is by ``streamattn.runner``; each reads every chosen layer's
keys and values once per block):

1. ``GroundTruth`` (per attention kind: exact normalisers, heavy entries A_ij ≥ ε and
   outputs), ``QueryTopKeys`` (the query-aware oracle: each query's own top-B keys),
   ``LeverageScores`` factors (plain / affine) and key norms;
2. ``KeyScores`` with the final leverage maps (every key's plain / affine leverage);
3. ``SetAttention``: for every selector, budget and query, the attention restricted to
   the query's set (mass, output, keys actually used).

Selectors (segment-aware through the mask interval [lo, hi] of each query, budget B_i = B,
or ⌈f · (hi − lo + 1)⌉ for a fraction f < 1, at most the keys it can attend):
``oracle`` (query-aware: the query's own top-B_i keys — an upper bound on mass at B_i keys,
not a deployable selector), ``universal-threshold`` (U_ε of the head ∩ interval),
``leverage-plain`` / ``leverage-affine`` / ``key-norm`` / ``random`` (top-B_i of the interval
by that per-key score), ``sinks-window`` (the first ``sinks`` keys of the interval — the
query's segment for native masks — plus the most recent keys up to the query inside it),
``local-window`` (the B_i keys of the interval nearest the query, for bidirectional
masks).

Metrics per (layer, query head, kind, mask, selector, budget): keys used (mean), recall of
heavy entries per query (mean over queries with one) and pooled (Σ hits / Σ heavy), mass
kept (mean, p10), relative output error (mean), heavy entries per query, queries.
"""

from __future__ import annotations

import csv
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.errors import ConfigError
from streamattn.masks import Mask, parse_masks
from streamattn.operators.cache_sets import (
    NO_RANKED,
    ORACLE_RANKED,
    KeyScores,
    KeyScoresSpec,
    QueryTopKeys,
    QueryTopKeysSpec,
    SetAttention,
    SetAttentionSpec,
)
from streamattn.operators.ground_truth import GroundTruth, GroundTruthSpec
from streamattn.operators.leverage import LeverageScores, LeverageSpec
from streamattn.operators.multihead import MultiHead
from streamattn.operators.protocol import Operator
from streamattn.runner import Pass, PassContext, Plan, Recipe, run_recipes
from streamattn.sources import MultiHeadSource, open_kv

CACHE_SELECTORS = ("oracle", "universal-threshold", "leverage-plain", "leverage-affine",
                   "sinks-window", "local-window", "key-norm", "random")
#: Selectors whose per-key scores ``key_scores`` returns (no queries needed).
QUERY_FREE = ("leverage-plain", "leverage-affine", "key-norm", "random", "sinks-window")
COLUMNS = ("layer", "head", "kv_head", "kind", "mask", "selector", "budget", "keys_used_mean",
           "recall_mean", "recall_pooled", "mass_mean", "mass_p10", "output_error_mean",
           "heavy_per_query", "n_queries")


# ---------------------------------------------------------------------------- budgets
def check_budgets(budgets: tuple[Any, ...]) -> None:
    """Counts (integers >= 1) or fractions (floats in (0, 1)) of the keys a query sees."""
    for b in budgets:
        ok = (isinstance(b, int) and not isinstance(b, bool) and b >= 1) or (
            isinstance(b, float) and 0 < b < 1)
        if not ok:
            raise ConfigError(
                f"selectors.budgets: {b!r} is neither a count (integer >= 1) nor a fraction "
                "in (0, 1) of the keys a query can attend."
            )


def row_budgets(budget: int | float, count: np.ndarray) -> np.ndarray:
    """B_i per query: min(B, count_i), or ⌈f · count_i⌉ (at least 1)."""
    if isinstance(budget, float):
        return np.maximum(1, np.ceil(budget * count - 1e-9)).astype(np.int64)
    return np.minimum(int(budget), count).astype(np.int64)


def _threshold_key(scores: np.ndarray, lo: int, hi: int, b: int) -> tuple[float, int]:
    """(t, τ): the b-th key of [lo, hi] by (score descending, index ascending)."""
    seg = scores[lo : hi + 1]
    t = float(-np.partition(-seg, b - 1)[b - 1])
    above = int(np.count_nonzero(seg > t))
    ties = np.flatnonzero(seg == t)
    return t, lo + int(ties[b - above - 1])


# ---------------------------------------------------------------------------- query batch
@dataclass(frozen=True)
class HeadBatch:
    """The query rows of one (layer, KV head): query heads × masks × sampled rows."""

    queries: np.ndarray  # (R, d) float64
    qhead: np.ndarray  # (R,) real query head
    mask: np.ndarray  # (R,) index into the masks
    sample: np.ndarray  # (R,) index into the sampled rows
    row: np.ndarray  # (R,) cache row of the query
    seg_lo: np.ndarray  # (R,) first row of the query's segment
    lo: np.ndarray
    hi: np.ndarray


def _batches(
    src: MultiHeadSource, q: np.ndarray, rows: np.ndarray, masks: list[Mask], group: int,
) -> list[list[HeadBatch]]:
    """``batches[layer][kv head]`` from the sampled queries ``q`` (s, L, Hq, d)."""
    assert src.queries is not None
    causal = bool(src.model.get("causal", False))
    bounds = [m.bounds(rows, src.segments, causal) for m in masks]
    seg_lo = src.segments.of_rows(rows)[0]
    out = []
    for li in range(src.layers):
        row_out = []
        for kv in src.head_ids:
            parts = []
            for qi, qh in enumerate(src.queries.head_ids):
                if qh // group != kv:
                    continue
                for mi, (lo, hi) in enumerate(bounds):
                    parts.append((q[:, li, qi], qh, mi, lo, hi))
            s = rows.size
            row_out.append(HeadBatch(
                np.vstack([p[0] for p in parts]).astype(np.float64),
                np.repeat([p[1] for p in parts], s), np.repeat([p[2] for p in parts], s),
                np.tile(np.arange(s), len(parts)), np.tile(rows, len(parts)),
                np.tile(seg_lo, len(parts)), np.concatenate([p[3] for p in parts]),
                np.concatenate([p[4] for p in parts]),
            ))
        out.append(row_out)
    return out


# ---------------------------------------------------------------------------- sets
@dataclass
class SetPlan:
    """The M set descriptors of one head batch (see ``SetAttentionSpec``) and their labels."""

    labels: list[tuple[str, Any]]
    windows: list[np.ndarray]
    rank_src: list[int]
    rank_t: list[np.ndarray]
    rank_j: list[np.ndarray]

    def add(self, label: tuple[str, Any], windows: np.ndarray, src: int = NO_RANKED,
            t: np.ndarray | None = None, j: np.ndarray | None = None) -> None:
        r = windows.shape[0]
        self.labels.append(label)
        self.windows.append(windows)
        self.rank_src.append(src)
        self.rank_t.append(np.full(r, np.inf) if t is None else t)
        self.rank_j.append(np.full(r, -1, dtype=np.int64) if j is None else j)


def _empty_windows(r: int) -> np.ndarray:
    w = np.empty((r, 4), dtype=np.int64)
    w[:, 0::2], w[:, 1::2] = 1, 0
    return w


def _plan_sets(
    hb: HeadBatch, names: tuple[str, ...], budgets: tuple[Any, ...], score_ids: dict[str, int],
    scores: np.ndarray, sinks: int, universal_eps: float, n: int,
) -> SetPlan:
    plan = SetPlan([], [], [], [], [])
    r = hb.row.size
    count = hb.hi - hb.lo + 1
    for name in names:
        if name == "universal-threshold":
            plan.add((name, None), _empty_windows(r), score_ids["universal"],
                     np.full(r, universal_eps), np.full(r, n, dtype=np.int64))
            continue
        for budget in budgets:
            b = row_budgets(budget, count)
            w = _empty_windows(r)
            if name == "oracle":
                plan.add((name, budget), w, ORACLE_RANKED, np.zeros(r), b)
            elif name == "sinks-window":
                k = np.minimum(sinks, b)  # the first keys of the query's segment
                w[:, 0], w[:, 1] = hb.seg_lo, hb.seg_lo + k - 1
                w[:, 2], w[:, 3] = hb.row - (b - k) + 1, hb.row
                plan.add((name, budget), w)
            elif name == "local-window":
                a = np.maximum(hb.lo, np.minimum(hb.row - (b - 1) // 2, hb.hi - b + 1))
                w[:, 0], w[:, 1] = a, np.minimum(hb.hi, a + b - 1)
                plan.add((name, budget), w)
            else:  # ranked by a per-key score: the top-B_i keys of the interval
                sid = score_ids[name]
                t = np.empty(r)
                j = np.empty(r, dtype=np.int64)
                cache: dict[tuple[int, int, int], tuple[float, int]] = {}
                for i in range(r):
                    key = (int(hb.lo[i]), int(hb.hi[i]), int(b[i]))
                    if key not in cache:
                        cache[key] = _threshold_key(scores[sid], *key)
                    t[i], j[i] = cache[key]
                plan.add((name, budget), w, sid, t, j)
    return plan


def random_scores(n: int, seed: int, layer: int, head: int) -> np.ndarray:
    """Seeded uniform per-key scores of one (layer, KV head): top-B = a uniform B-subset."""
    return np.random.default_rng([seed, layer, head]).random(n)


# ---------------------------------------------------------------------------- metrics
def _metrics(
    spec: SetAttentionSpec, m: int, rows: np.ndarray, truth: dict[str, Any],
    res: dict[str, Any],
) -> dict[str, float | None]:
    idx = truth["indices"][rows]
    heavy = (idx >= 0).sum(axis=1)
    hit = spec.member(m, rows[:, None], idx) & (idx >= 0)
    hits = hit.sum(axis=1)
    has = heavy > 0
    lse = truth["lse"][rows]
    lse_s = res["lse"][m, rows]
    mass = np.where(np.isfinite(lse_s), np.exp(np.minimum(lse_s - lse, 0.0)), 0.0)
    err = None
    if res["output"] is not None and truth["output"] is not None:
        o, o_s = truth["output"][rows], res["output"][m, rows]
        norm = np.linalg.norm(o, axis=1)
        ok = norm > 0
        err = float((np.linalg.norm(o - o_s, axis=1)[ok] / norm[ok]).mean()) if ok.any() \
            else None
    return {
        "keys_used_mean": float(res["keys"][m, rows].mean()),
        "recall_mean": float((hits[has] / heavy[has]).mean()) if has.any() else None,
        "recall_pooled": float(hits.sum() / heavy.sum()) if heavy.sum() else None,
        "mass_mean": float(mass.mean()),
        "mass_p10": float(np.percentile(mass, 10)),
        "output_error_mean": err,
        "heavy_per_query": float(heavy.mean()),
        "n_queries": int(rows.size),
    }


# ---------------------------------------------------------------------------- the run
def open_for_evaluate(path: Any, cfg: Any) -> tuple[MultiHeadSource, int]:
    """Open the cache with the KV heads the chosen query heads use; returns (source, group).

    ``cfg.input.heads`` are *query* heads here; values are read when the store has them.
    """
    probe = open_kv(path, layers=cfg.input.layers, batch=cfg.input.batch)
    if probe.queries is None:
        raise ConfigError(
            f"{probe.label}: evaluate on a KV cache needs queries/layer_{{l}} arrays next to "
            "keys/ (docs/real-caches.md); the cache has none."
        )
    hq, hkv = probe.queries.n_heads_total, probe.n_heads_total
    if hq % hkv:
        raise ConfigError(
            f"{probe.label}: {hq} query heads is not a multiple of {hkv} KV heads (GQA needs "
            "H_q = g · H_kv)."
        )
    group = hq // hkv
    qheads = cfg.input.heads
    kv = None if qheads is None else sorted({int(h) // group for h in qheads})
    src = open_kv(path, layers=cfg.input.layers, heads=kv, query_heads=qheads,
                  batch=cfg.input.batch, values=True)
    if src.queries is not None and src.queries.d != src.d:
        raise ConfigError(f"{src.label}: queries have head_dim {src.queries.d}, keys {src.d}.")
    return src, group


def _scale(src: MultiHeadSource, cfg: Any) -> float | None:
    if cfg.attention.scale is not None:
        return float(cfg.attention.scale)
    declared = src.model.get("attn_scaling")
    return None if declared is None else float(declared)


def _selector_names(cfg: Any) -> tuple[str, ...]:
    from streamattn.recipes.selectors import SELECTORS

    names = tuple(cfg.selectors.names)
    if names == SELECTORS:  # the single-store default: use the cache selectors
        return CACHE_SELECTORS
    bad = [x for x in names if x not in CACHE_SELECTORS]
    if bad:
        raise ConfigError(
            f"selectors.names: {bad} are not available for a KV cache; choose from "
            f"{list(CACHE_SELECTORS)} (oracle is the query-aware upper bound)."
        )
    return names


def evaluate_cache(
    src: MultiHeadSource, group: int, cfg: Any, run: dict[str, Any]
) -> dict[str, Any]:
    """The whole-cache evaluation (see the module docstring): report with ``rows`` (the
    results.csv records), the passes with their times and the runner's plan.

    ``run``: ``chunk_rows`` and ``progress`` for the runner (local engine).
    """
    t0 = time.perf_counter()
    outcome = run_recipes(src, [CacheEvaluation(group, cfg)], engine="local",
                          chunk_rows=run.get("chunk_rows"),
                          progress=bool(run.get("progress", False)))
    report: dict[str, Any] = outcome.results[0]
    report["passes"] = [{"pass": p["description"], "seconds": p["seconds"]}
                        for p in outcome.report.passes]
    report["plan"] = outcome.report.as_dict()
    report["seconds"] = time.perf_counter() - t0
    return report


class CacheEvaluation(Recipe[dict[str, Any]]):
    """The three passes of a whole-cache evaluation; its operators take whole-cache blocks
    (one ``MultiHead`` per family, each head's query batch inside), so it runs as-is."""

    on_cache = "as-is"

    def __init__(self, group: int, cfg: Any) -> None:
        self.group, self.cfg = group, cfg

    def describe(self) -> str:
        return "cache evaluation"

    def plan(self, ctx: PassContext) -> Plan[dict[str, Any]]:
        src = ctx.source
        assert isinstance(src, MultiHeadSource)
        return (yield from _cache_plan(src, self.group, self.cfg))


def _cache_plan(src: MultiHeadSource, group: int, cfg: Any) -> Plan[dict[str, Any]]:
    assert src.queries is not None
    a, sc = cfg.attention, cfg.selectors
    masks = parse_masks(a.modes)
    if any(m.kind in ("native", "local") for m in masks) and "causal" not in src.model:
        raise ConfigError(
            f"{src.label}: native and local masks need the cache's model.causal attribute "
            "(is the model a decoder?); add it to the group attributes."
        )
    check_budgets(tuple(sc.budgets))
    names = _selector_names(cfg)
    n, kinds = src.n, tuple(a.kinds)
    s = min(int(cfg.queries.count or 128), n)
    rows = np.sort(np.random.default_rng(cfg.queries.seed).choice(n, size=s, replace=False))
    q = src.queries.take(rows).astype(np.float64)
    batches = _batches(src, q, rows, masks, group)
    scale = _scale(src, cfg)
    dv = src.values_dim
    grid = [(li, hi) for li in range(src.layers) for hi in range(src.heads)]
    bmax = min(n, max(b if isinstance(b, int) else math.ceil(b * n) for b in sc.budgets))

    def att(hb: HeadBatch, kind: str) -> dict[str, Any]:
        return dict(scale=scale, kind=kind, p=a.p, key_lo=hb.lo, key_hi=hb.hi)

    def multi(make: Any) -> MultiHead:
        return MultiHead.of([[make(batches[li][hi], li, hi) for hi in range(src.heads)]
                             for li in range(src.layers)])

    # pass 1: ground truth, oracle, leverage factors, key norms
    first: dict[str, Operator] = {f"truth/{k}": multi(lambda hb, li, hi, k=k: GroundTruth(
        GroundTruthSpec(hb.queries, eps=a.eps, values_dim=dv, **att(hb, k)))) for k in kinds}
    if "oracle" in names:
        first.update({f"oracle/{k}": multi(lambda hb, li, hi, k=k: QueryTopKeys(
            QueryTopKeysSpec(hb.queries, budget=bmax, **att(hb, k)))) for k in kinds})
    variants = {v for v in ("plain", "affine") if f"leverage-{v}" in names}
    if "universal-threshold" in names:
        variants.add(sc.universal_variant)
    first.update({f"factor/{v}": multi(lambda hb, li, hi, v=v: LeverageScores(
        LeverageSpec(1.0, v == "affine"))) for v in sorted(variants)})
    if "key-norm" in names:
        first["norms"] = multi(lambda hb, li, hi: KeyScores(KeyScoresSpec(n)))
    done = yield Pass(first, "ground truth, oracle, factors")
    # results()[layer][head] of each family, computed once
    gts = {k: done[f"truth/{k}"].result() for k in kinds}
    tops = {k: done[f"oracle/{k}"].result() for k in kinds} if "oracle" in names else {}
    levs = {v: done[f"factor/{v}"].result() for v in sorted(variants)}
    norms = done["norms"].result() if "key-norm" in names else None

    # pass 2: every key's leverage with the final factors
    def key_map(v: str, li: int, hi: int) -> KeyScores:
        smap = levs[v][li][hi]["scoring_map"]
        return KeyScores(KeyScoresSpec(n, "map", smap.w, smap.shift, smap.offset))

    maps = {v: multi(lambda hb, li, hi, v=v: key_map(v, li, hi)) for v in levs}
    if maps:
        done = yield Pass(dict(maps), "leverage of every key")
    every = {v: done[v].result() for v in maps}

    # pass 3: attention restricted to every set
    specs: dict[str, list[list[SetAttentionSpec]]] = {}
    plans: list[list[SetPlan]] = [[None] * src.heads for _ in range(src.layers)]  # type: ignore[list-item]
    head_scores: dict[tuple[int, int], np.ndarray] = {}
    for li, hi in grid:
        arrays: list[np.ndarray] = []
        ids: dict[str, int] = {}
        for v in every:
            ids[f"leverage-{v}"] = len(arrays)
            arrays.append(every[v][li][hi])
        if "universal-threshold" in names:
            ids["universal"] = ids[f"leverage-{sc.universal_variant}"]
        if norms is not None:
            ids["key-norm"] = len(arrays)
            arrays.append(norms[li][hi])
        if "random" in names:
            ids["random"] = len(arrays)
            arrays.append(random_scores(n, sc.seed, src.layer_ids[li], src.head_ids[hi]))
        stacked = np.vstack(arrays) if arrays else np.zeros((1, n))
        head_scores[(li, hi)] = stacked
        plans[li][hi] = _plan_sets(batches[li][hi], names, tuple(sc.budgets), ids, stacked,
                                   sc.sinks, sc.universal_eps, n)
    for k in kinds:
        specs[k] = []
        for li in range(src.layers):
            row = []
            for hi in range(src.heads):
                hb, plan = batches[li][hi], plans[li][hi]
                oracle = tops[k][li][hi]["indices"] if tops else np.full(
                    (hb.row.size, 1), -1, dtype=np.int64)
                row.append(SetAttentionSpec(
                    hb.queries, values_dim=dv, windows=np.stack(plan.windows),
                    rank_src=np.asarray(plan.rank_src, dtype=np.int64),
                    rank_t=np.stack(plan.rank_t), rank_j=np.stack(plan.rank_j),
                    scores=head_scores[(li, hi)], oracle=oracle, **att(hb, k)))
            specs[k].append(row)
    restricted = {k: MultiHead.of([[SetAttention(sp) for sp in row] for row in specs[k]])
                  for k in kinds}
    done = yield Pass(dict(restricted), "restricted attention")
    restricted_res = {k: done[k].result() for k in kinds}

    records = []
    for k in kinds:
        for li, hi in grid:
            hb, plan = batches[li][hi], plans[li][hi]
            truth = gts[k][li][hi]
            res = restricted_res[k][li][hi]
            spec = specs[k][li][hi]
            for qh in np.unique(hb.qhead):
                for mi, mask in enumerate(masks):
                    sel = np.flatnonzero((hb.qhead == qh) & (hb.mask == mi))
                    for m, (name, budget) in enumerate(plan.labels):
                        records.append({
                            "layer": src.layer_ids[li], "head": int(qh),
                            "kv_head": src.head_ids[hi], "kind": k, "mask": mask.name,
                            "selector": name, "budget": budget,
                            **_metrics(spec, m, sel, truth, res),
                        })
    return {
        "source": src.describe(),
        "model": src.model,
        "n": n,
        "d": src.d,
        "values_dim": dv,
        "gqa_group": group,
        "query_rows": rows,
        "queries": int(s),
        "masks": [m.name for m in masks],
        "kinds": list(kinds),
        "eps": a.eps,
        "selectors": list(names),
        "scale": scale,
        "rows": records,
    }



# ---------------------------------------------------------------------------- summaries
def budget_family(budget: Any) -> str:
    """``count`` (B keys; also the ε-threshold set) or ``fraction`` (B_i ∝ keys visible).

    Curves never mix the two: at a fraction, early and late queries use very different
    numbers of keys, so a mean over queries is not a point of the count curve."""
    return "fraction" if isinstance(budget, float) else "count"


def curves(rows: list[dict[str, Any]], kind: str, mask: str, metric: str,
           family: str = "count") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per selector, (keys used, metric) averaged over heads per budget of one budget
    ``family``, sorted by keys used."""
    by: dict[tuple[str, Any], list[tuple[float, float]]] = {}
    for r in rows:
        if (r["kind"] == kind and r["mask"] == mask and r[metric] is not None
                and budget_family(r["budget"]) == family):
            by.setdefault((r["selector"], r["budget"]), []).append(
                (r["keys_used_mean"], r[metric]))
    out: dict[str, list[tuple[float, float]]] = {}
    for (name, _), pts in by.items():
        arr = np.asarray(pts)
        out.setdefault(name, []).append((float(arr[:, 0].mean()), float(arr[:, 1].mean())))
    result = {}
    for name, pts in out.items():
        arr = np.asarray(sorted(pts))
        result[name] = (arr[:, 0], arr[:, 1])
    return result


def at_equal_keys(
    rows: list[dict[str, Any]], kind: str, mask: str, metric: str, family: str = "count"
) -> tuple[list[float], dict[str, list[float | None]]]:
    """Each selector's metric interpolated (linearly in log keys) at common key counts.

    The grid is the oracle's keys-used points plus every single-point selector's (the
    ε-threshold set); a selector gets None outside the range of keys it was measured at
    (no extrapolation).
    """
    cs = curves(rows, kind, mask, metric, family)
    if not cs:
        return [], {}
    points = [c[0] for name, c in cs.items() if name == "oracle" or c[0].size == 1]
    base = np.unique(np.concatenate(points or [c[0] for c in cs.values()]))
    grid = [float(x) for x in base]
    table: dict[str, list[float | None]] = {}
    for name, (x, y) in cs.items():
        vals: list[float | None] = []
        for g in grid:
            if x.size == 1:
                vals.append(float(y[0]) if math.isclose(g, x[0], rel_tol=1e-9) else None)
            elif x[0] <= g <= x[-1]:
                vals.append(float(np.interp(np.log(g), np.log(x), y)))
            else:
                vals.append(None)
        table[name] = vals
    return grid, table


def write_results_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``results.csv``: exactly ``COLUMNS``, one row per (layer, head, kind, mask, selector,
    budget); empty cells for values that do not exist (no values, no heavy entries)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow(["" if r[c] is None else (f"{r[c]:.6g}" if isinstance(r[c], float)
                        and c != "budget" else r[c]) for c in COLUMNS])


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown_report(report: dict[str, Any]) -> str:
    """Summary tables: mass and recall at equal keys used, per kind and mask."""
    src = report["source"]
    lines = [
        f"# evaluate: {report['model'].get('name', src['label'])}",
        "",
        f"n = {report['n']}, d = {report['d']}, layers {src['layer_ids']}, KV heads "
        f"{src['head_ids']}, {report['queries']} sampled query rows, eps = {report['eps']}, "
        f"passes: " + ", ".join(f"{p['pass']} {p['seconds']:.1f} s" for p in report["passes"]),
        "",
        "Means over (layer, query head); each selector interpolated at the oracle's keys "
        "used (– outside the range it was measured at). oracle = the query's own top-B "
        "keys (query-aware upper bound, not a selector you can deploy).",
        "",
    ]
    for kind in report["kinds"]:
        for mask in report["masks"]:
            for family, metric in itertools.product(("count", "fraction"),
                                                    ("mass_mean", "recall_mean")):
                grid, table = at_equal_keys(report["rows"], kind, mask, metric, family)
                if not grid:
                    continue
                lines += [f"### {metric} at equal keys used ({kind}, mask {mask}, budgets "
                          f"as {family}s)", "",
                          "| keys used | " + " | ".join(table) + " |",
                          "|---:|" + "---:|" * len(table)]
                for i, g in enumerate(grid):
                    lines.append(f"| {g:.0f} | " + " | ".join(_fmt(v[i]) for v in table.values())
                                 + " |")
                lines.append("")
    return "\n".join(lines)


MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h")


def plot_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Per kind and metric (mass, recall): one panel per mask, a curve per selector vs
    keys used (means over heads); the oracle dashed. Masks with no data get no panel."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    names = report["selectors"]
    for kind in report["kinds"]:
        for metric, label in (("mass_mean", "attention mass kept"),
                              ("recall_mean", "recall of heavy entries (A >= eps)")):
            panels = [(m, {f: curves(report["rows"], kind, m, metric, f)
                           for f in ("count", "fraction")}) for m in report["masks"]]
            panels = [(m, c) for m, c in panels if c["count"] or c["fraction"]]
            if not panels:
                continue
            fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 2, 4.2),
                                     squeeze=False)
            for ax, (mask, fams) in zip(axes[0], panels, strict=True):
                for family, cs in fams.items():
                    for name, (x, y) in cs.items():
                        x, y = x[x > 0], y[x > 0]  # a set with no keys has no log-x point
                        if x.size == 0:
                            continue
                        i = names.index(name) if name in names else 0
                        style = "--" if name == "oracle" else "-"
                        text = "oracle (query-aware)" if name == "oracle" else name
                        ax.plot(x, y, style if family == "count" else ":",
                                marker=MARKERS[i % len(MARKERS)], color=f"C{i % 10}",
                                mfc="none" if family == "fraction" else None,
                                label=text if family == "count" or not fams["count"]
                                else None)
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set_xlabel("keys used per query (mean)")
                ax.set_ylabel(label)
                ax.set_ylim(-0.02, 1.02)
                ax.set_title(f"mask {mask}")
                ax.grid(alpha=0.3)
            axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
            fig.suptitle(f"{label} vs keys used per query\n{report['model'].get('name', '?')}, "
                         f"{kind}, eps = {report['eps']}, n = {report['n']}, d = {report['d']}"
                         " (solid: budgets as counts; dotted, hollow: as fractions)",
                         fontsize=10)
            fig.tight_layout(rect=(0, 0, 1, 0.93))
            path = out_dir / f"{metric.split('_')[0]}_{kind}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            paths.append(path)
    return paths


# ---------------------------------------------------------------------------- the command
def write_outputs(report: dict[str, Any], out: Path, *, overwrite: bool) -> Path:
    """``results.csv``, ``report.json``, ``report.md`` and the plots, atomically."""
    from streamattn.io.outputs import atomic_dir, write_json_atomic

    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_results_csv(tmp / "results.csv", report["rows"])
        write_json_atomic(tmp / "report.json", report)
        (tmp / "report.md").write_text(markdown_report(report))
        plot_report(report, tmp)
    return out
