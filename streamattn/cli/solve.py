"""``streamattn solve gram-power|a-gram-power|attention-kernel INPUT --b B --out OUT``.

Writes OUT/x.npy (float64) and OUT/report.json (the solver's ``info``, the command's
settings and the input description) atomically; refuses an output inside the input.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.cli.common import HelpFormatter, add_engine_flags, add_quiet, engine_from_args
from streamattn.config import EngineConfig
from streamattn.errors import ConfigError
from streamattn.io.outputs import atomic_dir, check_writable, write_json_atomic
from streamattn.operators.solve_ops import DEFAULT_TILE, SKETCH_METHODS
from streamattn.recipes import solve
from streamattn.recipes.solve import KERNEL_METHODS, METHODS
from streamattn.sources import open_keys

PROBLEMS = ("gram-power", "a-gram-power", "attention-kernel")


def add_parser(sub: Any) -> None:
    """Register the ``solve`` command on the CLI's subparsers."""
    p = sub.add_parser(
        "solve",
        help="kernel regressions: (AᵀA)^j, A(AᵀA)^j, exp(β AAᵀ)",
        description="Solve min ‖(AᵀA)^j x − b‖, min ‖A(AᵀA)^j x − b‖ or "
        "min ‖(exp(β AAᵀ) + λI) x − b‖ out of core (one pass over A per product); writes "
        "OUT/x.npy and OUT/report.json.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("problem", choices=list(PROBLEMS), help="which regression")
    p.add_argument("input", help="A: zarr array/group or .npy file (n x d)")
    p.add_argument("--array", help="key array name inside a zarr group (default keys)")
    p.add_argument("--b", required=True, help="right-hand side: .npy file or zarr array")
    p.add_argument("--j", type=int, default=1, help="power j >= 1 (gram-power, a-gram-power)")
    p.add_argument("--method", help=f"{list(METHODS)} (default direct) or "
                   f"{list(KERNEL_METHODS)} (attention-kernel, default nystrom-pcg)")
    p.add_argument("--sketch", choices=list(SKETCH_METHODS), default="gaussian")
    p.add_argument("--sketch-size", type=int, help="sketch rows m (default 8d)")
    p.add_argument("--seed", type=int, default=0, help="sketch / Nystrom seed")
    p.add_argument("--tol", type=float, help="CG tolerance (default 1e-12; kernel 1e-8)")
    p.add_argument("--max-iter", type=int, help="CG iteration cap")
    p.add_argument("--compare", action="store_true", help="also run unpreconditioned CG")
    p.add_argument("--beta", type=float, default=1.0, help="attention-kernel: exp(beta AA^T)")
    p.add_argument("--ridge", type=float, default=0.0, help="attention-kernel: ridge lambda")
    p.add_argument("--rank", type=int, default=100, help="attention-kernel: Nystrom rank")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE, help="attention-kernel: tile edge")
    p.add_argument("--no-verify", action="store_true", help="skip the residual passes")
    p.add_argument("--chunk-rows", type=int, help="rows per block (default: storage-aligned)")
    add_engine_flags(p)
    p.add_argument("--out", required=True, help="output directory (x.npy, report.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_quiet(p)
    p.set_defaults(func=run)


def _inside(out: Path, inp: Path) -> bool:
    out, inp = out.resolve(), inp.resolve()
    return out == inp or inp in out.parents


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    for given in (args.input, args.b):
        if _inside(out, Path(given)):
            raise ConfigError(f"--out {out} is inside the input {given}; choose another path.")
    check_writable(out, args.overwrite)
    engine = engine_from_args(EngineConfig(), args)
    run_opts: dict[str, Any] = dict(engine=engine.kind, chunk_rows=args.chunk_rows,
                                    **engine.options())
    source = open_keys(args.input, array=args.array)
    common: dict[str, Any] = dict(verify=not args.no_verify, compare=args.compare, **run_opts)
    if args.max_iter is not None:
        common["max_iter"] = args.max_iter
    if args.tol is not None:
        common["tol"] = args.tol
    t0 = time.perf_counter()
    if args.problem == "attention-kernel":
        res = solve.attention_kernel(
            source, args.b, beta=args.beta, ridge=args.ridge, rank=args.rank,
            method=args.method or "nystrom-pcg", seed=args.seed, tile=args.tile, **common,
        )
    else:
        fn = solve.gram_power if args.problem == "gram-power" else solve.a_gram_power
        res = fn(
            source, args.b, args.j, method=args.method or "direct", sketch=args.sketch,
            sketch_size=args.sketch_size, seed=args.seed, **common,
        )
    seconds = time.perf_counter() - t0
    report = {
        "command": "solve",
        "problem": args.problem,
        "input": source.describe(),
        "b": str(args.b),
        "info": res.info,
        "seconds": seconds,
        "engine": engine.kind,
    }
    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        np.save(tmp / "x.npy", res.x)
        write_json_atomic(tmp / "report.json", report)
    if not args.quiet:
        info = res.info
        line = (
            f"streamattn: solve {args.problem} ({info['method']}) n = {info['n']}, "
            f"d = {info['d']}: {info['passes']} pass(es), {info['iterations']} iteration(s)"
        )
        if "residual" in info:
            line += f", residual {info['residual']:.3e}"
        print(f"{line}, {seconds:.2f} s -> {out}")
    return 0
