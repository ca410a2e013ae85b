"""Dask engine benchmark: one store, the same universal set, each engine vs a raw read.

In one run, on one generated store (default n = 2^22, d = 128, float32, uncompressed,
65536-row chunks), times each configuration in a fresh process:

- ``read``: a plain zarr loop reading every chunk (the baseline, ratio 1.0);
- ``local``: the local engine (one sequential pass with read-ahead);
- ``dask-threads``: the Dask engine on dask's threaded scheduler;
- ``dask-local-cluster``: the Dask engine on a 2-worker ``LocalCluster``
  (1 thread each; cluster start-up timed separately, not included in the pass).

The selection is the plain universal set with eps = 0.01; every engine's indices are
checked equal to the local engine's. Also reported: the task-graph size (tasks) for the
store at several block sizes and the time to build the graph. Configurations are
interleaved over ``--repeat`` rounds; the minimum is reported.

Usage::

    .venv/bin/python scripts/bench_dask.py [--store /tmp/bench_dask_keys.zarr]
        [--n 4194304] [--d 128] [--repeat 2] [--out results/bench_dask]
    .venv/bin/python scripts/bench_dask.py --many-blocks   # 2^17 blocks: the graph at scale
    .venv/bin/python scripts/bench_dask.py --checkpoint    # with the CLI's checkpointing

Writes ``OUT/results.json`` and ``OUT/results.md`` (``--many-blocks``:
``OUT/many_blocks.json``: n = 2^20, d = 16, 8-row blocks, 8 blocks per leaf task, the
local engine vs Dask threads vs a 2-worker LocalCluster, same set checked).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

CONFIGS = ("read", "local", "dask-threads", "dask-local-cluster")
EPS = 0.01


def peak_rss() -> int:
    from streamattn.memory import peak_rss_bytes

    return int(peak_rss_bytes())


def run_one(config: str, store: str, checkpoint: bool = False) -> dict[str, Any]:
    """Time one configuration in this (fresh) process (``checkpoint``: with the CLI's
    default checkpointing, into a temporary directory)."""
    import tempfile

    import zarr

    import streamattn
    from streamattn.io.checkpoint import CheckpointConfig, Checkpointer

    with tempfile.TemporaryDirectory() as tmp:
        extra: dict[str, Any] = {}
        if checkpoint:
            extra["checkpoint"] = Checkpointer.from_config(CheckpointConfig(), Path(tmp) / "o")
        return _run_one(config, store, extra, zarr, streamattn)


def _run_one(config: str, store: str, extra: dict[str, Any], zarr: Any, streamattn: Any
             ) -> dict[str, Any]:
    out: dict[str, Any] = {"config": config, "checkpointed": "checkpoint" in extra}
    if config == "read":
        node = zarr.open(store, mode="r")
        arr = node["keys"] if isinstance(node, zarr.Group) else node
        step = int(arr.chunks[0])
        t0 = time.perf_counter()
        total = 0.0
        for a in range(0, arr.shape[0], step):
            total += float(arr[a : a + step][0, 0])
        out["seconds"] = time.perf_counter() - t0
    elif config in ("local", "dask-threads"):
        options: dict[str, Any] = {"engine": "local"}
        if config == "dask-threads":
            options = {"engine": "dask", "scheduler": "threads"}
        t0 = time.perf_counter()
        u = streamattn.universal_set(store, EPS, **options, **extra)
        out["seconds"] = time.perf_counter() - t0
        out["indices"] = u.indices.tolist()
    else:
        from distributed import Client, LocalCluster

        t0 = time.perf_counter()
        with (
            LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                scheduler_kwargs={"dashboard": False},
            ) as cluster,
            Client(cluster) as client,
        ):
            out["startup_seconds"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            u = streamattn.universal_set(store, EPS, engine="dask", client=client, **extra)
            out["seconds"] = time.perf_counter() - t0
            out["indices"] = u.indices.tolist()
            out["worker_peak_rss_bytes"] = sorted(client.run(peak_rss).values())
    out["peak_rss_bytes"] = peak_rss()
    return out


def graph_sizes(store: str) -> list[dict[str, Any]]:
    from streamattn.engines.dask_engine import build_graph
    from streamattn.operators import LeverageScores, LeverageSpec
    from streamattn.sources import open_keys

    src = open_keys(store)
    op = LeverageScores(LeverageSpec(EPS, False))
    rows = []
    for chunk_rows in (None, 4096, 32):
        for per_task in (1, 8):
            t0 = time.perf_counter()
            graph = build_graph(
                src, [op], chunk_rows=chunk_rows, split_every=8, blocks_per_task=per_task
            )
            rows.append(
                {
                    "chunk_rows": chunk_rows or src.default_chunk_rows(),
                    "blocks": len(graph.ranges),
                    "blocks_per_task": per_task,
                    "tasks": graph.n_tasks,
                    "build_seconds": time.perf_counter() - t0,
                }
            )
    return rows


def many_blocks(out: Path) -> None:
    """2^17 blocks through every engine: the graph and scheduler at 10^5+ blocks."""
    import zarr
    from distributed import Client, LocalCluster

    import streamattn

    n, d, rows, per_task = 2**20, 16, 8, 8
    store = "/tmp/bench_dask_many.zarr"
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    arr = zarr.create_array(
        store, shape=x.shape, dtype=x.dtype, chunks=(65536, d), overwrite=True, compressors=None
    )
    arr[...] = x
    res: dict[str, Any] = {"n": n, "d": d, "block_rows": rows, "blocks": n // rows}
    t0 = time.perf_counter()
    ref = streamattn.universal_set(store, EPS, chunk_rows=rows)
    res["local_seconds"] = time.perf_counter() - t0
    options = {"chunk_rows": rows, "engine": "dask", "blocks_per_task": per_task}
    t0 = time.perf_counter()
    u = streamattn.universal_set(store, EPS, scheduler="threads", **options)
    res["dask_threads_seconds"] = time.perf_counter() - t0
    assert np.array_equal(u.indices, ref.indices)
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            dashboard_address=":0",
            scheduler_kwargs={"dashboard": False},
        ) as cluster,
        Client(cluster) as client,
    ):
        t0 = time.perf_counter()
        u = streamattn.universal_set(store, EPS, client=client, **options)
        res["dask_local_cluster_seconds"] = time.perf_counter() - t0
    assert np.array_equal(u.indices, ref.indices)
    from streamattn.engines.dask_engine import build_graph
    from streamattn.operators import LeverageScores, LeverageSpec
    from streamattn.sources import open_keys

    graph = build_graph(
        open_keys(store),
        [LeverageScores(LeverageSpec(EPS, False))],
        chunk_rows=rows,
        blocks_per_task=per_task,
    )
    res["tasks"] = graph.n_tasks
    res["load_average_after"] = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    (out / "many_blocks.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"Store: {res['store']} (n = {res['n']}, d = {res['d']}, float32, uncompressed, "
        f"{res['storage_chunk_rows']}-row chunks); universal set eps = {EPS}; "
        f"{res['machine']['cores']} cores, {res['machine']['blas_threads']} BLAS thread(s) "
        f"per process; best of {res['repeat']}; load average "
        f"{res['machine']['load_average_before'][0]:.1f} before, "
        f"{res['machine']['load_average_after'][0]:.1f} after.",
        "",
        "| configuration | seconds | ratio to zarr read loop | rows/s | client peak RSS (MB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in CONFIGS:
        row = res["best"][name]
        lines.append(
            f"| {name} | {row['seconds']:.2f} | {row['ratio_to_read']:.2f} | "
            f"{res['n'] / row['seconds']:.3g} | {row['peak_rss_bytes'] / 2**20:.0f} |"
        )
    cluster = res["best"]["dask-local-cluster"]
    lines += [
        "",
        f"LocalCluster start-up (not in the pass): {cluster['startup_seconds']:.2f} s; "
        f"worker peak RSS (MB): "
        f"{[round(b / 2**20) for b in cluster['worker_peak_rss_bytes']]}.",
        "",
        "Graph size (split_every 8; the run above used the automatic blocks_per_task):",
        "",
        "| block rows | blocks | blocks per leaf task | graph tasks | graph build (s) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for g in res["graphs"]:
        lines.append(
            f"| {g['chunk_rows']} | {g['blocks']} | {g['blocks_per_task']} | {g['tasks']} | "
            f"{g['build_seconds']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="/tmp/bench_dask_keys.zarr")
    parser.add_argument("--n", type=int, default=2**22)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", default="results/bench_dask")
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=1,
        help="OPENBLAS/MKL/OMP_NUM_THREADS in every configuration's process (distributed "
        "workers use 1; nested BLAS threads oversubscribe a busy machine)",
    )
    parser.add_argument("--many-blocks", action="store_true", help="the 2^17-block check")
    parser.add_argument("--checkpoint", action="store_true",
                        help="every pass with the CLI's default checkpointing (client RSS)")
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.many_blocks:
        many_blocks(Path(args.out))
        return
    if args.one:
        print(json.dumps(run_one(args.one, args.store, args.checkpoint)))
        return

    from streamattn.sources import open_keys
    from streamattn.synthetic import SyntheticSpec, ensure_store

    spec = SyntheticSpec(n=args.n, d=args.d, chunk_rows=65536, compressor="none")
    ensure_store(Path(args.store), spec)
    src = open_keys(args.store)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    load_before = os.getloadavg()
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        env[var] = str(args.blas_threads)
    for _ in range(args.repeat):
        for config in CONFIGS:
            cmd = [sys.executable, __file__, "--one", config, "--store", args.store,
                   *(["--checkpoint"] if args.checkpoint else [])]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            runs[config].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(config, f"{runs[config][-1]['seconds']:.2f} s", flush=True)
    best = {c: min(runs[c], key=lambda r: r["seconds"]) for c in CONFIGS}
    read = best["read"]["seconds"]
    for row in best.values():
        row["ratio_to_read"] = row["seconds"] / read
    ref = best["local"]["indices"]
    for config in ("dask-threads", "dask-local-cluster"):
        if best[config]["indices"] != ref:
            raise SystemExit(f"{config} selected a different set than the local engine")
    res = {
        "store": args.store,
        "n": src.n,
        "d": src.d,
        "storage_chunk_rows": src.storage_chunk_rows,
        "eps": EPS,
        "selected": len(ref),
        "repeat": args.repeat,
        "best": best,
        "runs": {
            c: [{k: v for k, v in r.items() if k != "indices"} for r in rs]
            for c, rs in runs.items()
        },
        "graphs": graph_sizes(args.store),
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "blas_threads": args.blas_threads,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    for row in res["best"].values():
        row.pop("indices", None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "results.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
