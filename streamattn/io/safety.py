"""What keeps outputs from harming inputs and from being lost: the output guard.

Four promises, each checked by a test (docs/reliability.md lists them):

- **Inputs are never written.** Every store opened for reading registers its path
  (:func:`register_input`). An output or checkpoint path that *is*, *contains* or *lies
  inside* a registered input — compared after resolving symlinks and ``..`` — is refused
  before any work (:func:`refuse_overlap`).
- **Only streamattn's own outputs are replaced.** Every output directory carries a marker
  file (:data:`MARKER`); ``overwrite`` replaces an existing directory only when it has
  that marker, so a mistyped ``--out`` (or a config's default ``overwrite: true``) never
  deletes a directory that streamattn did not write.
- **One writer per output.** :func:`output_lock` takes an exclusive ``fcntl.flock`` on
  ``.OUT.lock`` beside the output for as long as a command works on ``OUT`` (its pass,
  its checkpoints, the final swap). A second process gets one clear line naming the
  holder's pid. The lock is per process and re-entrant (nested holders in one process
  share it); the OS releases it when the process dies, so a killed run never leaves a
  stale lock. The last holder removes the lock file before releasing it; a waiter that
  then wins the flock of the unlinked file sees that the path names another file (or
  none) and retries, so removal never lets two writers in.
- **A replace is crash-safe.** ``atomic_dir`` (``streamattn.io.outputs``) builds the new
  output in ``.OUT.tmp-PID-*`` and swaps it in with two renames (``OUT`` →
  ``.OUT.old-PID``, tmp → ``OUT``). A kill between them leaves no ``OUT``; the next
  writer of ``OUT`` (which holds the lock, so no other writer is alive) finds the
  ``.OUT.old-*`` directory and renames it back (:func:`recover_interrupted`), or deletes
  it when the new ``OUT`` is in place, and removes the ``.OUT.tmp-*`` directories of
  dead runs. It says what it did on stderr.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from streamattn.errors import OutputExistsError, OutputLockedError, OutputWriteError
from streamattn.memory import proc_field

#: The file that marks a directory as a streamattn output (JSON: version, pid, time).
MARKER = ".streamattn-output"

_INPUTS: dict[str, str] = {}  # resolved path -> how it was named
_HELD: dict[str, list[int]] = {}  # lock file -> [fd, depth]
_GUARD = threading.Lock()


# ---------------------------------------------------------------------------- paths
def resolved(path: str | os.PathLike[str]) -> Path:
    """``path`` with symlinks and ``..`` resolved (non-existing tails kept as written)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def register_input(path: str | os.PathLike[str]) -> None:
    """Record that ``path`` is read as an input in this process (outputs must avoid it)."""
    with _GUARD:
        _INPUTS[str(resolved(path))] = os.fspath(path)


def registered_inputs() -> dict[str, str]:
    """The inputs registered so far: resolved path -> the path as given."""
    with _GUARD:
        return dict(_INPUTS)


