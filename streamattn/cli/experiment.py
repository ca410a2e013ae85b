"""``streamattn experiment NAME [CONFIG.yaml] --out DIR`` and ``streamattn experiment --list``."""

from __future__ import annotations

import argparse
from typing import Any

from streamattn.cli.common import HelpFormatter, add_quiet
from streamattn.errors import ConfigError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "experiment",
        help="run a shipped, reproducible experiment (--list to see them)",
        description="Run an experiment (gaussian-sparsity, scaling, real-sparsity) from its "
        "shipped config or CONFIG.yaml; data is generated from the config's seed and streamed; "
        "results.csv, report.md, plots and provenance.json go to --out, atomically.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("name", nargs="?", help="experiment name (see --list)")
    p.add_argument("config", nargs="?", help="YAML config; none = the shipped config")
    p.add_argument("--out", help="output directory (written atomically)")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """List the experiments, or run one and print its summary."""
    from streamattn.experiments import EXPERIMENTS, run_experiment, shipped_config

    if args.list:
        for name, exp in sorted(EXPERIMENTS.items()):
            print(f"{name:20s} {exp.summary}")
            print(f"{'':20s} config: {shipped_config(name)}")
        return 0
    if args.name is None:
        raise ConfigError("name an experiment (streamattn experiment --list shows them).")
    if args.out is None:
        raise ConfigError("experiment needs --out DIR for its results.")
    summary = run_experiment(
        args.name, args.config, args.out, overwrite=args.overwrite, progress=not args.quiet
    )
    if not args.quiet:
        print(f"streamattn: experiment {args.name} in {summary['seconds']:.1f} s -> {args.out}")
        for key, value in summary.items():
            if key not in ("seconds", "out", "plots"):
                print(f"  {key}: {value}")
    return 0
