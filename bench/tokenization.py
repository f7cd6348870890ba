"""Tokenization throughput: the engine's one-pass encoder against CrossEncoder.preprocess, in one run.

preprocess is what CrossEncoder.predict spends on tokenizing; the reference encoder is preprocess plus the
second pass for document lengths that the engine needed before (its fallback path today); the one-pass
encoder is what the engine uses. Each is timed with the tokenizer's thread pool off and on.

Run: .venv/bin/python -m bench.tokenization
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from bench.report import best_of  # noqa: E402
from bench.workload import Request, build_benchmark_model, build_workload  # noqa: E402
from reranker import Settings  # noqa: E402
from reranker.loading import load_model  # noqa: E402
from reranker.model import ScoringModel  # noqa: E402
from reranker.tokens import ReferenceEncoder, TextPairEncoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    workload = build_workload(args.requests, args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_benchmark_model(Path(tmp) / "minilm-l6-reranker")
        model: ScoringModel = load_model(Settings(model=str(path), device="cpu", backend="torch", dtype="float32",
                                                  max_length=512))
    assert isinstance(model.encoder, TextPairEncoder), "the benchmark model should take the one-pass encoder"
    reference = ReferenceEncoder(model.cross_encoder, model.tokenizer, model.max_length)
    tokens = sum(doc.pair.n_tokens for r in workload for doc in model.encoder.encode(r.query, r.documents))

    def each(fn: Callable[[Request], object]) -> Callable[[], None]:
        def run() -> None:
            for request in workload:
                fn(request)

        return run

    paths = {
        "CrossEncoder.preprocess (predict's tokenization)": each(
            lambda r: model.cross_encoder.preprocess([(r.query, d) for d in r.documents])),
        "reference encoder (preprocess + length pass)": each(lambda r: reference.encode(r.query, r.documents)),
        "one-pass encoder (the engine)": each(lambda r: model.encoder.encode(r.query, r.documents)),
    }
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"workload: {args.requests} requests x {args.docs} documents, {tokens} tokens in pairs (max_length 512)")
    for parallel in ("false", "true"):
        os.environ["TOKENIZERS_PARALLELISM"] = parallel  # read by the Rust tokenizer at each batch call
        seconds = {name: best_of(args.repeats, run) for name, run in paths.items()}
        base = seconds["CrossEncoder.preprocess (predict's tokenization)"]
        print(f"TOKENIZERS_PARALLELISM={parallel}")
        for name, elapsed in seconds.items():
            print(f"  {name:50s}: {tokens / elapsed / 1e3:8.0f}k tokens/s  ({base / elapsed:.2f}x preprocess)")


if __name__ == "__main__":
    main()
