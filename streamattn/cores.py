"""How many CPU cores this process may use: the stream threads' default.

``os.cpu_count()`` counts the machine's cores, not the ones a process may run on: a
scheduler's affinity mask (``taskset``, Slurm, a Dask nanny pinning) and a container's
CPU quota (cgroup ``cpu.max``, or ``cpu.cfs_quota_us`` in cgroup v1) both give fewer.
Threads beyond them only queue (and a quota throttles the whole process once spent), so
the kernels size their thread pools by :func:`usable_cores`: the affinity mask's size,
capped by the quota rounded up (a quota of 1.5 cores still runs 2 threads, each at 0.75).
Written here rather than taken from ``dask.system.cpu_count`` (the same rules), because
the local engine must not need Dask.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def affinity_cores() -> int:
    """Cores in this process's affinity mask (all of the machine's where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def quota_cores(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """This process's cgroup CPU quota in cores (quota / period), or None (no quota).

    cgroup v2: ``cpu.max`` of the process's group (``0::/path`` in ``/proc/self/cgroup``),
    "max PERIOD" meaning none; cgroup v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
    of the cpu controller, −1 meaning none. Unreadable or malformed files: None.
    """
    for name in ("cpu,cpuacct", "cpuacct,cpu", "cpu"):  # v1 (the directory name varies)
        try:
            quota = int((root / name / "cpu.cfs_quota_us").read_text())
            period = int((root / name / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    try:
        group = next(line.split(":", 2)[2] for line in proc_cgroup.read_text().splitlines()
                     if line.startswith("0::"))
        fields = (root / group.strip().lstrip("/") / "cpu.max").read_text().split()
    except (OSError, StopIteration, IndexError):
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cores() -> int:
    """min(affinity mask, ⌈cgroup quota⌉), at least 1 (module docstring)."""
    cores = affinity_cores()
    quota = quota_cores()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return cores
