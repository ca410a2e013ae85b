"""``streamattn sample INPUT --eps 0.25 --out OUT``: a weighted leverage sample of a key store.

Writes ``OUT/result.zarr`` (group ``sample/<name>``: indices, weights, rows, certificate
attributes; a KV cache gives ``sample/layer_{l}/head_{h}``) and ``OUT/report.json``
(config, seconds, peak RSS, every certificate), atomically. The ``sample:`` section of a
run config does the same into ``<output.dir>/sample`` (``run_config_sample``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from streamattn.cli.common import (
    HelpFormatter,
    add_cache_flags,
    add_engine_flags,
    add_quiet,
    engine_from_args,
    say,
)
from streamattn.config import EngineConfig, to_dict
from streamattn.io.outputs import check_writable
from streamattn.memory import peak_rss_bytes
from streamattn.operators.sampler import METHODS, VARIANTS
from streamattn.recipes.samplers import (
    LeverageSample,
    SampleConfig,
    leverage_sample,
    save_samples,
)
from streamattn.results import MultiHeadResult
from streamattn.sources import open_source


def _named(result: LeverageSample | MultiHeadResult) -> dict[str, LeverageSample]:
    return result.named("sample") if isinstance(result, MultiHeadResult) else {"sample": result}


def compute_and_save(
    args: argparse.Namespace,
    source: Any,
    cfg: SampleConfig,
    *,
    out: Path,
    overwrite: bool,
    config: dict[str, Any],
    chunk_rows: int | None,
    engine: str,
    engine_options: dict[str, Any],
) -> dict[str, LeverageSample]:
    """One sampling pass of ``source`` and its atomic output (CLI and run configs)."""
    check_writable(out, overwrite)
    t0 = time.perf_counter()
    result = leverage_sample(
        source, cfg.eps, cfg.delta, cfg.method, cfg.variant, cfg.seed, check=cfg.check,
        chunk_rows=chunk_rows, engine=engine, progress=not getattr(args, "quiet", False),
        leaf_rows=cfg.leaf_rows, fan_in=cfg.fan_in, rtol=cfg.rtol, ridge=cfg.ridge,
        **engine_options,
    )
    seconds = time.perf_counter() - t0
    samples = _named(result)
    report = {
        "config": config,
        "seconds": seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "samples": {name: {"size": len(s), "certificate": s.certificate}
                    for name, s in samples.items()},
    }
    save_samples(out, samples, report=report, overwrite=overwrite)
    say(args, f"streamattn: {len(samples)} leverage sample(s) in {seconds:.1f} s -> {out}")
    for name, s in samples.items():
        c = s.certificate
        measured = (f", measured spectral error {c['spectral_error']:.3g}"
                    if "spectral_error" in c else "")
        say(args, f"  {name}: {len(s)} of {c['n']} rows ({c['method']}, {c['variant']}), "
             f"eps {c['eps']:g} with failure bound {c['delta_bound']:.2g}{measured}")
    return samples


def run(args: argparse.Namespace) -> int:
    engine = engine_from_args(EngineConfig(chunk_rows=args.chunk_rows), args)
    cfg = SampleConfig(args.eps, args.delta, args.method, args.variant, args.seed, args.check,
                       args.leaf_rows, args.fan_in, args.rtol, args.ridge)
    cfg.validate()
    source = open_source(args.input, array=args.array, n_heads=args.n_heads,
                         layers=args.layers, heads=args.heads, batch=args.batch)
    config = {"command": "sample", **{k: v for k, v in vars(args).items() if k != "func"}}
    compute_and_save(args, source, cfg, out=Path(args.out), overwrite=args.overwrite,
                     config=config, chunk_rows=args.chunk_rows, engine=engine.kind,
                     engine_options=engine.options())
    return 0


def run_config_sample(args: argparse.Namespace, cfg: Any, source: Any) -> None:
    """The ``sample:`` section of a run config, written to ``<output.dir>/sample``."""
    compute_and_save(
        args, source, cfg.sample, out=Path(cfg.output.dir) / "sample",
        overwrite=cfg.output.overwrite or args.overwrite, config=to_dict(cfg),
        chunk_rows=cfg.engine.chunk_rows, engine=cfg.engine.kind,
        engine_options=cfg.engine.options(),
    )


def add_parser(sub: Any) -> None:
    d = SampleConfig()
    p = sub.add_parser(
        "sample",
        help="weighted leverage sample: (1 +- eps) K^T K from one pass",
        description="A weighted key sample whose Gram is (1 +- eps) K^T K (affine: [K, 1]) "
        "with probability >= 1 - delta, from one pass (docs/samplers.md).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("input", help="zarr array/group or .npy file (a KV cache: every head)")
    p.add_argument("--eps", type=float, default=d.eps, help="relative spectral error")
    p.add_argument("--delta", type=float, default=d.delta, help="failure probability")
    p.add_argument("--method", choices=list(METHODS), default=d.method,
                   help="online (CMP online sampling) or merge-reduce (fixed merge tree)")
    p.add_argument("--variant", choices=list(VARIANTS), default=d.variant,
                   help="plain (K^T K) or affine ([K, 1]: every offset of the logits)")
    p.add_argument("--seed", type=int, default=d.seed, help="key of the keyed coins")
    p.add_argument("--check", action="store_true",
                   help="also measure the spectral error (exact factor in the same read)")
    p.add_argument("--leaf-rows", type=int, help="merge-reduce: rows per leaf (default: auto)")
    p.add_argument("--fan-in", type=int, default=d.fan_in, help="merge-reduce: tree fan-in")
    p.add_argument("--rtol", type=float, default=d.rtol, help="numerical-rank tolerance")
    p.add_argument("--ridge", type=float, default=d.ridge,
                   help="online, plain: ridge lambda (bound on G + lambda I)")
    p.add_argument("--array", help="key array name inside a zarr group (default keys)")
    add_cache_flags(p, heads_help="KV cache: KV heads to sample, e.g. 0,2 (default all)")
    p.add_argument("--chunk-rows", type=int, help="rows per block (default: storage-aligned)")
    add_engine_flags(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_quiet(p)
    p.set_defaults(func=run)
