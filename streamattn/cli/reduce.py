"""``streamattn reduce INPUT --m M --method METHOD --out OUT``: reduced embeddings Y = K S."""

from __future__ import annotations

import argparse
import json
from typing import Any

from streamattn.cli.common import (
    HelpFormatter,
    add_engine_flags,
    add_quiet,
    engine_from_args,
    quality_lines,
)
from streamattn.config import EngineConfig
from streamattn.io.outputs import to_jsonable
from streamattn.operators.projection import METHODS
from streamattn.recipes.embeddings import OUT_DTYPES, ReduceConfig, reduce_embeddings
from streamattn.sources import open_keys


def add_parser(sub: Any) -> None:
    defaults = ReduceConfig()
    p = sub.add_parser(
        "reduce",
        help="reduced embeddings Y = K S (n x m) of a key store",
        description="Stream a key store through an n x m map S (oblivious or data-aware) "
        "into OUT/embeddings.zarr, with a measured quality report.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("input", help="zarr array/group or .npy file")
    p.add_argument("--array", help="key array name inside a zarr group (default keys)")
    p.add_argument("--m", type=int, default=defaults.m, help="embedding dimension (<= d)")
    p.add_argument("--method", choices=list(METHODS), default=defaults.method,
                   help="the map S")
    p.add_argument("--seed", type=int, default=defaults.seed, help="map seed (int >= 0)")
    p.add_argument("--sparsity", type=int, default=defaults.sparsity,
                   help="non-zeros per row of a sparse-sign map")
    p.add_argument("--fd-ell", type=int, help="Frequent Directions rows (default 2m)")
    p.add_argument("--sample-keys", type=int, default=defaults.sample_keys,
                   help="keys in the quality-report sample")
    p.add_argument("--sample-queries", type=int, default=defaults.sample_queries,
                   help="queries in the quality-report sample")
    p.add_argument("--scale", type=float, help="attention scale (default 1/sqrt(d))")
    p.add_argument("--dtype", choices=list(OUT_DTYPES), default=defaults.dtype,
                   help="storage dtype of Y")
    p.add_argument("--chunk-rows", type=int, help="rows per block (default: storage-aligned)")
    add_engine_flags(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--json", action="store_true", help="print the quality report as JSON")
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    engine = engine_from_args(EngineConfig(chunk_rows=args.chunk_rows), args)
    source = open_keys(args.input, array=args.array)
    cfg = ReduceConfig(
        m=args.m,
        method=args.method,
        seed=args.seed,
        sparsity=args.sparsity,
        fd_ell=args.fd_ell,
        sample_keys=args.sample_keys,
        sample_queries=args.sample_queries,
        scale=args.scale,
        dtype=args.dtype,
    )
    res = reduce_embeddings(
        source,
        config=cfg,
        out=args.out,
        overwrite=args.overwrite,
        chunk_rows=args.chunk_rows,
        engine=engine.kind,
        progress=not args.quiet,
        **engine.options(),
    )
    info = res.report["embeddings"]
    if not args.quiet:
        print(f"streamattn: embeddings in {res.report['seconds']:.1f} s -> {args.out}")
        print("\n".join(quality_lines(info)))
        if args.json:
            print(json.dumps(to_jsonable(info["quality"]), indent=2))
    return 0
