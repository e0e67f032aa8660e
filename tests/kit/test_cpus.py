"""usable_cpus: the affinity mask, capped by a cgroup v2 CPU quota where one is set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mesh.kit.cpus import usable_cpus

CORES = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", CORES),
        ("100000 100000\n", 1),
        ("150000 100000\n", min(CORES, 2)),
        ("50000 100000\n", 1),
        ("6400000 100000\n", CORES),
        ("garbage\n", CORES),
    ],
)
def test_a_cpu_quota_caps_the_cores(tmp_path: Path, cpu_max: str, expected: int) -> None:
    """A quota of 1.5 CPUs gives 2 workers (rounded up), half a CPU gives 1, no quota gives the affinity."""
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert usable_cpus(path) == expected


def test_without_a_cgroup_file_the_affinity_counts(tmp_path: Path) -> None:
    """Outside a cgroup v2 container the answer is the cores the process may run on."""
    assert usable_cpus(tmp_path / "missing") == CORES
