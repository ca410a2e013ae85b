"""What every command shares: the engine flags (one parent parser), printing, saving sets."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from streamattn.config import EngineConfig
from streamattn.engines import ENGINES
from streamattn.io.checkpoint import Checkpointer
from streamattn.io.outputs import check_writable
from streamattn.io.update import state_writer
from streamattn.memory import peak_rss_bytes
from streamattn.recipes.selection import Selection
from streamattn.recipes.universal import save_universal_sets, universal_sets_outcome
from streamattn.results import MultiHeadResult, UniversalSet, flatten_results


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` after every option that has a real default (not None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.help is None:
            return action.help
        return super()._get_help_string(action)


def say(args: argparse.Namespace, *lines: str) -> None:
    """Print ``lines`` unless ``--quiet``."""
    if not getattr(args, "quiet", False):
        for line in lines:
            print(line)


def summary_lines(name: str, uset: UniversalSet) -> list[str]:
    """Two lines per universal set: size, bound, variant, passes, rank; first indices."""
    c = uset.certificate
    head = uset.indices[:10].tolist()
    more = " ..." if len(uset) > 10 else ""
    bound = f", bound rank/eps = {c['size_bound']:.0f}" if "size_bound" in c else ""
    return [
        f"  {name}: |U| = {len(uset)}{bound}  (variant {c['variant']}, mode {c['mode']}, "
        f"passes {c['passes']}, rank {c['numerical_rank']} at rtol {c['rank_rtol']:g})",
        f"    indices {head}{more}",
    ]


def quality_lines(info: dict[str, Any]) -> list[str]:
    """Two lines on reduced embeddings: shape and method, measured logit/attention error."""
    q = info["quality"]
    return [
        f"  embeddings: {info['n']} x {info['m']} ({info['map']['method']}), "
        f"passes {info['map']['passes']}",
        f"    logit error max {q['logit_error_max']:.4f} mean {q['logit_error_mean']:.4f}; "
        f"attention TV max {q['attention_tv_max']:.4f} mean {q['attention_tv_mean']:.4f} "
        f"({q['queries']} queries: {q['query_source']}, {q['keys']} keys)",
    ]


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


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


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The engine flags of every command that reads a store.

    Each flag overrides the matching key of the config's ``engine:`` section (commands
    without a config start from ``EngineConfig()``: local engine, storage-aligned blocks).
    """
    g = p.add_argument_group("engine (override the config's engine: section)")
    g.add_argument("--engine", choices=list(ENGINES), help="engine (default: config, else local)")
    g.add_argument("--scheduler", help="dask: threads, local-cluster or tcp://host:port "
                   "(default: threads)")
    g.add_argument("--n-workers", type=int, help="dask local-cluster: worker processes")
    g.add_argument("--threads-per-worker", type=int, help="dask: threads per worker")
    g.add_argument("--split-every", type=int, help="dask: fan-in of the merge tree (default 8)")
    g.add_argument("--blocks-per-task", type=int, help="dask: blocks folded per leaf task")
    g.add_argument("--retries", type=int, help="dask: retries of a failed task (default 2)")
    g.add_argument("--timeout", type=float,
                   help="dask: seconds to reach the scheduler (default 30)")
    g.add_argument("--no-dashboard", action="store_true", help="dask: no LocalCluster dashboard")
    g.add_argument("--memory-limit", help="refuse a plan whose projected peak (operator "
                   "bounds + blocks in flight) exceeds this, before any read: bytes or e.g. "
                   "4GiB")


def _size(text: str | None) -> int | str | None:
    """``--memory-limit``: plain digits are bytes, anything else a size such as ``4GiB``."""
    return int(text) if text is not None and text.isdigit() else text


def engine_from_args(base: EngineConfig, args: argparse.Namespace) -> EngineConfig:
    """``base`` with the engine flags that were given on the command line, checked."""
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
        "memory_limit": _size(args.memory_limit),
    }
    out = dataclasses.replace(base, **{k: v for k, v in flags.items() if v is not None})
    out.check()
    return out


def _cache_writer(
    caches: dict[str, MultiHeadResult], n: int, keep_mask: bool, then: Any
) -> Any:
    """``extra`` for ``save_universal_sets``: stacked cache selections, then ``then``."""
    if not caches:
        return then

    def write(tmp: Path) -> None:
        import zarr

        from streamattn.io.cache_outputs import write_cache_selection

        root = zarr.open_group(str(tmp / "result.zarr"), mode="a")
        for name, res in caches.items():
            write_cache_selection(root, name, res, n=n, keep_mask=keep_mask)
        if then is not None:
            then(tmp)

    return write


def compute_and_save(
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
    memory_limit: int | str | None = None,
    checkpoint: Checkpointer | None = None,
    n_heads: int | None = None,
    array: str | None = None,
    keep_mask: bool = False,
    per_head: bool = False,
    save_state: bool = False,
) -> dict[str, UniversalSet]:
    """Universal sets of ``named`` selections written to ``out`` (with state.npz), summarised."""
    check_writable(out, overwrite)
    t0 = time.perf_counter()
    outcome = universal_sets_outcome(
        source,
        list(named.values()),
        chunk_rows=chunk_rows,
        engine=engine,
        progress=progress,
        checkpoint=checkpoint,
        memory_limit=memory_limit,
        **(engine_options or {}),
    )
    results = outcome.results
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
        "plan": outcome.report.as_dict(),
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
            say(args, f"streamattn: pass {k + 1} resumed from its checkpoint at row {row}")
        checkpoint.discard()  # the output (with state.npz) now holds everything
    say(args, f"streamattn: {len(sets)} universal set(s) in {seconds:.1f} s -> {out}")
    for name, uset in sets.items():
        say(args, *summary_lines(name, uset))
    say(args, "  guarantee: x^2 / (x+c)^2 attention only; softmax coverage must be measured.")
    return sets
