"""The command line: ``streamattn run | select | generate | inspect``.

Every command validates its inputs before reading data, prints one clear line and exits
non-zero on bad input (never a traceback for a user error), and writes outputs
atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.checkpoint import CheckpointConfig, Checkpointer
from streamattn.config import EngineConfig, RunConfig, load_config, to_dict
from streamattn.engines import ENGINES
from streamattn.errors import StreamattnError
from streamattn.kvcache import MultiHeadResult, MultiHeadSource, flatten_results, open_source
from streamattn.memory import peak_rss_bytes
from streamattn.outputs import check_writable
from streamattn.synthetic import SyntheticSpec, ensure_store, generate_kv_store, generate_store
from streamattn.universal import (
    Selection,
    UniversalSet,
    save_universal_sets,
    universal_sets,
)
from streamattn.update import state_writer


def _say(args: argparse.Namespace, *lines: str) -> None:
    if not getattr(args, "quiet", False):
        for line in lines:
            print(line)


def _summary_lines(name: str, uset: UniversalSet) -> list[str]:
    c = uset.certificate
    head = uset.indices[:10].tolist()
    more = " ..." if len(uset) > 10 else ""
    bound = f", bound rank/eps = {c['size_bound']:.0f}" if "size_bound" in c else ""
    return [
        f"  {name}: |U| = {len(uset)}{bound}  (variant {c['variant']}, mode {c['mode']}, "
        f"passes {c['passes']}, rank {c['numerical_rank']} at rtol {c['rank_rtol']:g})",
        f"    indices {head}{more}",
    ]


def _compute_and_save(
    args: argparse.Namespace,
    source: Any,
    named: dict[str, Selection],
    *,
    out: Path,
    overwrite: bool,
    chunk_rows: int | None,
    engine: str,
    config: dict[str, Any],
    progress: bool,
    engine_options: dict[str, Any] | None = None,
    checkpoint: Checkpointer | None = None,
    n_heads: int | None = None,
    array: str | None = None,
    keep_mask: bool = False,
    per_head: bool = False,
    save_state: bool = False,
) -> dict[str, UniversalSet]:
    check_writable(out, overwrite)
    t0 = time.perf_counter()
    results = universal_sets(
        source,
        list(named.values()),
        chunk_rows=chunk_rows,
        engine=engine,
        progress=progress,
        checkpoint=checkpoint,
        **(engine_options or {}),
    )
    seconds = time.perf_counter() - t0
    caches = {k: r for k, r in zip(named, results, strict=True) if isinstance(r, MultiHeadResult)}
    sets = flatten_results(list(named), results)  # KV caches: name/layer_{l}/head_{h}
    report = {
        "config": config,
        "seconds": seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "sets": {
            name: {"size": len(u), "indices_head": u.indices[:20], "certificate": u.certificate}
            for name, u in sets.items()
        },
    }
    # a KV cache's state.npz (every head's factor) only on request; a single store's always
    keep_state = save_state or not caches
    writer = state_writer(checkpoint, named, array=array, n_heads=n_heads) if keep_state \
        else None
    # KV caches: stacked (layer, head, rank) arrays; per-head groups only on request
    groups = {k: u for k, u in sets.items() if per_head or k.split("/")[0] not in caches}
    save_universal_sets(out, groups, report=report, overwrite=overwrite,
                        extra=_cache_writer(caches, source.n, keep_mask, writer))
    if checkpoint is not None:
        for k, row in sorted(checkpoint.resumed_from.items()):
            _say(args, f"streamattn: pass {k + 1} resumed from its checkpoint at row {row}")
        checkpoint.discard()  # the output (with state.npz) now holds everything
    _say(args, f"streamattn: {len(sets)} universal set(s) in {seconds:.1f} s -> {out}")
    for name, uset in sets.items():
        _say(args, *_summary_lines(name, uset))
    _say(args, "  guarantee: x^2 / (x+c)^2 attention only; softmax coverage must be measured.")
    return sets


def _cache_writer(
    caches: dict[str, MultiHeadResult], n: int, keep_mask: bool, then: Any
) -> Any:
    """``extra`` for ``save_universal_sets``: stacked cache selections, then ``then``."""
    if not caches:
        return then

    def write(tmp: Path) -> None:
        import zarr

        from streamattn.cache_outputs import write_cache_selection

        root = zarr.open_group(str(tmp / "result.zarr"), mode="a")
        for name, res in caches.items():
            write_cache_selection(root, name, res, n=n, keep_mask=keep_mask)
        if then is not None:
            then(tmp)

    return write


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Engine flags; for ``run`` they override the config's ``engine:`` section."""
    p.add_argument("--engine", choices=list(ENGINES), help="engine (default local)")
    p.add_argument("--scheduler", help="dask: threads, local-cluster or tcp://host:port")
    p.add_argument("--n-workers", type=int, help="dask local-cluster: worker processes")
    p.add_argument("--threads-per-worker", type=int, help="dask: threads per worker")
    p.add_argument("--split-every", type=int, help="dask: fan-in of the merge tree")
    p.add_argument("--blocks-per-task", type=int, help="dask: blocks folded per leaf task")
    p.add_argument("--retries", type=int, help="dask: retries of a failed task")
    p.add_argument("--timeout", type=float, help="dask: seconds to reach the scheduler")
    p.add_argument("--no-dashboard", action="store_true", help="dask: no LocalCluster dashboard")


