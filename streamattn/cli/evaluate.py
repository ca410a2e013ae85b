"""``streamattn evaluate [CONFIG]``: coverage of key selectors against exact attention."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from streamattn.cli.common import HelpFormatter, add_engine_flags, add_quiet, engine_from_args
from streamattn.config import to_dict
from streamattn.errors import ConfigError
from streamattn.io.outputs import check_writable
from streamattn.memory import peak_rss_bytes
from streamattn.recipes.cache_evaluate import evaluate_cache, open_for_evaluate, write_outputs
from streamattn.recipes.evaluate import (
    _fmt,
    evaluate,
    load_evaluate_config,
    prepare_source,
    write_report,
)
from streamattn.sources import is_multihead


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="coverage of key selectors against exact attention ground truth",
        description="Measure how much attention each key selector keeps (recall of heavy "
        "entries, attention mass, output error) against the exact one-pass ground truth; "
        "with no config, on the default evaluation store (configs/evaluate.yaml).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("config", nargs="?", help="YAML config; none = evaluate the default store")
    p.add_argument("--out", help="output directory (default: output.dir of the config)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_engine_flags(p)
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``streamattn evaluate [CONFIG]``: measure selectors against exact ground truth."""
    cfg = load_evaluate_config(args.config)
    cfg = dataclasses.replace(cfg, engine=engine_from_args(cfg.engine, args))
    out = Path(args.out or cfg.output.dir)
    overwrite = cfg.output.overwrite or args.overwrite
    check_writable(out, overwrite, inputs=[cfg.input.path])  # before the store is opened
    if cfg.input.generate is None and is_multihead(cfg.input.path, cfg.input.array):
        return run_cache(cfg, out, overwrite=overwrite, quiet=args.quiet)
    src, made = prepare_source(cfg)
    quiet = args.quiet
    if not quiet:
        print(f"streamattn: {'generated' if made else 'using'} store {src.label}: "
              f"n = {src.n}, d = {src.d}")
    report = evaluate(src, cfg, progress=cfg.progress and not quiet)
    report["config"] = to_dict(cfg)
    report["peak_rss_bytes"] = peak_rss_bytes()
    write_report(report, out, overwrite=overwrite)
    if not quiet:
        print(f"streamattn: evaluated {report['queries']} queries in {report['seconds']:.1f} s "
              f"-> {out}/report.md")
        for key, res in report["results"].items():
            best = max(
                (r for r in res["rows"] if r["budget"] == max(cfg.selectors.budgets)),
                key=lambda r: r["mass"]["mean"] or 0.0,
                default=None,
            )
            if best is not None:
                print(f"  {key}: best mass at B = {best['budget']}: {best['selector']} "
                      f"(mass {_fmt(best['mass']['mean'])}, recall {_fmt(best['recall']['mean'])})")
    return 0


def run_cache(cfg: Any, out: Path, *, overwrite: bool, quiet: bool) -> int:
    """``streamattn evaluate`` with ``input.path`` a KV cache (see the module docstring)."""
    if cfg.engine.kind != "local":
        raise ConfigError(
            "engine.kind: evaluate on a KV cache runs on the local engine (its passes read "
            "chosen layers and heads of one process's cache view)."
        )
    src, group = open_for_evaluate(cfg.input.path, cfg)
    if not quiet:
        assert src.queries is not None
        print(f"streamattn: cache {src.label}: n = {src.n}, d_head = {src.d}, layers "
              f"{list(src.layer_ids)}, KV heads {list(src.head_ids)}, query heads "
              f"{list(src.queries.head_ids)} (GQA group {group}), "
              f"{src.segments.starts.size} segment(s), model {src.model.get('name', '?')}")
    run = {"engine": "local", "chunk_rows": cfg.engine.chunk_rows,
           "progress": cfg.progress and not quiet}
    report = evaluate_cache(src, group, cfg, run)
    report["config"] = to_dict(cfg)
    report["peak_rss_bytes"] = peak_rss_bytes()
    write_outputs(report, out, overwrite=overwrite)
    if not quiet:
        print(f"streamattn: {len(report['rows'])} result rows for {src.layers} layer(s) x "
              f"{len(set(r['head'] for r in report['rows']))} query head(s), "
              f"{report['queries']} queries, in {report['seconds']:.1f} s "
              f"({len(report['passes'])} passes) -> {out}/results.csv")
    return 0
