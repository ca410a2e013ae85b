"""``scaling``: one pass of the universal set, JL embeddings and ground truth as n grows.

For each n (default 2^16 … 2^27), d (64, 128) and source (``generator``: rows generated
on the fly from the seed; ``zarr``: the same rows in an uncompressed zarr store on disk,
up to ``zarr_max_n``) a *fresh subprocess* streams the keys once through

- ``LeverageScores`` (the one-pass universal set U_ε, ``streamattn.recipes.universal``),
- ``ProjectedEmbeddings`` (a JL map, ``streamattn.recipes.embeddings``; Y is computed block by
  block and not stored, so the time is the projection's, not a disk write's),
- ``GroundTruth`` (exact heavy entries of ``gt_queries`` queries),
- with ``sampler`` set (``online`` or ``merge-reduce``), ``LeverageSampler`` (issue 13: a
  weighted row sample with (1 ± ``sampler_eps``) spectral error w.p. ≥ 1 − ``sampler_delta``,
  its oversampling from ``streamattn.recipes.samplers.plan_spec``),

all sharing each read block (the runner fuses the recipes into one read), and reports the time
per row (wall and CPU: user + system over all threads of the child), |U|, the
heavy/candidate counts and its peak RSS (``streamattn.memory``). For zarr sources it then
times a raw read of the same store (blocks only, no operators): engine time / raw read
time says how far the pass is from the reading limit.

A *series* is one (d, source, sampler, seed); its runs go in increasing n, one at a time.
With ``sampler_max_n`` set, the main series run without the sampler and the sampler gets
series of its own (from the generator, n ≤ ``sampler_max_n``): the merge-reduce sampler's
state grows like log n by design (its memory bound), so it must not blur the flat-memory
measurement of the rest, and it costs several times the rest of the pass per row.
``parallel`` series run at the same time (each run still a fresh subprocess, measured by
its own CPU time and peak RSS).

The keys are ``streamattn.synthetic`` rows with ``outliers: 0``, so row j depends only on
(seed, j): the store for each n is a prefix of the largest one, grown in place as n
increases, and removed at the end (stores live in a temporary directory, never in the
repository). ``results.csv`` holds only deterministic quantities (sizes, counts, sums),
identical on rerun and between the two sources; times and RSS go to
``measurements.csv``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.errors import ConfigError
from streamattn.experiments.common import (
    PLOTS_MISSING,
    as_list,
    csv_text,
    new_figure,
    plots_available,
    save_figure,
)
from streamattn.synthetic import SyntheticSpec, synthetic_queries, synthetic_rows

NAME = "scaling"
SOURCES = ("generator", "zarr")
SAMPLER_NOTE = (
    "With sampler set, the leverage sampler (issue 13, streamattn.operators.sampler) shares "
    "the pass; sample_size and its certified bound are in results.csv."
)
COLUMNS = [
    "n", "d", "source", "sampler", "universal_set_size", "numerical_rank", "gt_heavy_mean",
    "gt_heavy_max", "gt_candidates_max", "gt_candidate_bound", "gt_lse_sum", "jl_mu_s_sum",
    "sample_size", "sample_size_bound",
]
MEASURE_COLUMNS = [
    "n", "d", "source", "sampler", "seconds", "ns_per_row", "cpu_seconds", "cpu_ns_per_row",
    "peak_rss_bytes", "rss_ratio_vs_2^20",
    "read_seconds", "read_mb_per_s", "engine_over_read",
]


@dataclass(frozen=True)
class ScalingConfig:
    """``n``, ``d``, ``source`` and ``seed`` take scalars or lists; sizes are row counts."""

    n: Any = field(default_factory=lambda: [2**k for k in range(16, 28)])
    d: Any = field(default_factory=lambda: [64, 128])
    source: Any = field(default_factory=lambda: list(SOURCES))
    seed: Any = 0
    zarr_max_n: int = 2**25
    eps: float = 1e-3
    variant: str = "affine"
    gt_queries: int = 16
    gt_eps: float = 0.01
    jl_m: int = 16
    jl_method: str = "srht"
    sampler: str | None = "merge-reduce"
    sampler_eps: float = 0.5
    sampler_delta: float = 0.1
    rank: int = 16
    noise: float = 0.1
    chunk_rows: int = 65536
    store_dir: str | None = None
    time_budget_s: float | None = None
    #: None: the sampler (when set) shares every run; else its own generator series, n ≤ this.
    sampler_max_n: int | None = None
    parallel: int = 1

    def check(self) -> None:
        for name in ("n", "d"):
            if any(v < 1 for v in as_list(getattr(self, name), int, name)):
                raise ConfigError(f"config.{name}: values must be >= 1.")
        for s in as_list(self.source, str, "source"):
            if s not in SOURCES:
                raise ConfigError(f"config.source: {s!r} is not one of {list(SOURCES)}.")
        if any(v < 0 for v in as_list(self.seed, int, "seed")):
            raise ConfigError("config.seed: seeds must be >= 0.")
        if not 0 < self.eps <= 1 or not 0 < self.gt_eps <= 1:
            raise ConfigError("config.eps and config.gt_eps must be in (0, 1].")
        if self.variant not in ("plain", "affine"):
            raise ConfigError("config.variant must be plain or affine.")
        for name in ("gt_queries", "jl_m", "chunk_rows", "zarr_max_n", "parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config.{name} must be >= 1.")
        if any(self.jl_m > d for d in as_list(self.d, int, "d")):
            raise ConfigError("config.jl_m must be <= every d.")
        if self.sampler is not None and self.sampler not in ("online", "merge-reduce"):
            raise ConfigError("config.sampler must be online, merge-reduce or null.")
        if not 0 < self.sampler_eps < 1 or not 0 < self.sampler_delta < 1:
            raise ConfigError("config.sampler_eps and config.sampler_delta must be in (0, 1).")
        if self.sampler_max_n is not None and self.sampler_max_n < 1:
            raise ConfigError("config.sampler_max_n must be >= 1 (or null: every run).")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError("config.time_budget_s must be > 0 (or null: no budget).")

    def seeds(self) -> list[int]:
        return as_list(self.seed, int, "seed")

    def spec(self, n: int, d: int, seed: int) -> SyntheticSpec:
        """Prefix-consistent synthetic keys (no planted outliers: row j = f(seed, j))."""
        return SyntheticSpec(
            n=n, d=d, rank=min(self.rank, d), noise=self.noise, outliers=0, seed=seed,
            chunk_rows=self.chunk_rows, dtype="float32", compressor="none",
        )


# ---------------------------------------------------------------------- the child
def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One (n, d, source) measurement in this process (run it in a fresh one)."""
    from streamattn.experiments.generated import GeneratedSource, SyntheticRows
    from streamattn.memory import peak_rss_bytes
    from streamattn.operators.ground_truth import GroundTruth, GroundTruthSpec
    from streamattn.operators.projection import ProjectionMap
    from streamattn.operators.sampler import LeverageSampler
    from streamattn.recipes.embeddings import ReduceConfig, projection_operator
    from streamattn.recipes.samplers import plan_spec
    from streamattn.recipes.selection import Selection
    from streamattn.recipes.universal import selection_recipe
    from streamattn.runner import OnePass, run_recipes
    from streamattn.sources import open_keys

    spec = SyntheticSpec(**job["spec"])
    if job["source"] == "generator":
        source: Any = GeneratedSource(SyntheticRows(spec), label=f"generated n={spec.n}")
    else:
        source = open_keys(job["store"])
        if source.n != spec.n:
            raise ConfigError(f"{job['store']}: has {source.n} rows, expected {spec.n}.")
    queries, _ = synthetic_queries(replace(spec, queries=job["gt_queries"]))
    gt = GroundTruth(GroundTruthSpec(queries.astype(np.float64), eps=job["gt_eps"]))
    rcfg = ReduceConfig(m=job["jl_m"], method=job["jl_method"], seed=job["seed"])
    proj = projection_operator(ProjectionMap(rcfg.method, spec.d, rcfg.m, rcfg.seed), "", rcfg)
    fused: list[Any] = [gt, proj]
    if job.get("sampler"):
        fused.append(LeverageSampler(plan_spec(
            spec.n, spec.d, eps=job["sampler_eps"], delta=job["sampler_delta"],
            method=job["sampler"], variant=job["variant"], seed=job["seed"],
        )))
    t0, c0 = time.perf_counter(), _cpu_seconds()
    sel = Selection(job["eps"], job["variant"])
    uset, also = run_recipes(source, [selection_recipe(sel), OnePass(fused)]).results
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    gt_res, proj_res = also[0].result(), also[1].result()
    sample = also[2].result() if len(also) > 2 else None
    read_seconds = None
    if job["source"] == "zarr":
        t1 = time.perf_counter()
        for _ in source.blocks():
            pass
        read_seconds = time.perf_counter() - t1
    else:
        read_seconds = source.array.seconds  # time spent generating, summed over the readers
    return {
        "universal_set_size": len(uset),
        "numerical_rank": int(uset.certificate["numerical_rank"]),
        "gt_heavy_mean": float(np.mean(gt_res["counts"])),
        "gt_heavy_max": int(np.max(gt_res["counts"])),
        "gt_candidates_max": int(also[0].candidate_counts().max()),
        "gt_candidate_bound": int(also[0].spec.max_candidates),
        "gt_lse_sum": float(np.sum(gt_res["lse"])),
        "jl_mu_s_sum": float(np.sum(proj_res.mu_s)),
        "sample_size": None if sample is None else int(sample["indices"].size),
        "sample_size_bound": None if sample is None else sample["certificate"].get("size_bound"),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "read_seconds": read_seconds,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (the reader threads included)."""
    import resource

    use = resource.getrusage(resource.RUSAGE_SELF)
    return float(use.ru_utime + use.ru_stime)


def _child_main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    print(json.dumps(measure(job)))
    return 0


# ---------------------------------------------------------------------- the driver
def _grow_store(path: Path, spec: SyntheticSpec) -> None:
    """Make the zarr store at ``path`` hold the first ``spec.n`` rows (grow a prefix)."""
    import zarr

    if not path.exists():
        group = zarr.open_group(str(path), mode="w")
        group.create_array("keys", shape=(0, spec.d), dtype=spec.dtype,
                           chunks=(spec.chunk_rows, spec.d), compressors=None)
    arr = zarr.open_array(str(path / "keys"), mode="r+")
    old = arr.shape[0]
    if old >= spec.n:
        if old > spec.n:
            raise ConfigError(f"{path}: holds {old} rows; sweep n in increasing order.")
        return
    arr.resize((spec.n, spec.d))
    for a in range(old, spec.n, spec.chunk_rows):
        b = min(a + spec.chunk_rows, spec.n)
        arr[a:b] = synthetic_rows(spec, a, b)


def _jobs(cfg: ScalingConfig) -> list[dict[str, Any]]:
    jobs = []
    split = cfg.sampler is not None and cfg.sampler_max_n is not None
    for seed in cfg.seeds():
        for d in as_list(cfg.d, int, "d"):
            for n in sorted(set(as_list(cfg.n, int, "n"))):
                runs = [(s, None if split else cfg.sampler)
                        for s in as_list(cfg.source, str, "source")]
                if split and n <= int(cfg.sampler_max_n or 0):
                    runs.append(("generator", cfg.sampler))
                for source, sampler in runs:
                    if source == "zarr" and n > cfg.zarr_max_n:
                        continue
                    jobs.append({
                        "n": n, "d": d, "source": source, "seed": seed,
                        "spec": asdict(cfg.spec(n, d, seed)), "eps": cfg.eps,
                        "variant": cfg.variant, "gt_queries": cfg.gt_queries,
                        "gt_eps": cfg.gt_eps, "jl_m": cfg.jl_m, "jl_method": cfg.jl_method,
                        "sampler": sampler, "sampler_eps": cfg.sampler_eps,
                        "sampler_delta": cfg.sampler_delta,
                    })
    # cheapest first, so a time budget cuts the largest runs
    return sorted(jobs, key=lambda j: (j["n"] * j["d"], j["d"], j["source"],
                                       j["sampler"] or "", j["seed"]))


def _series_key(job: dict[str, Any]) -> tuple[int, str, str, int]:
    return (job["d"], job["source"], job["sampler"] or "", job["seed"])


def _series(jobs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Jobs grouped by series (increasing n inside), the most expensive series first."""
    groups: dict[tuple[int, str, str, int], list[dict[str, Any]]] = {}
    for job in jobs:
        groups.setdefault(_series_key(job), []).append(job)
    return sorted(groups.values(), key=lambda g: -sum(j["n"] * j["d"] for j in g))


def _run_child(job: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "streamattn.experiments.scaling", json.dumps(job)],
        capture_output=True, text=True, env=env, check=False,
    )
    if proc.returncode != 0:
        raise ConfigError(
            f"scaling child n={job['n']} d={job['d']} source={job['source']} failed: "
            f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
        )
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def run(cfg: ScalingConfig, out: Path, *, progress: bool = False) -> dict[str, Any]:
    """Run every (n, d, source) job in a fresh subprocess; write tables, plots, report.

    Series (see the module docstring) run ``cfg.parallel`` at a time; inside a series the
    runs go in increasing n, and with ``time_budget_s`` a run predicted (from the series'
    previous run, scaled by n) to end past the budget is skipped with the rest of its
    series' larger n.
    """
    t_start = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="streamattn-scaling-", dir=cfg.store_dir))
    rows: list[dict[str, Any]] = []
    meas: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    lock = threading.Lock()

    def one_series(series: list[dict[str, Any]]) -> None:
        last: tuple[int, float] | None = None
        store: Path | None = None
        try:
            for job in series:
                if cfg.time_budget_s is not None and last is not None:
                    predicted = last[1] * job["n"] / last[0]
                    if time.perf_counter() - t_start + predicted > cfg.time_budget_s:
                        with lock:
                            skipped.append({**job, "sampler": job["sampler"] or "",
                                            "reason": f"time budget ({predicted:.0f} s)"})
                        continue
                t_job = time.perf_counter()
                if job["source"] == "zarr":
                    store = base / f"d{job['d']}-seed{job['seed']}.zarr"
                    _grow_store(store, SyntheticSpec(**job["spec"]))
                    job = {**job, "store": str(store)}
                res = _run_child(job)
                last = (job["n"], time.perf_counter() - t_job)
                head = {"n": job["n"], "d": job["d"], "source": job["source"],
                        "sampler": job["sampler"] or ""}
                with lock:
                    if progress:
                        print(f"  scaling n={job['n']} d={job['d']} {job['source']} "
                              f"sampler={job['sampler']}: {res['seconds']:.1f} s "
                              f"(CPU {res['cpu_seconds']:.1f} s), |U| = "
                              f"{res['universal_set_size']}, RSS "
                              f"{res['peak_rss_bytes'] / 2**20:.0f} MiB  {json.dumps(res)}",
                              flush=True)
                    rows.append({**head, **{c: res[c] for c in COLUMNS if c in res}})
                    meas.append({**head, **res})
        finally:
            if store is not None:
                shutil.rmtree(store, ignore_errors=True)  # a series' store: its last use

    try:
        groups = _series(_jobs(cfg))
        if cfg.parallel == 1:
            for series in groups:
                one_series(series)
        else:
            with ThreadPoolExecutor(max_workers=cfg.parallel) as pool:
                for fut in [pool.submit(one_series, g) for g in groups]:
                    fut.result()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows.sort(key=lambda r: (r["n"] * r["d"], r["d"], r["source"], r["sampler"]))
    meas.sort(key=lambda m: (*_label(m), m["n"]))
    _derive(meas)
    (out / "results.csv").write_text(csv_text(rows, COLUMNS))
    (out / "measurements.csv").write_text(csv_text(meas, MEASURE_COLUMNS))
    plots = _plots(meas, out) if meas and plots_available() else []
    (out / "report.md").write_text(_report(cfg, rows, meas, skipped, plots))
    reached = max((m["n"] for m in meas), default=None)
    return {"runs": len(meas), "skipped": len(skipped), "max_n": reached, "plots": plots,
            "seconds_total": time.perf_counter() - t_start}


