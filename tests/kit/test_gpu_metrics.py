"""GPU metrics (``mesh.kit.gpu_metrics``): series per device and for the pool, nothing without a GPU."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mesh.kit.gpu_metrics import open_nvml, register_gpu_metrics


@dataclass
class FakeNvml:
    """Two devices with fixed readings."""

    devices: list[tuple[str, int, int, float]] = field(
        default_factory=lambda: [("NVIDIA H100", 3 << 30, 80 << 30, 0.42), ("NVIDIA H100", 0, 80 << 30, 0.0)]
    )

    def device_count(self) -> int:
        return len(self.devices)

    def name(self, index: int) -> str:
        return self.devices[index][0]

    def memory(self, index: int) -> tuple[int, int]:
        return self.devices[index][1], self.devices[index][2]

    def utilization(self, index: int) -> float:
        return self.devices[index][3]


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by name and sorted labels."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


H100 = ("name", "NVIDIA H100")


def test_each_device_reports_memory_and_utilisation_and_the_pool_its_bytes() -> None:
    """With a GPU, a scrape shows used/total memory and utilisation per device, and the process's pool."""
    registry = CollectorRegistry()
    assert register_gpu_metrics(lambda: (1024, 4096), nvml=FakeNvml(), registry=registry)
    found = samples(registry)
    assert found[("mesh_gpu_memory_used_bytes", (("gpu", "0"), H100))] == 3 << 30
    assert found[("mesh_gpu_memory_total_bytes", (("gpu", "1"), H100))] == 80 << 30
    assert found[("mesh_gpu_utilization_ratio", (("gpu", "0"), H100))] == 0.42
    assert found[("mesh_gpu_pool_bytes", (("state", "in_use"),))] == 1024
    assert found[("mesh_gpu_pool_bytes", (("state", "held"),))] == 4096


def test_readings_are_taken_at_scrape_time() -> None:
    """A later scrape shows the device's new state, not the one at registration."""
    registry = CollectorRegistry()
    nvml = FakeNvml()
    register_gpu_metrics(nvml=nvml, registry=registry)
    nvml.devices[0] = ("NVIDIA H100", 5 << 30, 80 << 30, 0.9)
    found = samples(registry)
    assert found[("mesh_gpu_utilization_ratio", (("gpu", "0"), H100))] == 0.9
    assert not any(name == "mesh_gpu_pool_bytes" for name, _ in found)


def test_without_an_nvidia_driver_nothing_is_registered() -> None:
    """On a machine without NVML (this one, and CI) no GPU series appear, rather than zeros."""
    if open_nvml() is not None:
        return  # a GPU machine: the case under test cannot arise here
    registry = CollectorRegistry()
    assert register_gpu_metrics(registry=registry) is False
    assert "mesh_gpu" not in generate_latest(registry).decode()
