"""The host side of scoring: everything but the network's forward pass, engine against raw predict, one run.

Both sides load the MiniLM benchmark model and then have its network's `forward` replaced by one that returns
zero logits at once, so what is timed is the work around the pass: for the engine, validation, the cache,
one-pass tokenization, token-budget batching, padding, the copy to the device, delivery and sorting; for raw
`CrossEncoder.predict` (batch 32), its tokenization, collation and copies. On a GPU the pass runs
asynchronously, so the engine's host rate is the most tokens per second it can feed a GPU: a GPU that
consumes tokens faster than this waits for Python. The host time per batch is what a pass must outlast for
the GPU never to wait.

Run: .venv/bin/python -m bench.host_path   (add --device cuda on a GPU host)
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
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # as start.sh runs the service

import torch  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from sentence_transformers import CrossEncoder  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

from bench.workload import Request, build_benchmark_model, build_workload  # noqa: E402
from reranker import Reranker, Settings  # noqa: E402
from reranker.metrics import Metrics  # noqa: E402


def without_forward(network: torch.nn.Module) -> None:
    """Replace the network's forward pass (what sentence-transformers calls) by zero logits, on its device."""

    def zero_logits(input_ids: torch.Tensor, **features: Any) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=torch.zeros(len(input_ids), 1, device=input_ids.device))

    network.forward = zero_logits


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU host (the copies then are real)")
    parser.add_argument("--batch-tokens", default="auto", help="RERANKER_BATCH_TOKENS for the engine")
    args = parser.parse_args()

    workload = build_workload(args.requests, args.docs)
    warmup = build_workload(2, args.docs, seed=99)
    n_pairs = sum(len(r.documents) for r in workload)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_benchmark_model(Path(tmp) / "minilm-l6-reranker")
        baseline = CrossEncoder(str(path), device=args.device)
        assert baseline.transformers_model is not None
        without_forward(baseline.transformers_model)

        def raw(request: Request) -> object:
            return baseline.predict([(request.query, d) for d in request.documents], batch_size=32,
                                    show_progress_bar=False)

        for request in warmup:
            raw(request)
        raw_seconds = timed(lambda: [raw(r) for r in workload])

        env = {"RERANKER_MODEL": str(path), "RERANKER_DEVICE": args.device, "RERANKER_BACKEND": "torch",
               "RERANKER_CACHE_SIZE": "0", "RERANKER_BATCH_TOKENS": args.batch_tokens}
        rates: dict[str, tuple[float, float, float]] = {}  # mode -> (seconds, tokens, batches)
        for mode, callers in (("sequential", 1), (f"{args.concurrency} concurrent callers", args.concurrency)):
            metrics = Metrics(CollectorRegistry())
            with Reranker.from_settings(Settings.from_env(env), metrics=metrics) as reranker:
                assert reranker.model.cross_encoder.transformers_model is not None
                without_forward(reranker.model.cross_encoder.transformers_model)
                for request in warmup:
                    reranker.rerank(request.query, request.documents)
                tokens_before = metrics.registry.get_sample_value("reranker_input_tokens_total") or 0.0
                batches_before = metrics.registry.get_sample_value("reranker_batch_size_count") or 0.0
                with ThreadPoolExecutor(callers) as pool:
                    seconds = timed(lambda: list(pool.map(
                        lambda r: reranker.rerank(r.query, r.documents), workload)))
                tokens = (metrics.registry.get_sample_value("reranker_input_tokens_total") or 0.0) - tokens_before
                batches = (metrics.registry.get_sample_value("reranker_batch_size_count") or 0.0) - batches_before
                budget = reranker.batch_tokens
            rates[mode] = (seconds, tokens, batches)

    raw_rate = n_pairs / raw_seconds
    tokens_per_pair = rates["sequential"][1] / n_pairs
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, device {args.device}, TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']}")
    print(f"workload: {args.requests} requests x {args.docs} documents = {n_pairs} pairs, "
          f"{tokens_per_pair:.0f} tokens per pair (CPython docstrings); network forward replaced by zero logits")
    print(f"raw CrossEncoder.predict host path, batch 32 : {raw_rate:8.0f} pairs/s, "
          f"{raw_rate * tokens_per_pair / 1e3:6.0f}k tokens/s  (1.00x)")
    for mode, (seconds, tokens, batches) in rates.items():
        rate = n_pairs / seconds
        print(f"engine host path, {mode:<22}: {rate:8.0f} pairs/s, {tokens / seconds / 1e3:6.0f}k tokens/s  "
              f"({rate / raw_rate:.2f}x); {batches:.0f} batches of <= {budget} tokens, "
              f"{seconds / batches * 1e3:.1f} ms of host time per batch")


if __name__ == "__main__":
    main()
