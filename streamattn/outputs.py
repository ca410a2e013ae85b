"""Outputs: zarr groups with provenance attributes, report.json, atomic writes.

Every output directory is built under a temporary name beside its destination and
renamed into place only when complete, so a crash leaves either the previous output or
the new one, never a half-written mix. An existing output is replaced only with
``overwrite=True``; inputs are never written.
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

from streamattn.errors import OutputExistsError


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


def check_writable(out: Path, overwrite: bool) -> None:
    """Refuse early (before any work) to overwrite an existing output."""
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"{out}: output already exists; choose another path or pass overwrite "
            "(CLI: --overwrite) to replace it atomically."
        )


@contextmanager
def atomic_dir(out: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``out`` when the block succeeds."""
    out = Path(out)
    check_writable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        check_writable(out, overwrite)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
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
