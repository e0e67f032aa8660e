"""The soak tool's pieces: process discovery, memory verdicts, job accounting, the mix."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator

import pytest

from mesh.queue.v1 import job_pb2
from mesh.tools import soak

MIB = 1024 * 1024


@pytest.fixture
def fake_service() -> Iterator[subprocess.Popen[bytes]]:
    """A sleeping process whose command line names mesh.services.fake_for_soak."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "mesh.services.fake_for_soak"]
    )
    yield process
    process.kill()
    process.wait()


def test_discovery_by_port_keeps_only_the_mesh_under_test(fake_service: subprocess.Popen[bytes]) -> None:
    """Restricted to the mesh's ports, a matching process that listens on none of them is left out."""
    assert soak.discover_processes("mesh.services.fake_for_soak", ports={1}) == {}


def test_discovers_mesh_processes_and_notices_an_exit(fake_service: subprocess.Popen[bytes]) -> None:
    """Processes are found by `mesh.services.` on their command line; one that exits is marked, not sampled."""
    found = soak.discover_processes("mesh.services.fake_for_soak")
    assert found == {fake_service.pid: f"mesh.services.fake_for_soak[{fake_service.pid}]"}
    series = {pid: soak.MemorySeries(label) for pid, label in found.items()}
    soak.sample_memory(series, 1.0)
    assert series[fake_service.pid].samples[0][1] > MIB
    fake_service.kill()
    fake_service.wait()
    soak.sample_memory(series, 2.0)
    assert series[fake_service.pid].exited_at == 2.0
    assert len(series[fake_service.pid].samples) == 1


def _series(values_mib: list[float]) -> soak.MemorySeries:
    entry = soak.MemorySeries("p")
    entry.samples = [(float(t), int(v * MIB)) for t, v in enumerate(values_mib)]
    return entry


def test_memory_growth_within_bound_passes_and_leak_fails() -> None:
    """Growth is final-tenth median minus post-warm-up-tenth median; warm-up growth does not count."""
    flat_after_warmup = [50.0] * 10 + [100.0] * 90  # 100 s run: grows only during warm-up
    verdict = soak.memory_verdict(_series(flat_after_warmup), 100.0, bound_mib=64)
    assert verdict["ok"] is True
    assert verdict["growth_mib"] == 0.0
    leak = [100.0 + t for t in range(100)]  # 1 MiB per second
    verdict = soak.memory_verdict(_series(leak), 100.0, bound_mib=64)
    assert verdict["ok"] is False
    assert verdict["growth_mib"] == pytest.approx(80.0, abs=1)
    assert verdict["slope_mib_per_min"] == pytest.approx(60.0, abs=0.5)


def test_a_process_that_exited_fails_the_memory_check() -> None:
    """A service that died during the soak fails it even if its memory looked fine."""
    entry = _series([100.0] * 100)
    entry.exited_at = 99.0
    assert soak.memory_verdict(entry, 100.0, bound_mib=64)["ok"] is False


def test_job_accounting_counts_non_terminal_jobs_as_lost() -> None:
    """Every submitted job is counted once; queued, running or unknown at the end means lost."""
    states = {
        "a": job_pb2.JOB_STATE_SUCCEEDED,
        "b": job_pb2.JOB_STATE_SUCCEEDED,
        "c": job_pb2.JOB_STATE_FAILED,
        "d": job_pb2.JOB_STATE_RUNNING,
        "e": job_pb2.JOB_STATE_UNSPECIFIED,
        "f": job_pb2.JOB_STATE_DEAD,
    }
    assert soak.job_accounting(states) == {
        "submitted": 6,
        "succeeded": 2,
        "failed": 1,
        "dead": 1,
        "cancelled": 0,
        "lost": 2,
    }


def test_mix_follows_its_weights_and_covers_the_four_kinds_of_work() -> None:
    """The mix draws uploads, processing, predictions and jobs in proportion to their weights."""
    rng = random.Random(1)
    drawn = Counter(soak.pick(rng, soak.MIX) for _ in range(12_000))
    total_weight = sum(soak.MIX.values())
    for name, weight in soak.MIX.items():
        assert drawn[name] / 12_000 == pytest.approx(weight / total_weight, abs=0.02)
    assert {"file.upload", "image.process", "inference.predict", "queue.submit"} <= set(soak.MIX)


def test_soak_refuses_when_the_mesh_is_down(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a running mesh the soak exits 2 and says which service is down."""
    monkeypatch.setenv("MESH_FILE_SERVICE_ADDRESS", "127.0.0.1:9")
    assert soak.main(["--minutes", "0.1"]) == 2
    assert "file service at 127.0.0.1:9: UNAVAILABLE" in capsys.readouterr().err
