"""KV caches, checkpoints and appended tokens: what they cost, measured in one run.

Writes results/kvcache/bench.json and bench.md. Measures, on a generated uncompressed
KV cache (``--layers`` x ``--heads`` x ``--n`` x ``--d``, float32):

- a plain read of every block of the cache (all layers);
- the one-pass universal sets (plain eps 0.05 + affine eps 0.02) of every head in one
  pass over the cache, with the number of array reads;
- the same sets computed head by head (one pass per head over its own columns), the
  way a user without multi-head support would do it;
- checkpoint overhead: the one-pass run with a checkpoint after every block vs none,
  and the checkpoint file size;
- appended tokens: after appending ``--append`` rows, ``update`` vs a fresh run.

Usage: python scripts/bench_kvcache.py [--layers 4 --heads 8 --n 65536 --d 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import zarr

import streamattn as sa
from streamattn.io.checkpoint import Checkpointer
from streamattn.io.update import update_output
from streamattn.synthetic import SyntheticSpec, generate_kv_store

SELECTIONS = [sa.Selection(eps=0.05), sa.Selection(eps=0.02, variant="affine")]


def timed(fn):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def one_pass_rss(store: Path, rows: int) -> int:
    """Peak RSS of a fresh process running the one pass (store opened, sets computed)."""
    code = (
        "import streamattn as sa, sys; from streamattn.memory import peak_rss_bytes\n"
        f"sa.universal_sets(sa.open_kv({str(store)!r}), [sa.Selection(eps=0.05), "
        f"sa.Selection(eps=0.02, variant='affine')], chunk_rows={rows})\n"
        "print(peak_rss_bytes())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


def state_bound(src: sa.MultiHeadSource) -> int:
    """The operators' own memory bound (``nbytes_bound``), all heads, both sets."""
    from streamattn.operators import LeverageScores, LeverageSpec

    total = 0
    for sel in SELECTIONS:
        op = sa.MultiHead.of([[LeverageScores(LeverageSpec(sel.pruning_threshold(src.d),
                                                           sel.variant == "affine"))
                               for _ in range(src.heads)] for _ in range(src.layers)])
        total += op.nbytes_bound(src.d)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--chunk-rows", type=int, default=8192)
    ap.add_argument("--append", type=int, default=4096)
    ap.add_argument("--out", default="results/kvcache")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-kvcache-"))
    try:
        spec = SyntheticSpec(n=args.n, d=args.d, rank=16, chunk_rows=args.chunk_rows,
                             compressor="none")
        store = generate_kv_store(work / "kv.zarr", spec, layers=args.layers, heads=args.heads)
        src = sa.open_kv(store)
        rows = args.chunk_rows
        ranges = src.block_ranges(rows)
        res: dict = {
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "store": {"layers": args.layers, "heads": args.heads, "n": args.n, "d_head": args.d,
                      "dtype": "float32", "chunk_rows": rows, "compressor": "none",
                      "bytes": args.layers * args.heads * args.n * args.d * 4},
        }
        res["read_s"], _ = timed(lambda: [src.read(a, b) for a, b in ranges])
        res["one_pass_s"], sets = timed(lambda: sa.universal_sets(src, SELECTIONS,
                                                                  chunk_rows=rows))
        res["one_pass_array_reads"] = len(ranges) * args.layers
        half = generate_kv_store(work / "half.zarr", replace(spec, n=args.n // 2),
                                 layers=args.layers, heads=args.heads)
        res["one_pass_peak_rss_bytes"] = one_pass_rss(store, rows)
        res["one_pass_peak_rss_bytes_half_n"] = one_pass_rss(half, rows)
        res["state_bound_bytes"] = state_bound(src)
        group = zarr.open_group(str(store), mode="r")

        # one pass per head over its own columns (what a single-head tool does)
        def head_by_head_single() -> None:
            for lay in range(args.layers):
                arr = group["keys"][f"layer_{lay}"]
                for h in range(args.heads):
                    cols = slice(h * args.d, (h + 1) * args.d)
                    keys = np.ascontiguousarray(arr[:, cols])  # one read of the columns
                    sa.universal_sets(keys, SELECTIONS, chunk_rows=rows)

        res["head_by_head_s"], _ = timed(head_by_head_single)
        same = all(
            np.array_equal(sets[i][lay, h].indices,
                           sa.universal_sets(np.ascontiguousarray(
                               group["keys"][f"layer_{lay}"][:, h * args.d:(h + 1) * args.d]),
                               [sel], chunk_rows=rows)[0].indices)
            for i, sel in enumerate(SELECTIONS) for lay, h in [(0, 0), (args.layers - 1,
                                                                     args.heads - 1)]
        )
        res["per_head_equals_single_head_spot_check"] = bool(same)
        ck = work / "ck"
        res["checkpoint_every_block_s"], _ = timed(lambda: sa.universal_sets(
            src, SELECTIONS, chunk_rows=rows, checkpoint=Checkpointer(ck, every_blocks=1)))
        res["checkpoint_bytes"] = (ck / "pass0.npz").stat().st_size
        res["checkpoints_written"] = len(ranges)
        # appended tokens: save a run's state, append rows, update vs fresh
        from streamattn.cli import main as cli

        cfg = work / "c.yaml"
        cfg.write_text(
            f"input:\n  path: {store}\nselect:\n  - name: plain\n    eps: 0.05\n"
            f"  - name: affine\n    eps: 0.02\n    variant: affine\nengine:\n  chunk_rows: {rows}\n"
            f"output:\n  dir: {work / 'out'}\nprogress: false\n"
        )
        assert cli(["run", str(cfg), "--quiet"]) == 0
        extra = np.random.default_rng(1).standard_normal(
            (args.append, args.heads * args.d)).astype(np.float32)
        for lay in range(args.layers):
            arr = zarr.open_array(str(store / "keys" / f"layer_{lay}"), mode="r+")
            arr.resize((args.n + args.append, arr.shape[1]))
            arr[args.n:] = extra
        res["append_rows"] = args.append
        res["update_s"], _ = timed(lambda: update_output(work / "out", store))
        fresh = cfg.read_text().replace(str(work / "out"), str(work / "fresh"))
        cfg.write_text(fresh)
        res["fresh_after_append_s"], _ = timed(lambda: cli(["run", str(cfg), "--quiet"]))
        res["machine"]["load_average"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=2) + "\n")
    s = res["store"]
    lines = [
        f"KV cache {s['layers']} layers x {s['heads']} heads x n = {s['n']} x d_head = "
        f"{s['d_head']} float32, uncompressed, {s['bytes'] / 2**20:.0f} MiB, "
        f"blocks of {s['chunk_rows']} rows, {res['machine']['cpus']} CPUs (1-min load "
        f"average {res['machine']['load_average']:.1f} at the end: other jobs shared them).",
        "",
        "| measurement | seconds | ratio to read |",
        "|---|---:|---:|",
    ]
    for key, label in [
        ("read_s", "read every block (all layers)"),
        ("one_pass_s", "all heads, 2 sets each, one pass"),
        ("head_by_head_s", "same sets, one pass per head"),
        ("checkpoint_every_block_s", "one pass, checkpoint after every block"),
        ("update_s", f"`update` after {res['append_rows']} appended rows (incl. writing)"),
        ("fresh_after_append_s", "fresh `run` after the append (incl. writing)"),
    ]:
        lines.append(f"| {label} | {res[key]:.2f} | {res[key] / res['read_s']:.2f} |")
    lines += [
        "",
        f"Array reads in the one pass: {res['one_pass_array_reads']} (blocks x layers); "
        f"checkpoint file {res['checkpoint_bytes'] / 2**20:.2f} MiB; peak RSS of the one "
        f"pass (fresh process) {res['one_pass_peak_rss_bytes'] / 2**20:.0f} MiB at n = "
        f"{s['n']} and {res['one_pass_peak_rss_bytes_half_n'] / 2**20:.0f} MiB at n = "
        f"{s['n'] // 2} (where the whole store is fewer blocks than are in flight), of which "
        f"the operators' bound (heads x single-head nbytes_bound) is "
        f"{res['state_bound_bytes'] / 2**20:.1f} MiB and the rest blocks in flight "
        f"({rows} rows x {s['layers'] * s['heads']} heads = "
        f"{rows * s['layers'] * s['heads'] * s['d_head'] * 4 / 2**20:.0f} MiB each, read "
        f"ahead, plus float64 copies per head) and libraries; per-head == "
        f"single-head spot check: {res['per_head_equals_single_head_spot_check']}.",
    ]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
