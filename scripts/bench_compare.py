"""Before/after: the one-pass universal set of a baseline package against this checkout.

Side by side in one run, each configuration in a fresh process (``streamattn.bench``):
the zarr chunk loop and the parallel raw read of the same store, then ``uset-plain`` and
``uset-affine`` with the baseline package first on ``PYTHONPATH`` and with this checkout.
Ratios are to the loop / parallel read measured in the same run.

    git archive main streamattn | tar -x -C /tmp/base
    python scripts/bench_compare.py --baseline /tmp/base --log2n 20 --d 128 64

Writes results.json and results.md to ``--out`` (default: a fresh runs/bench-<UTC time>).

``--targets``: instead, issue 16's targets 2-4 before/after (the baseline needs this
checkout's ``streamattn/bench.py`` copied in, for the configurations): the whole cache
(``--cache-n``, 30 x 3 x 64) read and selected, budget mode against the zarr loop, the
Dask client's checkpointed peak RSS (threads and LocalCluster) at ``--ckpt-log2n`` and
LocalCluster against the local engine::

    git archive main streamattn | tar -x -C /tmp/base
    cp streamattn/bench.py /tmp/base/streamattn/
    python scripts/bench_compare.py --baseline /tmp/base --targets

``--fold-only``: instead, the operator alone in this process on the same in-memory
float32 blocks (65536 rows), the baseline's ``operators/leverage.py`` loaded beside this
checkout's and the two alternated (fastest of ``--repeat``): no I/O, no process start.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.bench import (
    CACHE_SHAPE,
    _ratios,
    compared_row,
    ensure_bench_store,
    ensure_cache_store,
    flat_checks,
    format_row,
    fresh_run_dir,
    measure,
    target_check,
    warm_store,
    write_results,
)

PLAN = [("zarr-loop", "-"), ("parallel-read", "-"), ("uset-plain", "baseline"),
        ("uset-plain", "this"), ("uset-affine", "baseline"), ("uset-affine", "this")]


def fold_only(baseline: Path, n: int, dims: list[int], repeat: int) -> None:
    """Baseline vs this checkout's LeverageScores on the same blocks, alternated."""
    import streamattn.operators.leverage as this
    from streamattn.sources import Block

    spec = importlib.util.spec_from_file_location(
        "baseline_leverage", baseline / "streamattn" / "operators" / "leverage.py"
    )
    assert spec is not None and spec.loader is not None
    base = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = base
    spec.loader.exec_module(base)
    for d in dims:
        x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
        for affine in (False, True):
            best = {"baseline": np.inf, "this": np.inf}
            for _ in range(repeat):
                for name, mod in (("baseline", base), ("this", this)):
                    op = mod.LeverageScores(mod.LeverageSpec(0.01, affine))
                    t0 = time.perf_counter()
                    for a in range(0, n, 65536):
                        op.update(Block(a, x[a : a + 65536]))
                    op.result()
                    best[name] = min(best[name], time.perf_counter() - t0)
            print(f"n=2^{n.bit_length() - 1} d={d} {'affine' if affine else 'plain'}: "
                  f"baseline {best['baseline']:.2f} s, this {best['this']:.2f} s, "
                  f"speed-up {best['baseline'] / best['this']:.1f}x", flush=True)


