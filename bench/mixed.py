"""Small requests beside large ones: what letting smaller requests cut in between a round's batches buys a 10-document
request that arrives while large requests are being scored, and what it costs the large ones.

In-process (the engine, no HTTP), on the benchmark model with what RERANKER_BACKEND/RERANKER_DTYPE=auto pick on this
CPU, the pair-score cache off. Each round runs the same load twice, in an order that alternates each round so a drift
of the host falls on both: with cut-ins (the engine's default since 2026-12-04) and without (a request waited for
the whole round in progress, as before). The load: `--bulk` callers send `--docs`-document requests back to back
while one caller sends `--small-docs`-document requests one after another for `--seconds`. Printed per mode: the
small requests' p50/p95 latency, against the same small request on the idle engine (in the same round), the bulk
callers' pairs/s and every caller's; then the ratios.

Run: .venv/bin/python -m bench.mixed   [--rounds 3 --bulk 2 --docs 200 --small-docs 10 --seconds 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # as start.sh runs the service

from bench.report import host, percentile  # noqa: E402
from bench.workload import Request, build_benchmark_model, build_workload  # noqa: E402
from reranker import Reranker, Settings  # noqa: E402
from reranker.loading import load_model  # noqa: E402

MODES = ("cut-ins", "none")


@dataclass
class Run:
    small: list[float]  # seconds, each small request
    idle: float  # seconds, the small request alone just before
    bulk_pairs_per_s: float
    all_pairs_per_s: float  # the bulk callers' and the small one's
    tokens_per_s: float  # of the pairs scored, as tokenized
    padded_share: float  # of the tokens the passes ran, padding


def run_mixed(reranker: Reranker, bulk: list[Request], small: list[Request], clients: int, seconds: float) -> Run:
    """`clients` callers send `bulk` requests back to back while one caller sends `small` ones in turn for
    `seconds`; the bulk callers then finish the request in hand."""
    idle = min(timed(reranker, small[i % len(small)]) for i in range(3))
    tokens, padded = counted(reranker)
    stop = threading.Event()
    scored = [0] * clients

    def bulk_caller(index: int) -> None:
        turn = index
        while not stop.is_set():
            request = bulk[turn % len(bulk)]
            reranker.rerank(request.query, request.documents)
            scored[index] += len(request.documents)
            turn += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=bulk_caller, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(min(1.0, seconds / 4))  # the bulk requests are queued and running
    latencies: list[float] = []
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        latencies.append(timed(reranker, small[len(latencies) % len(small)]))
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    small_pairs = sum(len(small[i % len(small)].documents) for i in range(len(latencies)))
    tokens_after, padded_after = counted(reranker)
    tokens, padded = tokens_after - tokens, padded_after - padded
    return Run(latencies, idle, sum(scored) / elapsed, (sum(scored) + small_pairs) / elapsed, tokens / elapsed,
               1 - tokens / padded)


def counted(reranker: Reranker) -> tuple[float, float]:
    """The tokens of the pairs scored so far, and the padded tokens of the passes that scored them."""
    registry = reranker.metrics.registry
    return (registry.get_sample_value("reranker_input_tokens_total") or 0.0,
            registry.get_sample_value("reranker_batch_tokens_sum") or 0.0)


def timed(reranker: Reranker, request: Request) -> float:
    begun = time.perf_counter()
    reranker.rerank(request.query, request.documents)
    return time.perf_counter() - begun


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bulk", type=int, default=2, help="callers sending bulk requests back to back")
    parser.add_argument("--docs", type=int, default=200, help="documents per bulk request")
    parser.add_argument("--small-docs", type=int, default=10, help="documents per small request")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the small caller sends, per run")
    args = parser.parse_args()
    if min(args.rounds, args.bulk) < 1 or args.seconds <= 0:
        parser.error("--rounds and --bulk must be at least 1, --seconds above 0")

    bulk = build_workload(4, args.docs, seed=0)
    small = build_workload(16, args.small_docs, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_benchmark_model(Path(tmp) / "minilm")
        settings = Settings(model=str(path), cache_size=0, cache_dir=str(Path(tmp) / "cache"),
                            max_queue=max(Settings().max_queue, (args.bulk + 1) * args.docs))
        model = load_model(settings)
        with Reranker(model, settings) as reranker:
            batcher = reranker._batcher
            print(f"host: {host()}; {model.backend.name} {model.dtype}, batch tokens {reranker.batch_tokens}, "
                  f"{args.bulk} bulk "
                  f"callers x {args.docs} documents, one caller of {args.small_docs}-document requests, "
                  f"{args.seconds:g} s per run, {args.rounds} rounds", flush=True)
            for request in build_workload(2, args.docs, seed=2):  # the shapes compiled, the threads started
                timed(reranker, request)
            runs: dict[str, list[Run]] = {mode: [] for mode in MODES}
            for round_ in range(args.rounds):
                for mode in (MODES if round_ % 2 == 0 else MODES[::-1]):
                    batcher._rounds.cut_ins = mode == "cut-ins"
                    run = run_mixed(reranker, bulk, small, args.bulk, args.seconds)
                    runs[mode].append(run)
                    print(f"round {round_ + 1} {mode:>7}: small p50 {percentile(run.small, 0.5) * 1000:.0f} ms, "
                          f"p95 {percentile(run.small, 0.95) * 1000:.0f} ms ({len(run.small)} requests; alone "
                          f"{run.idle * 1000:.0f} ms), bulk {run.bulk_pairs_per_s:.1f} pairs/s, all "
                          f"{run.all_pairs_per_s:.1f}, {run.tokens_per_s:.0f} tokens/s, padding "
                          f"{run.padded_share:.1%}", flush=True)
    for mode in MODES:
        latencies = [seconds for run in runs[mode] for seconds in run.small]
        idle = statistics.median(run.idle for run in runs[mode])
        rate = statistics.median(run.bulk_pairs_per_s for run in runs[mode])
        every = statistics.median(run.all_pairs_per_s for run in runs[mode])
        tokens = statistics.median(run.tokens_per_s for run in runs[mode])
        padding = statistics.median(run.padded_share for run in runs[mode])
        print(f"{mode}: small p50 {percentile(latencies, 0.5) * 1000:.0f} ms, p95 "
              f"{percentile(latencies, 0.95) * 1000:.0f} ms (alone {idle * 1000:.0f} ms; {len(latencies)} requests), "
              f"bulk {rate:.1f} pairs/s, all {every:.1f}, {tokens:.0f} tokens/s, padding {padding:.1%} (medians of "
              "rounds)")
    p95 = {mode: [percentile(run.small, 0.95) for run in runs[mode]] for mode in MODES}
    rates = {mode: [run.bulk_pairs_per_s for run in runs[mode]] for mode in MODES}
    faster = [n / c for c, n in zip(p95["cut-ins"], p95["none"], strict=True)]
    kept = [c / n for c, n in zip(rates["cut-ins"], rates["none"], strict=True)]
    alls = {mode: [run.all_pairs_per_s for run in runs[mode]] for mode in MODES}
    served = [c / n for c, n in zip(alls["cut-ins"], alls["none"], strict=True)]
    print(f"small p95, none / cut-ins: {statistics.median(faster):.2f}x (median; {min(faster):.2f}-"
          f"{max(faster):.2f}x)")
    print(f"bulk pairs/s, cut-ins / none: {statistics.median(kept):.2f}x (median; {min(kept):.2f}-"
          f"{max(kept):.2f}x)")
    scored = [c.tokens_per_s / n.tokens_per_s for c, n in zip(runs["cut-ins"], runs["none"], strict=True)]
    print(f"tokens/s, cut-ins / none: {statistics.median(scored):.2f}x (median; {min(scored):.2f}-"
          f"{max(scored):.2f}x)")
    print(f"all pairs/s, cut-ins / none: {statistics.median(served):.2f}x (median; {min(served):.2f}-"
          f"{max(served):.2f}x)")


if __name__ == "__main__":
    main()
