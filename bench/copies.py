"""The host's own ceiling for replicas: copies of the bare model, one thread each, scoring at the same time.

No service, no HTTP, no Ray: each copy is a process that loads the model as the service does (OpenVINO float32,
one thread), scores bench/cpu.py's workload in the batcher's token-budget batches (shuffled, fixed seed) again
and again for a fixed time, and reports its pairs/s. All copies start scoring together (a barrier). Two copies
on two cores reach less than twice one copy where the cores share what the model leans on (caches, memory
bandwidth, a hypervisor's sibling threads): that ratio bounds what two model replicas can reach over one,
whatever the serving layer does. bench/scale.py prints it beside the replicas' ratio.

Run: .venv/bin/python -m bench.copies   [--copies 1,2 --seconds 15]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import random
import tempfile
import time
from multiprocessing.synchronize import Barrier
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SETTINGS = {"RERANKER_DEVICE": "cpu", "RERANKER_BACKEND": "openvino", "RERANKER_DTYPE": "float32"}


def _copy(model_dir: str, cache_dir: str, seconds: float, start: Barrier, rates: multiprocessing.Queue) -> None:
    """One copy (a spawned process): load, warm up, wait for the others, score for `seconds`, report pairs/s."""
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread, as a replica with num_cpus 1 gets
    from bench.workload import batcher_batches, build_workload
    from reranker.loading import load_model
    from reranker.settings import Settings

    model = load_model(Settings.from_env({**SETTINGS, "RERANKER_MODEL": model_dir, "RERANKER_CACHE_DIR": cache_dir}))
    batches = batcher_batches(model, build_workload(16, 50), 2048)
    random.Random(0).shuffle(batches)  # any stretch of the loop then holds short and long batches alike
    for batch in batches[::8]:  # warm-up: a few of the shapes
        model.score(batch)
    start.wait()
    done, pairs, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = batches[done % len(batches)]  # round and round the workload's batches
        model.score(batch)
        done, pairs = done + 1, pairs + len(batch)
    rates.put(pairs / (time.perf_counter() - started))


def run_copies(model_dir: Path, copies: int, *, seconds: float = 15.0, cache_dir: Path | None = None) -> list[float]:
    """Pairs/s of each of `copies` concurrent copies of the model at `model_dir`."""
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no threads or OpenVINO state inherited
    start, rates = context.Barrier(copies), context.Queue()
    with tempfile.TemporaryDirectory() as scratch:
        cache = str(cache_dir or scratch)
        workers = [context.Process(target=_copy, args=(str(model_dir), cache, seconds, start, rates))
                   for _ in range(copies)]
        for worker in workers:
            worker.start()
        try:
            out: list[float] = []
            deadline = time.monotonic() + 600
            while len(out) < copies:  # a copy that died says so now, not after the deadline
                try:
                    out.append(rates.get(timeout=1))
                except queue.Empty:
                    failed = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                    if failed or time.monotonic() > deadline:
                        raise RuntimeError(f"a copy of the model failed (exit codes {failed}) or hung") from None
        finally:
            for worker in workers:
                worker.join(timeout=30)
                if worker.is_alive():
                    worker.kill()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", default="1,2", help="comma-separated numbers of concurrent copies")
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    from bench.report import host
    from bench.workload import build_benchmark_model

    print(f"host: {host()}")
    with tempfile.TemporaryDirectory() as folder:
        model = build_benchmark_model(Path(folder) / "minilm")
        cache = Path(folder) / "cache"
        totals = {}
        for copies in (int(c) for c in args.copies.split(",")):
            rates = run_copies(model, copies, seconds=args.seconds, cache_dir=cache)
            totals[copies] = sum(rates)
            print(f"{copies} cop{'y' if copies == 1 else 'ies'} x 1 thread: {totals[copies]:.1f} pairs/s in all "
                  f"({', '.join(f'{r:.1f}' for r in rates)}); {totals[copies] / totals[min(totals)]:.2f}x "
                  f"{min(totals)} cop{'y' if min(totals) == 1 else 'ies'}", flush=True)


if __name__ == "__main__":
    main()
