"""Peak resident memory of this process (for reports and the bounded-memory benchmark)."""

from __future__ import annotations

import resource
import sys


def proc_field(path: str, key: str) -> str | None:
    """The first word after ``key:`` in a ``/proc`` file of ``Key: value`` lines (None
    where the file or the key is missing: not Linux)."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(f"{key}:"):
                    return line.split()[1]
    except OSError:
        pass
    return None


def available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where unknown)."""
    kib = proc_field("/proc/meminfo", "MemAvailable")
    return None if kib is None else int(kib) * 1024


def peak_rss_bytes() -> int:
    """Peak RSS of the current process in bytes.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` is kept across
    fork + exec, so a child started by a large parent (a benchmark measuring each
    configuration "in a fresh process") would report the parent's peak instead of its own.
    Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    hwm = proc_field("/proc/self/status", "VmHWM")
    if hwm is not None:
        return int(hwm) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
