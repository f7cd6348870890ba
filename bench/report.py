"""What every benchmark prints beside its figures: the host it ran on, and latency percentiles."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

from reranker.backends.cpu import cpu_flags, cpuinfo


def host() -> str:
    """The CPU's name, cores and the vector extensions that matter to a float32/bfloat16 forward pass."""
    cpus = cpuinfo()
    name = cpus[0].get("model name", platform.machine()) if cpus else platform.machine()
    flags = cpu_flags()
    extensions = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name}, {os.cpu_count()} cores, {' '.join(extensions) or 'no AVX-512'}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def best_of(repeats: int, run: Callable[[], object]) -> float:
    """The fastest of `repeats` timed runs, in seconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)
