"""How the padded-token budget of one forward pass changes throughput, against raw CrossEncoder.predict.

Run: .venv/bin/python -m bench.batch_tokens [--dtype float32] [--requests 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # as start.sh runs the service

import torch  # noqa: E402
from sentence_transformers import CrossEncoder  # noqa: E402

from bench.workload import build_benchmark_model, build_workload  # noqa: E402
from reranker import Reranker, Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--budgets", default="256,512,1024,2048,4096,16384")
    args = parser.parse_args()
    workload = build_workload(args.requests, 50)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_benchmark_model(Path(tmp) / "minilm-l6-reranker")
        baseline = CrossEncoder(str(path), device="cuda" if torch.cuda.is_available() else "cpu")
        baseline.predict([(workload[0].query, d) for d in workload[0].documents], show_progress_bar=False)
        started = time.perf_counter()
        for r in workload:
            baseline.predict([(r.query, d) for d in r.documents], batch_size=32, show_progress_bar=False)
        raw = time.perf_counter() - started
        print(f"raw CrossEncoder.predict float32, batch 32: {raw:.2f} s (1.00x)")
        for budget in (int(b) for b in args.budgets.split(",")):
            settings = Settings(model=str(path), dtype=args.dtype, backend="torch", batch_tokens=budget, cache_size=0)
            with Reranker.from_settings(settings) as reranker:
                reranker.rerank(workload[0].query, workload[0].documents)
                started = time.perf_counter()
                for r in workload:
                    reranker.rerank(r.query, r.documents)
                seconds = time.perf_counter() - started
            print(f"Reranker {args.dtype}, RERANKER_BATCH_TOKENS={budget:>6}: {seconds:.2f} s ({raw / seconds:.2f}x)")


if __name__ == "__main__":
    main()
