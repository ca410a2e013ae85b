"""Coverage experiment: how much attention each key selector keeps, against exact truth.

Usage::

    python scripts/exp_coverage.py [--config configs/coverage.yaml] [--input STORE]
                                   [--out results/exp_coverage]

Runs ``streamattn.recipes.evaluate`` with the config (by default a structured synthetic store:
offset, low rank, planted large keys, attention sinks, recency bias; generated once
under data/) or on any store with ``queries`` (and ``values``, ``query_positions``), and
writes ``report.json``, ``report.md`` (full tables), ``winners.md`` (best selector by
mean mass and mean recall per budget) and the PNG plots to the output directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from streamattn.config import to_dict
from streamattn.io.outputs import atomic_dir, write_json_atomic
from streamattn.memory import peak_rss_bytes
from streamattn.recipes.evaluate import (
    evaluate,
    load_evaluate_config,
    markdown_table,
    plot_report,
    prepare_source,
)

REPO = Path(__file__).resolve().parents[1]


def winners(report: dict[str, Any]) -> str:
    """Per (mode, kind) and budget: the best selector by mean mass and by mean recall."""
    lines = [
        "| attention | B | best mass (mean) | runner-up | best recall (mean) | runner-up |",
        "|---|---:|---|---|---|---|",
    ]
    for key, res in report["results"].items():
        budgets = sorted({r["budget"] for r in res["rows"] if r["budget"]})
        for b in budgets:
            rows = [r for r in res["rows"] if r["budget"] == b]
            cells = []
            for metric in ("mass", "recall"):
                ranked = sorted(
                    (r for r in rows if r[metric]["mean"] is not None),
                    key=lambda r, m=metric: -r[m]["mean"],
                )
                for r in ranked[:2]:
                    cells.append(f"{r['selector']} {r[metric]['mean']:.3f}")
                cells += ["–"] * (2 - len(ranked[:2]))
            lines.append(f"| {key} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "coverage.yaml"))
    parser.add_argument("--input", help="a store with queries (overrides the config's input)")
    parser.add_argument("--out", help="output directory (default: output.dir of the config)")
    args = parser.parse_args(argv)
    cfg = load_evaluate_config(args.config)
    if args.input:
        cfg = dataclasses.replace(
            cfg, input=dataclasses.replace(cfg.input, path=args.input, generate=None)
        )
    out = Path(args.out or cfg.output.dir)
    t0 = time.perf_counter()
    src, made = prepare_source(cfg)
    generated = time.perf_counter() - t0
    report = evaluate(src, cfg, progress=cfg.progress)
    report.pop("per_query")
    report["config"] = to_dict(cfg)
    report["generate_seconds"] = generated if made else 0.0
    report["peak_rss_bytes"] = peak_rss_bytes()
    report["command"] = "python scripts/exp_coverage.py " + " ".join(argv or [])
    with atomic_dir(out, overwrite=True) as tmp:
        write_json_atomic(tmp / "report.json", report)
        (tmp / "report.md").write_text(markdown_table(report))
        (tmp / "winners.md").write_text(winners(report))
        plot_report(report, tmp)
    print(f"exp_coverage: {src.label} n = {src.n}, {report['queries']} queries, "
          f"{report['seconds']:.1f} s -> {out}")
    print(winners(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
