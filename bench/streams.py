"""OpenVINO's two streams against one, in-process: the engine (our batcher and worker, no HTTP) on the benchmark
model at the precision RERANKER_DTYPE=auto picks on this CPU (or `--dtype`), fed by `--clients` concurrent callers.

Both models are compiled first, on all of this process's threads: one with one stream, one with two (the
default, RERANKER_CPU_STREAMS=auto). Then, for `--rounds` rounds, each scores the same workload through its own
Reranker (the pair-score cache off), in an order that alternates each round, so a drift in the host's speed falls
on both. A round's ratio is two streams' pairs/s over one stream's in that round; the median and range are
printed. What docs/cpu.md#streams bases the default on, per CPU.
Run: .venv/bin/python -m bench.streams   [--rounds 6 --requests 16 --docs 50 --clients 4 --dtype auto]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # as start.sh runs the service

from bench.report import host  # noqa: E402
from bench.workload import Request, build_benchmark_model, build_workload  # noqa: E402
from reranker import Reranker, Settings  # noqa: E402
from reranker.loading import load_model  # noqa: E402
from reranker.model import ScoringModel  # noqa: E402


def pairs_per_second(reranker: Reranker, workload: list[Request], clients: int) -> float:
    """Every request of `workload` through `reranker` from `clients` callers: scored pairs per second."""
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda r: reranker.rerank(r.query, r.documents), workload))
    return sum(len(r.documents) for r in workload) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="RERANKER_DTYPE of both (auto: what the service picks on this CPU)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    workload = build_workload(args.requests, args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_benchmark_model(Path(tmp) / "minilm")
        base = Settings(model=str(path), device="cpu", backend="openvino", cache_size=0,
                        cache_dir=str(Path(tmp) / "ov"), dtype=args.dtype)
        models: dict[int, ScoringModel] = {}
        for streams in (1, 2):
            models[streams] = load_model(replace(base, cpu_streams=None if streams == 2 else 1))
            got = getattr(models[streams].backend, "streams", None)
            if got != streams:  # one thread (OMP_NUM_THREADS=1, one core) is always one stream
                raise SystemExit(f"asked OpenVINO for {streams} stream(s), got {got}: this needs 2 threads or more")
        print(f"host: {host()}; {sum(len(r.documents) for r in workload)} pairs in {len(workload)} requests, "
              f"{args.clients} callers, {args.rounds} rounds; OpenVINO {models[2].dtype} ({models[2].dtype_reason})")
        rates: dict[int, list[float]] = {1: [], 2: []}
        with Reranker(models[1], base) as one, Reranker(models[2], base) as two:
            engines = {1: one, 2: two}
            for streams in (1, 2):  # warm-up: each shape compiled once, the threads started
                pairs_per_second(engines[streams], build_workload(4, args.docs, seed=1), args.clients)
            for round_ in range(args.rounds):
                for streams in ((1, 2) if round_ % 2 == 0 else (2, 1)):
                    rates[streams].append(pairs_per_second(engines[streams], workload, args.clients))
                print(f"round {round_ + 1}: one stream {rates[1][-1]:.1f} pairs/s, two {rates[2][-1]:.1f}: "
                      f"{rates[2][-1] / rates[1][-1]:.2f}x", flush=True)
    ratios = [two / one for one, two in zip(rates[1], rates[2], strict=True)]
    print(f"one stream: {statistics.median(rates[1]):.1f} pairs/s (median; {min(rates[1]):.1f}-{max(rates[1]):.1f})")
    print(f"two streams: {statistics.median(rates[2]):.1f} pairs/s (median; {min(rates[2]):.1f}-{max(rates[2]):.1f})")
    print(f"two streams / one: {statistics.median(ratios):.2f}x (median; {min(ratios):.2f}-{max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
