"""Several passes in one 2-worker LocalCluster: each pass's time and when its leaves ran.

A long-lived cluster runs many passes; ``streamattn bench``'s ``dask-cluster`` times a
fresh cluster's first. This starts one cluster (2 workers, 1 thread each, streamattn
imported on them), runs the plain universal set ``--passes`` times on one store and
records, per pass, its seconds and every task's start and stop on its worker (Dask's task
stream), so leaves that wait for a worker are visible. ``--baseline DIR`` runs the same in
a child process with the package in ``DIR`` first on ``PYTHONPATH`` (the workers inherit
it), for a before/after in one run::

    git archive REV streamattn | tar -x -C /tmp/base
    python scripts/bench_cluster_passes.py --baseline /tmp/base STORE

Writes results.json to ``--out`` (default: a fresh runs/bench-<UTC time>).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: Imported on the workers before the passes (a baseline package may predate
#: ``streamattn.bench.PRELOADED``, so the list is this script's own).
PRELOADED = ("scipy.linalg", "zarr", "streamattn.recipes.universal")


def passes(store: str, n: int) -> list[dict[str, Any]]:
    """``n`` passes in one fresh cluster: seconds and task timings (relative to the pass)."""
    from distributed import Client, LocalCluster, get_task_stream

    from streamattn.bench import run_uset

    out = []
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0",
                     scheduler_kwargs={"dashboard": False}) as cluster,
        Client(cluster) as client,
    ):
        for module in PRELOADED:
            client.run(importlib.import_module, module)
        for _ in range(n):
            with get_task_stream(client) as stream:
                t0 = time.time()
                run_uset(Path(store), "plain", engine="dask", client=client)
                seconds = time.time() - t0
            tasks = [{"key": str(t["key"] if isinstance(t["key"], str) else t["key"][0]),
                      "worker": t["worker"], "action": ss["action"],
                      "start": ss["start"] - t0, "stop": ss["stop"] - t0}
                     for t in stream.data for ss in t["startstops"]]
            out.append({"seconds": seconds, "tasks": sorted(tasks, key=lambda r: r["start"])})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store", help="a single-head key store (e.g. a bench store)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--baseline", default=None, help="a baseline package's parent dir")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # a child: print this package's passes as one JSON line
        print(json.dumps(passes(args.store, args.passes)))
        return 0
    trees = {"this": None} if args.baseline is None else {"baseline": args.baseline,
                                                          "this": None}
    results: dict[str, Any] = {}
    for name, tree in trees.items():
        env = dict(os.environ)
        if tree is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
        with tempfile.TemporaryDirectory() as cwd:  # not a checkout: PYTHONPATH decides
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--one", "--passes",
                 str(args.passes), os.path.abspath(args.store)],
                capture_output=True, text=True, env=env, cwd=cwd, check=True)
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        for i, p in enumerate(results[name]):
            leaves = [t for t in p["tasks"] if "leaf" in t["key"] and t["action"] == "compute"]
            starts = ", ".join(f"{t['start']:.2f}–{t['stop']:.2f} s" for t in leaves)
            print(f"{name}: pass {i + 1}: {p['seconds']:.2f} s; leaves {starts}")
    out = Path(args.out) if args.out else Path("runs") / time.strftime(
        "bench-%Y%m%d-%H%M%S", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
