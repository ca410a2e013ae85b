"""Checkpoints: periodic, atomic, checksummed snapshots of operator states and position.

A pass folds blocks ``[start, stop)`` into a list of operators in a fixed order. Every
``every_blocks`` blocks or ``every_seconds`` seconds (whichever comes first), and at the
end of each pass, the :class:`Checkpointer` writes ``DIR/pass{k}.npz``: the operators'
plain-array states (``Operator.to_state``), the stream position (the next row to read),
the block size and a fingerprint of the store (path, array, shape, dtype). The file is a
plain ``np.savez`` archive written to a temporary name, fsynced and renamed over the
previous one, so a crash (SIGKILL, power loss) leaves the previous checkpoint or the new
one, never a mix. A sha256 of the payload (over the sorted array names, dtypes, shapes and
bytes) is stored inside the archive; a file whose checksum does not match, or that cannot
be read, is refused with a message naming it, never silently restarted from row 0.

Resume is exact: the restored states are the saved float64 arrays bit for bit, and the
blocks after the checkpoint have the same boundaries (the block size is recorded and
must match), so a resumed sequential pass performs the same floating-point operations as
an uninterrupted one and its result is bit-identical.

The store is checked against the fingerprint before each checkpoint and at the end of
each pass: its shape is re-read from disk, and a store that changed during the run is
refused (``InvalidInputError``). What was read is fingerprinted as well
(``streamattn.io.readlog``): each checkpoint records the XXH3-64 digest of every block folded so far
and the stamps of the store's files taken before the pass read them, and a resume first
checks that the rows ``[0, position)`` are unchanged (re-reading only blocks whose files
were touched), refusing a store rewritten in place or replaced, with the first changed
block's rows.

The Checkpointer knows nothing about algorithms: only ``to_state``, ``from_state``,
``merge`` and the spec of each operator.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.errors import (
    ConfigError,
    InvalidInputError,
    OutputWriteError,
    StateFormatError,
)
from streamattn.io.readlog import (
    BlockDigests,
    BlockDigestsSpec,
    digests_for,
    stamps_from_json,
    stamps_to_json,
    store_stamps,
    verify_read,
)
from streamattn.operators.protocol import Operator, State, specs_equal
from streamattn.progress import progress_bar

FORMAT = 4  # 2: read checksums (BlockDigests) and file stamps; 3: a KV cache's checksums
#: over its block buffer's byte order; 4: XXH3-64 block digests (3 and older: CRC-32; such
#: a record cannot be verified and is refused, see check_format)
CHECKSUM_KEY = "__sha256__"
META_KEY = "__meta__"


# ---------------------------------------------------------------------------- encoding
def state_digest(state: State) -> str:
    """sha256 over the sorted names, dtypes, shapes and raw bytes of the arrays."""
    h = hashlib.sha256()
    for key in sorted(state):
        arr = np.asarray(state[key])  # tobytes() is C order; keeps 0-d shapes
        h.update(json.dumps([key, arr.dtype.str, list(arr.shape)]).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def write_state_file(path: str | os.PathLike[str], payload: State) -> None:
    """``np.savez`` of ``payload`` plus its sha256, atomically (temp file, fsync, rename).

    Raises ``OutputWriteError`` (disk full, permission denied, ...) with the previous file
    at ``path``, if any, left intact.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = dict(payload)
    data[CHECKSUM_KEY] = np.array(state_digest(payload))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            _write_payload(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise OutputWriteError(
            f"could not write {path}: {exc.strerror or exc}. The previous version of "
            f"{path.name} (if any) is intact; free space or fix permissions and rerun."
        ) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_payload(fh: Any, data: State) -> None:
    """The one place bytes are written (tests inject disk-full errors here)."""
    np.savez(fh, **data)  # type: ignore[arg-type]


def read_state_file(path: str | os.PathLike[str]) -> State:
    """Read a file written by :func:`write_state_file`, verifying its checksum."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
    except Exception as exc:  # truncated zip, bad CRC, not an npz at all
        raise StateFormatError(
            f"{path}: corrupt or unreadable ({type(exc).__name__}: {exc}); refusing to use it. "
            "Delete it to start over from the beginning."
        ) from exc
    stored = data.pop(CHECKSUM_KEY, None)
    if stored is None or str(stored) != state_digest(data):
        raise StateFormatError(
            f"{path}: checksum mismatch (sha256 of the payload differs from the one stored "
            "in the file); the file is corrupt. Refusing to use it. Delete it to start over "
            "from the beginning."
        )
    return data


def pack_operators(ops: list[Operator], meta: dict[str, Any]) -> State:
    """Operator states under ``op{i}|`` prefixes, with a JSON ``meta`` record."""
    out: State = {META_KEY: np.array(json.dumps(meta, sort_keys=True))}
    for i, op in enumerate(ops):
        for key, value in op.to_state().items():
            out[f"op{i}|{key}"] = value
    return out


def unpack_operators(payload: State, where: Any = None) -> tuple[dict[str, Any], list[Operator]]:
    """Inverse of :func:`pack_operators`; with ``where`` (the file, for messages) a pass
    record of an older format is refused first (:func:`check_format`)."""
    meta = json.loads(str(payload[META_KEY]))
    if where is not None:
        check_format(meta, where)
    states: list[State] = [{} for _ in range(int(meta["n_ops"]))]
    for key, value in payload.items():
        if key.startswith("op"):
            index, _, name = key.partition("|")
            states[int(index[2:])][name] = value
    return meta, [Operator.from_state(s) for s in states]


# ---------------------------------------------------------------------------- the store
def current_shape(source: Any) -> tuple[int, ...]:
    """The store's shape as it is on disk now (re-read, not the cached value)."""
    fresh = getattr(source, "current_shape", None)
    if fresh is not None:
        return tuple(fresh())
    if source.path is None:
        return tuple(int(s) for s in source.keys.shape)
    path = Path(source.path)
    if path.is_file():
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    import zarr

    node: Any = zarr.open(str(path), mode="r")
    if source.array_name is not None:
        node = node[source.array_name]
    return tuple(int(s) for s in node.shape)


def fingerprint(source: Any) -> dict[str, Any]:
    """What a checkpoint must match: label, path, array, shape, dtype (and head layout)."""
    return {
        "label": source.label,
        "path": source.path,
        "array": getattr(source, "array_name", None),
        "shape": list(current_shape(source)),
        "dtype": str(source.dtype),
        "layout": getattr(source, "layout", "2d"),
    }


def check_unchanged(source: Any, expected: dict[str, Any]) -> None:
    """Refuse a store whose shape changed since ``expected`` was taken."""
    now = list(current_shape(source))
    if now != expected["shape"]:
        raise InvalidInputError(
            f"{source.label}: the store changed during the run: shape was "
            f"{tuple(expected['shape'])} when the pass started, now {tuple(now)}. "
            "Refusing to mix two versions of the data; no output was written and the last "
            "checkpoint is kept. For rows appended to a finished run use `streamattn update`."
        )


# ---------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class CheckpointConfig:
    """When to checkpoint: every ``every_blocks`` blocks or ``every_seconds`` seconds.

    ``None`` disables that trigger; a checkpoint is also written at the end of each pass.
    ``enabled: false`` writes none (no resume and no ``state.npz`` for ``update``).
    """

    enabled: bool = True
    every_blocks: int | None = None
    every_seconds: float | None = 300.0

    def check(self) -> None:
        if self.every_blocks is not None and self.every_blocks < 1:
            raise ConfigError(f"checkpoint.every_blocks must be >= 1, got {self.every_blocks}.")
        if self.every_seconds is not None and not self.every_seconds > 0:
            raise ConfigError(
                f"checkpoint.every_seconds must be > 0, got {self.every_seconds}."
            )


def checkpoint_dir_for(out: str | os.PathLike[str]) -> Path:
    """The checkpoint directory next to output ``out``: ``OUT.checkpoint``."""
    out = Path(out)
    return out.parent / f"{out.name}.checkpoint"


@dataclass
class Record:
    """A pass's saved states: position (next row), block size and store fingerprint.

    ``reads`` are the checksums of the blocks folded into ``ops`` and ``stamps`` the
    store's file stamps taken before they were read (``streamattn.io.readlog``).
    """

    ops: list[Operator]
    position: int
    chunk_rows: int
    fingerprint: dict[str, Any]
    reads: BlockDigests | None = None
    stamps: dict[str, Any] | None = None


def check_format(meta: dict[str, Any], where: Any) -> None:
    """Refuse a pass record whose read log this streamattn cannot check against the store."""
    version = int(meta.get("format", 1))
    if version < 2 or not meta.get("reads"):
        raise StateFormatError(
            f"{where}: written by an older streamattn without checksums of what was read, "
            "so an unchanged store cannot be verified. Delete it and run from scratch."
        )
    if version < FORMAT:
        raise StateFormatError(
            f"{where}: written by an older streamattn (record format {version}) whose read "
            f"log holds CRC-32 checksums of the blocks; this one (format {FORMAT}) compares "
            "XXH3-64 digests, so an unchanged store cannot be verified. Delete it and run "
            "from scratch."
        )


def split_reads(meta: dict[str, Any], ops: list[Operator], where: Any) -> Record:
    """A Record from unpacked operators whose last one is the read log (format 4)."""
    check_format(meta, where)
    reads = ops[-1]
    if not isinstance(reads, BlockDigests):
        raise StateFormatError(f"{where}: the read log is missing or corrupt.")
    return Record(
        ops[:-1],
        int(meta["position"]),
        int(meta["chunk_rows"]),
        meta["fingerprint"],
        reads,
        stamps_from_json(meta.get("stamps")),
    )


# ---------------------------------------------------------------------------- the engine hook
class Checkpointer:
    """Checkpoint and resume the passes of one run (engines call begin/step/end).

    Parameters
    ----------
    directory
        Where ``pass{k}.npz`` files go (``None``: nothing is written; final states are
        still kept in ``finals`` for ``state.npz``).
    every_blocks, every_seconds
        Triggers for periodic checkpoints (``None``: off).
    resume
        Continue from the files in ``directory``. Without it, an existing checkpoint is
        refused rather than overwritten (it may hold hours of work).
    initial
        Saved final states of earlier passes (``streamattn update``): pass ``k`` starts from
        ``initial[k]`` at its position; the store may have grown since (appended rows).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None,
        *,
        every_blocks: int | None = None,
        every_seconds: float | None = None,
        resume: bool = False,
        initial: dict[int, Record] | None = None,
    ) -> None:
        self.directory = None if directory is None else Path(directory)
        self.every_blocks = every_blocks
        self.every_seconds = every_seconds
        self.initial = dict(initial or {})
        self.finals: dict[int, Record] = {}
        self.resumed_from: dict[int, int] = {}
        #: Blocks of the saved part re-read to verify the store is unchanged, per pass.
        self.reread: dict[int, int] = {}
        #: The read log of the current pass: engines fold every block into it as well.
        self.reads = BlockDigests(BlockDigestsSpec(0))
        self._stamps: dict[str, Any] | None = None
        self._pass = -1
        if self.directory is not None and self.directory.is_symlink():
            raise ConfigError(
                f"{self.directory}: the checkpoint directory is a symlink; refusing to follow "
                "it (checkpoints are written and deleted there). Remove the link and rerun."
            )
        if self.directory is not None and self.directory.exists() and not resume:
            if any(self.directory.glob("pass*.npz")):
                raise ConfigError(
                    f"{self.directory}: holds the checkpoint of an interrupted run. Rerun with "
                    "--resume to continue it, or delete that directory to start over."
                )
        self.resume = resume

    @classmethod
    def from_config(
        cls, cfg: CheckpointConfig, out: str | os.PathLike[str], *, resume: bool = False
    ) -> Checkpointer | None:
        cfg.check()
        if not cfg.enabled:
            if resume:
                raise ConfigError("--resume needs checkpoint.enabled: true.")
            return None
        return cls(
            checkpoint_dir_for(out),
            every_blocks=cfg.every_blocks,
            every_seconds=cfg.every_seconds,
            resume=resume,
        )

    def _file(self, k: int) -> Path:
        assert self.directory is not None
        return self.directory / f"pass{k}.npz"

    def _on_disk(self, k: int) -> bool:
        return self.directory is not None and self.resume and self._file(k).exists()

    def _load(self, k: int) -> Record | None:
        if self._on_disk(k):
            meta, ops = unpack_operators(read_state_file(self._file(k)), self._file(k))
            return split_reads(meta, ops, self._file(k))
        return self.initial.get(k)

    # -- called by engines --------------------------------------------------------
    def begin(
        self, source: Any, ops: list[Operator], *, start: int, stop: int, chunk_rows: int
    ) -> int:
        """Start pass k: restore saved states into ``ops`` (in place); return the start row."""
        self._pass += 1
        self._fp = fingerprint(source)
        self._stamps = store_stamps(source)  # before anything is read (readlog)
        self._chunk_rows = int(chunk_rows)
        self._start, self._stop = start, stop
        self._blocks = 0
        self._last = time.monotonic()
        self.reads = digests_for(source, self._chunk_rows)
        rec = self._load(self._pass)
        if rec is None:
            return start
        on_disk = self._on_disk(self._pass)
        where = self._file(self._pass) if on_disk else "the saved state"
        grown = not on_disk  # a saved final state (update): rows may have been appended
        _check_record(rec, self._fp, ops, where, grown=grown)
        if not grown and rec.chunk_rows != self._chunk_rows:
            raise StateFormatError(
                f"{where}: written with blocks of {rec.chunk_rows} rows, this run uses "
                f"{self._chunk_rows}; resume with the same engine.chunk_rows."
            )
        if rec.reads is None or rec.reads.covered.as_list() != rec.ops[0].covered.as_list():
            raise StateFormatError(f"{where}: its read log does not cover the rows it holds.")
        self.reread[self._pass] = verify_read(source, rec.reads, rec.stamps, str(where))
        for op, saved in zip(ops, rec.ops, strict=True):
            op.merge(saved)  # ops are empty: this loads the saved state exactly
        self.reads = rec.reads.resized(self.reads.spec.max_blocks)
        self.resumed_from[self._pass] = rec.position
        return rec.position

    def step(self, source: Any, ops: list[Operator], position: int) -> None:
        """After a block: write a checkpoint when a trigger fires."""
        self._blocks += 1
        due = self.every_blocks is not None and self._blocks >= self.every_blocks
        due = due or (
            self.every_seconds is not None
            and time.monotonic() - self._last >= self.every_seconds
        )
        if due and self.directory is not None and position < self._stop:
            self.save(source, ops, position)

    def end(self, source: Any, ops: list[Operator], position: int) -> None:
        """After the last block: check the store, keep (and write) the final states."""
        check_unchanged(source, self._fp)
        self.finals[self._pass] = Record(
            [op.copy() for op in ops], position, self._chunk_rows, self._fp,
            self.reads.copy(), self._stamps,
        )
        if self.directory is not None:
            self.save(source, ops, position, checked=True)

    def save(self, source: Any, ops: list[Operator], position: int, *,
             checked: bool = False) -> None:
        """Write the states (after checking the store, unless the caller just did)."""
        if not checked:
            check_unchanged(source, self._fp)
        assert self.directory is not None
        payload = pack_operators([*ops, self.reads], self._meta(position, ops))
        write_state_file(self._file(self._pass), payload)
        self._blocks = 0
        self._last = time.monotonic()

    def _meta(self, position: int, ops: list[Operator]) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "pass": self._pass,
            "position": position,
            "stop": self._stop,
            "chunk_rows": self._chunk_rows,
            "fingerprint": self._fp,
            "n_ops": len(ops) + 1,
            "families": [op.family for op in ops],
            "reads": True,  # the last operator is the read log (BlockDigests)
            "stamps": stamps_to_json(self._stamps),
        }

    def discard(self) -> None:
        """Remove the checkpoint files once the output is safely written."""
        if self.directory is not None and self.directory.exists():
            shutil.rmtree(self.directory)


def _check_record(
    rec: Record, fp: dict[str, Any], ops: list[Operator], where: Any, *, grown: bool
) -> None:
    """The saved states must fit this store and these operators (same specs, same data)."""
    saved, now = rec.fingerprint, fp
    same_cols = saved["shape"][1:] == now["shape"][1:] and saved["dtype"] == now["dtype"]
    same_layout = saved.get("layout") == now.get("layout")
    if grown:
        fits = same_cols and same_layout and saved["shape"][0] <= now["shape"][0]
    else:
        fits = saved == now
    if not fits:
        raise InvalidInputError(
            f"{where} was made from {saved['label']} with shape {tuple(saved['shape'])}, "
            f"dtype {saved['dtype']}; the store is now {now['label']} with shape "
            f"{tuple(now['shape'])}, dtype {now['dtype']}. Refusing to combine them."
        )
    pairs = zip(rec.ops, ops, strict=False)
    if len(rec.ops) != len(ops) or not all(
        type(a) is type(b) and specs_equal(a.spec, b.spec) for a, b in pairs
    ):
        raise StateFormatError(
            f"{where} was written for other operators or settings "
            f"({[op.family for op in rec.ops]}); rerun with the same config, or delete the "
            "checkpoint to start over."
        )


# ---------------------------------------------------------------------------- other engines
#: Blocks per segment of a checkpointed run on an engine that merges partial states.
DEFAULT_SEGMENT_BLOCKS = 256


class RowWindow:
    """``source`` restricted to rows ``[start, stop)``, with global row numbers.

    ``block_ranges`` yields only the window's blocks; ``keys``/``values`` are the window's
    rows, sliced once when first asked for (an engine that reads the store by path, e.g. Dask
    workers, never touches them: slicing a zarr array would read the whole segment on
    the client); everything else (``n``, path, dtype, ``read``) is the source's, so
    blocks keep their global ``start``.
    """

    def __init__(self, source: Any, start: int, stop: int) -> None:
        self._source = source
        self._start, self._stop = start, stop

    # Sliced on first access, never at construction: slicing a zarr array reads it, and a
    # store on disk is read by the engine's workers themselves (by path), not the client.
    @cached_property
    def keys(self) -> Any:
        keys = getattr(self._source, "keys", None)
        return None if keys is None else keys[self._start : self._stop]

    @cached_property
    def values(self) -> Any:
        values = getattr(self._source, "values", None)
        return None if values is None else values[self._start : self._stop]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def block_ranges(
        self, chunk_rows: int | None = None, start: int | None = None, stop: int | None = None
    ) -> list[tuple[int, int]]:
        a = self._start if start is None else max(start, self._start)
        b = self._stop if stop is None else min(stop, self._stop)
        return self._source.block_ranges(chunk_rows, a, b)


def run_segmented(
    source: Any,
    ops: list[Operator],
    checkpoint: Checkpointer,
    run_pass: Any,
    *,
    chunk_rows: int | None,
    progress: bool = False,
    description: str = "pass",
) -> list[Operator]:
    """A checkpointed pass on an engine that merges partial states (e.g. Dask).

    The blocks are cut into segments of ``checkpoint.every_blocks`` blocks (default
    ``DEFAULT_SEGMENT_BLOCKS``); ``run_pass(window, empty_ops)`` folds one segment on the
    engine (a tree of partial states), its merged state is folded into ``ops`` on the
    client, and a checkpoint is written after every segment. A resumed run skips the
    completed segments: the granularity of resume is one segment of completed partial
    states; the progress bar advances by segment. Segment boundaries depend only on the
    block size and ``every_blocks``, so a resumed run merges in the same order as an
    uninterrupted one (same result, bit for bit, for a deterministic engine merge tree).
    """
    rows = source.rows_per_block(chunk_rows)
    start = checkpoint.begin(source, ops, start=0, stop=source.n, chunk_rows=rows)
    seg = rows * (checkpoint.every_blocks or DEFAULT_SEGMENT_BLOCKS)
    with progress_bar(source.n - start, description, enabled=progress) as bar:
        for a in range(start, source.n, seg):
            b = min(a + seg, source.n)
            partial = run_pass(
                RowWindow(source, a, b), [op.empty() for op in ops] + [checkpoint.reads.empty()]
            )
            for op, part in zip([*ops, checkpoint.reads], partial, strict=True):
                op.merge(part)
            bar.update(b - a)
            if b < source.n and checkpoint.directory is not None:
                checkpoint.save(source, ops, b)
    checkpoint.end(source, ops, source.n)
    return ops
