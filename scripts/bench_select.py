"""Issue 2 benchmark: the one-pass exact universal set against a plain read of the store.

On generated uncompressed zarr stores (d = 128, 65536-row chunks), time in one run
(a) a plain zarr read of every chunk and (b) the one-pass exact universal set
(eps = 0.01, plain), each in a fresh process that reports its own peak RSS; print and
write the ratio (b)/(a) for n = 2^20 and n = 2^22, so RSS flatness in n is visible.

    .venv/bin/python scripts/bench_select.py [--repeat 3] [--data-dir data/bench]

Writes results/bench_select/results.json and results.md. See ``streamattn.bench``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamattn.bench import bench_rows, write_results

TARGET = 1.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data/bench")
    parser.add_argument("--out", default="results/bench_select")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration (min)")
    parser.add_argument("--d", type=int, default=128)
    args = parser.parse_args()
    kinds = ["zarr-loop", "uset-plain"]
    cases = [(n, args.d, "none", kinds) for n in (2**20, 2**22)]
    rows = bench_rows(cases, Path(args.data_dir), args.repeat)
    summary = {}
    for n in (2**20, 2**22):
        by = {r["config"]: r for r in rows if r["n"] == n and r.get("status") == "ok"}
        if len(by) == 2:
            summary[f"n=2^{n.bit_length() - 1}"] = {
                "ratio_uset_to_read": by["uset-plain"]["ratio_to_zarr_loop"],
                "uset_peak_rss_mib": by["uset-plain"]["peak_rss_bytes"] / 2**20,
            }
    if len(summary) == 2:
        small, big = summary.values()
        summary["rss_growth_2^20_to_2^22"] = big["uset_peak_rss_mib"] / small["uset_peak_rss_mib"]
    summary["target_ratio"] = TARGET
    command = "python scripts/bench_select.py " + " ".join(sys.argv[1:])
    write_results(Path(args.out), rows, {"command": command.strip(), "summary": summary,
                                         "repeat": args.repeat})
    for key, value in summary.items():
        print(key, value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
