"""``streamattn evaluate``: how much attention each key selector keeps, measured exactly.

For a query batch (the store's ``queries`` array, or seeded random directions), each
attention kind (softmax, |x|^p) and mode (global, causal), a ``GroundTruth`` pass gives
the exact normalisers L_i, heavy entries H_i = {j : A_ij ≥ ε} and outputs o_i; every
selector (``streamattn.recipes.selectors``) proposes a set S_i per budget; one
``RestrictedAttention`` pass gives log Σ_{j∈S_i} exp(ℓ_ij) and the output o_S,i
renormalised over S_i. Per query and set:

- recall = |H_i ∩ S_i| / |H_i|   (queries with no heavy entry are left out),
- mass   = Σ_{j∈S_i} A_ij        (the attention mass S keeps),
- error  = ‖o_i − o_S,i‖ / ‖o_i‖ (needs values),
- keys   = |S_i| (what the query actually used),

aggregated as mean, p10 and worst (min for recall/mass, max for error).

Passes over the store: leverage rankings (1–2 each), key norms (1), ground truth (1, all
kinds and modes together), observed attention (1), restricted attention (1). Memory is
bounded independently of n (each operator's bound), except for the per-set outputs
(sets × queries × d_v floats).

Guarantee reminder: for x² attention (kind ``power``, p = 2) in *global* mode the
universal set U_ε has recall 1.0 on every query. In causal mode a query sees a prefix,
whose leverage scores are larger than the full store's, so U_ε of the whole store
carries no guarantee there; softmax has no guarantee at all — this report measures it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.config import (
    EngineConfig,
    InputConfig,
    OutputConfig,
    load_yaml_config,
)
from streamattn.errors import ConfigError
from streamattn.io.outputs import atomic_dir, write_json_atomic
from streamattn.masks import Mask
from streamattn.operators.ground_truth import (
    KINDS,
    MODES,
    GroundTruth,
    GroundTruthSpec,
    ObservedAttentionSpec,
    ObservedAttentionTop,
    RestrictedAttention,
    RestrictedAttentionSpec,
)
from streamattn.operators.protocol import Operator
from streamattn.recipes.cache_evaluate import CACHE_SELECTORS, check_budgets
from streamattn.recipes.selection import Selection
from streamattn.recipes.selectors import (
    SELECTORS,
    KeySet,
    _check_budgets,
    hybrid,
    largest_norm_plan,
    leverage_top,
    rank_by_score,
    ranked_sets,
    sinks_window,
    uniform_random,
)
from streamattn.recipes.universal import LeverageSet
from streamattn.runner import Pass, PassContext, Plan, Recipe, fuse, run_recipes
from streamattn.sources import KeySource, open_keys
from streamattn.synthetic import SyntheticSpec, ensure_store

METRICS = ("recall", "mass", "error", "keys")


def _default_store() -> SyntheticSpec:
    return SyntheticSpec(
        n=32768,
        d=64,
        chunk_rows=8192,
        values_dim=64,
        queries=128,
        sinks=4,
        sink_logit=2.0,
        recency=8.0,
    )


@dataclass(frozen=True)
class QueryConfig:
    """Where the queries come from.

    ``source``: ``store`` (the store's ``queries`` array, with ``query_positions`` for
    causal mode) or ``random`` (seeded Gaussian directions scaled so the softmax logits
    over a key sample have standard deviation ``logit_std``; positions uniform).
    ``count``: use the first ``count`` queries (null: all).
    """

    source: str = "store"
    count: int | None = None
    seed: int = 0
    logit_std: float = 2.0


@dataclass(frozen=True)
class AttentionConfig:
    """Which attention to measure: kinds (softmax, power = |x|^p), modes, eps, scale."""

    kinds: tuple[str, ...] = ("softmax", "power")
    modes: tuple[str, ...] = ("global", "causal")
    p: float = 2.0
    eps: float = 0.01
    scale: float | None = None


@dataclass(frozen=True)
class SelectorConfig:
    """Which selectors, at which budgets, with their parameters."""

    names: tuple[str, ...] = SELECTORS
    # counts, or fractions < 1 of the keys a query can attend (KV caches: cache_evaluate)
    budgets: tuple[int | float, ...] = (16, 32, 64, 128, 256, 512, 1024)
    universal_eps: float = 0.01
    universal_variant: str = "plain"
    sinks: int = 4
    window_fraction: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class EvaluateConfig:
    """A whole ``streamattn evaluate`` run (``configs/evaluate.yaml`` spells out the default)."""

    input: InputConfig = field(
        default_factory=lambda: InputConfig(path="data/eval-keys.zarr", generate=_default_store())
    )
    queries: QueryConfig = field(default_factory=QueryConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    selectors: SelectorConfig = field(default_factory=SelectorConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/evaluate"))
    progress: bool = True

    def check(self) -> None:
        a, s, q = self.attention, self.selectors, self.queries
        for kind in a.kinds:
            if kind not in KINDS:
                raise ConfigError(f"attention.kinds: {kind!r} is not one of {list(KINDS)}.")
        for mode in a.modes:  # masks; native and local:W need a KV cache (cache_evaluate)
            Mask.parse(mode)
        if not a.kinds or not a.modes:
            raise ConfigError("attention.kinds and attention.modes must not be empty.")
        if not 0 < a.eps <= 1:
            raise ConfigError(f"attention.eps must be in (0, 1], got {a.eps}.")
        if a.p <= 0:
            raise ConfigError(f"attention.p must be > 0, got {a.p}.")
        known = SELECTORS + tuple(x for x in CACHE_SELECTORS if x not in SELECTORS)
        for name in s.names:
            if name not in known:
                raise ConfigError(f"selectors.names: {name!r} is not one of {list(known)}.")
        if not s.budgets:
            raise ConfigError("selectors.budgets must not be empty.")
        check_budgets(tuple(s.budgets))
        if not 0 < s.universal_eps <= 1:
            raise ConfigError(f"selectors.universal_eps must be in (0, 1], got {s.universal_eps}.")
        if s.sinks < 0:
            raise ConfigError(f"selectors.sinks must be >= 0, got {s.sinks}.")
        if q.source not in ("store", "random"):
            raise ConfigError(f"queries.source must be 'store' or 'random', got {q.source!r}.")
        if q.count is not None and q.count < 1:
            raise ConfigError(f"queries.count must be >= 1 or null, got {q.count}.")
        if self.input.generate is not None:
            self.input.generate.check()
        self.engine.check()


def load_evaluate_config(path: str | Path | None) -> EvaluateConfig:
    """Read an evaluate YAML config (None: the embedded default), unknown keys refused."""
    cfg: EvaluateConfig = load_yaml_config(EvaluateConfig, path)
    return cfg


# ---------------------------------------------------------------------------- queries
def load_queries(src: KeySource, qc: QueryConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """The query batch (float64) and its positions (None if the store has none)."""
    if qc.source == "store":
        if src.queries is None:
            raise ConfigError(
                f"{src.label}: the store has no 'queries' array; add one (zarr group with "
                "keys, values, queries, query_positions) or set queries.source: random."
            )
        s = src.queries.shape[0] if qc.count is None else min(qc.count, src.queries.shape[0])
        q = np.asarray(src.queries[:s], dtype=np.float64)
        if not np.isfinite(q).all():
            raise ConfigError(f"{src.label}: the queries array contains NaN or Inf.")
        pos = None if src.query_positions is None else np.asarray(src.query_positions[:s])
        return q, pos
    rng = np.random.default_rng(qc.seed)
    s = qc.count or 128
    sample = src.read(0, min(src.n, 4096)).rows.astype(np.float64)
    centred = sample - sample.mean(axis=0)
    q = rng.standard_normal((s, src.d))
    spread = (centred @ q.T).std(axis=0) / np.sqrt(src.d)
    q *= (qc.logit_std / np.maximum(spread, 1e-300))[:, None]
    return q, np.sort(rng.integers(0, src.n, size=s)).astype(np.int64)


# ---------------------------------------------------------------------------- metrics
def _aggregate(x: np.ndarray, worst: str) -> dict[str, float | None]:
    """mean, the 10 % tail (p10, or p90 when larger is worse) and the worst value."""
    x = x[np.isfinite(x)]
    tail = "p90" if worst == "max" else "p10"
    if x.size == 0:
        return {"mean": None, tail: None, "worst": None, "queries": 0}
    return {
        "mean": float(x.mean()),
        tail: float(np.percentile(x, 90 if worst == "max" else 10)),
        "worst": float(x.max() if worst == "max" else x.min()),
        "queries": int(x.size),
    }


def set_metrics(
    ks: KeySet,
    truth: dict[str, Any],
    lse_s: np.ndarray,
    out_s: np.ndarray | None,
    positions: np.ndarray,
) -> dict[str, np.ndarray]:
    """Per-query recall, mass, error and keys used of one set (see the module docstring)."""
    idx = truth["indices"]
    valid = idx >= 0
    pos = np.searchsorted(ks.indices, idx)
    member = (pos < ks.indices.size) & (
        ks.indices[np.minimum(pos, ks.indices.size - 1)] == idx
    ) if ks.indices.size else np.zeros(idx.shape, dtype=bool)
    if ks.window > 0:
        wp = positions[:, None]
        member |= (idx > wp - ks.window) & (idx <= wp)
    heavy = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(heavy > 0, (valid & member).sum(axis=1) / heavy, np.nan)
    lse = truth["lse"]
    mass = np.where(np.isfinite(lse_s), np.exp(np.minimum(lse_s - lse, 0.0)), 0.0)
    error = np.full(lse.shape, np.nan)
    if out_s is not None and truth["output"] is not None:
        o = truth["output"]
        norm = np.linalg.norm(o, axis=1)
        ok = norm > 0
        error[ok] = np.linalg.norm(o - out_s, axis=1)[ok] / norm[ok]
    return {"recall": recall, "mass": mass, "error": error, "keys": ks.sizes(positions)}


# ---------------------------------------------------------------------------- the run
def _global_sets(src: KeySource, cfg: EvaluateConfig) -> Plan[list[KeySet]]:
    """Every query-independent selector's sets (heavy hitters come later)."""
    s = cfg.selectors
    budgets = [int(b) for b in s.budgets if b <= src.n]  # counts (_single_store_config)
    names = set(s.names)
    out: list[KeySet] = []
    # All leverage selections share one read of the store (and one second pass), and
    # the key-norm pass shares it too.
    wanted: dict[str, Selection] = {}
    if "universal-threshold" in names:
        wanted["threshold"] = Selection(eps=s.universal_eps, variant=s.universal_variant)
    if "leverage-plain" in names:
        wanted["plain"] = Selection(budget=max(budgets), variant="plain")
    if names & {"leverage-affine", "hybrid"}:
        wanted["affine"] = Selection(budget=max(budgets), variant="affine")
    for sel in wanted.values():
        sel.check(src.n)
    ctx = PassContext(src, src.rows_per_block(cfg.engine.chunk_rows), cfg.engine.kind)
    plans: list[Plan[Any]] = [LeverageSet(sel).plan(ctx) for sel in wanted.values()]
    if "key-norm" in names:
        plans.append(largest_norm_plan(src.n, src.d, _check_budgets(budgets, src.n)))
    fused = yield from fuse(plans)
    got = dict(zip(wanted, fused, strict=False))
    if "threshold" in got:
        out.append(KeySet("universal-threshold", None, got["threshold"].indices, src.n))
    if "plain" in got:
        ranking = rank_by_score(got["plain"].indices, got["plain"].scores)
        out += leverage_top(src, budgets, "plain", ranking=ranking)
    affine = None
    if "affine" in got:
        affine = rank_by_score(got["affine"].indices, got["affine"].scores)
    if "leverage-affine" in names:
        out += leverage_top(src, budgets, "affine", ranking=affine)
    if "sinks-window" in names:
        out += sinks_window(src.n, budgets, sinks=s.sinks)
    if "key-norm" in names:
        out += fused[-1]
    if "random" in names:
        out += uniform_random(src.n, budgets, seed=s.seed)
    if "hybrid" in names:
        out += hybrid(
            src, budgets, sinks=s.sinks, window_fraction=s.window_fraction, ranking=affine
        )
    return out


