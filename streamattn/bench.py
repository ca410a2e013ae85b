"""Benchmarks: the one-pass engine against the read limit of the store and Dask peers.

Every configuration runs in a fresh Python process (``python -m streamattn.bench --one``)
that reports its wall time and its own peak RSS (``ru_maxrss``, plus that of the
processes it waited for, e.g. LocalCluster workers), so memory is measured per
configuration. Times are compared with a plain zarr loop over every chunk of the same
store, measured in the same run. On a shared machine the timings are noisy: each
configuration runs ``repeat`` times and the fastest run is reported, together with the
CPU idle share seen during the run (``/proc/stat``), so contention is visible.

Configurations (``KINDS``): ``zarr-loop`` (``arr[a:b]`` per storage chunk; ``zarr-loop-reuse``:
the same loop with glibc reusing heap memory, ``KIND_ENV``), ``parallel-read``
(the chunk files' bytes read by 4 threads into preallocated buffers, decompressed there
when the store is zstd-compressed: the read limit), ``uset-plain`` / ``uset-affine`` (the
one-pass exact universal set, eps = 0.01), ``uset+jl`` (universal set and SRHT embeddings
in one pass), ``gram-floor`` (the store read by the engine's block stream and its float64
Gram summed on the stream threads, nothing else: the floor of any exact pass built on
them, stated beside every time target), ``ground-truth`` (exact heavy attention for 256
queries), ``dask-threads`` / ``dask-cluster`` (the Dask engine), and the peers
``dask-gram`` (two passes: Gram K^T K by dask.array, then scores by map_blocks) and
``dask-tsqr`` (``da.linalg.tsqr``, row norms of Q).

Issue 16's other targets have their own configurations: ``uset-budget`` (exact top-B,
budget mode, against the zarr loop), ``dask-ckpt`` / ``dask-ckpt-cluster``
(``streamattn select --engine dask`` with its default checkpointing, threads scheduler or
a 2-worker LocalCluster: the client's peak RSS at two or more n, flat?), and on a
generated whole KV cache (``CACHE_KINDS``: layers × KV heads × head_dim, per-layer
``keys/layer_{l}`` and ``values/layer_{l}`` arrays) ``cache-read-keys`` (a plain zarr loop
over every keys array: the baseline), ``cache-read-kv`` (keys and values arrays),
``cache-gram-floor`` (``gram-floor`` for every head of the cache) and ``cache-select``
(``streamattn select CACHE --eps``: every head's set in one pass, keys only; its projected
peak — states plus blocks in flight — next to the measured one).

Each configuration with a target of issue 16 gets a ``target`` and ``meets_target`` entry
(``TARGETS``: the exact one-pass set ≤ 1.0× the zarr loop and ≤ 2.0× the parallel read,
with JL embeddings ≤ 1.5× the loop; ``RATIO_TARGETS``: a time ratio to another
configuration of the same store; ``FLAT_TARGETS``: peak RSS flat in n), and
``results.md`` opens with one table of every target, met or missed. Results go to
``--out`` (default: a fresh ``runs/bench-<UTC time>``, never over earlier results);
generated stores live in ``--data-dir`` and are reused by later runs, or deleted at the
end with ``--remove-data``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.memory import available_bytes, peak_rss_bytes

EPS = 0.01
KINDS = (
    "zarr-loop",
    "zarr-loop-reuse",
    "parallel-read",
    "uset-plain",
    "uset-affine",
    "uset+jl",
    "gram-floor",
    "ground-truth",
    "dask-threads",
    "dask-cluster",
    "dask-gram",
    "dask-tsqr",
    "uset-budget",
    "dask-ckpt",
    "dask-ckpt-cluster",
)
#: The environment of a configuration's process, where it differs. ``zarr-loop-reuse``: the
#: zarr loop with glibc told to reuse heap memory. Each ``arr[a:b]`` allocates a fresh
#: chunk-sized array; a 65536 × 128 float32 chunk (32 MiB) is at glibc's largest dynamic
#: mmap threshold, so every chunk is a fresh mmap whose pages fault in again: the d = 128
#: loop over 2 GiB took 2.5–5.2 s that way and 0.9 s with the heap reused (four runs each,
#: warm page cache). The engine reads into pooled buffers and never pays those faults.
KIND_ENV: dict[str, dict[str, str]] = {
    "zarr-loop-reuse": {"MALLOC_MMAP_THRESHOLD_": str(2**26),
                        "MALLOC_TRIM_THRESHOLD_": str(2**27), "MALLOC_TOP_PAD_": str(2**26)},
}
#: Configurations on a whole KV cache (``cache-read-keys`` is their baseline).
CACHE_KINDS = ("cache-read-keys", "cache-read-kv", "cache-gram-floor", "cache-select")
#: The cache's shape: layers, KV heads, head_dim (issue 16's example); rows per chunk.
CACHE_SHAPE = (30, 3, 64)
CACHE_CHUNK_ROWS = 4096
CACHE_EPS = 0.05
#: Budget mode's B (exact top-B keys by leverage).
BUDGET = 1024
READ_THREADS = 4
#: Issue 16's single-head targets: (max × zarr loop, max × parallel read) per configuration.
TARGETS: dict[str, tuple[float, float | None]] = {
    "uset-plain": (1.0, 2.0),
    "uset-affine": (1.0, 2.0),
    "uset+jl": (1.5, None),
}
#: Issue 16's time-ratio targets: configuration -> (baseline configuration, max ratio, text).
RATIO_TARGETS: dict[str, tuple[str, float, str]] = {
    "cache-select": ("cache-read-keys", 1.5, "≤ 1.5× plain read of the keys arrays"),
    "dask-cluster": ("uset-plain", 1.2,
                     "≤ 1.2× local engine (cluster start-up and its workers' imports excluded)"),
    "uset-budget": ("zarr-loop", 2.0, "≤ 2.0× zarr loop"),
}
#: Issue 16's memory targets: peak RSS at the largest n ≤ this × at the smallest n.
FLAT_TARGETS: dict[str, float] = {"cache-select": 1.1, "dask-ckpt": 1.1,
                                   "dask-ckpt-cluster": 1.1}
#: The float64 floor measured beside each time target (``run_gram_floor``): the same store
#: read by the engine's stream and its float64 Gram summed, nothing else. Where the floor
#: itself exceeds a limit, no pass built on that read path and a float64 Gram meets it on
#: this machine (only a faster read or Gram arrangement would move the floor itself).
FLOORS: dict[str, str] = {"uset-plain": "gram-floor", "uset-affine": "gram-floor",
                          "uset+jl": "gram-floor", "uset-budget": "gram-floor",
                          "cache-select": "cache-gram-floor"}


#: Imported before any configuration is timed: in its process and, for a LocalCluster, on
#: its workers (part of the cluster's start-up), so neither side's time holds an import.
PRELOADED = ("scipy.linalg", "zarr", "streamattn.recipes.universal")


class NotAvailable(Exception):
    """A configuration whose module is not part of this installation."""


# ---------------------------------------------------------------------------- stores
def store_path(data_dir: Path, n: int, d: int, compressor: str) -> Path:
    return data_dir / f"keys-n{n}-d{d}-{compressor}.zarr"


def ensure_bench_store(data_dir: Path, n: int, d: int, compressor: str) -> Path:
    """The synthetic store for (n, d, compressor), generated once (65536-row chunks)."""
    from streamattn.synthetic import SyntheticSpec, ensure_store

    path = store_path(data_dir, n, d, compressor)
    spec = SyntheticSpec(n=n, d=d, chunk_rows=65536, compressor=compressor)
    ensure_store(path, spec)
    return path


def cache_path(data_dir: Path, n: int, shape: tuple[int, int, int]) -> Path:
    layers, heads, hd = shape
    return data_dir / f"cache-n{n}-{layers}x{heads}x{hd}.zarr"


def ensure_cache_store(data_dir: Path, n: int, shape: tuple[int, int, int]) -> Path:
    """A synthetic whole KV cache (keys and values per layer, uncompressed), made once."""
    from streamattn.synthetic import SyntheticSpec, generate_kv_store

    path = cache_path(data_dir, n, shape)
    if not path.exists():
        layers, heads, hd = shape
        spec = SyntheticSpec(n=n, d=hd, rank=min(16, hd), chunk_rows=CACHE_CHUNK_ROWS,
                             compressor="none", values_dim=hd)
        generate_kv_store(path, spec, layers=layers, heads=heads)
    return path


def warm_store(path: Path, log: Any = print) -> float:
    """Read every file of the store once (untimed), so that each configuration after it
    reads from the page cache, as issue 16 measures ("page cache warm"); the seconds.

    Without it, a case's first configuration (its baseline) read from disk whatever earlier
    cases had evicted: the 25k cache's keys read took 1.04 s in one full run and 0.39 s in
    the next, and its ratios moved with it. (The d = 128 zarr loop's own spread is its
    allocator's page faults: ``KIND_ENV``.) A store larger than the memory available
    cannot stay cached: that is logged.
    """
    t0 = time.perf_counter()
    total = 0
    buf = bytearray(8 * 2**20)
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb", buffering=0) as fh:
                while got := fh.readinto(buf):
                    total += got
    seconds = time.perf_counter() - t0
    available = available_bytes()
    note = ""
    if available is not None and total > available:
        note = f"; larger than the {available / 1e9:.1f} GB available: reads may hit the disk"
    log(f"page cache: read {path.name} ({total / 1e9:.2f} GB) once in {seconds:.2f} s{note}")
    return seconds


# ---------------------------------------------------------------------------- runners
def _zarr_array(path: Path) -> Any:
    import zarr

    group: Any = zarr.open(str(path), mode="r")
    return group["keys"]


def run_zarr_loop(path: Path) -> dict[str, Any]:
    arr = _zarr_array(path)
    step = int(arr.chunks[0])
    total = 0.0
    for a in range(0, arr.shape[0], step):
        total += float(arr[a : a + step][0, 0])
    return {}


def run_parallel_read(path: Path) -> dict[str, Any]:
    """Chunk files read (and zstd-decoded) by threads into preallocated buffers."""
    arr = _zarr_array(path)
    n, d = arr.shape
    step = int(arr.chunks[0])
    root = path / "keys"
    codecs = [type(c).__name__ for c in arr.metadata.codecs]
    compressed = "ZstdCodec" in codecs
    decoder = None
    if compressed:
        from numcodecs import Zstd

        decoder = Zstd()
    bufs = [np.empty((step, d), dtype=arr.dtype) for _ in range(READ_THREADS)]

    def read(i: int) -> None:
        buf = bufs[i % READ_THREADS]
        fname = root / arr.metadata.encode_chunk_key((i, 0))
        with open(fname, "rb", buffering=0) as fh:
            if decoder is None:
                fh.readinto(buf.reshape(-1).view(np.uint8).data)
            else:
                decoder.decode(fh.read(), out=buf)

    with ThreadPoolExecutor(READ_THREADS) as pool:
        list(pool.map(read, range(-(-n // step))))
    return {"threads": READ_THREADS, "decompress": compressed}


def run_cache_read(path: Path, values: bool) -> dict[str, Any]:
    """A plain zarr loop over every ``keys/layer_{l}`` (and ``values/layer_{l}``) array."""
    import zarr

    root: Any = zarr.open_group(str(path), mode="r")
    groups = ["keys", "values"] if values else ["keys"]
    total, arrays = 0.0, 0
    for name in groups:
        for _, arr in sorted(root[name].arrays()):
            step = int(arr.chunks[0])
            for a in range(0, arr.shape[0], step):
                total += float(arr[a : a + step][0, 0])
            arrays += 1
    return {"arrays": arrays}


def _cli_select(path: Path, *flags: str) -> dict[str, Any]:
    """``streamattn select PATH FLAGS --out TMP --quiet``; the run's report.json.

    The select command's own parser and run function (``streamattn.cli.select``), not the
    CLI's entry point, which lists ``bench`` among its commands (an import circle).
    """
    from streamattn.cli import select as select_cmd

    parser = argparse.ArgumentParser(prog="streamattn")
    select_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / "out"
        args = parser.parse_args(["select", str(path), *flags, "--out", str(out), "--quiet"])
        code = select_cmd.run(args)
        if code != 0:
            raise RuntimeError(f"streamattn select exited with {code}")
        report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def run_cache_select(path: Path) -> dict[str, Any]:
    """``streamattn select CACHE --eps CACHE_EPS``: every head in one pass, keys only."""
    report = _cli_select(path, "--eps", str(CACHE_EPS))
    plan = report["plan"]
    certs = [s["certificate"] for s in report["sets"].values()]
    return {
        "heads": len(certs),
        "reads": plan["reads"],
        "chunk_rows": plan["chunk_rows"],
        "selected": sum(int(s["size"]) for s in report["sets"].values()),
        # before values_opened existed, has_values said whether values were opened
        "values_opened": any(c["source"].get("values_opened", c["source"]["has_values"])
                             for c in certs),
        "projected_peak_bytes": plan["projected_peak_bytes"],
    }


def run_dask_ckpt(path: Path, cluster: bool = False) -> dict[str, Any]:
    """``streamattn select --engine dask`` with the CLI's default checkpointing, on the
    threads scheduler (the client process is also the worker) or a 2-worker LocalCluster
    (the workers read their own chunks; the client holds states only)."""
    where = ["--scheduler", "threads"]
    if cluster:
        where = ["--scheduler", "local-cluster", "--n-workers", "2", "--threads-per-worker",
                 "1", "--no-dashboard"]
    report = _cli_select(path, "--eps", str(EPS), "--engine", "dask", *where)
    (name,) = report["sets"]
    return {"selected": int(report["sets"][name]["size"]),
            "checkpointed": all(p["checkpointed"] for p in report["plan"]["passes"])}


def run_dask_cluster(path: Path) -> dict[str, Any]:
    """The Dask engine on a 2-worker LocalCluster (1 thread each); start-up (the cluster,
    and ``PRELOADED`` imported on its workers, as a long-lived cluster has it) timed apart."""
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0",
                     scheduler_kwargs={"dashboard": False}) as cluster,
        Client(cluster) as client,
    ):
        for module in PRELOADED:  # the workers import what this process has, untimed
            client.run(importlib.import_module, module)
        startup = time.perf_counter() - t0
        info = run_uset(path, "plain", engine="dask", client=client)
    return {**info, "startup_seconds": startup}


def run_budget(path: Path) -> dict[str, Any]:
    """Budget mode: the exact top-``BUDGET`` keys (one pass, or two when the first cannot
    certify the top-B)."""
    from streamattn.recipes.universal import universal_set
    from streamattn.results import UniversalSet

    u = universal_set(str(path), budget=BUDGET)
    assert isinstance(u, UniversalSet)
    return {"selected": len(u), "budget": BUDGET, "passes": u.certificate["passes"]}


def run_uset(path: Path, variant: str, **engine: Any) -> dict[str, Any]:
    from streamattn.recipes.universal import universal_set
    from streamattn.results import UniversalSet

    u = universal_set(str(path), eps=EPS, variant=variant, **engine)
    assert isinstance(u, UniversalSet)  # the bench stores are single-head
    return {"selected": len(u), "rank": u.certificate["numerical_rank"]}


def run_uset_jl(path: Path) -> dict[str, Any]:
    """A universal set and reduced embeddings from one read (the runner fuses them)."""
    try:
        from streamattn.recipes.embeddings import Embeddings, ReduceConfig
    except ImportError as exc:
        raise NotAvailable(str(exc)) from exc
    from streamattn.recipes.selection import Selection
    from streamattn.recipes.universal import LeverageSet
    from streamattn.runner import run_recipes

    cfg = ReduceConfig()
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        uset, _ = run_recipes(
            str(path), [LeverageSet(Selection(EPS)), Embeddings(cfg, Path(tmp) / "emb.zarr")]
        ).results
    return {"selected": len(uset), "m": cfg.m, "method": cfg.method}


def run_ground_truth(path: Path) -> dict[str, Any]:
    try:
        from streamattn.operators.ground_truth import GroundTruth, GroundTruthSpec
    except ImportError as exc:
        raise NotAvailable(str(exc)) from exc
    from streamattn.runner import run_pass
    from streamattn.sources import open_keys

    src = open_keys(str(path))
    q = np.random.default_rng(0).standard_normal((256, src.d))
    (op,) = run_pass(src, [GroundTruth(GroundTruthSpec(q, eps=EPS))])
    return {"queries": 256, "heavy": int(op.result()["counts"].sum())}


def _row_scores(block: np.ndarray, w: np.ndarray) -> np.ndarray:
    y = block @ w
    return np.einsum("ij,ij->i", y, y)


def run_dask_gram(path: Path) -> dict[str, Any]:
    """Peer: two Dask passes, G = KᵀK (float64), then τ = ‖k W‖² by map_blocks."""
    import dask
    import dask.array as da

    k = da.from_zarr(str(path), component="keys").astype(np.float64)
    with dask.config.set(scheduler="threads"):
        g = (k.T @ k).compute()
        s, v = np.linalg.eigh(g)
        keep = s > 1e-10 * s[-1]
        w = v[:, keep] / np.sqrt(s[keep])
        scores = k.map_blocks(_row_scores, w, drop_axis=1, dtype=np.float64)
        idx = da.flatnonzero(scores >= EPS).compute()
    return {"selected": int(idx.size)}


def run_dask_tsqr(path: Path) -> dict[str, Any]:
    """Peer: Dask's TSQR, τ_j = ‖Q_j‖² (full column rank)."""
    import dask
    import dask.array as da

    k = da.from_zarr(str(path), component="keys").astype(np.float64)
    with dask.config.set(scheduler="threads"):
        q, _ = da.linalg.tsqr(k)
        idx = da.flatnonzero((q * q).sum(axis=1) >= EPS).compute()
    return {"selected": int(idx.size)}


def _gram_span(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Σ xᵀx over rows [lo, hi) of ``x``: float64 pieces of PIECE_ROWS rows, one SYRK each."""
    from streamattn.operators.gram_step import PIECE_ROWS, work_buffer

    d = x.shape[1]
    piece = max(1, min(PIECE_ROWS, hi - lo))
    buf = work_buffer("bench-floor", piece, d)
    acc, out = np.zeros((d, d)), np.empty((d, d))
    for a in range(lo, hi, piece):
        xb = buf[: min(piece, hi - a)]
        np.copyto(xb, x[a : a + xb.shape[0]], casting="safe")
        np.matmul(xb.T, xb, out=out)
        acc += out
    return acc


def run_gram_floor(path: Path) -> dict[str, Any]:
    """The float64 floor of an exact pass: every block read by the engine's own block
    stream and its Gram XᵀX summed in float64, per head, on the stream threads (one BLAS
    thread each; a single head's block in row spans, a cache's heads side by side), each
    piece of PIECE_ROWS rows converted and summed by one SYRK call: the fastest
    arrangement, and uncertified. No bounds, factor, scores or candidates: the least any
    exact method built on the float64 Gram does. ``gram_fro``: √(Σ_heads ‖KₕᵀKₕ‖_F²)."""
    from streamattn.blas import single_blas_thread
    from streamattn.operators.gram_step import pool, split_rows
    from streamattn.sources import open_source

    src = open_source(str(path))
    grams: dict[tuple[int, int], np.ndarray] = {}
    with single_blas_thread():
        for block in src.blocks():
            rows = block.rows
            if rows.ndim == 2:  # one head: its rows in spans, summed in span order
                spans = split_rows(rows.shape[0])
                sums = list(pool().map(_gram_span, *zip(*[(rows, a, b) for a, b in spans],
                                                         strict=True)))
                parts = {(0, 0): np.sum(sums, axis=0)}
            else:  # (rows, layers, heads, d): every head of the block, side by side
                heads = {(layer, h): rows[:, layer, h] for layer in range(rows.shape[1])
                         for h in range(rows.shape[2])}
                per_head = pool().map(lambda x: _gram_span(x, 0, x.shape[0]), heads.values())
                parts = dict(zip(heads, per_head, strict=True))
            for key, g in parts.items():
                grams[key] = g if key not in grams else grams[key] + g
    fro2 = sum(float(np.sum(g * g)) for g in grams.values())
    return {"heads": len(grams), "gram_fro": float(np.sqrt(fro2))}


def run_one(kind: str, path: Path) -> dict[str, Any]:
    if kind == "zarr-loop":
        return run_zarr_loop(path)
    if kind == "zarr-loop-reuse":  # the same loop; KIND_ENV set its allocator
        return {**run_zarr_loop(path), "env": {k: os.environ.get(k) for k in KIND_ENV[kind]}}
    if kind == "parallel-read":
        return run_parallel_read(path)
    if kind in ("uset-plain", "uset-affine"):
        return run_uset(path, kind.split("-")[1])
    if kind == "uset+jl":
        return run_uset_jl(path)
    if kind in ("gram-floor", "cache-gram-floor"):
        return run_gram_floor(path)
    if kind == "ground-truth":
        return run_ground_truth(path)
    if kind == "dask-threads":
        return run_uset(path, "plain", engine="dask", scheduler="threads")
    if kind == "dask-cluster":
        return run_dask_cluster(path)
    if kind == "dask-gram":
        return run_dask_gram(path)
    if kind == "dask-tsqr":
        return run_dask_tsqr(path)
    if kind == "uset-budget":
        return run_budget(path)
    if kind in ("dask-ckpt", "dask-ckpt-cluster"):
        return run_dask_ckpt(path, cluster=kind == "dask-ckpt-cluster")
    if kind in ("cache-read-keys", "cache-read-kv"):
        return run_cache_read(path, values=kind == "cache-read-kv")
    if kind == "cache-select":
        return run_cache_select(path)
    raise ValueError(f"unknown configuration {kind!r}; choose from {list(KINDS + CACHE_KINDS)}")


def _cpu_idle() -> tuple[int, int]:
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)
    except OSError:  # not Linux
        return 0, 0


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure_here(kind: str, path: Path) -> dict[str, Any]:
    """Run one configuration in this process: its record (time, peak RSS, CPU idle).

    ``import_rss_bytes`` is the peak RSS after importing the libraries, before the run (a
    fresh process's floor); ``client_peak_rss_bytes`` this process's own peak, and
    ``peak_rss_bytes`` the larger of it and its waited-for children's (cluster workers);
    ``cpu_seconds`` the CPU time it used (less sensitive to other jobs than ``seconds``).
    A configuration's ``startup_seconds`` (cluster start) is not counted in ``seconds``.
    """
    for module in PRELOADED:
        importlib.import_module(module)

    import_rss = peak_rss_bytes()
    idle0, total0 = _cpu_idle()
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    try:
        info = run_one(kind, path)
        status = "ok"
    except NotAvailable as exc:
        info, status = {"reason": str(exc)}, "not available"
    seconds = time.perf_counter() - t0 - float(info.get("startup_seconds", 0.0))
    cpu = _cpu_seconds() - cpu0
    idle1, total1 = _cpu_idle()
    self_rss = peak_rss_bytes()  # VmHWM: ru_maxrss would inherit the parent's peak
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    busy = total1 - total0
    return {
        "status": status,
        "seconds": seconds,
        "peak_rss_bytes": max(self_rss, child_rss),
        "client_peak_rss_bytes": self_rss,
        "cpu_seconds": cpu,
        "import_rss_bytes": import_rss,
        "cpu_idle_share": (idle1 - idle0) / busy if busy else None,
        **info,
    }


def child_main(kind: str, path: str) -> None:
    """Run one configuration in this (fresh) process; print one JSON line."""
    print(json.dumps(measure_here(kind, Path(path))))


# ---------------------------------------------------------------------------- driver
def measure(kind: str, path: Path, repeat: int, timeout: float = 1800,
            cwd: Path | None = None) -> dict[str, Any]:
    """Fastest of ``repeat`` fresh-process runs of one configuration.

    ``cwd``: the children's working directory. ``python -m`` puts it first on
    ``sys.path``, ahead of ``PYTHONPATH``: a baseline package given by ``PYTHONPATH`` is
    only imported when the children do not start in a checkout of this one.
    """
    runs = []
    for _ in range(repeat):
        proc = subprocess.run(
            [sys.executable, "-m", "streamattn.bench", "--one", kind, str(Path(path).resolve())],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env={**os.environ, **KIND_ENV.get(kind, {})},
        )
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-3:]
            return {"status": "failed", "error": " | ".join(tail)}
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if runs[-1]["status"] != "ok":
            return runs[-1]
    best = min(runs, key=lambda r: r["seconds"])
    best["all_seconds"] = [r["seconds"] for r in runs]
    for key in ("peak_rss_bytes", "client_peak_rss_bytes"):
        best[key] = max(r.get(key, 0) for r in runs)
    return best


def machine_info() -> dict[str, Any]:
    from streamattn.cores import usable_cores
    from streamattn.operators.gram_step import STREAM_THREADS

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "stream_threads": STREAM_THREADS,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
    }
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [
            {k: p.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for p in threadpool_info()
        ]
    except ImportError:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["blas"] = [{"name": cfg.get("name"), "version": cfg.get("version")}]
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(
                (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None
            )
    except OSError:
        info["cpu"] = None
    return info


Case = tuple[int, int, str, list[str]]
#: A whole-cache case: n, (layers, heads, head_dim), configurations.
CacheCase = tuple[int, tuple[int, int, int], list[str]]
Measure = Callable[[str, Path, int], dict[str, Any]]


def _ratios(row: dict[str, Any], base: dict[str, float]) -> None:
    """Time ratios of an ok row to the baselines measured before it on the same store."""
    sec = row["seconds"]
    if "zarr-loop" in base:
        row["ratio_to_zarr_loop"] = sec / base["zarr-loop"]
    if "zarr-loop-reuse" in base:
        row["ratio_to_zarr_loop_reuse"] = sec / base["zarr-loop-reuse"]
    if "parallel-read" in base:
        row["ratio_to_parallel_read"] = sec / base["parallel-read"]
    spec = RATIO_TARGETS.get(row["config"])
    if spec is not None and spec[0] in base:
        row[f"ratio_to_{spec[0]}"] = sec / base[spec[0]]


def compared_row(n: int, d: int, kind: str, label: str, res: dict[str, Any],
                 base: dict[str, float]) -> dict[str, Any]:
    """The row of ``kind`` (shown as ``label``) on the uncompressed (n, d) store of a
    before/after comparison: rates, ratios to the zarr loop and parallel read measured
    before it (``base``: the first time of each kind, updated here) and its target check."""
    row: dict[str, Any] = {"n": n, "d": d, "compressor": "none", "config": label, **res}
    if res.get("status") == "ok":
        sec = res["seconds"]
        base.setdefault(kind, sec)
        row["rows_per_s"], row["gb_per_s"] = n / sec, n * d * 4 / sec / 1e9
        row["ratio_to_zarr_loop"] = sec / base["zarr-loop"]
        if "parallel-read" in base:
            row["ratio_to_parallel_read"] = sec / base["parallel-read"]
        row.update(target_check(kind, row))
    return row


def bench_rows(
    cases: list[Case], data_dir: Path, repeat: int, log: Any = print,
    measure_fn: Measure = measure,
) -> list[dict[str, Any]]:
    """Measure each (n, d, compressor, kinds) case; ratios against its own zarr loop."""
    rows: list[dict[str, Any]] = []
    for n, d, comp, kinds in cases:
        path = ensure_bench_store(data_dir, n, d, comp)
        warmed = warm_store(path, log)
        first = len(rows)
        nbytes = n * d * 4
        base: dict[str, float] = {}
        for kind in kinds:
            res = measure_fn(kind, path, repeat)
            row = {"n": n, "d": d, "compressor": comp, "config": kind,
                   "page_cache_warmup_s": warmed, **res}
            if res.get("status") == "ok":
                sec = res["seconds"]
                base.setdefault(kind, sec)
                row["rows_per_s"] = n / sec
                row["gb_per_s"] = nbytes / sec / 1e9
                _ratios(row, base)
                row.update(target_check(kind, row))
            rows.append(row)
            log(format_row(row))
        floor_checks(rows[first:])
    return rows


def cache_rows(
    cases: list[CacheCase], data_dir: Path, repeat: int, log: Any = print,
    measure_fn: Measure = measure,
) -> list[dict[str, Any]]:
    """Measure each whole-cache case; ratios against its plain read of the keys arrays."""
    rows: list[dict[str, Any]] = []
    for n, shape, kinds in cases:
        path = ensure_cache_store(data_dir, n, shape)
        warmed = warm_store(path, log)
        layers, heads, hd = shape
        nbytes = n * layers * heads * hd * 4  # keys
        base: dict[str, float] = {}
        first = len(rows)
        for kind in kinds:
            res = measure_fn(kind, path, repeat)
            row = {"n": n, "d": hd, "compressor": "none", "config": kind,
                   "store": f"cache {layers}x{heads}x{hd}", "layers": layers, "heads": heads,
                   "page_cache_warmup_s": warmed, **res}
            if res.get("status") == "ok":
                sec = res["seconds"]
                base.setdefault(kind, sec)
                if "cache-read-keys" in base:
                    row["ratio_to_zarr_loop"] = sec / base["cache-read-keys"]
                row["rows_per_s"] = n / sec
                row["gb_per_s"] = nbytes * (2 if kind == "cache-read-kv" else 1) / sec / 1e9
                _ratios(row, base)
                row.update(target_check(kind, row))
            rows.append(row)
            log(format_row(row))
        floor_checks(rows[first:])
    return rows


def time_limits(kind: str) -> list[tuple[str, float, str]]:
    """The time limits of a configuration's target: (ratio key, limit, baseline name)."""
    if kind in RATIO_TARGETS:
        base, limit, _ = RATIO_TARGETS[kind]
        return [(f"ratio_to_{base}", limit, base)]
    if kind not in TARGETS:
        return []
    loop, par = TARGETS[kind]
    out = [("ratio_to_zarr_loop", loop, "loop")]
    if par is not None:
        out.append(("ratio_to_parallel_read", par, "parallel read"))
    return out


def floor_checks(case: list[dict[str, Any]]) -> None:
    """On each row of one store (``case``) with a time target: its float64 floor.

    The floor row (``FLOORS``) measured on the same store in the same run has ratio
    ``ratio × floor time / row time`` to each of the target's baselines; ``floor`` states
    them, each marked within or above its limit, and ``floor_within_target`` whether all
    are within (False: a limit lies below what reading the store and forming its float64
    Gram take here).
    """
    ok = {r["config"]: r for r in case if r.get("status") == "ok"}
    for row in case:
        floor = ok.get(FLOORS.get(row["config"], ""))
        if floor is None or "meets_target" not in row:
            continue
        scale = floor["seconds"] / row["seconds"]
        checks = [(row[key] * scale, limit, name) for key, limit, name in
                  time_limits(row["config"]) if key in row]
        if not checks:
            continue
        row["floor"] = ", ".join(
            f"{ratio:.2f}× {name} ({'within' if ratio <= limit else 'above'})"
            for ratio, limit, name in checks)
        row["floor_within_target"] = all(ratio <= limit for ratio, limit, _ in checks)


def target_check(kind: str, row: dict[str, Any]) -> dict[str, Any]:
    """``target`` (the stated limits) and ``meets_target`` for a configuration that has one
    (its first baseline measured; a second limit only where its baseline was too)."""
    wanted = time_limits(kind)
    if not wanted or wanted[0][0] not in row:
        return {}
    have = [(row[key], limit, name) for key, limit, name in wanted if key in row]
    ok = all(ratio <= limit for ratio, limit, _ in have)
    if kind in RATIO_TARGETS:
        text = RATIO_TARGETS[kind][2]
        if kind == "cache-select" and "values_opened" in row:
            text += "; values never opened"
            ok = ok and not row["values_opened"]
    else:
        text = ", ".join(f"≤ {limit:g}× {name}" for _, limit, name in have)
    return {"target": text, "meets_target": bool(ok)}


def _rss_key(kind: str) -> str:
    return "client_peak_rss_bytes" if kind.startswith("dask-ckpt") else "peak_rss_bytes"


def flat_checks(rows: list[dict[str, Any]]) -> None:
    """Peak RSS flat in n (``FLAT_TARGETS``), on the largest-n row of each store kind.

    Adds ``rss_ratio_to_smallest_n`` (peak RSS at the largest n over that at the smallest),
    ``rss_target`` and ``meets_rss_target``; for ``cache-select`` also whether the measured
    peak above the process's import floor stays within the run's projection (operator
    states plus blocks in flight).
    """
    groups: dict[tuple[str, int, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["config"] in FLAT_TARGETS and r.get("status") == "ok":
            key = (r["config"], r["d"], r["compressor"], r.get("store", "single head"))
            groups.setdefault(key, []).append(r)
    for (kind, *_), group in groups.items():
        if len({r["n"] for r in group}) < 2:
            continue
        small = min(group, key=lambda r: r["n"])
        big = max(group, key=lambda r: r["n"])
        rss, limit = _rss_key(kind), FLAT_TARGETS[kind]
        ratio = big[rss] / small[rss]
        big["rss_ratio_to_smallest_n"] = ratio
        big["rss_target"] = (f"peak RSS flat in n: ≤ {limit:g}× at n = {_n(small['n'])}"
                             + (" (client)" if kind.startswith("dask-ckpt") else ""))
        ok = ratio <= limit
        if kind == "cache-select":
            within = all(r[rss] - r["import_rss_bytes"] <= r["projected_peak_bytes"]
                         for r in group)
            big["rss_within_projection"] = within
            big["rss_target"] += ("; peak − import floor ≤ projected (states + blocks + "
                                  "thread buffers)")
            ok = ok and within
        big["meets_rss_target"] = bool(ok)


def _n(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f} MiB"


def format_row(row: dict[str, Any]) -> str:
    where = f"n={_n(row['n'])} d={row['d']} {row.get('store', row['compressor']):4s}"
    if row.get("status") != "ok":
        why = row.get("reason") or row.get("error") or ""
        return f"{where} {row['config']:15s} {row.get('status')}: {why}"
    return (
        f"{where} {row['config']:15s} "
        f"{row['seconds']:8.2f} s  x{row.get('ratio_to_zarr_loop', float('nan')):5.2f} loop  "
        f"x{row.get('ratio_to_parallel_read', float('nan')):5.2f} par  "
        f"{row['gb_per_s']:5.2f} GB/s  RSS {row['peak_rss_bytes'] / 2**20:7.0f} MiB  "
        f"idle {100 * (row.get('cpu_idle_share') or 0):3.0f}%"
        + ("" if "meets_target" not in row else
           f"  target {'met' if row['meets_target'] else 'MISSED'}")
    )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| n | d | store | configuration | time (s) | × zarr loop | × parallel read | "
        "rows/s | GB/s | peak RSS (MiB) | CPU idle | target |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        cells = [_n(r["n"]), str(r["d"]), r.get("store", r["compressor"]), r["config"]]
        if r.get("status") != "ok":
            lines.append("| " + " | ".join(cells + [r.get("status", "?")] + [""] * 7) + " |")
            continue
        cells += [
            f"{r['seconds']:.2f}",
            f"{r['ratio_to_zarr_loop']:.2f}" if "ratio_to_zarr_loop" in r else "",
            f"{r['ratio_to_parallel_read']:.2f}" if "ratio_to_parallel_read" in r else "",
            f"{r['rows_per_s'] / 1e6:.2f} M",
            f"{r['gb_per_s']:.2f}",
            f"{r['peak_rss_bytes'] / 2**20:.0f}",
            f"{100 * r['cpu_idle_share']:.0f}%" if r.get("cpu_idle_share") is not None else "",
            "" if "meets_target" not in r else
            f"{r['target']}: {'met' if r['meets_target'] else 'missed'}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: results.md's first table: issue 16's target number of each configuration.
TARGET_NUMBER = {"uset-plain": 1, "uset-affine": 1, "uset+jl": 1, "cache-select": 2,
                 "dask-ckpt": 3, "dask-ckpt-cluster": 3, "dask-cluster": 3, "uset-budget": 4}


STORE_NAMES = {"none": "uncompressed", "zstd": "zstd"}


def target_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per checked target: number, configuration, store, measured, limit, met."""
    out: list[dict[str, Any]] = []
    for r in rows:
        store = r.get("store", f"single head, {STORE_NAMES.get(r['compressor'], r['compressor'])}")
        where = f"{store}, n = {_n(r['n'])}, d = {r['d']}"
        if "meets_target" in r:
            kind = r["config"]
            if kind in RATIO_TARGETS:
                base = RATIO_TARGETS[kind][0]
                measured = f"{r[f'ratio_to_{base}']:.2f}× {base}"
                if kind == "cache-select":
                    measured += f"; values opened: {'yes' if r['values_opened'] else 'no'}"
            else:
                measured = f"{r['ratio_to_zarr_loop']:.2f}× loop"
                if "ratio_to_parallel_read" in r:
                    measured += f", {r['ratio_to_parallel_read']:.2f}× parallel read"
            if "ratio_to_zarr_loop_reuse" in r:  # context: the loop without its page faults
                measured += f" ({r['ratio_to_zarr_loop_reuse']:.2f}× zarr-loop-reuse)"
            floor = r.get("floor", "")
            out.append({"target": TARGET_NUMBER.get(kind), "config": kind, "where": where,
                        "measured": measured, "limit": r["target"], "met": r["meets_target"],
                        "floor": floor})
        if "meets_rss_target" in r:
            key = _rss_key(r["config"])
            measured = f"{_mib(r[key])} ({r['rss_ratio_to_smallest_n']:.2f}× the smallest n)"
            if "rss_within_projection" in r:
                measured += (f"; import floor {_mib(r['import_rss_bytes'])}, projected "
                             f"{_mib(r['projected_peak_bytes'])}")
            out.append({"target": TARGET_NUMBER.get(r["config"]), "config": r["config"],
                        "where": where, "measured": measured, "limit": r["rss_target"],
                        "met": r["meets_rss_target"], "floor": ""})
    return sorted(out, key=lambda t: t["target"] or 0)


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| issue 16 target | configuration | store | measured | limit | status | "
             "float64 floor (read + Gram) |", "|---|---|---|---|---|---|---|"]
    for t in target_rows(rows):
        lines.append(f"| {t['target']} | {t['config']} | {t['where']} | {t['measured']} | "
                     f"{t['limit']} | {'met' if t['met'] else 'missed'} | {t['floor']} |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, rows: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    from streamattn.io.outputs import to_jsonable, write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    payload = {"machine": machine_info(), "commit": commit or None, **extra, "rows": rows,
               "targets": target_rows(rows)}
    write_json_atomic(out_dir / "results.json", to_jsonable(payload))
    info = payload["machine"]
    blas = ", ".join(f"{b.get('internal_api') or b.get('name')} {b.get('version')} "
                     f"({b.get('architecture', '')}, {b.get('num_threads', '?')} threads)"
                     for b in info["blas"])
    md = (
        f"Machine: {info['cpu']}, {info['cpu_count']} cores ({info.get('usable_cores', '?')} "
        f"usable, {info.get('stream_threads', '?')} stream threads), BLAS: {blas}, "
        f"numpy {info['numpy']}, Python {info['python']}; commit {payload['commit']}. "
        "CPU idle: share of the machine's CPU time left idle during the run (0%: "
        "contended by other work).\n\n"
        f"Command: `{extra.get('command', '')}`\n\n"
        "Page cache warm: each store's files were read once before its configurations "
        "(results.json: page_cache_warmup_s).\n\n"
        "Issue 16's targets (each ratio from configurations measured in this run, a fresh "
        "process each; peak RSS: VmHWM of the process, with its waited-for children for "
        "a LocalCluster; dask-ckpt, dask-ckpt-cluster: the client process only; float64 "
        "floor: the same store read by the engine's block stream and its float64 Gram "
        "summed on the stream threads, nothing else (gram-floor, cache-gram-floor), as the "
        "same ratios, each marked within or above its limit: a limit below the floor is out "
        "of reach of any pass on this read path with a float64 Gram, here):\n\n"
        + targets_table(rows) + "\nEvery configuration:\n\n" + markdown_table(rows)
    )
    tmp = out_dir / "results.md.tmp"
    tmp.write_text(md)
    tmp.replace(out_dir / "results.md")


MAIN_KINDS = [k for k in KINDS if not k.startswith("dask-ckpt")]
SIDE_KINDS = ["zarr-loop", "zarr-loop-reuse", "parallel-read", "gram-floor", "uset-plain",
              "uset-affine"]
CKPT_KINDS = ["dask-ckpt", "dask-ckpt-cluster"]
D64_KINDS = [*SIDE_KINDS, *CKPT_KINDS]
ZSTD_KINDS = ["zarr-loop", "zarr-loop-reuse", "parallel-read", "gram-floor", "uset-plain"]


def default_cases(big: bool, quick: bool) -> list[Case]:
    """d = 64 and 128, n = 2^20 and 2^22 (2^24 with ``big``); everything at d=128, n=2^22;
    the Dask client's checkpointed RSS at d = 64, n = 2^21 and 2^22 (from 2^21 on, a leaf
    task folds the most blocks it ever does, so its read-ahead no longer grows with n)."""
    if quick:
        return [(2**20, 128, "none", [*SIDE_KINDS, "dask-gram", "uset-budget", "dask-cluster"]),
                (2**19, 64, "none", ["zarr-loop", *CKPT_KINDS]),
                (2**20, 64, "none", ["zarr-loop", *CKPT_KINDS])]
    cases = [
        (2**20, 64, "none", SIDE_KINDS),
        (2**21, 64, "none", ["zarr-loop", *CKPT_KINDS]),
        (2**22, 64, "none", D64_KINDS),
        (2**20, 128, "none", SIDE_KINDS),
        (2**22, 128, "none", MAIN_KINDS),
        (2**22, 128, "zstd", ZSTD_KINDS),
    ]
    if big:
        cases.append((2**24, 128, "none", SIDE_KINDS))
    return cases


def default_cache_cases(quick: bool, sizes: list[int] | None = None,
                        shape: tuple[int, int, int] = CACHE_SHAPE) -> list[CacheCase]:
    """The whole cache at two n (issue 16: 30 layers × 3 KV heads × 64, n = 25k and 50k;
    quick: 8 × 2 × 64 at 8192 and 16384 rows)."""
    if sizes is None:
        sizes = [8192, 16384] if quick else [25_000, 50_000]
    if quick and shape == CACHE_SHAPE:
        shape = (8, 2, 64)
    return [(n, shape, list(CACHE_KINDS)) for n in sizes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamattn bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return cmd_bench(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--one", nargs=2, metavar=("KIND", "STORE"), help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", default="data/bench",
                        help="where stores are generated (reused by later runs)")
    parser.add_argument("--out", default=None,
                        help="results directory (default: a fresh runs/bench-<UTC time>)")
    parser.add_argument("--remove-data", action="store_true",
                        help="delete the stores this run generated when it ends")
    parser.add_argument("--log2n", type=int, nargs="+", default=None,
                        help="row counts as powers of two (default: 20 22)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (min)")
    parser.add_argument("--big", action="store_true", help="also n = 2^24 (8 GB store)")
    parser.add_argument("--quick", action="store_true", help="small stores only")
    parser.add_argument(
        "--only", nargs="+", choices=KINDS + CACHE_KINDS,
        help="run only these configurations (single head: d=128, 2^22; cache kinds: the "
        "cache cases)",
    )
    parser.add_argument("--cache-n", type=int, nargs="+", default=None,
                        help="whole-cache row counts (default: 25000 50000; quick: 8192 16384)")
    parser.add_argument("--cache-shape", type=int, nargs=3, default=list(CACHE_SHAPE),
                        metavar=("LAYERS", "HEADS", "HEAD_DIM"), help="the whole cache's shape")
    parser.add_argument("--no-cache", action="store_true", help="skip the whole-cache cases")


def at_sizes(cases: list[Case], sizes: list[int]) -> list[Case]:
    """Each (d, store) of ``cases`` with its largest configuration list, at every size."""
    widest: dict[tuple[int, str], list[str]] = {}
    for _, d, comp, kinds in cases:
        if len(kinds) > len(widest.get((d, comp), [])):
            widest[(d, comp)] = kinds
    return [(n, d, comp, kinds) for n in sizes for (d, comp), kinds in widest.items()]


def fresh_run_dir(root: Path) -> Path:
    """A new, not yet existing ``root/bench-<UTC time>[-k]`` (never over earlier results)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = root / f"bench-{stamp}"
    k = 1
    while path.exists():
        path = root / f"bench-{stamp}-{k}"
        k += 1
    return path


def plan_cases(args: argparse.Namespace) -> tuple[list[Case], list[CacheCase]]:
    """The single-head and whole-cache cases the arguments ask for."""
    cases = default_cases(args.big, args.quick)
    shape = (int(args.cache_shape[0]), int(args.cache_shape[1]), int(args.cache_shape[2]))
    caches = [] if args.no_cache else default_cache_cases(args.quick, args.cache_n, shape)
    if args.only:
        single = [k for k in args.only if k in KINDS]
        cache = [k for k in args.only if k in CACHE_KINDS]
        floors = [f for f in dict.fromkeys(FLOORS[k] for k in single if k in FLOORS)
                  if f not in single]  # each time target with its floor beside it
        cases = ([(2**22, 128, "none", ["zarr-loop", "zarr-loop-reuse", "parallel-read",
                                        *floors, *single])]
                 if single else [])
        ckpt = [k for k in single if k in CKPT_KINDS]
        if ckpt:  # flat in n: two sizes at d = 64
            cases += [(n, 64, "none", ["zarr-loop", *ckpt]) for n in (2**21, 2**22)]
        floors = [FLOORS[k] for k in cache if k in FLOORS and FLOORS[k] not in cache]
        base = ["cache-read-keys", *floors, *[k for k in cache if k != "cache-read-keys"]]
        caches = [(n, shp, base) for n, shp, _ in caches] if cache else []
    if args.log2n:
        cases = at_sizes(cases, [2**k for k in args.log2n])
    return cases, caches


def cmd_bench(args: argparse.Namespace) -> int:
    if args.one:
        child_main(*args.one)
        return 0
    cases, caches = plan_cases(args)
    out = Path(args.out) if args.out else fresh_run_dir(Path("runs"))
    data_dir = Path(args.data_dir)
    paths = [store_path(data_dir, n, d, comp) for n, d, comp, _ in cases] + [
        cache_path(data_dir, n, shape) for n, shape, _ in caches]
    made = [p for p in dict.fromkeys(paths) if not p.exists()]
    try:
        rows = bench_rows(cases, data_dir, args.repeat)
        rows += cache_rows(caches, data_dir, args.repeat)
    finally:
        if args.remove_data:
            for path in made:
                shutil.rmtree(path, ignore_errors=True)
    flat_checks(rows)
    command = "streamattn bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else
                                             sys.argv[1:])
    write_results(out, rows, {"command": command.strip(), "eps": EPS, "cache_eps": CACHE_EPS,
                              "budget": BUDGET, "repeat": args.repeat})
    print(f"wrote {out}/results.json and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
