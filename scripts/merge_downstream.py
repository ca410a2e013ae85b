"""Merge ``streamattn downstream`` outputs of the same model/text/C/T (e.g. runs made in parallel).

    .venv/bin/python scripts/merge_downstream.py OUT PART [PART ...] [--overwrite]

Writes OUT/results.csv, report.md, delta_loss.png and settings.json (merged_from lists the
parts). Refuses parts with other settings or another full-cache loss.
"""

from __future__ import annotations

import argparse
import sys

from streamattn.models.downstream import merge_runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("parts", nargs="+")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args()
    rows = merge_runs(a.parts, a.out, overwrite=a.overwrite)
    print(f"wrote {a.out}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
