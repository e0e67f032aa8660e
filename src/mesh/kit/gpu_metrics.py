"""GPU memory and utilisation as Prometheus metrics, read from NVML at scrape time.

Registered by the services that can compute on a GPU (image processing, inference); where there is no
NVIDIA driver, NVML does not load and nothing is registered, so a CPU-only deployment shows no GPU series
rather than zeros that look like an idle GPU. NVML sits behind :class:`Nvml`, so tests give a fake.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mesh.kit.logging import get_logger

log = get_logger(__name__)

PoolBytes = Callable[[], tuple[int, int]]
"""This process's GPU memory pool: (bytes in use, bytes held)."""


class Nvml(Protocol):
    """The NVML queries the collector makes."""

    def device_count(self) -> int: ...
    def name(self, index: int) -> str: ...
    def memory(self, index: int) -> tuple[int, int]:
        """(used, total) bytes of device memory."""
        ...

    def utilization(self, index: int) -> float:
        """Fraction of the last sample period in which a kernel ran (0 to 1)."""
        ...


class PynvmlAdapter:
    """:class:`Nvml` on NVIDIA's own bindings (nvidia-ml-py)."""

    def __init__(self, pynvml: Any) -> None:
        self._nvml = pynvml

    def device_count(self) -> int:
        return int(self._nvml.nvmlDeviceGetCount())

    def name(self, index: int) -> str:
        name = self._nvml.nvmlDeviceGetName(self._nvml.nvmlDeviceGetHandleByIndex(index))
        return name.decode() if isinstance(name, bytes) else str(name)

    def memory(self, index: int) -> tuple[int, int]:
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._nvml.nvmlDeviceGetHandleByIndex(index))
        return int(info.used), int(info.total)

    def utilization(self, index: int) -> float:
        rates = self._nvml.nvmlDeviceGetUtilizationRates(self._nvml.nvmlDeviceGetHandleByIndex(index))
        return float(rates.gpu) / 100.0


def cupy_pool_bytes() -> tuple[int, int]:
    """CuPy's default memory pool (the one both GPU backends allocate from): (in use, held) bytes."""
    import cupy

    pool = cupy.get_default_memory_pool()
    return int(pool.used_bytes()), int(pool.total_bytes())


def open_nvml() -> Nvml | None:
    """NVML when a driver with at least one device is present, else None."""
    import pynvml

    try:
        pynvml.nvmlInit()
        adapter = PynvmlAdapter(pynvml)
        if adapter.device_count() > 0:
            return adapter
    except pynvml.NVMLError as error:
        log.debug("no NVML: GPU metrics off", reason=str(error))
    return None


class GpuCollector(Collector):
    """Per-device memory and utilisation, and this process's pool, read when Prometheus scrapes."""

    def __init__(self, nvml: Nvml, pool_bytes: PoolBytes | None = None) -> None:
        self._nvml = nvml
        self._pool_bytes = pool_bytes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["gpu", "name"]
        used = GaugeMetricFamily(
            "mesh_gpu_memory_used_bytes", "Device memory in use (all processes).", labels=labels
        )
        total = GaugeMetricFamily("mesh_gpu_memory_total_bytes", "Device memory in all.", labels=labels)
        busy = GaugeMetricFamily(
            "mesh_gpu_utilization_ratio", "Fraction of the last sample period a kernel ran.", labels=labels
        )
        for index in range(self._nvml.device_count()):
            values = [str(index), self._nvml.name(index)]
            device_used, device_total = self._nvml.memory(index)
            used.add_metric(values, device_used)
            total.add_metric(values, device_total)
            busy.add_metric(values, self._nvml.utilization(index))
        yield from (used, total, busy)
        if self._pool_bytes is not None:
            in_use, held = self._pool_bytes()
            pool = GaugeMetricFamily(
                "mesh_gpu_pool_bytes", "This process's GPU memory pool.", labels=["state"]
            )
            pool.add_metric(["in_use"], in_use)
            pool.add_metric(["held"], held)
            yield pool


def register_gpu_metrics(
    pool_bytes: PoolBytes | None = None,
    *,
    nvml: Nvml | None = None,
    registry: CollectorRegistry = REGISTRY,
) -> bool:
    """Export GPU metrics when a GPU is present (``nvml`` defaults to the real NVML); True if registered."""
    found = nvml if nvml is not None else open_nvml()
    if found is None:
        return False
    registry.register(GpuCollector(found, pool_bytes))
    return True
