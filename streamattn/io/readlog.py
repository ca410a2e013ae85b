"""What a pass read: per-block checksums and file stamps, to refuse a changed store.

A checkpoint (or an output's ``state.npz`` for ``streamattn update``) stands for the rows
``[0, position)`` as they were when the pass read them. Resuming or updating from it is
only correct if those rows are still the same. So the pass records, alongside its
operator states:

- :class:`BlockDigests`, an operator folded with the others (so it runs wherever the
  blocks are read, Dask workers included): the XXH3-64 digest of each block's key bytes
  (and value bytes), keyed by the block's row range. Cost: one pass of ``xxhash`` over
  the bytes already in memory, in the reader thread without the GIL (about 29 GB/s
  here; zlib's CRC-32, used up to checkpoint format 3, ran at 4.7 GB/s).
- the **stamps** ``(size, mtime_ns, ctime_ns, inode)`` of every file of the store
  (``streamattn.sources.chunkfiles``), taken *before* the pass reads anything.

:func:`verify_read` runs before a resume or an update folds anything: for each recorded
block, if every file holding its rows still has its recorded stamp, the block is
unchanged (a write, a replace or a rename changes the ctime, which no user can set);
otherwise the rows are read again and their digest compared. The first block whose digest
differs is refused with its row range. So a store rewritten in place or replaced by
another of the same shape is detected; the cost is one ``stat`` per chunk file, plus a
re-read of only the blocks whose files were touched (for an appended store, the last
partially filled chunk). Stores that are not files on local disk (in-memory or remote
arrays) have no stamps: every recorded block is re-read and checked.

What is not promised: XXH3-64 (a fast non-cryptographic hash) misses a change of a
re-read block with probability about 2⁻⁶⁴ (it guards against accidents, not against a
forger); a file changed without its ctime changing (a raw device write, a reset clock)
is not re-read. Blocks are digested as the engine cut them, so digests are comparable
only for the same block size (which resume and update already require).
"""

from __future__ import annotations

from typing import Any

from streamattn.errors import InvalidInputError
from streamattn.operators.block_digests import (
    BlockDigests,
    BlockDigestsSpec,
    block_digest,
    digests_for,
)
from streamattn.sources.chunkfiles import Stamp, stamp


def store_stamps(source: Any) -> dict[str, Stamp] | None:
    """Stamps of every file holding the store's rows (None: not files on local disk)."""
    files = _row_files(source, 0, int(source.n))
    if files is None:
        return None
    out: dict[str, Stamp] = {}
    for f in files:
        st = stamp(f)
        if st is not None:
            out[f] = st
    return out


def _row_files(source: Any, start: int, stop: int) -> list[str] | None:
    fn = getattr(source, "row_files", None)
    return None if fn is None else fn(start, stop)


def stamps_to_json(stamps: dict[str, Stamp] | None) -> Any:
    return None if stamps is None else {k: list(v) for k, v in stamps.items()}


def stamps_from_json(data: Any) -> dict[str, Stamp] | None:
    if data is None:
        return None
    return {str(k): (int(v[0]), int(v[1]), int(v[2]), int(v[3])) for k, v in data.items()}


def verify_read(
    source: Any,
    digests: BlockDigests,
    stamps: dict[str, Stamp] | None,
    where: str,
) -> int:
    """Refuse when a block recorded in ``digests`` no longer has the same bytes.

    ``stamps``: the file stamps recorded when the pass started (None: re-read all).
    Returns the number of blocks that had to be re-read. Raises ``InvalidInputError``
    naming the first changed block's rows.
    """
    reread = 0
    now: dict[str, Stamp | None] = {}
    for start, stop, digest in digests.result():
        if stop > source.n:
            raise InvalidInputError(
                f"{source.label}: {where} covers rows [{start}, {stop}), but the store has "
                f"only {source.n} rows now; the store was replaced or truncated."
            )
        files = _row_files(source, start, stop) if stamps is not None else None
        if files is not None and stamps is not None:
            for f in files:
                if f not in now:
                    now[f] = stamp(f)
            if all(stamps.get(f) is not None and now[f] == stamps.get(f) for f in files):
                continue  # no file holding these rows was written since they were read
        reread += 1
        got = block_digest(source.read(start, stop))
        if got != digest:
            raise InvalidInputError(
                f"{source.label}: rows [{start}, {stop}) changed since {where} was written "
                f"(XXH3-64 of the rows read then {digest:016x}, now {got:016x}): the store was "
                "rewritten in place or replaced. Refusing to combine two versions of the "
                "data; run from scratch (delete the checkpoint, or rerun without update)."
            )
    return reread


__all__ = [
    "BlockDigests",
    "BlockDigestsSpec",
    "block_digest",
    "digests_for",
    "stamps_from_json",
    "stamps_to_json",
    "store_stamps",
    "verify_read",
]