def evaluate(
    source: Any, cfg: EvaluateConfig, *, progress: bool = False, **engine_options: Any
) -> dict[str, Any]:
    """Run the evaluation; returns the report (aggregates) and per-query arrays.

    Every pass runs on ``cfg.engine`` (local or Dask; a Dask cluster is started once for
    all passes). ``engine_options`` (e.g. ``client=``) override the config's.
    """
    src = open_keys(source, array=cfg.input.array) if not isinstance(source, KeySource) else source
    opts = {**cfg.engine.options(), **engine_options}
    outcome = run_recipes(src, [Evaluation(cfg)], engine=cfg.engine.kind,
                          chunk_rows=cfg.engine.chunk_rows, progress=progress,
                          memory_limit=cfg.engine.memory_limit, **opts)
    report: dict[str, Any] = outcome.results[0]
    report["plan"] = outcome.report.as_dict()
    return report


def _single_store_config(src: KeySource, cfg: EvaluateConfig) -> EvaluateConfig:
    """Refuse cache-only masks and selectors; fractional budgets become counts of n."""
    for mode in cfg.attention.modes:
        if mode not in MODES:
            raise ConfigError(
                f"attention.modes: {mode!r} needs a KV cache with segments (input.path in "
                "the layout of docs/real-caches.md); a single key store has "
                f"{list(MODES)}."
            )
    only = [x for x in cfg.selectors.names if x not in SELECTORS]
    if only:
        raise ConfigError(f"selectors.names: {only} need a KV cache input (docs/real-caches.md).")
    budgets = tuple(b if isinstance(b, int) else max(1, math.ceil(b * src.n))
                    for b in cfg.selectors.budgets)
    return dataclasses.replace(cfg, selectors=dataclasses.replace(cfg.selectors,
                                                                  budgets=budgets))


