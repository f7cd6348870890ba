"""GPU gauges read from NVML at scrape time; without a GPU or driver they are simply absent."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_ratio: float


class Nvml:
    """NVML, initialized once on first use; any failure means 'no GPU' and is logged once."""

    def __init__(self, module: ModuleType | Any | None = None) -> None:
        self._module = module
        self._state: bool | None = None  # None: not tried; False: unavailable
        self._lock = threading.Lock()

    def _ready(self) -> bool:
        with self._lock:
            if self._state is None:
                try:
                    if self._module is None:
                        import pynvml

                        self._module = pynvml
                    self._module.nvmlInit()
                    self._state = True
                except Exception as err:  # no driver, no library, no device: no GPU gauges
                    logger.debug("NVML unavailable; GPU gauges are off", extra={"reason": str(err)})
                    self._state = False
            return self._state

    def available(self) -> bool:
        """Whether NVML is there (a driver, a library): a host whose GPUs this process can read."""
        return self._ready()

    def read(self) -> list[GpuReading]:
        """One reading per GPU; empty without NVML. A failing read is skipped, not raised."""
        if not self._ready():
            return []
        nvml = self._module
        assert nvml is not None
        readings = []
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception:
            return []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
                name = nvml.nvmlDeviceGetName(handle)
                readings.append(GpuReading(
                    index, name.decode() if isinstance(name, bytes) else str(name),
                    int(memory.used), int(memory.total), float(utilization.gpu) / 100.0,
                ))
            except Exception as err:
                logger.debug("NVML read failed", extra={"gpu": index, "reason": str(err)})
        return readings


class GpuCollector(Collector):
    """`reranker_gpu_memory_used_bytes`, `_total_bytes` and `reranker_gpu_utilization_ratio`, per GPU."""

    def __init__(self, nvml: Nvml | None = None) -> None:
        self.nvml = nvml or Nvml()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        readings = self.nvml.read()
        if not readings:
            return
        used = GaugeMetricFamily("reranker_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily("reranker_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu"])
        busy = GaugeMetricFamily("reranker_gpu_utilization_ratio",
                                 "Share of the last sample period a kernel ran on the GPU.", labels=["gpu"])
        for reading in readings:
            label = [str(reading.index)]
            used.add_metric(label, reading.memory_used_bytes)
            total.add_metric(label, reading.memory_total_bytes)
            busy.add_metric(label, reading.utilization_ratio)
        yield from (used, total, busy)

    def describe(self) -> list[GaugeMetricFamily]:
        # Describing nothing keeps registration from calling NVML at import or start-up.
        return []