def _label(m: dict[str, Any]) -> tuple[int, str, str]:
    """A measured series as the tables show it: (d, source, sampler or "")."""
    return (m["d"], m["source"], m["sampler"])


def _name(label: tuple[int, str, str]) -> str:
    d, source, sampler = label
    return f"d={d} {source}" + (f" +{sampler} sampler" if sampler else "")


def _derive(meas: list[dict[str, Any]]) -> None:
    ref = {_label(m): m["peak_rss_bytes"] for m in meas if m["n"] == 2**20}
    for m in meas:
        m["ns_per_row"] = 1e9 * m["seconds"] / m["n"]
        m["cpu_ns_per_row"] = 1e9 * m["cpu_seconds"] / m["n"]
        r = ref.get(_label(m))
        m["rss_ratio_vs_2^20"] = m["peak_rss_bytes"] / r if r else None
        if m["read_seconds"]:
            m["read_mb_per_s"] = m["n"] * m["d"] * 4 / m["read_seconds"] / 1e6
            m["engine_over_read"] = m["seconds"] / m["read_seconds"]


def _plots(meas: list[dict[str, Any]], out: Path) -> list[str]:
    fig, axes = new_figure(ncols=2, nrows=2, width=4.6, height=3.4)
    series = sorted({_label(m) for m in meas})
    panels = [
        ("cpu_ns_per_row", "CPU time per row (ns; wall: thin)", False),
        ("universal_set_size", "|U| (··: sampler's sample size)", False),
        ("peak_rss_bytes", "peak RSS (MiB)", True),
        ("read_mb_per_s", "read / generate throughput (MB/s)", False),
    ]
    for ax, (key, title, mib) in zip(axes.ravel(), panels, strict=True):
        for i, label in enumerate(series):
            mine = [m for m in meas if _label(m) == label]
            pts = sorted((m["n"], m.get(key)) for m in mine if m.get(key) is not None)
            if not pts:
                continue
            y = np.array([p[1] for p in pts], dtype=float) / (2**20 if mib else 1)
            style = {"generator": "o-", "zarr": "s--"}[label[1]]
            ax.plot([p[0] for p in pts], y, style if not label[2] else "^-.",
                    color=f"C{i}", label=_name(label))
            if key == "universal_set_size":
                samp = sorted((m["n"], m["sample_size"]) for m in mine if m.get("sample_size"))
                if samp:
                    ax.plot([p[0] for p in samp], [p[1] for p in samp], ":", color=f"C{i}")
            if key == "cpu_ns_per_row":
                wall = sorted((m["n"], m["ns_per_row"]) for m in mine)
                ax.plot([p[0] for p in wall], [p[1] for p in wall], "-", lw=0.6,
                        color=f"C{i}", alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if key == "universal_set_size":
            ax.set_yscale("symlog", linthresh=1)
            ax.set_ylim(0, None)
        if key == "cpu_ns_per_row":
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, out / "scaling.png")
    return ["scaling.png"]


