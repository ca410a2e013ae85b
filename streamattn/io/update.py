"""Appended tokens: fold rows added to a store since a run into its saved result.

A run's output keeps the final operator states of its one-pass universal sets in
``OUT/state.npz`` (checksummed, see :mod:`streamattn.io.checkpoint`), with the row count,
block size, store fingerprint and the selections. ``streamattn update OUT --input STORE``
reads that state, checks that the store only grew (same width, dtype and head layout,
at least as many rows), folds rows ``[n_old, n_new)`` into the saved states and rewrites
``OUT`` atomically: rows ``[0, n_old)`` are not read again.

Why this is exact: the one-pass state (the TSQR factor R of all rows and the candidate
rows whose score can still reach the threshold) is a mergeable summary of the rows it
covers (``Operator.merge``), so folding the new rows into it gives the state a fresh pass
over all ``n_new`` rows would have, up to float rounding of the different block
boundaries: the same index sets (except rows whose score is within rounding of the
threshold) and scores equal to ~1e-12 relative.

Budget mode is honest about its cost: when the top-B cannot be certified from the
one-pass state, the second pass (top-B by the final scoring map) needs every row again,
so it rereads the whole store; the report says so (``update.second_pass_reread_rows``).
The store must only have grown: ``state.npz`` also records the XXH3-64 digest of every block
folded into it and the stamps of the store's files (``streamattn.io.readlog``), and the
update first verifies that rows ``[0, n_old)`` are unchanged — re-reading only blocks
whose files were written since (for an appended store, the last partial chunk) — so a
store rewritten in place, or another store of the same width, is refused with the first
changed block's rows. The output is locked for the whole update (``streamattn.io.safety``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamattn.errors import InvalidInputError, StateFormatError
from streamattn.io.checkpoint import (
    FORMAT,
    Checkpointer,
    pack_operators,
    read_state_file,
    split_reads,
    unpack_operators,
    write_state_file,
)
from streamattn.io.readlog import stamps_to_json, verify_read
from streamattn.io.safety import output_lock, refuse_overlap

STATE_FILE = "state.npz"


def state_writer(
    checkpoint: Checkpointer | None,
    named: dict[str, Any],
    *,
    array: str | None,
    n_heads: int | None,
) -> Callable[[Path], None] | None:
    """A function writing ``state.npz`` into the output being built (None: nothing kept).

    The state is pass 1's final operator states as recorded by ``checkpoint``.
    """
    if checkpoint is None or 0 not in checkpoint.finals:
        return None
    rec = checkpoint.finals[0]
    meta = {
        "format": FORMAT,
        "reads": rec.reads is not None,
        "stamps": stamps_to_json(rec.stamps),
        "n_ops": len(rec.ops) + (rec.reads is not None),
        "position": rec.position,
        "chunk_rows": rec.chunk_rows,
        "fingerprint": rec.fingerprint,
        "array": array,
        "n_heads": n_heads,
        # a list: the order must match the operators' (the meta JSON sorts dict keys)
        "selections": [[name, dataclasses.asdict(sel)] for name, sel in named.items()],
    }
    if len(rec.ops) != len(named):
        return None  # a run whose pass 1 is not one operator per selection (e.g. l_p sets)

    ops = [*rec.ops, rec.reads] if rec.reads is not None else rec.ops

    def write(tmp: Path) -> None:
        write_state_file(tmp / STATE_FILE, pack_operators(ops, meta))

    return write


def load_state(out: str | Path) -> tuple[dict[str, Any], list[Any]]:
    """The saved meta record and pass-1 operators of output ``out``."""
    path = Path(out) / STATE_FILE
    if not path.exists():
        raise InvalidInputError(
            f"{path}: not found. `streamattn update` needs the final operator states that "
            "`streamattn run`/`select` save with checkpoint.enabled: true (p = 2 universal "
            "sets); rerun once to create them."
        )
    try:
        return unpack_operators(read_state_file(path), path)
    except (KeyError, ValueError, json.JSONDecodeError) as exc:
        if isinstance(exc, StateFormatError):
            raise
        raise StateFormatError(f"{path}: not a streamattn state file ({exc}).") from exc


def update_output(
    out: str | Path,
    store: Any,
    *,
    progress: bool = False,
    engine: str = "local",
    **engine_options: Any,
) -> dict[str, Any]:
    """Fold the rows appended to ``store`` since ``out`` was written; rewrite ``out``.

    Returns ``{"sets": {name: UniversalSet}, "report": {...}}``; ``sets`` is empty when no
    rows were appended (then nothing is rewritten).
    """
    with output_lock(out):
        return _update_output(out, store, progress=progress, engine=engine, **engine_options)


def _update_output(
    out: str | Path, store: Any, *, progress: bool, engine: str, **engine_options: Any
) -> dict[str, Any]:
    from streamattn.recipes.selection import Selection
    from streamattn.recipes.universal import save_universal_sets, universal_sets
    from streamattn.results import flatten_results
    from streamattn.sources import open_source

    meta, ops = load_state(out)
    source = open_source(store, array=meta["array"],
                         n_heads=meta.get("n_heads", meta.get("heads")))
    refuse_overlap(out)
    saved = split_reads(meta, ops, Path(out) / STATE_FILE)
    n_old, n_new = saved.position, source.n
    if n_new < n_old:
        raise InvalidInputError(
            f"{source.label}: has {n_new} rows, fewer than the {n_old} rows folded into "
            f"{out}; rows were removed or the store was replaced. Run from scratch instead."
        )
    report: dict[str, Any] = {"update": {"rows_before": n_old, "rows_after": n_new}}
    if n_new == n_old:  # nothing to fold, but say "up to date" only for the same rows
        if saved.reads is not None:
            verify_read(source, saved.reads, saved.stamps, f"{Path(out) / STATE_FILE}")
        return {"sets": {}, "report": report}
    named = {name: Selection(**fields) for name, fields in meta["selections"]}
    ckpt = Checkpointer(None, initial={0: saved})
    t0 = time.perf_counter()
    results = universal_sets(
        source,
        list(named.values()),
        chunk_rows=saved.chunk_rows,
        engine=engine,
        progress=progress,
        checkpoint=ckpt,
        **engine_options,
    )
    sets = flatten_results(list(named), results)
    second = any(u.certificate["passes"] == 2 for u in sets.values())
    report["update"].update(
        {
            "rows_read_pass1": n_new - n_old,
            "second_pass_reread_rows": n_new if second else 0,
            "note": "pass 1 folded only the appended rows into the saved state"
            + ("; budget mode's second pass reread every row" if second else ""),
        }
    )
    report.update(
        {
            "seconds": time.perf_counter() - t0,
            "sets": {
                name: {"size": len(u), "indices_head": u.indices[:20],
                       "certificate": u.certificate}
                for name, u in sets.items()
            },
        }
    )
    writer = state_writer(ckpt, named, array=meta["array"], n_heads=meta.get("n_heads"))
    save_universal_sets(out, sets, report=report, overwrite=True, extra=writer)
    return {"sets": sets, "report": report}


__all__ = ["STATE_FILE", "load_state", "state_writer", "update_output"]