def _related(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "contains"
    return None


def refuse_overlap(
    out: str | os.PathLike[str],
    *,
    what: str = "output",
    inputs: list[str | os.PathLike[str]] | None = None,
) -> None:
    """Refuse an output path that is, contains or lies inside an input (resolved).

    ``inputs`` adds paths to the registered ones (e.g. a config's input path before it
    is opened).
    """
    target = resolved(out)
    known = registered_inputs()
    for extra in inputs or []:
        known[str(resolved(extra))] = os.fspath(extra)
    for real, given in sorted(known.items()):
        how = _related(target, Path(real))
        if how is not None:
            shown = f"{out} (resolved: {target})" if str(target) != os.fspath(out) else str(out)
            raise OutputExistsError(
                f"{what} {shown} {how} the input {given}; streamattn never writes into, over "
                f"or around an input store. Choose an {what} path outside {given}."
            )


# ---------------------------------------------------------------------------- the marker
def _is_zarr_root(directory: Path) -> bool:
    return any((directory / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray"))


def write_marker(directory: str | os.PathLike[str], info: dict[str, Any] | None = None) -> None:
    """Mark ``directory`` as a streamattn output.

    A plain directory gets the :data:`MARKER` file; a directory that is itself a zarr
    array or group (``generate``'s stores) gets the same record as its ``MARKER``
    attribute instead, since zarr refuses unknown files among its members.
    """
    import streamattn

    body = {"streamattn": streamattn.__version__, "pid": os.getpid(), "time": time.time()}
    body.update(info or {})
    d = Path(directory)
    if _is_zarr_root(d):
        import zarr

        root: Any = zarr.open(str(d), mode="r+")
        root.attrs[MARKER] = body
        return
    with open(d / MARKER, "w") as fh:
        json.dump(body, fh, sort_keys=True)
        fh.write("\n")


def is_streamattn_output(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory carrying the streamattn output marker."""
    p = Path(path)
    if not p.is_dir() or p.is_symlink():
        return False
    if (p / MARKER).is_file():
        return True
    if _is_zarr_root(p):
        try:
            import zarr

            return MARKER in zarr.open(str(p), mode="r").attrs
        except Exception:
            return False
    return False


def check_replaceable(out: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse to replace ``out`` unless ``overwrite`` and it is a streamattn output."""
    p = Path(out)
    if not (p.exists() or p.is_symlink()):
        return
    if not overwrite:
        raise OutputExistsError(
            f"{out}: output already exists; choose another path or pass overwrite "
            "(CLI: --overwrite) to replace it atomically."
        )
    if not is_streamattn_output(p):
        kind = "a symlink" if p.is_symlink() else ("a file" if p.is_file() else "a directory")
        raise OutputExistsError(
            f"{out}: exists and is {kind} that streamattn did not write (no {MARKER} marker); "
            "overwrite only replaces earlier streamattn outputs. Delete it yourself or "
            "choose another path."
        )


# ---------------------------------------------------------------------------- permissions
def current_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    listed = proc_field("/proc/self/status", "Umask")
    if listed is not None:
        return int(listed, 8)
    with _GUARD:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def umask_mode(directory: bool) -> int:
    """The mode a new file (0666) or directory (0777) gets under the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


# ---------------------------------------------------------------------------- the lock
def lock_path(out: str | os.PathLike[str]) -> Path:
    """``.OUT.lock`` beside ``OUT``."""
    p = Path(out)
    return p.parent / f".{p.name}.lock"


@contextmanager
def output_lock(out: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the exclusive lock of output ``out`` (re-entrant within this process).

    On first acquisition the leftovers of interrupted writers are recovered
    (:func:`recover_interrupted`). Raises :class:`OutputLockedError` when another
    process holds it.
    """
    path = lock_path(out)
    key = str(resolved(path))
    with _GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
            first = False
        else:
            fd = _acquire(path, out)
            _HELD[key] = [fd, 1]
            first = True
    try:
        if first:
            recover_interrupted(out)
        yield
    finally:
        with _GUARD:
            entry = _HELD[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[key]
                _release(path, entry[0])


def _release(path: Path, fd: int) -> None:
    """Remove the lock file, then drop the flock (closing ``fd`` releases it).

    Unlinking while still holding the lock is what makes removal safe: a process that
    opened the old file and waits for it re-checks, once it holds the flock, that the path
    still names that file (:func:`_acquire`), and retries on a fresh one if not.
    """
    try:
        if _same_file(path, fd):
            path.unlink()
    except OSError:
        pass  # a lock file that cannot be removed is harmless: it is only ever flocked
    finally:
        os.close(fd)


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = path.stat(follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _acquire(path: Path, out: str | os.PathLike[str]) -> int:
    """Open ``path`` and take its flock; retried while a releasing holder unlinks it."""
    while True:
        fd = _acquire_once(path, out)
        if _same_file(path, fd):
            break
        os.close(fd)  # the file we locked was unlinked by its last holder: use the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _acquire_once(path: Path, out: str | os.PathLike[str]) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputWriteError(
                f"{path}: the lock file of {out} is a symlink; refusing to follow it. "
                "Remove it and rerun."
            ) from exc
        raise OutputWriteError(
            f"cannot create the lock file {path} for {out}: {exc.strerror or exc}."
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise OutputLockedError(
                f"{out}: another streamattn process (pid {holder}) is writing this output "
                f"(lock {path}); wait for it to finish or choose another output path."
            ) from exc
        raise OutputWriteError(f"cannot lock {path}: {exc.strerror or exc}.") from exc
    return fd


def holds_lock(out: str | os.PathLike[str]) -> bool:
    """Whether this process holds the lock of ``out``."""
    with _GUARD:
        return str(resolved(lock_path(out))) in _HELD


# ---------------------------------------------------------------------------- recovery
def _note(message: str) -> None:
    print(f"streamattn: {message}", file=sys.stderr)


def recover_interrupted(out: str | os.PathLike[str]) -> list[str]:
    """Undo what a killed writer of ``out`` left behind; call with the lock held.

    - no ``OUT`` but a ``.OUT.old-*`` directory: the kill came between the two renames
      of a replace; the previous result is renamed back to ``OUT``;
    - ``OUT`` and a ``.OUT.old-*``: the replace finished but its cleanup did not; the old
      copy is deleted;
    - ``.OUT.tmp-*`` directories (and checkpoint temporaries ``.pass*.npz.tmp-*``): half
      written by a dead run (the lock proves no live writer owns them); deleted.

    Returns one line per action (also printed on stderr).
    """
    p = Path(out)
    parent = p.parent
    if not parent.is_dir():
        return []
    done: list[str] = []
    olds = sorted(
        (q for q in parent.glob(f".{p.name}.old-*") if q.is_dir() and not q.is_symlink()),
        key=lambda q: q.stat().st_mtime_ns,
    )
    if olds and not (p.exists() or p.is_symlink()):
        keep = olds.pop()
        os.replace(keep, p)
        done.append(f"restored {p} from {keep.name} (a replace was interrupted)")
    for q in olds:
        shutil.rmtree(q, ignore_errors=True)
        done.append(f"removed {q.name} (left by an interrupted replace)")
    for q in parent.glob(f".{p.name}.tmp-*"):
        if q.is_symlink() or not q.is_dir():
            continue
        shutil.rmtree(q, ignore_errors=True)
        done.append(f"removed {q.name} (a half-written output of a dead run)")
    ckpt = parent / f"{p.name}.checkpoint"
    if ckpt.is_dir() and not ckpt.is_symlink():
        for q in ckpt.glob(".pass*.npz.tmp-*"):
            q.unlink(missing_ok=True)
            done.append(f"removed {ckpt.name}/{q.name} (a half-written checkpoint)")
    for line in done:
        _note(line)
    return done


__all__ = [
    "MARKER",
    "check_replaceable",
    "current_umask",
    "holds_lock",
    "is_streamattn_output",
    "lock_path",
    "output_lock",
    "recover_interrupted",
    "refuse_overlap",
    "register_input",
    "registered_inputs",
    "resolved",
    "umask_mode",
    "write_marker",
]