def _index_list(text: str) -> tuple[int, ...]:
    """``"3,15"`` -> (3, 15) for --layers / --heads."""
    try:
        out = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 0,2; got {text!r}"
        ) from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one index")
    return out


def add_cache_flags(p: argparse.ArgumentParser, *, heads_help: str) -> None:
    """KV-cache input flags shared by select, inspect and evaluate (docs/real-caches.md)."""
    p.add_argument("--layers", type=_index_list, help="KV cache: real layer indices, e.g. 3,15")
    p.add_argument("--heads", type=_index_list, help=heads_help)
    p.add_argument("--n-heads", type=int,
                   help="the head count of a 2-D (n, H*d) key array (per-layer zarr arrays "
                   "carry it as an attribute)")
    p.add_argument("--batch", type=int, help="KV cache with a batch axis: the sequence to read")


def _engine_from_args(base: EngineConfig, args: argparse.Namespace) -> EngineConfig:
    flags = {
        "kind": args.engine,
        "scheduler": args.scheduler,
        "n_workers": args.n_workers,
        "threads_per_worker": args.threads_per_worker,
        "split_every": args.split_every,
        "blocks_per_task": args.blocks_per_task,
        "retries": args.retries,
        "timeout": args.timeout,
        "dashboard": False if args.no_dashboard else None,
    }
    out = dataclasses.replace(base, **{k: v for k, v in flags.items() if v is not None})
    out.check()
    return out


