"""How fast an abandoned request is noticed, and how much of it still runs: a client sends /v1/rerank and
closes its connection after `--abandon-ms`. Prints the time from the close to the engine's cancellation (the
request's own duration, which ends there, less the delay) and the share of its pairs scored anyway, against the
share of the request's time that had passed (the least any server can have run), both measured in this run.
Passes are kept short (`--batch-tokens`) so that what runs after the close is decided by when it is noticed,
not by one long pass already on the device.

Run: .venv/bin/python -m bench.disconnect   (README's reliability figures)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import httpx  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from bench.workload import build_benchmark_model, build_workload  # noqa: E402
from reranker import Reranker, Settings  # noqa: E402
from reranker.metrics import Metrics  # noqa: E402
from tests.servers import serve  # noqa: E402
from web.http import create_app  # noqa: E402


def abandon(url: str, body: bytes, after: float) -> None:
    """POST `body` to /v1/rerank over a raw socket and close the connection `after` seconds later."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(after)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target-ms", type=float, default=150.0, help="how long the whole request takes")
    parser.add_argument("--abandon-ms", type=float, default=50.0)
    parser.add_argument("--doc-chars", type=int, default=200, help="passages cut to this many characters")
    parser.add_argument("--batch-tokens", type=int, default=256)
    parser.add_argument("--trials", type=int, default=7)
    args = parser.parse_args()

    workload = build_workload(40, 25, seed=5)
    pool = [doc[:args.doc_chars] for r in workload for doc in r.documents]
    query = workload[0].query
    metrics = Metrics(CollectorRegistry())
    with tempfile.TemporaryDirectory() as tmp:
        path = build_benchmark_model(Path(tmp) / "minilm-l6-reranker")
        settings = Settings.from_env({"RERANKER_MODEL": str(path), "RERANKER_CACHE_SIZE": "0",
                                      "RERANKER_BATCH_TOKENS": str(args.batch_tokens)})
        with Reranker.from_settings(settings, metrics=metrics) as reranker, \
                serve(create_app(reranker, ui=False)) as url:
            def whole_request(documents: list[str]) -> float:
                started = time.perf_counter()
                httpx.post(f"{url}/v1/rerank", json={"query": query, "documents": documents},
                           timeout=60).raise_for_status()
                return time.perf_counter() - started

            whole_request(pool[:32])  # warm-up
            per_doc = statistics.median(whole_request(pool[:32]) for _ in range(3)) / 32
            documents = pool[:max(8, min(len(pool), settings.max_docs, round(args.target_ms / 1000 / per_doc)))]
            whole = statistics.median(whole_request(documents) for _ in range(args.trials))
            body = json.dumps({"query": query, "documents": documents}).encode()
            shares, noticed = [], []
            seconds = {"route": "/v1/rerank"}
            for trial in range(args.trials):
                before = sample(metrics, "reranker_pairs_scored_total")
                took = sample(metrics, "reranker_request_duration_seconds_sum", **seconds)
                abandon(url, body, args.abandon_ms / 1000)
                deadline = time.monotonic() + 60
                while sample(metrics, "reranker_requests_total", route="/v1/rerank", status="cancelled") <= trial:
                    if time.monotonic() > deadline:
                        raise SystemExit("the abandoned request was never counted as cancelled")
                    time.sleep(0.01)
                while reranker.queued_pairs or sample(metrics, "reranker_inflight_requests"):
                    time.sleep(0.01)
                time.sleep(0.3)  # a pass already on the device finishes and is counted
                shares.append((sample(metrics, "reranker_pairs_scored_total") - before) / len(documents))
                took = sample(metrics, "reranker_request_duration_seconds_sum", **seconds) - took
                noticed.append(took - args.abandon_ms / 1000)

    elapsed_share = min(1.0, args.abandon_ms / 1000 / whole)
    scored = statistics.mean(shares)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {__import__('torch').__version__}")
    print(f"request: {len(documents)} documents of up to {args.doc_chars} characters, {whole * 1000:.0f} ms whole "
          f"(median of {args.trials}); "
          f"abandoned after {args.abandon_ms:.0f} ms = {elapsed_share:.0%} of it")
    print(f"noticed after the close: mean {statistics.mean(noticed) * 1000:.1f} ms, "
          f"max {max(noticed) * 1000:.1f} ms (batch budget {args.batch_tokens} tokens)")
    print(f"pairs scored after the client left: mean {scored:.0%} "
          f"(trials: {', '.join(f'{s:.0%}' for s in shares)})")
    print(f"scored share / elapsed share: {scored / elapsed_share:.2f}x (1.00x: nothing ran after the client left)")


if __name__ == "__main__":
    main()
