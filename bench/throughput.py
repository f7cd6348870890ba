"""Throughput of Reranker against raw CrossEncoder.predict (float32) on one seeded workload, in one run.

Run: .venv/bin/python -m bench.throughput   (prints the figures and ratios that README.md quotes)
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # as start.sh runs the service

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from sentence_transformers import CrossEncoder  # noqa: E402

from bench.workload import Request, build_benchmark_model, build_workload  # noqa: E402
from reranker import Reranker, Settings  # noqa: E402


def timed(run: Callable[[], list[np.ndarray]]) -> tuple[float, list[np.ndarray]]:
    started = time.perf_counter()
    scores = run()
    return time.perf_counter() - started, scores


def scores_by_index(reranker: Reranker, request: Request) -> np.ndarray:
    results = reranker.rerank(request.query, request.documents)
    out = np.empty(len(request.documents))
    for result in results:
        out[result.index] = result.score
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    workload = build_workload(args.requests, args.docs)
    warmup = build_workload(2, args.docs, seed=99)
    n_pairs = sum(len(r.documents) for r in workload)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_benchmark_model(Path(tmp) / "minilm-l6-reranker")
        settings = Settings.from_env({"RERANKER_MODEL": str(path)})  # defaults otherwise

        baseline = CrossEncoder(str(path), device="cuda" if torch.cuda.is_available() else "cpu")
        for request in warmup:
            baseline.predict([(request.query, d) for d in request.documents], show_progress_bar=False)
        raw_seconds, raw_scores = timed(lambda: [
            baseline.predict([(r.query, d) for d in r.documents], batch_size=32, show_progress_bar=False)
            for r in workload
        ])

        # A fresh Reranker per mode, so no mode is served from the cache of another.
        with Reranker.from_settings(settings) as reranker:
            for request in warmup:
                reranker.rerank(request.query, request.documents)
            seq_seconds, seq_scores = timed(lambda: [scores_by_index(reranker, r) for r in workload])
            describe = f"{reranker.model.device}, {reranker.model.dtype}, max_length {reranker.model.max_length}"
        with Reranker.from_settings(settings) as reranker:
            for request in warmup:
                reranker.rerank(request.query, request.documents)
            with ThreadPoolExecutor(args.concurrency) as pool:
                conc_seconds, conc_scores = timed(
                    lambda: list(pool.map(lambda r: scores_by_index(reranker, r), workload))
                )
        # The same engine in float32 separates what batching buys from what the dtype buys.
        float32 = Settings.from_env({"RERANKER_MODEL": str(path), "RERANKER_DTYPE": "float32"})
        with Reranker.from_settings(float32) as r32:
            for request in warmup:
                r32.rerank(request.query, request.documents)
            f32_seconds, f32_scores = timed(lambda: [scores_by_index(r32, r) for r in workload])
        # torch.compile (RERANKER_COMPILE=on): its compile and warm-up are in load_seconds, not in the timing.
        compiled = Settings.from_env({"RERANKER_MODEL": str(path), "RERANKER_COMPILE": "on",
                                      "RERANKER_BACKEND": "torch"})
        with Reranker.from_settings(compiled) as rc:
            compile_load = rc.model.load_seconds
            for request in warmup:
                rc.rerank(request.query, request.documents)
            compiled_seconds, compiled_scores = timed(lambda: [scores_by_index(rc, r) for r in workload])

    raw_rate, seq_rate, conc_rate, f32_rate, compiled_rate = (
        n_pairs / s for s in (raw_seconds, seq_seconds, conc_seconds, f32_seconds, compiled_seconds)
    )
    compiled_diff = max(np.max(np.abs(a - b)) for a, b in zip(compiled_scores, seq_scores, strict=True))
    f32_diff = max(np.max(np.abs(a - b)) for a, b in zip(f32_scores, raw_scores, strict=True))
    diffs = [np.max(np.abs(a - b)) for a, b in zip(seq_scores, raw_scores, strict=True)]
    rhos = [spearmanr(a, b).statistic for a, b in zip(seq_scores, raw_scores, strict=True)]
    overlaps = [
        len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10
        for a, b in zip(seq_scores, raw_scores, strict=True)
    ]
    concurrent_same = max(np.max(np.abs(a - b)) for a, b in zip(conc_scores, seq_scores, strict=True))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(f"workload: {args.requests} requests x {args.docs} documents = {n_pairs} pairs (CPython docstrings)")
    print(f"Reranker default settings: {describe}")
    print(f"raw CrossEncoder.predict float32, batch 32 : {raw_rate:8.1f} pairs/s  (1.00x)")
    print(f"Reranker sequential                        : {seq_rate:8.1f} pairs/s  ({seq_rate / raw_rate:.2f}x)")
    print(f"Reranker {args.concurrency} concurrent callers               : {conc_rate:8.1f} pairs/s  "
          f"({conc_rate / raw_rate:.2f}x)")
    print(f"Reranker sequential, RERANKER_DTYPE=float32 : {f32_rate:8.1f} pairs/s  ({f32_rate / raw_rate:.2f}x), "
          f"max |score diff| vs raw {f32_diff:.1e}")
    print(f"Reranker sequential, RERANKER_COMPILE=on    : {compiled_rate:8.1f} pairs/s  "
          f"({compiled_rate / raw_rate:.2f}x; {compiled_rate / seq_rate:.2f}x uncompiled), load + compile "
          f"{compile_load:.1f} s, max |score diff| vs uncompiled {compiled_diff:.1e}")
    print(f"fidelity of the default dtype vs float32: max |score diff| {max(diffs):.5f}, "
          f"Spearman mean {np.mean(rhos):.4f} / min {np.min(rhos):.4f}, top-10 overlap mean "
          f"{np.mean(overlaps):.3f} / min {np.min(overlaps):.2f}")
    print(f"concurrent vs sequential Reranker scores: max |diff| {concurrent_same:.2e}")


if __name__ == "__main__":
    main()
