"""The command line: ``streamattn COMMAND ...`` (one module per command in this package).

Every command validates its inputs before reading data, prints one clear line and exits
non-zero on bad input (never a traceback for a user error), and writes outputs
atomically.
"""

from __future__ import annotations

import argparse
import sys

from streamattn import __version__
from streamattn.cli import (
    bench,
    downstream,
    evaluate,
    experiment,
    extract,
    generate,
    inspect,
    reduce,
    run,
    sample,
    select,
    solve,
    update,
    window,
)
from streamattn.cli.common import HelpFormatter
from streamattn.errors import StreamattnError

#: The commands, in the order ``streamattn --help`` lists them.
COMMANDS = (
    run, select, sample, generate, update, evaluate, reduce, inspect, window, bench, experiment,
    solve, extract, downstream,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamattn",
        description="Heavy parts of attention over key stores far longer than memory.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"streamattn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except StreamattnError as exc:
        print(f"streamattn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("streamattn: interrupted; no output was written.", file=sys.stderr)
        return 130