def measure_as(code: str, kind: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``measure`` with this checkout, or with the baseline package: then first on
    ``PYTHONPATH`` and the children started in its directory (``python -m`` puts the
    working directory ahead of ``PYTHONPATH``: started here, they would import this
    checkout)."""
    if code != "baseline":
        return measure(kind, path, args.repeat)
    base = Path(args.baseline).resolve()
    os.environ["PYTHONPATH"] = str(base)
    try:
        return measure(kind, path, args.repeat, cwd=base)
    finally:
        os.environ.pop("PYTHONPATH", None)


def targets(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Targets 2-4, each configuration with the baseline and with this checkout."""
    data = Path(args.data_dir)
    both = ("baseline", "this")
    plan: list[tuple[Any, list[tuple[str, str]]]] = []
    for n in args.cache_n:
        plan.append(((n, CACHE_SHAPE), [("cache-read-keys", "-"), ("cache-read-kv", "-")]
                     + [("cache-select", c) for c in both]))
    if args.budget_log2n:
        plan.append(((2**args.budget_log2n, 128), [("zarr-loop", "-"), ("uset-plain", "this")]
                     + [(k, c) for k in ("uset-budget", "dask-cluster") for c in both]))
    for k in args.ckpt_log2n:
        plan.append(((2**k, 64), [("zarr-loop", "-")] + [
            (kind, c) for kind in ("dask-ckpt", "dask-ckpt-cluster") for c in both]))
    rows: list[dict[str, Any]] = []
    for case, kinds in plan:
        cache = isinstance(case[1], tuple)
        path = (ensure_cache_store(data, *case) if cache else
                ensure_bench_store(data, case[0], case[1], "none"))
        warm_store(path)
        base: dict[str, float] = {}
        for kind, code in kinds:
            res = measure_as(code, kind, path, args)
            row: dict[str, Any] = {"n": case[0], "d": case[1][2] if cache else case[1],
                                   "compressor": "none", "config": kind, "code": code, **res}
            if cache:
                row["store"] = "cache {}x{}x{}".format(*case[1])
            if code != "-":
                row["store"] = f"{row.get('store', 'single head')} ({code})"
            if res.get("status") == "ok":
                sec = res["seconds"]
                if code != "baseline":
                    base.setdefault(kind, sec)
                first = base.get("cache-read-keys" if cache else "zarr-loop", sec)
                width = int(np.prod(case[1])) if cache else case[1]
                row["rows_per_s"], row["gb_per_s"] = case[0] / sec, case[0] * width * 4 / sec / 1e9
                _ratios(row, {**base, "zarr-loop": first})
                row.update(target_check(kind, row))
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="directory holding a streamattn/")
    parser.add_argument("--log2n", type=int, default=20)
    parser.add_argument("--d", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--repeat", type=int, default=2, help="runs per configuration (min)")
    parser.add_argument("--data-dir", default="data/bench")
    parser.add_argument("--out", default=None)
    parser.add_argument("--fold-only", action="store_true",
                        help="time the operator alone, in this process (no I/O)")
    parser.add_argument("--targets", action="store_true", help="issue 16's targets 2-4")
    parser.add_argument("--cache-n", type=int, nargs="*", default=[25_000, 50_000])
    parser.add_argument("--budget-log2n", type=int, default=21, help="0: no budget case")
    parser.add_argument("--ckpt-log2n", type=int, nargs="*", default=[19, 20, 21])
    args = parser.parse_args()
    n = 2**args.log2n
    if args.targets:
        saved = os.environ.pop("PYTHONPATH", None)
        try:
            rows = targets(args)
        finally:
            if saved is not None:
                os.environ["PYTHONPATH"] = saved
        flat_checks(rows)  # the baseline's and this checkout's rows are separate stores
        out = Path(args.out) if args.out else fresh_run_dir(Path("runs"))
        command = "python scripts/bench_compare.py " + " ".join(sys.argv[1:])
        write_results(out, rows, {"command": command, "repeat": args.repeat})
        print(f"wrote {out}/results.json and results.md")
        return 0
    if args.fold_only:
        fold_only(Path(args.baseline), n, args.d, args.repeat)
        return 0
    rows: list[dict[str, Any]] = []
    saved = os.environ.pop("PYTHONPATH", None)
    try:
        for d in args.d:
            path = ensure_bench_store(Path(args.data_dir), n, d, "none")
            warm_store(path)
            base: dict[str, float] = {}
            for kind, code in PLAN:
                res = measure_as(code, kind, path, args)
                label = kind if code == "-" else f"{kind} ({code})"
                row = compared_row(n, d, kind, label, res, base)
                rows.append(row)
                print(format_row(row), flush=True)
    finally:
        if saved is not None:
            os.environ["PYTHONPATH"] = saved
    out = Path(args.out) if args.out else fresh_run_dir(Path("runs"))
    command = "python scripts/bench_compare.py " + " ".join(sys.argv[1:])
    write_results(out, rows, {"command": command, "repeat": args.repeat})
    print(f"wrote {out}/results.json and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
