"""Allocator tuning, the bound on glibc's malloc arenas, and giving free memory back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.kit.memory import MALLOC_ARENAS, limit_arenas, tune_allocator

GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None

# Eight threads that each allocate while all are alive, as the decode threads of a busy service do; then glibc's
# malloc_stats() lists the process's arenas on stderr, one "Arena N:" line each.
ALLOCATE_TOGETHER = """
import ctypes, threading

def allocate_together():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    together = threading.Barrier(8)

    def allocate():
        block = libc.malloc(1 << 20)
        together.wait()
        libc.free(block)

    threads = [threading.Thread(target=allocate) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    libc.malloc_stats()
"""

# A service whose run() allocates so.
ARENAS_SERVICE = (
    ALLOCATE_TOGETHER
    + """
import contextlib
from mesh.kit.runtime import run_service
from mesh.kit.settings import ServerSettings

class Runtime:
    async def run(self):
        allocate_together()

@contextlib.asynccontextmanager
async def probe_service(settings):
    yield Runtime()

run_service("probe", ServerSettings, probe_service)
"""
)

# Limits the arenas as a service does, then spawns a child (a new interpreter, as the inference workers are) that
# allocates so.
SPAWNED_CHILD = (
    ALLOCATE_TOGETHER
    + """
import multiprocessing
from mesh.kit.memory import limit_arenas

if __name__ == "__main__":
    assert limit_arenas()
    process = multiprocessing.get_context("spawn").Process(target=allocate_together)
    process.start()
    process.join()
    assert process.exitcode == 0
"""
)

# Frees 96 MiB of 1 MiB blocks allocated in a thread (an arena's heaps, as a decode thread's buffers), keeping
# the last block so that the heaps stay; prints the RSS (KiB) before and after return_free_memory().
RETURN_SCRIPT = """
import ctypes, threading
from mesh.kit.memory import limit_arenas, return_free_memory, tune_allocator

def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))

tune_allocator()
limit_arenas()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def allocate_then_free():
    blocks = [libc.malloc(1 << 20) for _ in range(97)]
    for block in blocks:
        ctypes.memset(block, 1, 1 << 20)
    for block in blocks[:-1]:
        libc.free(block)

thread = threading.Thread(target=allocate_then_free)
thread.start()
thread.join()
before = rss()
assert return_free_memory()
print(before, rss())
"""


def _clean_env() -> dict[str, str]:
    """The environment without MESH_* (start_service would warn about each) nor a chosen arena count."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MESH_") and name not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")
    }


def test_tune_allocator_applies_on_glibc_linux() -> None:
    """On Linux with glibc the thresholds are set; elsewhere it reports False instead of failing."""
    applied = tune_allocator()
    if sys.platform.startswith("linux"):
        assert applied
    else:
        assert not applied


@pytest.mark.skipif(not GLIBC, reason="malloc arenas are glibc's")
def test_every_service_process_has_at_most_two_malloc_arenas_however_many_threads_allocate() -> None:
    """run_service caps glibc's arenas before the service starts threads: eight threads allocating at once
    share MALLOC_ARENAS arenas, where glibc's default (8 per core) gave each its own, and each kept what its
    thread freed (the inference service's RSS grew past 3 GiB under large images)."""
    done = subprocess.run(
        [sys.executable, "-c", ARENAS_SERVICE], env=_clean_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    arenas = [line for line in done.stderr.splitlines() if line.startswith("Arena ")]
    assert 1 <= len(arenas) <= MALLOC_ARENAS, done.stderr


@pytest.mark.skipif(not GLIBC, reason="malloc arenas are glibc's")
def test_a_process_spawned_by_a_service_has_at_most_two_malloc_arenas_too(tmp_path: Path) -> None:
    """The limit reaches spawned children (the inference service's worker processes): mallopt's does not outlive
    the program, so the limit travels in the environment; without it the child's eight threads had eight
    arenas."""
    script = tmp_path / "spawn_child.py"
    script.write_text(SPAWNED_CHILD)
    done = subprocess.run(
        [sys.executable, str(script)], env=_clean_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    arenas = [line for line in done.stderr.splitlines() if line.startswith("Arena ")]
    assert 1 <= len(arenas) <= MALLOC_ARENAS, done.stderr


def test_an_arena_count_chosen_in_the_environment_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    """MALLOC_ARENA_MAX (or its tunable) set by an operator is not overridden by the kit's own number."""
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not limit_arenas()
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    assert not limit_arenas()


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_return_free_memory_gives_back_the_free_pages_an_arena_kept() -> None:
    """96 MiB freed in a thread's arena stay in the process (the heaps are not trimmed under the kit's trim
    threshold) until return_free_memory() hands their pages back: the RSS drops by most of it."""
    done = subprocess.run(
        [sys.executable, "-c", RETURN_SCRIPT], env=_clean_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    before, after = (int(kib) for kib in done.stdout.split())
    assert before - after > 80 * 1024, done.stdout