class Evaluation(Recipe[dict[str, Any]]):
    """Coverage of every selector against exact attention, in three rounds of reads:
    (1) leverage, key norms and the ground truth; (2) top-B second passes and observed
    attention; (3) attention restricted to every selected set."""

    on_cache = "refuse"

    def __init__(self, cfg: EvaluateConfig) -> None:
        self.cfg = cfg

    def describe(self) -> str:
        return "evaluate"

    def plan(self, ctx: PassContext) -> Plan[dict[str, Any]]:
        src = ctx.source
        assert isinstance(src, KeySource)
        cfg = _single_store_config(src, self.cfg)
        queries, positions = load_queries(src, cfg.queries)
        a = cfg.attention
        if "causal" in a.modes and positions is None:
            raise ConfigError(
                f"{src.label}: causal mode needs query positions: add a 'query_positions' "
                "array (int64, one per query) next to 'queries', or use attention.modes: "
                "[global]."
            )
        dv = 0 if src.values is None else int(src.values.shape[1])
        t0 = time.perf_counter()
        combos = [(m, k) for m in a.modes for k in a.kinds]
        common, (truths, observed) = yield from fuse(
            [_global_sets(src, cfg), _truth(src, cfg, queries, positions, dv, combos)]
        )
        sets: dict[tuple[str, str], list[KeySet]] = {c: list(common) for c in combos}
        budgets = [int(b) for b in cfg.selectors.budgets if b <= src.n]
        for c, res in zip(combos, observed, strict=False):
            order = rank_by_score(res["indices"], res["scores"])
            sets[c] += ranked_sets("heavy-hitters", order, budgets, src.n)

        restricted: dict[str, Operator[Any, Any]] = {}
        for m, k in combos:
            ks = sets[(m, k)]
            restricted[f"{m}/{k}"] = RestrictedAttention(
                RestrictedAttentionSpec(
                    queries,
                    values_dim=dv,
                    set_indices=np.concatenate([x.indices for x in ks]),
                    set_offsets=np.cumsum([0] + [x.indices.size for x in ks]),
                    set_windows=np.array([x.window for x in ks], dtype=np.int64),
                    n_keys=src.n,
                    **_attention(a, m, k, positions),
                )
            )
        done = yield Pass(restricted, "restricted attention")

        results: dict[str, Any] = {}
        per_query: dict[str, np.ndarray] = {}
        for (m, k), truth in zip(combos, truths, strict=True):
            res = done[f"{m}/{k}"].result()
            qpos = positions if m == "causal" else np.full(queries.shape[0], src.n - 1)
            rows = []
            assert qpos is not None
            for i, chosen in enumerate(sets[(m, k)]):
                out_s = None if res["output"] is None else res["output"][i]
                met = set_metrics(chosen, truth, res["lse"][i], out_s, qpos)
                row: dict[str, Any] = {"selector": chosen.name, "budget": chosen.budget}
                for name in METRICS:
                    row[name] = _aggregate(met[name].astype(np.float64), "max" if name in (
                        "error", "keys") else "min")
                    per_query[f"{m}.{k}.{chosen.name}.{chosen.budget}.{name}"] = met[name]
                rows.append(row)
            results[f"{m}/{k}"] = {
                "mode": m,
                "kind": k,
                "heavy_per_query": _aggregate(truth["counts"].astype(np.float64), "max"),
                "queries_with_heavy": int(np.count_nonzero(truth["counts"])),
                "dropped_candidates": truth["dropped"],
                "rows": rows,
            }
        return {
            "source": src.describe(),
            "queries": int(queries.shape[0]),
            "values_dim": dv,
            "seconds": time.perf_counter() - t0,
            "results": results,
            "per_query": per_query,
        }


