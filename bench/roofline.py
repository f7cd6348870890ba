"""How close the OpenVINO forward pass runs to this CPU's arithmetic ceiling, in one run.

The ceiling is measured, not looked up: the fastest of OpenVINO's own dense layers on MiniLM's shapes (feed-forward
up and down, attention projections; 512 to 8192 rows), at float32 and at bfloat16, with the service's compile
settings. The model is then run in-process on the token-budget batches the service's batcher would form from
bench/cpu.py's workload (length-sorted, RERANKER_BATCH_TOKENS), and its useful work is counted: 2 FLOPs per weight
per real token (embeddings are lookups, not counted) plus attention's 4 x tokens x width per layer, padding not
counted. The ratio of the two says how much a faster kernel could still win; what padding costs is printed
beside it.
Run: .venv/bin/python -m bench.roofline   [--requests 16 --docs 50 --batch-tokens 2048]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import openvino as ov  # noqa: E402
from openvino import opset13 as ops  # noqa: E402

from bench.report import best_of, host  # noqa: E402
from bench.workload import batcher_batches, build_benchmark_model, build_workload  # noqa: E402
from reranker.backends.convert import convert  # noqa: E402
from reranker.backends.openvino import compile_for_cpu, compiled_precision  # noqa: E402
from reranker.model import load_model  # noqa: E402
from reranker.settings import Settings  # noqa: E402

HINTS = ("f32", "bf16")


def best_seconds(run: Callable[[], object], repeats: int = 3) -> float:
    run()  # warm-up
    return best_of(repeats, run)


def dense_layer(core: ov.Core, hint: str, rows: int, width: int, inner: int) -> float:
    """GFLOP/s of one dense layer (rows x width @ width x inner) with the service's compile settings."""
    x = ops.parameter([rows, width], ov.Type.f32, name="x")
    weight = ops.constant(np.random.default_rng(0).standard_normal((width, inner)).astype(np.float32))
    compiled = compile_for_cpu(core, ov.Model([ops.matmul(x, weight, False, False)], [x]), hint)
    request = compiled.create_infer_request()
    data = {"x": np.random.default_rng(1).standard_normal((rows, width)).astype(np.float32)}
    seconds = best_seconds(lambda: [request.infer(data) for _ in range(10)])
    return 10 * 2 * rows * width * inner / seconds / 1e9


def dense_peak(core: ov.Core, hint: str) -> float:
    """The most OpenVINO's dense kernels reach here on this model's shapes (feed-forward up and down, attention
    projections), over a few batch sizes."""
    shapes = [(rows, width, inner) for rows in (512, 2048, 8192) for width, inner in ((384, 1536), (1536, 384),
                                                                                       (384, 384))]
    return max(dense_layer(core, hint, *shape) for shape in shapes)


def model_flops_per_token(config: Any, mean_tokens: float) -> float:
    """Useful FLOPs per real token of a BERT-style encoder: its dense layers, and attention over the pair."""
    width, layers, inner = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    dense = layers * (4 * width * width + 2 * width * inner)
    return 2 * dense + layers * 4 * mean_tokens * width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    args = parser.parse_args()
    print(f"host: {host()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = build_benchmark_model(Path(tmp) / "minilm")
        model = load_model(Settings.from_env({"RERANKER_MODEL": str(path), "RERANKER_DEVICE": "cpu",
                                              "RERANKER_BACKEND": "torch", "RERANKER_DTYPE": "float32"}))
        batches = batcher_batches(model, build_workload(args.requests, args.docs), args.batch_tokens)
        pairs = [pair for batch in batches for pair in batch]
        padded = [model.collate(batch).arrays() for batch in batches]
        tokens = sum(p.n_tokens for p in pairs)
        padded_tokens = sum(a["input_ids"].size for a in padded)
        per_token = model_flops_per_token(model.cross_encoder.config, tokens / len(pairs))
        graph = convert(model.cross_encoder, model.extras, model.collate(batches[0]), causal=False)
        core = ov.Core()
        print(f"{len(pairs)} pairs, {tokens / len(pairs):.1f} tokens each, {len(batches)} batches of <= "
              f"{args.batch_tokens} tokens; padding adds {padded_tokens / tokens - 1:.1%}; "
              f"{per_token / 1e6:.1f} MFLOP per token")
        print("| precision | model pairs/s | model GFLOP/s | dense-layer peak GFLOP/s | of peak |")
        print("|---|---|---|---|---|")
        for hint in HINTS:
            compiled = compile_for_cpu(core, graph, hint)
            ran = compiled_precision(compiled)
            if ran != hint:  # a bf16 hint on a CPU without bfloat16 runs f32
                print(f"| {hint} | runs as {ran} on this CPU | | | |")
                continue
            request = compiled.create_infer_request()

            def every_batch(request: ov.InferRequest = request) -> None:
                for arrays in padded:
                    request.infer(arrays)

            seconds = best_seconds(every_batch, repeats=2)
            achieved = tokens * per_token / seconds / 1e9
            peak = dense_peak(core, hint)
            print(f"| {hint} | {len(pairs) / seconds:.1f} | {achieved:.0f} | {peak:.0f} | {achieved / peak:.0%} |")


if __name__ == "__main__":
    main()