def cmd_run(args: argparse.Namespace) -> int:
    cfg: RunConfig = load_config(args.config)
    cfg = dataclasses.replace(cfg, engine=_engine_from_args(cfg.engine, args))
    path = Path(cfg.input.path)
    if cfg.input.generate is not None:
        _, made = ensure_store(path, cfg.input.generate)
        _say(args, f"streamattn: {'generated' if made else 'using cached'} store {path}")
    source = open_source(path, array=cfg.input.array, **cfg.input.cache_options())
    _say(args, f"streamattn: {source.label}: n = {source.n}, d = {source.d}, {source.dtype}")
    named = {s.name: s.selection() for s in cfg.select}
    if cfg.reduce is not None:  # universal sets + embeddings from one shared read
        from streamattn.embeddings import run_select_and_reduce

        return run_select_and_reduce(args, cfg, source, named)
    _compute_and_save(
        args,
        source,
        named,
        out=Path(cfg.output.dir),
        overwrite=cfg.output.overwrite or args.overwrite,
        chunk_rows=cfg.engine.chunk_rows,
        engine=cfg.engine.kind,
        config=to_dict(cfg),
        progress=cfg.progress and not args.quiet,
        engine_options=cfg.engine.options(),
        checkpoint=Checkpointer.from_config(cfg.checkpoint, cfg.output.dir, resume=args.resume),
        n_heads=cfg.input.n_heads,
        array=cfg.input.array,
        keep_mask=cfg.output.keep_mask,
        per_head=cfg.output.per_head,
        save_state=cfg.output.save_state,
    )
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    engine = _engine_from_args(EngineConfig(chunk_rows=args.chunk_rows), args)
    source = open_source(args.input, array=args.array, n_heads=args.n_heads,
                         layers=args.layers, heads=args.heads, batch=args.batch)
    sel = Selection(args.eps, args.variant, args.budget, args.rtol, args.p)
    sel.check(source.n)
    name = f"{args.variant}" + (f"-eps{args.eps:g}" if args.eps else "") + (
        f"-top{args.budget}" if args.budget else ""
    ) + (f"-p{args.p:g}" if args.p != 2 else "")
    _compute_and_save(
        args,
        source,
        {name: sel},
        out=Path(args.out),
        overwrite=args.overwrite,
        chunk_rows=args.chunk_rows,
        engine=engine.kind,
        config={"command": "select", **{k: v for k, v in vars(args).items() if k != "func"}},
        progress=not args.quiet,
        engine_options=engine.options(),
        checkpoint=Checkpointer.from_config(CheckpointConfig(), args.out, resume=args.resume),
        n_heads=args.n_heads,
        array=args.array,
        keep_mask=args.keep_mask,
        per_head=args.per_head,
        save_state=args.save_state,
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
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
        _say(args, f"streamattn: wrote {args.out} ({layers} layers x {heads} heads x "
             f"{spec.n} x {spec.d} {spec.dtype}) in {time.perf_counter() - t0:.1f} s")
        return 0
    generate_store(args.out, spec, overwrite=args.overwrite)
    _say(args, f"streamattn: wrote {args.out} ({spec.n} x {spec.d} {spec.dtype}) "
         f"in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Describe a store; the key-norm figures are over a sample of the first 4096 rows.

    ``sample_mean_key_norm_ratio`` = ‖mean_j k_j‖ / mean_j ‖k_j‖ (≤ 1 by the triangle
    inequality): near 1, keys share a large common offset (softmax ignores it, plain
    leverage does not). For a KV cache it is computed per (layer, head), over rows.
    """
    source = open_source(args.input, array=args.array, n_heads=args.n_heads,
                         layers=args.layers, heads=args.heads, batch=args.batch)
    info = source.describe()
    rows = source.read(0, min(source.n, 4096)).rows.astype(np.float64)
    norms = np.linalg.norm(rows, axis=-1)  # (r,) or (r, layers, heads)
    ratio = np.linalg.norm(rows.mean(axis=0), axis=-1) / np.maximum(norms.mean(axis=0),
                                                                    1e-300)
    info["sample_rows"] = int(rows.shape[0])
    info["sample_mean_norm"] = float(norms.mean())
    info["sample_mean_key_norm_ratio"] = float(ratio.mean())
    if isinstance(source, MultiHeadSource):
        info["per_head"] = [
            {"layer": lay, "head": h, "mean_norm": float(norms[:, li, hi].mean()),
             "mean_key_norm_ratio": float(ratio[li, hi])}
            for li, lay in enumerate(source.layer_ids)
            for hi, h in enumerate(source.head_ids)
        ]
    info["default_chunk_rows"] = source.default_chunk_rows()
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamattn",
        description="Heavy parts of attention over key stores far longer than memory.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    p = sub.add_parser("run", help="run a config (default: the embedded default job)")
    p.add_argument("config", nargs="?", help="YAML config; none = embedded default")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    _add_engine_flags(p)
    common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("select", help="universal set of one key store")
    p.add_argument("input", help="zarr array/group or .npy file")
    p.add_argument("--array", help="key array name inside a zarr group (default keys)")
    p.add_argument("--eps", type=float, help="threshold: keep keys with score >= eps")
    p.add_argument("--variant", choices=["plain", "affine"], default="plain")
    p.add_argument("--budget", type=int, help="keep the top-B keys by score")
    p.add_argument("--rtol", type=float, default=1e-10, help="numerical-rank tolerance")
    p.add_argument("--p", type=float, default=2.0,
                   help="f(x) = |x|^p attention (default 2; p != 2: l_p Lewis weights)")
    p.add_argument("--chunk-rows", type=int, help="rows per block (default: storage-aligned)")
    _add_engine_flags(p)
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
    common(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("generate", help="write a deterministic synthetic key store")
    p.add_argument("out", help="output zarr group path")
    defaults = SyntheticSpec()
    p.add_argument("--n", type=int, default=defaults.n)
    p.add_argument("--d", type=int, default=defaults.d)
    p.add_argument("--rank", type=int, default=defaults.rank)
    p.add_argument("--noise", type=float, default=defaults.noise)
    p.add_argument("--outliers", type=int, default=defaults.outliers)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--chunk-rows", type=int, default=defaults.chunk_rows)
    p.add_argument("--dtype", default=defaults.dtype, choices=["float16", "float32", "float64"])
    p.add_argument("--compressor", default=defaults.compressor, choices=["zstd", "none"])
    p.add_argument("--layers", type=int, help="KV cache: layers (keys/layer_{l} arrays)")
    p.add_argument("--heads", type=int, help="KV cache: heads per layer (d = d_head)")
    p.add_argument("--overwrite", action="store_true")
    common(p)
    p.set_defaults(func=cmd_generate)

    from streamattn.update import add_update_parser

    add_update_parser(sub)

    from streamattn.evaluate import add_evaluate_parser

    add_evaluate_parser(sub)

    from streamattn.embeddings import add_reduce_parser

    add_reduce_parser(sub)

    p = sub.add_parser("inspect", help="describe a key store (shape, dtype, chunks)")
    p.add_argument("input")
    p.add_argument("--array")
    add_cache_flags(p, heads_help="KV cache: KV heads to describe, e.g. 0,2 (default all)")
    p.set_defaults(func=cmd_inspect)

    from streamattn.sliding_window import add_window_parser

    add_window_parser(sub)

    from streamattn.bench import add_bench_parser

    add_bench_parser(sub)
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


if __name__ == "__main__":
    sys.exit(main())
