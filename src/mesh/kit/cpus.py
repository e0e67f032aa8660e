"""How many CPU cores this process may use: its affinity, and its container's CPU quota where one is set."""

from __future__ import annotations

import math
import os
from pathlib import Path

# cgroup v2: "<quota> <period>" in microseconds, or "max <period>" for no quota.
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may run on, at least 1.

    ``os.cpu_count()`` is the node's count: in a Kubernetes pod limited to 2 CPUs on a 64-core node it says 64, and
    a pool sized by it would thrash. The affinity mask covers CPU sets, and the cgroup's quota covers limits.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return max(1, cores)
    if quota == "max":
        return max(1, cores)
    try:
        limit = math.ceil(int(quota) / int(period))
    except (ValueError, ZeroDivisionError):
        return max(1, cores)
    return max(1, min(cores, limit))
