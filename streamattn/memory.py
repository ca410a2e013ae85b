"""Peak resident memory of this process (for reports and the bounded-memory benchmark)."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """Peak RSS of the current process in bytes.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` is kept across
    fork + exec, so a child started by a large parent (a benchmark measuring each
    configuration "in a fresh process") would report the parent's peak instead of its own.
    Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
