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
from streamattn.engines import run_operators
from streamattn.io.checkpoint import Checkpointer
from streamattn.io.outputs import atomic_dir, check_writable, claim_output, write_json_atomic
from streamattn.memory import peak_rss_bytes
from streamattn.recipes.embeddings import (
    ReduceConfig,
    build_map,
    create_embeddings_array,
    finish_embeddings,
    projection_operator,
)
from streamattn.recipes.selection import Selection
from streamattn.recipes.universal import save_universal_sets, universal_sets
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
            checkpoint=Checkpointer.from_config(cfg.checkpoint, out, resume=args.resume),
            n_heads=cfg.input.n_heads,
            array=cfg.input.array,
            keep_mask=cfg.output.keep_mask,
            per_head=cfg.output.per_head,
            save_state=cfg.output.save_state,
        )
    return 0


def run_select_and_reduce(
    args: argparse.Namespace, cfg: RunConfig, source: KeySource, named: dict[str, Selection]
) -> int:
    """``streamattn run`` with both ``select`` and ``reduce``: one shared read of the store.

    Universal sets and embeddings are folded from the same blocks (data-aware maps take
    one extra pass first). Output: ``OUT/result.zarr`` (universal sets, as without
    ``reduce``), ``OUT/embeddings.zarr`` and one ``OUT/report.json``.
    """
    rc: ReduceConfig | None = cfg.reduce
    assert rc is not None
    rc.check(source.d)
    out = Path(cfg.output.dir)
    overwrite = cfg.output.overwrite or args.overwrite
    check_writable(out, overwrite)
    rows = cfg.engine.chunk_rows or source.default_chunk_rows()
    progress = cfg.progress and not args.quiet
    run = dict(engine=cfg.engine.kind, chunk_rows=rows, progress=progress)
    run.update(cfg.engine.options())
    t0 = time.perf_counter()
    pmap, map_info = build_map(source, rc, **run)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        out_path = create_embeddings_array(tmp / "embeddings.zarr", source.n, rc.m, rows, rc.dtype)
        also: list[Any] = [projection_operator(pmap, out_path, rc)]
        if any(sel.p != 2 for sel in named.values()):  # Lewis-weight passes: a separate read
            results = universal_sets(source, list(named.values()), **run)
            also = run_operators(source, also, description="reduce", **run)
        else:
            results = universal_sets(source, list(named.values()), also=also, **run)
        info = finish_embeddings(tmp / "embeddings.zarr", source, also[0].result(), rc, map_info)
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
        }
        write_json_atomic(tmp / "report.json", report)
    say(args, f"streamattn: {len(sets)} universal set(s) + embeddings in {seconds:.1f} s -> {out}")
    for name, uset in sets.items():
        say(args, *summary_lines(name, uset))
    say(args, *quality_lines(info))
    return 0
