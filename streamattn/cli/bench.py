"""``streamattn bench``: the engine's throughput against the store's read limit."""

from __future__ import annotations

from typing import Any

from streamattn.bench import add_arguments, cmd_bench
from streamattn.cli.common import HelpFormatter


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark the engine against the store's read limit",
        description="Benchmark each pass configuration in a fresh process against the read "
        "speed of the same store; results to --out (results.json, results.md).",
        formatter_class=HelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
