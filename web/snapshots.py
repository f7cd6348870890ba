"""What the Monitoring tab plots, read from one engine's registry: snapshots of its counters, and its model card.

Free of Gradio and pandas, so that a Ray Serve model replica can answer a UI on another replica with them
(deploy/ray/panel.py).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

from reranker import Reranker
from reranker.gpu import Nvml
from reranker.metrics import STATUSES, Metrics

GPU_MEMORY = "GPU memory"
PROCESS_MEMORY = "process memory"  # on a host without a GPU


@dataclass(frozen=True)
class Snapshot:
    time: float
    requests: dict[str, float]
    latency_buckets: list[tuple[float, float]]  # (upper bound, cumulative count), all routes
    docs: tuple[float, float]  # (sum, count)
    batch: tuple[float, float]
    cache: tuple[float, float]  # (hits, misses)
    queue_pairs: float
    memory: tuple[float, float, str] = field(default=(0.0, 0.0, PROCESS_MEMORY))  # used, total, what


def _samples(metric: object, suffix: str = "") -> list[tuple[dict[str, str], float]]:
    out = []
    for family in metric.collect():  # type: ignore[attr-defined]
        for sample in family.samples:
            if sample.name == family.name + suffix:
                out.append((sample.labels, sample.value))
    return out


def _process_memory(reranker: Reranker) -> float:
    value = reranker.metrics.registry.get_sample_value("process_resident_memory_bytes")
    if value is not None:
        return value
    try:
        with open("/proc/self/statm") as statm:
            return float(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0.0


def take_snapshot(reranker: Reranker, nvml: Nvml) -> Snapshot:
    gpus = nvml.read()
    if gpus:
        memory = (float(sum(g.memory_used_bytes for g in gpus)), float(sum(g.memory_total_bytes for g in gpus)),
                  GPU_MEMORY)
    else:
        memory = (_process_memory(reranker), 0.0, PROCESS_MEMORY)
    return metrics_snapshot(reranker.metrics, memory)


def metrics_snapshot(m: Metrics, memory: tuple[float, float, str] = (0.0, 0.0, PROCESS_MEMORY)) -> Snapshot:
    """The counters of registry `m` now: an engine's, or, on Ray Serve, an ingress's or UI's (what they answered
    themselves; no documents, batches, cache or queue of their own)."""
    requests = dict.fromkeys(STATUSES, 0.0)
    for labels, value in _samples(m.requests, "_total"):
        requests[labels["status"]] = requests.get(labels["status"], 0.0) + value
    buckets: dict[float, float] = {}
    for labels, value in _samples(m.request_seconds, "_bucket"):
        bound = float(labels["le"])
        buckets[bound] = buckets.get(bound, 0.0) + value

    def total(metric: object, suffix: str) -> float:
        return sum(value for _, value in _samples(metric, suffix))

    cache = {labels["result"]: value for labels, value in _samples(m.cache_requests, "_total")}
    return Snapshot(
        time=time.time(), requests=requests, latency_buckets=sorted(buckets.items()),
        docs=(total(m.documents_per_request, "_sum"), total(m.documents_per_request, "_count")),
        batch=(total(m.batch_size, "_sum"), total(m.batch_size, "_count")),
        cache=(cache.get("hit", 0.0), cache.get("miss", 0.0)), queue_pairs=total(m.queue_pairs, ""),
        memory=memory,
    )


def bucket_quantile(q: float, start: list[tuple[float, float]], end: list[tuple[float, float]]) -> float | None:
    """histogram_quantile over the increase between two snapshots; None when nothing happened."""
    before = dict(start)
    counts = [(bound, value - before.get(bound, 0.0)) for bound, value in end]
    if not counts or counts[-1][1] <= 0:
        return None
    rank = q * counts[-1][1]
    lower, below = 0.0, 0.0
    for bound, cumulative in counts:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            share = (rank - below) / (cumulative - below) if cumulative > below else 1.0
            return lower + (bound - lower) * share
        lower, below = bound, cumulative
    return lower


def model_card(reranker: Reranker) -> str:
    """The tab's header: a one-row Markdown table of the model and its limits."""
    model, settings = reranker.model, reranker.settings
    return (f"| model | device | dtype | max_length | load time | long documents | batch tokens |\n"
            f"|---|---|---|---|---|---|---|\n| `{model.model_id}` | {model.device} | {model.dtype} | "
            f"{model.max_length} | {model.load_seconds:.1f} s | {settings.long_docs} | "
            f"{reranker.batch_tokens} |")
