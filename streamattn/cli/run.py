"""``streamattn run [CONFIG]``: a YAML job (none: the embedded default job)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

from streamattn.cli.common import (
    HelpFormatter,
    add_engine_flags,
    add_quiet,
    compute_and_save,
    engine_from_args,
    quality_lines,
    say,
    summary_lines,
)
from streamattn.config import RunConfig, load_config, to_dict
from streamattn.errors import ConfigError
from streamattn.io.checkpoint import Checkpointer
from streamattn.io.outputs import atomic_dir, check_writable, claim_output, write_json_atomic
from streamattn.memory import peak_rss_bytes
from streamattn.recipes.embeddings import Embeddings, ReduceConfig
from streamattn.recipes.selection import Selection
from streamattn.recipes.universal import save_universal_sets, selection_recipe
from streamattn.runner import Recipe, run_recipes
from streamattn.sources import KeySource, open_source
from streamattn.synthetic import ensure_store


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run a config (default: the embedded default job)",
        description="Run a YAML job: universal sets (select:), optionally reduced embeddings "
        "(reduce:) from the same read; with no config, the embedded default job "
        "(configs/default.yaml spells it out).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("config", nargs="?", help="YAML config; none = embedded default")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    add_engine_flags(p)
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the config, open (or generate) the store, compute, save, summarise."""
    cfg: RunConfig = load_config(args.config)
    cfg = dataclasses.replace(cfg, engine=engine_from_args(cfg.engine, args))
    path = Path(cfg.input.path)
    if cfg.input.generate is not None:
        _, made = ensure_store(path, cfg.input.generate)
        say(args, f"streamattn: {'generated' if made else 'using cached'} store {path}")
    source = open_source(path, array=cfg.input.array, **cfg.input.cache_options())
    say(args, f"streamattn: {source.label}: n = {source.n}, d = {source.d}, {source.dtype}")
    named = {s.name: s.selection() for s in cfg.select}
    out, overwrite = Path(cfg.output.dir), cfg.output.overwrite or args.overwrite
    with claim_output(out, overwrite):  # checked, locked and repaired before any work
        if out.exists() and not args.overwrite:  # overwrite came from the config
            say(args, f"streamattn: replacing {out}, the output of an earlier streamattn "
                "run (output.overwrite: true)")
        if cfg.reduce is not None:  # universal sets + embeddings from one shared read
            if not isinstance(source, KeySource):
                raise ConfigError(
                    f"{source.label}: reduce: takes a single-head key store; drop the reduce "
                    "section for a multi-head KV cache."
                )
            return run_select_and_reduce(args, cfg, source, named)
        compute_and_save(
            args,
            source,
            named,
            out=out,
            overwrite=overwrite,
            chunk_rows=cfg.engine.chunk_rows,
            engine=cfg.engine.kind,
            config=to_dict(cfg),
            progress=cfg.progress and not args.quiet,
            engine_options=cfg.engine.options(),
            memory_limit=cfg.engine.memory_limit,
            checkpoint=Checkpointer.from_config(cfg.checkpoint, out, resume=args.resume),
            n_heads=cfg.input.n_heads,
            array=cfg.input.array,
            keep_mask=cfg.output.keep_mask,
            per_head=cfg.output.per_head,
            save_state=cfg.output.save_state,
        )
    if cfg.sample is not None:  # a leverage sample into <output.dir>/sample (cli/sample.py)
        from streamattn.cli.sample import run_config_sample

        run_config_sample(args, cfg, source)
    return 0


def run_select_and_reduce(
    args: argparse.Namespace, cfg: RunConfig, source: KeySource, named: dict[str, Selection]
) -> int:
    """``streamattn run`` with both ``select`` and ``reduce``: one shared read of the store.

    Universal sets and embeddings are folded from the same blocks, pass by pass (a
    data-aware map's first pass shares the sets' first read). Output:
    ``OUT/result.zarr`` (universal sets, as without ``reduce``), ``OUT/embeddings.zarr``
    and one ``OUT/report.json``.
    """
    rc: ReduceConfig | None = cfg.reduce
    assert rc is not None
    rc.check(source.d)
    for sel in named.values():
        sel.check(source.n)
    out = Path(cfg.output.dir)
    overwrite = cfg.output.overwrite or args.overwrite
    check_writable(out, overwrite)
    progress = cfg.progress and not args.quiet
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        recipes: list[Recipe[Any]] = [*(selection_recipe(sel) for sel in named.values()),
                                       Embeddings(rc, tmp / "embeddings.zarr")]
        outcome = run_recipes(source, recipes, engine=cfg.engine.kind,
                              chunk_rows=cfg.engine.chunk_rows, progress=progress,
                              memory_limit=cfg.engine.memory_limit, **cfg.engine.options())
        *results, info = outcome.results
        sets = dict(zip(named, results, strict=True))
        seconds = time.perf_counter() - t0
        save_universal_sets(tmp / ".sets", sets, report={}, overwrite=True)
        os.replace(tmp / ".sets" / "result.zarr", tmp / "result.zarr")
        shutil.rmtree(tmp / ".sets")
        report = {
            "config": to_dict(cfg),
            "seconds": seconds,
            "peak_rss_bytes": peak_rss_bytes(),
            "sets": {
                name: {"size": len(u), "indices_head": u.indices[:20], "certificate": u.certificate}
                for name, u in sets.items()
            },
            "embeddings": info,
            "plan": outcome.report.as_dict(),
        }
        write_json_atomic(tmp / "report.json", report)
    say(args, f"streamattn: {len(sets)} universal set(s) + embeddings in {seconds:.1f} s -> {out}")
    for name, uset in sets.items():
        say(args, *summary_lines(name, uset))
    say(args, *quality_lines(info))
    return 0
