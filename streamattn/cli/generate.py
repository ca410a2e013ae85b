"""``streamattn generate OUT``: a deterministic synthetic key store (or KV cache)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from streamattn.cli.common import HelpFormatter, add_quiet, say
from streamattn.synthetic import SyntheticSpec, generate_kv_store, generate_store


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="write a deterministic synthetic key store",
        description="Write a seeded synthetic key store: low-rank keys plus noise and planted "
        "outliers; with --layers/--heads a whole KV cache (keys/layer_{l} arrays).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("out", help="output zarr group path")
    defaults = SyntheticSpec()
    p.add_argument("--n", type=int, default=defaults.n, help="rows (keys)")
    p.add_argument("--d", type=int, default=defaults.d, help="key dimension (per head)")
    p.add_argument("--rank", type=int, default=defaults.rank, help="rank of the signal part")
    p.add_argument("--noise", type=float, default=defaults.noise, help="noise level")
    p.add_argument("--outliers", type=int, default=defaults.outliers, help="planted outliers")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    p.add_argument("--chunk-rows", type=int, default=defaults.chunk_rows,
                   help="rows per storage chunk")
    p.add_argument("--dtype", default=defaults.dtype, choices=["float16", "float32", "float64"],
                   help="storage dtype")
    p.add_argument("--compressor", default=defaults.compressor, choices=["zstd", "none"],
                   help="chunk compressor")
    p.add_argument("--layers", type=int, help="KV cache: layers (keys/layer_{l} arrays)")
    p.add_argument("--heads", type=int, help="KV cache: heads per layer (d = d_head)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = SyntheticSpec(
        n=args.n,
        d=args.d,
        rank=min(args.rank, args.d),
        noise=args.noise,
        outliers=args.outliers,
        seed=args.seed,
        chunk_rows=args.chunk_rows,
        dtype=args.dtype,
        compressor=args.compressor,
    )
    t0 = time.perf_counter()
    if args.layers is not None or args.heads is not None:  # a multi-layer multi-head KV cache
        layers, heads = args.layers or 1, args.heads or 1
        generate_kv_store(args.out, spec, layers=layers, heads=heads, overwrite=args.overwrite)
        say(args, f"streamattn: wrote {args.out} ({layers} layers x {heads} heads x "
             f"{spec.n} x {spec.d} {spec.dtype}) in {time.perf_counter() - t0:.1f} s")
        return 0
    generate_store(args.out, spec, overwrite=args.overwrite)
    say(args, f"streamattn: wrote {args.out} ({spec.n} x {spec.d} {spec.dtype}) "
         f"in {time.perf_counter() - t0:.1f} s")
    return 0