def _report(cfg: ScalingConfig, rows: list[dict], meas: list[dict], skipped: list[dict],
            plots: list[str]) -> str:
    def opt(x: float | None, f: str) -> str:
        return "" if not x else format(x, f)

    lines = [
        f"# {NAME}",
        "",
        "One pass per run (fresh subprocess): affine universal set at ε = "
        f"{cfg.eps:g}, a {cfg.jl_method} JL map to m = {cfg.jl_m} (computed, not stored) and exact",
        f"ground truth for {cfg.gt_queries} queries at ε = {cfg.gt_eps:g}, sharing each block.",
        SAMPLER_NOTE,
        "",
        f"Series run {cfg.parallel} at a time; every run is a fresh subprocess.",
        "",
        "| n | d | source | sampler | wall s | CPU s | CPU ns/row | peak RSS MiB | "
        "RSS / RSS(2^20) | read s | engine / read | size U | sample size | GT heavy mean |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in sorted(meas, key=lambda m: (*_label(m), m["n"])):
        ratio = m.get("rss_ratio_vs_2^20")
        eor = m.get("engine_over_read")
        lines.append(
            f"| 2^{int(math.log2(m['n']))} | {m['d']} | {m['source']} | {m['sampler']} | "
            f"{m['seconds']:.1f} | "
            f"{m['cpu_seconds']:.1f} | {m['cpu_ns_per_row']:.0f} | "
            f"{m['peak_rss_bytes'] / 2**20:.0f} | "
            f"{opt(ratio, '.3f')} | {opt(m['read_seconds'], '.1f')} | "
            f"{opt(eor, '.2f')} | {m['universal_set_size']} | {m['sample_size'] or ''} | "
            f"{m['gt_heavy_mean']:.2f} |"
        )
    same: dict[tuple[int, int, str], list[tuple[Any, ...]]] = {}
    for r in rows:
        same.setdefault((r["n"], r["d"], r["sampler"]), []).append(
            tuple(r[c] for c in COLUMNS[4:])
        )
    both = [v for v in same.values() if len(v) == 2]
    lines += ["", "Peak RSS from n = 2^20 to the largest n reached:", ""]
    if not any(m["n"] == 2**20 for m in meas):
        lines.append("- (no run at n = 2^20)")
    for label in sorted({_label(m) for m in meas}):
        series = sorted((m["n"], m["peak_rss_bytes"]) for m in meas if _label(m) == label)
        ref = dict(series).get(2**20)
        if ref:
            n_max, rss_max = series[-1]
            lines.append(f"- {_name(label)}: {ref / 2**20:.0f} MiB at 2^20, "
                         f"{rss_max / 2**20:.0f} MiB at 2^{int(math.log2(n_max))} "
                         f"(ratio {rss_max / ref:.3f})")
    lines += [
        "",
        "- wall s is the pass's elapsed time, CPU s its user + system time over all threads "
        "(the reader threads included); on a shared machine only the CPU time is comparable "
        "across runs.",
        f"- generator and zarr runs of the same (n, d) give identical results.csv rows in "
        f"{sum(1 for v in both if v[0] == v[1])} of {len(both)} pairs.",
        "- 'read s' is the time spent generating rows (generator; summed over the reader "
        "threads, overlapped with the pass) or a raw read of the store after the pass (zarr).",
    ]
    if skipped:
        lines += ["", f"Skipped by the time budget ({cfg.time_budget_s} s):", ""]
        lines += [f"- n = 2^{int(math.log2(s['n']))}, {_name(_label(s))}: "
                  f"{s['reason']}" for s in sorted(skipped, key=lambda s: (s['d'], s['n']))]
    lines += ["", "## Plots", ""] + ([f"![{p}]({p})" for p in plots] or [PLOTS_MISSING]) + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
