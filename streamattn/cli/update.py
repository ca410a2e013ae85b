"""``streamattn update OUT --input STORE``: fold rows appended to a store into a saved result."""

from __future__ import annotations

import argparse
from typing import Any

from streamattn.cli.common import (
    HelpFormatter,
    add_engine_flags,
    add_quiet,
    engine_from_args,
    say,
    summary_lines,
)
from streamattn.config import EngineConfig
from streamattn.io.update import update_output


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "update",
        help="fold rows appended to a store into a saved result (no reread)",
        description="Fold the rows appended to a store since OUT was written into OUT's "
        "saved operator states (state.npz) and rewrite OUT; the old rows are not reread.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("out", help="output directory of an earlier run/select (has state.npz)")
    p.add_argument("--input", required=True, help="the store, grown since that run")
    add_quiet(p)
    add_engine_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    engine = engine_from_args(EngineConfig(), args)
    done = update_output(args.out, args.input, progress=not args.quiet, engine=engine.kind,
                         **engine.options())
    info = done["report"]["update"]
    if not done["sets"]:
        say(args, f"streamattn: {args.input} still has {info['rows_after']} rows; "
             f"{args.out} is up to date.")
        return 0
    say(
        args,
        f"streamattn: folded rows [{info['rows_before']}, {info['rows_after']}) into "
        f"{args.out} ({info['note']}).",
    )
    for name, uset in done["sets"].items():
        say(args, *summary_lines(name, uset))
    return 0


