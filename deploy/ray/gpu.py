"""A model replica's GPU gauges: reranker_gpu_* of the GPUs Ray assigned it, read from NVML every few seconds.

One process reads NVML when scraped (reranker/gpu.py's collector); a replica cannot be scraped, so a thread sets
Ray gauges of the same names instead, for the replica's own GPUs only (`ray.get_gpu_ids()`: NVML sees every GPU
of the host). Replicas sharing a GPU (fractional `num_gpus`) report it alike; the alert takes the max per GPU.
A replica without a GPU (or without NVML) exports none, as one process does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deploy.ray.periodic import Periodic
from reranker.gpu import Nvml

PERIOD_S = 5.0  # Ray pushes metrics to its node agent every few seconds anyway


class ReplicaGpus:
    """Sets the gauges every `period_s` on a daemon thread until close()."""

    def __init__(self, ray_metrics: Any, nvml: Nvml, gpu_ids: Sequence[str | int],
                 period_s: float = PERIOD_S) -> None:
        self.nvml = nvml
        self.gpu_ids = {str(gpu) for gpu in gpu_ids}
        self.period_s = period_s
        gauge = ray_metrics.Gauge
        self.used = gauge("reranker_gpu_memory_used_bytes", "GPU memory in use.", tag_keys=("gpu",))
        self.total = gauge("reranker_gpu_memory_total_bytes", "GPU memory in all.", tag_keys=("gpu",))
        self.busy = gauge("reranker_gpu_utilization_ratio", "Share of time the GPU was busy (NVML), 0-1.",
                          tag_keys=("gpu",))
        self._thread: Periodic | None = None

    def read_once(self) -> int:
        """Set the gauges from one NVML reading; how many GPUs were read."""
        read = 0
        for gpu in self.nvml.read():
            if str(gpu.index) in self.gpu_ids:
                tags = {"gpu": str(gpu.index)}
                self.used.set(float(gpu.memory_used_bytes), tags=dict(tags))
                self.total.set(float(gpu.memory_total_bytes), tags=dict(tags))
                self.busy.set(gpu.utilization_ratio, tags=dict(tags))
                read += 1
        return read

    def start(self) -> ReplicaGpus:
        if self.gpu_ids and self.read_once():  # no GPU or no NVML: no thread, no gauges
            self._thread = Periodic(self.read_once, self.period_s, "replica-gpu-metrics")
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._thread.close()


def replica_gpus(gpu_ids: Sequence[object]) -> ReplicaGpus:
    """The gauges of `gpu_ids`, the GPUs Ray gave this replica (deploy/ray/model.py's assigned_gpus), started."""
    from ray.serve import metrics as ray_metrics

    return ReplicaGpus(ray_metrics, Nvml(), [str(gpu) for gpu in gpu_ids]).start()
