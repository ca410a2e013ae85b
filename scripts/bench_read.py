"""The read path alone, before/after: blocks of a store read, validated (and digested).

Each configuration runs in a fresh process, baseline tree and this checkout alternated,
``--rounds`` times; the table shows the median wall time and the process's user and system
CPU seconds of the loop. Modes: ``zarr`` (a plain zarr chunk loop over the key arrays, the
reference), ``read`` (``source.read`` per block, fresh buffers), ``blocks`` (the read-ahead
stream the engines use), ``digests`` (the same with the read log's block digests, what a
checkpointed pass, the CLI default, reads) and ``select`` (the whole command,
``streamattn select STORE --eps 0.05``, checkpointed as by default, output to a temporary
directory removed after; the table adds the process's peak RSS)::

    git archive main streamattn | tar -x -C /tmp/base
    python scripts/bench_read.py --baseline /tmp/base STORE [STORE ...]

``--digests``: instead, the digest candidates on one 32 MiB block in this process (GB/s) and
whether each releases the GIL (the rate a pure-Python thread keeps while another hashes).

Writes results.json and results.md to ``--out`` (default: a fresh runs/bench-<UTC time>).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODES = ("zarr", "read", "blocks", "digests", "select")


def one(tree: str, store: str, mode: str) -> dict[str, Any]:
    """One configuration in this (fresh) process; ``tree``: a source tree or "" (this one)."""
    if tree:  # the baseline first on the path, the editable install's finder out of the way
        sys.meta_path[:] = [f for f in sys.meta_path
                            if "editable" not in str(getattr(f, "__module__", ""))]
        sys.path.insert(0, tree)
    import resource
    import shutil
    import tempfile

    import numpy as np
    import zarr

    from streamattn.cli import main
    from streamattn.sources import open_keys

    src = open_keys(store)
    t0, c0 = time.perf_counter(), os.times()
    nbytes = 0
    if mode == "select":
        tmp = tempfile.mkdtemp(prefix="bench-read-")
        try:
            code = main(["select", store, "--eps", "0.05", "--out", f"{tmp}/out", "--quiet"])
        finally:
            shutil.rmtree(tmp)
        if code != 0:
            raise SystemExit(f"select failed with exit code {code}")
    elif mode == "zarr":
        node: Any = zarr.open(store, mode="r")
        keys = node if isinstance(node, zarr.Array) else node["keys"]
        arrays = [keys] if isinstance(keys, zarr.Array) else [
            keys[name] for name in sorted(keys.array_keys())]
        for arr in arrays:
            step = int(arr.chunks[0])
            for a in range(0, arr.shape[0], step):
                nbytes += np.asarray(arr[a : a + step]).nbytes
    elif mode == "read":
        for a, b in src.block_ranges():
            nbytes += src.read(a, b).rows.nbytes
    else:
        for blk in src.blocks(digests=mode == "digests"):
            nbytes += blk.rows.nbytes
    c1 = os.times()
    return {"wall_s": time.perf_counter() - t0, "user_s": c1.user - c0.user,
            "sys_s": c1.system - c0.system, "bytes": nbytes,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def rate(f: Callable[[], object], nbytes: int, reps: int = 20) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return nbytes * reps / (time.perf_counter() - t0) / 1e9


def gil_kept(f: Callable[[], object], seconds: float = 0.5) -> float:
    """The rate a pure-Python counting thread keeps while this thread runs ``f``."""
    stop, count = [False], [0]

    def spin() -> None:
        while not stop[0]:
            count[0] += 1

    th = threading.Thread(target=spin)
    th.start()
    time.sleep(seconds)
    c0 = count[0]
    time.sleep(seconds)
    alone = count[0] - c0
    c0, t0 = count[0], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        f()
    shared = count[0] - c0
    stop[0] = True
    th.join()
    return shared / max(alone, 1)


def digests() -> list[dict[str, Any]]:
    import numpy as np

    block = np.random.default_rng(0).standard_normal((131072, 64)).astype(np.float32)
    data = block.data.cast("B")
    found: list[tuple[str, Callable[[], object]]] = [("zlib.crc32", lambda: zlib.crc32(data))]
    try:
        import xxhash

        found += [("xxhash.xxh3_64", lambda: xxhash.xxh3_64(data).intdigest()),
                  ("xxhash.xxh64", lambda: xxhash.xxh64(data).intdigest())]
    except ImportError:
        pass
    try:
        import google_crc32c

        copy = bytes(data)  # it takes read-only bytes only: the copy is not timed
        found.append(("google_crc32c (bytes, copy not timed)",
                      lambda: google_crc32c.value(copy)))
    except ImportError:
        pass
    rows = [{"digest": name, "GB_per_s": rate(f, block.nbytes), "gil_kept": gil_kept(f)}
            for name, f in found]
    def hold() -> object:  # the reference: a call that holds the GIL
        return sum(range(200000))

    return [*rows, {"digest": "pure Python (holds the GIL)", "GB_per_s": float("nan"),
                    "gil_kept": gil_kept(hold)}]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stores", nargs="*", help="key stores or caches to read")
    p.add_argument("--baseline", help="a baseline source tree (e.g. git archive of main)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--digests", action="store_true", help="compare digests instead")
    p.add_argument("--out", help="run directory (default: a fresh runs/bench-<UTC time>)")
    p.add_argument("--one", nargs=3, metavar=("TREE", "STORE", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return 0
    from streamattn.bench import fresh_run_dir

    out = Path(args.out) if args.out else fresh_run_dir(Path("runs"))
    out.mkdir(parents=True, exist_ok=True)
    if args.digests:
        rows = digests()
        lines = ["| digest | GB/s | Python thread's rate kept |", "|---|---|---|"]
        lines += [f"| {r['digest']} | {r['GB_per_s']:.2f} | {r['gil_kept']:.2f} |" for r in rows]
    else:
        trees = [("baseline", args.baseline)] if args.baseline else []
        trees.append(("this", ""))
        runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for _ in range(args.rounds):
            for store in args.stores:
                for mode in args.modes:
                    for name, tree in trees:
                        cmd = [sys.executable, __file__, "--one", tree or "", store, mode]
                        got = json.loads(subprocess.check_output(cmd).decode().splitlines()[-1])
                        runs.setdefault((store, mode, name), []).append(got)
        rows = []
        lines = ["| store | mode | tree | wall s (median) | user s | sys s | GB read | peak RSS MB "
                 "|",
                 "|---|---|---|---|---|---|---|---|"]
        keys = ("wall_s", "user_s", "sys_s", "peak_rss_mb")
        for (store, mode, name), got in runs.items():
            med = {k: statistics.median(g[k] for g in got) for k in keys}
            rows.append({"store": store, "mode": mode, "tree": name, **med,
                         "walls": [g["wall_s"] for g in got], "bytes": got[0]["bytes"]})
            read = f"{got[0]['bytes'] / 1e9:.2f}" if mode != "select" else "-"
            lines.append(f"| {Path(store).name} | {mode} | {name} | {med['wall_s']:.3f} | "
                         f"{med['user_s']:.2f} | {med['sys_s']:.2f} | {read} | "
                         f"{med['peak_rss_mb']:.0f} |")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
