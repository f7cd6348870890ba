"""Tracing overhead: pairs/s over HTTP with tracing on and exporting (OTLP/HTTP to a loopback collector) ÷ off.

Both modes run in one process, on one loaded model, in back-to-back pairs of rounds (off then on, then on then
off, ...); each round sends the workload from concurrent callers to /v1/rerank. The figure is the median over
the pairs of on ÷ off, so that a machine whose speed drifts (a shared one) moves both sides of each ratio.

Run: .venv/bin/python -m bench.tracing   (prints the ratio that README.md quotes)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import httpx  # noqa: E402
import torch  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from bench.workload import Request, build_benchmark_model, build_workload  # noqa: E402
from reranker import Reranker, Settings  # noqa: E402
from reranker.loading import load_model  # noqa: E402
from reranker.metrics import Metrics  # noqa: E402
from reranker.tracing import Tracing  # noqa: E402
from tests.otlp_receiver import otlp_receiver  # noqa: E402
from tests.servers import serve  # noqa: E402
from web.http import create_app  # noqa: E402


def send_all(url: str, workload: list[Request], concurrency: int) -> float:
    """Seconds to rerank the whole workload through /v1/rerank from `concurrency` callers."""
    with httpx.Client(base_url=url, timeout=600) as client, ThreadPoolExecutor(concurrency) as pool:
        def call(request: Request) -> None:
            response = client.post("/v1/rerank", json={"query": request.query, "documents": request.documents})
            response.raise_for_status()

        started = time.perf_counter()
        list(pool.map(call, workload))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=8, help="requests per round")
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--pairs-of-rounds", type=int, default=10)
    args = parser.parse_args()

    workload = build_workload(args.requests, args.docs)
    warmup = build_workload(2, args.docs, seed=99)
    n_pairs = sum(len(r.documents) for r in workload)
    seconds: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp, otlp_receiver() as (collector, received):
        path = build_benchmark_model(Path(tmp) / "minilm-l6-reranker")
        # No cache: every round scores every pair. The SDK reads the endpoint from the environment.
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector
        environ = {"RERANKER_MODEL": str(path), "RERANKER_CACHE_SIZE": "0"}
        off_settings = Settings.from_env({**environ, "RERANKER_TRACING": "0"})
        on_settings = Settings.from_env({**environ, "OTEL_EXPORTER_OTLP_ENDPOINT": collector})
        assert on_settings.tracing and not off_settings.tracing
        model = load_model(off_settings)
        on_metrics = Metrics(CollectorRegistry())
        tracing = Tracing.from_settings(on_settings, on_metrics)
        with Reranker(model, off_settings, metrics=Metrics(CollectorRegistry())) as off, \
                Reranker(model, on_settings, metrics=on_metrics, tracing=tracing) as on, \
                serve(create_app(off, ui=False)) as off_url, serve(create_app(on, ui=False)) as on_url:
            urls = {"off": off_url, "on": on_url}
            for url in urls.values():
                send_all(url, warmup, args.concurrency)
            for pair in range(args.pairs_of_rounds):
                for mode in ("off", "on") if pair % 2 == 0 else ("on", "off"):
                    seconds[mode].append(send_all(urls[mode], workload, args.concurrency))
        assert tracing.shutdown(), "the loopback collector should take every span"
        describe = f"{model.device}, {model.dtype}, max_length {model.max_length}"
    spans = len(received.spans())
    dropped = sum(on_metrics.registry.get_sample_value("reranker_trace_spans_dropped_total", {"reason": reason})
                  or 0.0 for reason in ("queue_full", "export_failed", "shutdown"))
    off_rate, on_rate = (len(seconds[mode]) * n_pairs / sum(seconds[mode]) for mode in ("off", "on"))
    ratios = [off / on for off, on in zip(seconds["off"], seconds["on"], strict=True)]  # rates: on ÷ off

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model: MiniLM-L6 benchmark model (bench/workload.py), {describe}")
    print(f"workload: {args.pairs_of_rounds} pairs of rounds, a round = {args.requests} requests x {args.docs} "
          f"documents from {args.concurrency} concurrent callers over HTTP; load average {os.getloadavg()[0]:.1f}")
    print(f"tracing off                         : {off_rate:8.1f} pairs/s")
    print(f"tracing on, exporting over OTLP/HTTP: {on_rate:8.1f} pairs/s")
    print(f"on ÷ off: median of the {len(ratios)} pairs {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}); all rounds together {on_rate / off_rate:.3f}")
    print(f"spans received by the loopback collector: {spans}, dropped: {dropped:.0f}")


if __name__ == "__main__":
    main()
