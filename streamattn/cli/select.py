"""``streamattn select INPUT --eps E | --budget B --out OUT``: one universal set."""

from __future__ import annotations

import argparse
from typing import Any

from streamattn.cli.common import (
    HelpFormatter,
    add_cache_flags,
    add_engine_flags,
    add_quiet,
    compute_and_save,
    engine_from_args,
)
from streamattn.config import EngineConfig
from streamattn.io.checkpoint import CheckpointConfig, Checkpointer
from streamattn.io.outputs import claim_output
from streamattn.recipes.selection import Selection
from streamattn.sources import open_source


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "select",
        help="universal set of one key store",
        description="The universal set of a key store (or of every head of a KV cache): "
        "threshold mode (--eps), budget mode (--budget) or both; p != 2 via Lewis weights.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("input", help="zarr array/group or .npy file")
    p.add_argument("--array", help="key array name inside a zarr group (default keys)")
    p.add_argument("--eps", type=float, help="threshold: keep keys with score >= eps")
    p.add_argument("--variant", choices=["plain", "affine"], default="plain",
                   help="plain leverage, or affine (shift-invariant: 1/n + centred leverage)")
    p.add_argument("--budget", type=int, help="keep the top-B keys by score")
    p.add_argument("--rtol", type=float, default=1e-10, help="numerical-rank tolerance")
    p.add_argument("--p", type=float, default=2.0,
                   help="f(x) = |x|^p attention (p != 2: l_p Lewis weights)")
    p.add_argument("--chunk-rows", type=int, help="rows per block (default: storage-aligned)")
    add_engine_flags(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_cache_flags(p, heads_help="KV cache: KV heads to select, e.g. 0,2 (default all)")
    p.add_argument("--keep-mask", action="store_true",
                   help="KV cache: also write the (layer, head, key) boolean keep-mask")
    p.add_argument("--per-head", action="store_true",
                   help="KV cache: also write one group per (layer, head)")
    p.add_argument("--save-state", action="store_true",
                   help="KV cache: also write state.npz (for streamattn update)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--fill-missing-chunks", action="store_true",
                   help="read missing zarr chunk files as the fill value (default: an error)")
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    engine = engine_from_args(EngineConfig(chunk_rows=args.chunk_rows), args)
    source = open_source(args.input, array=args.array, n_heads=args.n_heads,
                         layers=args.layers, heads=args.heads, batch=args.batch,
                         fill_missing=args.fill_missing_chunks)
    sel = Selection(args.eps, args.variant, args.budget, args.rtol, args.p)
    sel.check(source.n)
    name = f"{args.variant}" + (f"-eps{args.eps:g}" if args.eps else "") + (
        f"-top{args.budget}" if args.budget else ""
    ) + (f"-p{args.p:g}" if args.p != 2 else "")
    with claim_output(args.out, args.overwrite) as out:  # checked and locked before work
        compute_and_save(
            args,
            source,
            {name: sel},
            out=out,
            overwrite=args.overwrite,
            chunk_rows=args.chunk_rows,
            engine=engine.kind,
            config={"command": "select", **{k: v for k, v in vars(args).items() if k != "func"}},
            progress=not args.quiet,
            engine_options=engine.options(),
            memory_limit=engine.memory_limit,
            checkpoint=Checkpointer.from_config(CheckpointConfig(), out, resume=args.resume),
            n_heads=args.n_heads,
            array=args.array,
            keep_mask=args.keep_mask,
            per_head=args.per_head,
            save_state=args.save_state,
        )
    return 0