def _attention(a: AttentionConfig, mode: str, kind: str, positions: np.ndarray | None
               ) -> dict[str, Any]:
    return dict(
        scale=a.scale,
        kind=kind,
        p=a.p,
        mode=mode,
        positions=positions if mode == "causal" else None,
    )


def _truth(
    src: KeySource, cfg: EvaluateConfig, queries: np.ndarray, positions: np.ndarray | None,
    dv: int, combos: list[tuple[str, str]],
) -> Plan[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """The exact ground truth per (mode, kind), then (heavy hitters) observed attention."""
    a = cfg.attention
    gts: dict[str, Operator[Any, Any]] = {
        f"{m}/{k}": GroundTruth(GroundTruthSpec(queries, eps=a.eps, values_dim=dv,
                                                **_attention(a, m, k, positions)))
        for m, k in combos
    }
    done = yield Pass(gts, "ground truth")
    truths = [done[f"{m}/{k}"].result() for m, k in combos]
    observed: list[dict[str, Any]] = []
    if "heavy-hitters" in cfg.selectors.names:
        budgets = [int(b) for b in cfg.selectors.budgets if b <= src.n]
        hh: dict[str, Operator[Any, Any]] = {
            f"{m}/{k}": ObservedAttentionTop(
                ObservedAttentionSpec(queries, lse=t["lse"], budget=max(budgets),
                                      **_attention(a, m, k, positions))
            )
            for (m, k), t in zip(combos, truths, strict=True)
        }
        done = yield Pass(hh, "observed attention")
        observed = [done[f"{m}/{k}"].result() for m, k in combos]
    return truths, observed


# ---------------------------------------------------------------------------- outputs
def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown_table(report: dict[str, Any]) -> str:
    """One table per (mode, kind): recall / mass / error (mean, p10, worst) and keys."""
    lines = []
    for key, res in report["results"].items():
        lines += [
            f"### {key} (eps = {report['config']['attention']['eps']}, "
            f"{res['queries_with_heavy']} queries with heavy entries, "
            f"mean {_fmt(res['heavy_per_query']['mean'], 1)} heavy per query)",
            "",
            "| selector | B | keys used | recall mean | recall p10 | recall worst | "
            "mass mean | mass p10 | mass worst | error mean | error p90 | error worst |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in res["rows"]:
            r, m, e = row["recall"], row["mass"], row["error"]
            lines.append(
                f"| {row['selector']} | {row['budget'] if row['budget'] else '(eps)'} | "
                f"{_fmt(row['keys']['mean'], 0)} | {_fmt(r['mean'])} | {_fmt(r['p10'])} | "
                f"{_fmt(r['worst'])} | {_fmt(m['mean'])} | {_fmt(m['p10'])} | "
                f"{_fmt(m['worst'])} | {_fmt(e['mean'])} | {_fmt(e['p90'])} | "
                f"{_fmt(e['worst'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG per (mode, kind): recall and mass (means) vs budget, one curve per selector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, res in report["results"].items():
        fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.2))
        for metric, ax in zip(("recall", "mass"), axes, strict=True):
            by_sel: dict[str, list[tuple[float, float]]] = {}
            for row in res["rows"]:
                val = row[metric]["mean"]
                if val is not None:
                    by_sel.setdefault(row["selector"], []).append((row["keys"]["mean"], val))
            for name, pts in by_sel.items():
                pts.sort()
                xs, ys = zip(*pts, strict=True)
                style = "*" if len(pts) == 1 else ".-"
                ax.plot(xs, ys, style, label=name, markersize=10 if len(pts) == 1 else 6)
            ax.set_xscale("log")
            ax.set_xlabel("keys used per query (mean)")
            ax.set_ylabel(f"{metric} (mean over queries)")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[0].set_title(f"recall of entries >= eps ({key})")
        axes[1].set_title(f"attention mass kept ({key})")
        axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.tight_layout()
        path = out_dir / f"coverage_{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(report: dict[str, Any], out: Path, *, overwrite: bool) -> Path:
    """``report.json``, ``report.md``, ``per_query.npz`` and (with the ``plots`` extra,
    matplotlib) the PNGs, atomically."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        body = {k: v for k, v in report.items() if k != "per_query"}
        write_json_atomic(tmp / "report.json", body)
        (tmp / "report.md").write_text(markdown_table(report))
        np.savez(tmp / "per_query.npz", **report["per_query"])
        if importlib.util.find_spec("matplotlib") is not None:  # the plots extra
            plot_report(report, tmp)
    return out


def prepare_source(cfg: EvaluateConfig) -> tuple[KeySource, bool]:
    """Open the configured store, generating the synthetic one first when configured."""
    made = False
    if cfg.input.generate is not None:
        _, made = ensure_store(cfg.input.path, cfg.input.generate)
    return open_keys(cfg.input.path, array=cfg.input.array), made
