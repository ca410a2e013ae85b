"""Before/after for any ``streamattn bench`` kinds: a baseline package against this checkout.

Side by side in one run, each configuration in a fresh process (``streamattn.bench``): the
zarr chunk loop and the parallel raw read of each store, then every kind with the baseline
package first on ``PYTHONPATH`` and with this checkout. Ratios are to the loop / parallel
read measured in the same run. The children run in a scratch directory: started from the
repository root, ``python -m`` would put this checkout's ``streamattn`` ahead of
``PYTHONPATH`` and the "baseline" would silently be this checkout.

    git -C /work/main archive HEAD streamattn | tar -x -C /tmp/base
    python scripts/compare_uset.py --baseline /tmp/base --log2n 22 --d 128 64 \\
        --kinds uset-plain uset-affine uset+jl --repeat 2 --remove-data

Writes results.json and results.md to ``--out`` (default: a fresh runs/bench-<UTC time>).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from streamattn.bench import (
    KINDS,
    compared_row,
    ensure_bench_store,
    format_row,
    fresh_run_dir,
    measure,
    store_path,
    warm_store,
    write_results,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="directory holding a streamattn/")
    parser.add_argument("--log2n", type=int, default=22)
    parser.add_argument("--d", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--kinds", nargs="+", default=["uset-plain", "uset-affine", "uset+jl"],
                        choices=KINDS)
    parser.add_argument("--repeat", type=int, default=2, help="runs per configuration (min)")
    parser.add_argument("--data-dir", default="data/bench")
    parser.add_argument("--remove-data", action="store_true",
                        help="delete the stores this run generated when it ends")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    n = 2**args.log2n
    data = Path(args.data_dir).resolve()
    baseline = str(Path(args.baseline).resolve())
    out = Path(args.out) if args.out else fresh_run_dir(Path("runs"))
    made = [store_path(data, n, d, "none") for d in args.d
            if not store_path(data, n, d, "none").exists()]
    plan = [("zarr-loop", "-"), ("parallel-read", "-")] + [
        (kind, code) for kind in args.kinds for code in ("baseline", "this")]
    rows: list[dict[str, Any]] = []
    saved = os.environ.pop("PYTHONPATH", None)
    here = os.getcwd()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for d in args.d:
                path = ensure_bench_store(data, n, d, "none")
                warm_store(path)
                base: dict[str, float] = {}
                os.chdir(scratch)
                for kind, code in plan:
                    if code == "baseline":
                        os.environ["PYTHONPATH"] = baseline
                    res = measure(kind, path, args.repeat)
                    os.environ.pop("PYTHONPATH", None)
                    label = kind if code == "-" else f"{kind} ({code})"
                    row = compared_row(n, d, kind, label, res, base)
                    rows.append(row)
                    print(format_row(row), flush=True)
                os.chdir(here)
    finally:
        os.chdir(here)
        if saved is not None:
            os.environ["PYTHONPATH"] = saved
        if args.remove_data:
            for p in made:
                shutil.rmtree(p, ignore_errors=True)
    command = "python scripts/compare_uset.py " + " ".join(sys.argv[1:])
    write_results(out, rows, {"command": command, "repeat": args.repeat})
    print(f"wrote {out}/results.json and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
