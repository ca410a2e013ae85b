"""Peak resident memory of this process (for reports and the bounded-memory benchmark)."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """Peak RSS of the current process in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
