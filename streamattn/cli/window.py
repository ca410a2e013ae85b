"""``streamattn window INPUT --window W --block B --eps E``: a sliding-window universal set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from streamattn.cli.common import HelpFormatter, add_quiet
from streamattn.errors import ConfigError
from streamattn.io.outputs import atomic_dir, check_writable, to_jsonable
from streamattn.recipes.sliding_window import SlidingWindow
from streamattn.sources import open_keys


def add_parser(sub: Any) -> None:
    """``streamattn window``: replay a store as a token stream through a sliding window."""
    p = sub.add_parser(
        "window",
        help="universal set of the last W rows of a stream",
        description="Replay a store as a token stream: the universal set of the last W rows, "
        "maintained in blocks of b rows, reported every N rows.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("input", help="zarr array/group or .npy file, read as a stream of rows")
    p.add_argument("--array", help="key array name inside a zarr group (default keys)")
    p.add_argument("--window", type=int, required=True, help="W: rows attention looks at")
    p.add_argument("--block", type=int, required=True, help="b: the window moves in b rows")
    p.add_argument("--eps", type=float, required=True, help="threshold in (0, 1]")
    p.add_argument("--variant", choices=["plain", "affine"], default="plain",
                   help="plain or affine leverage")
    p.add_argument("--every", type=int, help="report the set every N rows (a multiple of b)")
    p.add_argument("--out", required=True, help="output directory (report.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    src = open_keys(args.input, array=args.array)
    check_writable(out, args.overwrite)  # after the open: the input is registered
    sw = SlidingWindow(args.window, args.block, args.eps, variant=args.variant)
    every = args.every or src.n
    if every < 1:
        raise ConfigError(f"--every must be >= 1, got {every}.")
    if args.every is not None and every % args.block:
        raise ConfigError(
            f"--every {every} is not a multiple of --block {args.block}: the set is only "
            "known after whole blocks; use a multiple such as "
            f"{args.block * max(1, every // args.block)}."
        )
    checkpoints: list[dict[str, Any]] = []
    for block in src.blocks(args.block):
        sw.append(block.rows, block.values)
        if sw.t % every == 0 or sw.t == src.n:
            u = sw.result()
            checkpoints.append(
                {"t": sw.t, "window": [u.start, u.stop], "size": len(u),
                 "indices": u.indices, "scores": u.scores}
            )
            if not args.quiet:
                print(f"  t = {sw.t}: window [{u.start}, {u.stop}) |U| = {len(u)}")
    final = sw.result()
    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        (tmp / "report.json").write_text(
            json.dumps(
                to_jsonable({"source": src.describe(), "certificate": final.certificate,
                             "checkpoints": checkpoints}),
                indent=2,
            )
            + "\n"
        )
    if not args.quiet:
        print(f"streamattn: sliding window W = {args.window}, b = {args.block}: "
              f"{len(checkpoints)} checkpoint(s) -> {out}")
    return 0
