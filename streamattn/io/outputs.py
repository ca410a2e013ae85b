"""Outputs: zarr groups with provenance attributes, report.json, atomic writes.

Every output directory is built under a temporary name beside its destination and
renamed into place only when complete, so a crash leaves either the previous output or
the new one, never a half-written mix (a kill inside the two-rename swap is repaired by
the next writer: ``streamattn.io.safety``). An existing output is replaced only with
``overwrite=True`` and only when it carries streamattn's output marker; an output path
that is, contains or lies inside an input is refused; one process at a time writes an
output (a lock beside it). New files and directories get the permissions the umask
gives (not mkdtemp's 0700 / mkstemp's 0600).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.io import safety


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, tuples and paths to plain JSON types (NaN -> None)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def check_writable(
    out: Path, overwrite: bool, *, what: str = "output",
    inputs: list[str | os.PathLike[str]] | None = None,
) -> None:
    """Refuse early (before any work): an output over/inside/around an input (the opened
    ones, and ``inputs`` not opened yet), or an existing output without ``overwrite`` or
    without streamattn's marker."""
    safety.refuse_overlap(out, what=what, inputs=inputs)
    safety.check_replaceable(out, overwrite)


@contextmanager
def claim_output(out: str | os.PathLike[str], overwrite: bool) -> Iterator[Path]:
    """Hold output ``out`` for a whole command: its pass, checkpoints and final swap.

    Checked before anything is created: ``out`` and its checkpoint directory
    (``OUT.checkpoint``) must not be, contain or lie inside an input, and an existing
    ``out`` must be replaceable. Then the lock is taken (another writer gets one clear
    line) and the leftovers of a killed writer are repaired.
    """
    out = Path(out)
    check_writable(out, overwrite)
    safety.refuse_overlap(out.parent / f"{out.name}.checkpoint", what="checkpoint")
    with safety.output_lock(out):
        safety.check_replaceable(out, overwrite)  # recovery may have restored it
        yield out


@contextmanager
def atomic_dir(out: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``out`` when the block succeeds.

    Holds the output's lock throughout; the directory gets the output marker and the
    umask's permissions.
    """
    out = Path(out)
    check_writable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with safety.output_lock(out):
        check_writable(out, overwrite)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            os.chmod(tmp, safety.umask_mode(directory=True))
            yield tmp
            safety.write_marker(tmp)
            check_writable(out, overwrite)
            old = None
            if out.exists() or out.is_symlink():
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                os.replace(out, old)
            os.replace(tmp, out)  # a kill before this line: the next writer restores `old`
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, safety.umask_mode(directory=False))
        with os.fdopen(fd, "w") as fh:
            json.dump(to_jsonable(obj), fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_arrays(
    group: Any,
    arrays: dict[str, np.ndarray | None],
    attrs: dict[str, Any],
    dims: dict[str, list[str]] | None = None,
) -> None:
    """Write named arrays (None skipped) into a zarr group and set its attributes.

    Every array gets zarr v3 ``dimension_names`` (``dims[name]``, else ``name_0, ...``)
    so ``xarray.open_zarr`` opens the group.
    """
    for name, arr in arrays.items():
        if arr is None:
            continue
        arr = np.ascontiguousarray(arr)
        chunks = tuple(max(1, min(s, 65536)) for s in arr.shape) if arr.ndim else ()
        names = (dims or {}).get(name) or [f"{name}_{i}" for i in range(arr.ndim)]
        group.create_array(name, data=arr, chunks=chunks or "auto",
                           dimension_names=names if arr.ndim else None)
    group.attrs.update(to_jsonable(attrs))
