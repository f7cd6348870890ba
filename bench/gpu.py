"""The engine on a GPU against raw CrossEncoder.predict (fp16, batch 32), same process, same workloads.

Builds, on the GPU itself, a bge-reranker-v2-m3-shaped model (XLM-RoBERTa-large: 24 layers, hidden 1024,
16 heads, FFN 4096, vocab 250002) and a Qwen3-Reranker-0.6B-shaped one (28 layers, hidden 1024, 16 heads
/ 8 KV heads, head_dim 128, FFN 3072) with random weights, and runs the workloads of the GPU issue. Prints
pairs/s, tokens/s, useful MFU (FLOPs of the real, unpadded tokens / 989 TFLOP/s, the H100 SXM dense
fp16 peak), GPU busy share (NVML, sampled every 50 ms), p50/p95 latency and the ratio to raw predict.

Each variant (VARIANTS: token budget 16384 or 32768, eager, torch.compile or CUDA graphs) runs every workload
against the same raw-predict baseline, and a fidelity section scores real MiniLM-L6 weights with each variant
against float32 raw predict (Spearman), the condition for adopting it.

Run on a GPU host: python -m bench.gpu        (exits with a message where there is no CUDA)
                   python -m bench.gpu --only bge --variants eager-32k,cudagraphs-32k
Smoke run of the same code on the CPU, tiny shapes, no meaningful figures: python -m bench.gpu --smoke
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import torch  # noqa: E402
from sentence_transformers import CrossEncoder  # noqa: E402

from bench.gpu_checks import fidelity, profile  # noqa: E402
from reranker import Reranker, Settings  # noqa: E402
from reranker.gpu import Nvml  # noqa: E402
from tests.tiny_models import build_causal_reranker, build_xlmr_reranker, random_text  # noqa: E402

PEAK_FLOPS = 989e12  # H100 SXM, dense fp16/bf16
# The real models' layers. Their vocabularies (250,002 and 151,669 rows) are left at the ~800 tokens of the tokenizer
# built here: an embedding row is a lookup, not FLOPs, and the service refuses a model whose vocabulary is over twice
# its tokenizer's (reranker.model.check_vocabulary: a folder without its tokenizer files).
BGE_M3 = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
QWEN3_06B = {"hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
             "head_dim": 128, "intermediate_size": 3072}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


@dataclass(frozen=True)
class Workload:
    name: str
    requests: list[tuple[str, list[str]]]
    callers: int = 1


def flops_per_pair(config: Any, n: int) -> float:
    """Forward FLOPs of one pair of n tokens: projections, FFN and attention (2 FLOPs per multiply-add)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    projections = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2  # q, o; k, v
    gated = getattr(config, "model_type", "") == "qwen3"
    ffn = (3 if gated else 2) * d * config.intermediate_size
    return 2.0 * layers * (projections + ffn) * n + 4.0 * layers * n * n * heads * head_dim


def documents_of(tokenizer: Any, rng: random.Random, count: int, tokens: int) -> list[str]:
    """`count` documents of about `tokens` tokens each, cut at a token boundary."""
    out = []
    for _ in range(count):
        text = random_text(rng, tokens)
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = encoding["offset_mapping"]
        target = max(1, int(rng.gauss(tokens, tokens * 0.15)))
        out.append(text[:spans[min(target, len(spans)) - 1][1]])
    return out


def workloads(tokenizer: Any, scale: float) -> list[Workload]:
    rng = random.Random(0)

    def requests(n: int, docs: int, tokens: int) -> list[tuple[str, list[str]]]:
        return [(f"question {i}: " + random_text(rng, 8), documents_of(tokenizer, rng, docs, tokens))
                for i in range(n)]

    def size(n: int) -> int:
        return max(1, int(n * scale))

    return [
        Workload("32 x 100 short passages (~200 tokens/pair)", requests(size(32), size(100), 180)),
        Workload("16 x 100 RAG chunks (~600 tokens/pair)", requests(size(16), size(100), 570)),
        Workload("3 x 1000-document requests (~180 tokens)", requests(3, size(1000), 160)),
        Workload("400 x 8 documents, 16 callers", requests(size(400), 8, 180), callers=16),
        Workload("16 x 100 RAG chunks, 8 callers", requests(size(16), size(100), 570), callers=8),
    ]


class BusySampler:
    """The GPU's utilization (share of time a kernel ran), from NVML every 50 ms."""

    def __init__(self, nvml: Nvml) -> None:
        self.nvml, self._stop = nvml, threading.Event()
        self.samples: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            readings = self.nvml.read()
            if readings:
                self.samples.append(readings[0].utilization_ratio)

    def __enter__(self) -> BusySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def share(self) -> str:
        return f"{statistics.mean(self.samples):.0%}" if self.samples else "n/a"


def run(requests: Sequence[tuple[str, list[str]]], callers: int,
        call: Callable[[str, list[str]], object]) -> tuple[float, list[float]]:
    latencies: list[float] = []

    def one(request: tuple[str, list[str]]) -> None:
        started = time.perf_counter()
        call(*request)
        latencies.append(time.perf_counter() - started)

    sync()
    started = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(one, requests))
    sync()
    return time.perf_counter() - started, sorted(latencies)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # deliberate: the timed region ends when the GPU is done


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


# The options of the GPU issue's item 3, each a set of settings; raw predict is measured once per workload.
VARIANTS = {
    "eager-16k": {"RERANKER_BATCH_TOKENS": "16384"},
    "eager-32k": {"RERANKER_BATCH_TOKENS": "32768"},
    "compile-32k": {"RERANKER_BATCH_TOKENS": "32768", "RERANKER_COMPILE": "on"},
    "cudagraphs-32k": {"RERANKER_BATCH_TOKENS": "32768", "RERANKER_COMPILE": "cudagraphs"},
}
CPU_VARIANTS = ["eager-16k", "compile-32k"]  # what --smoke can run: CUDA graphs need CUDA


@dataclass
class Baseline:
    """Raw predict's time for each workload, and what the figures need: pairs, real tokens, FLOPs."""

    workload: Workload
    raw_seconds: float
    pairs: int
    tokens: int
    flops: float


def engine_settings(path: Path, device: str, variant: str) -> Settings:
    return Settings.from_env({"RERANKER_MODEL": str(path), "RERANKER_DEVICE": device, "RERANKER_BACKEND": "torch",
                              "RERANKER_CACHE_SIZE": "0", "RERANKER_MAX_LENGTH": "1024", **VARIANTS[variant]})


def baselines(path: Path, device: str, scale: float) -> tuple[str, list[Baseline]]:
    """Raw CrossEncoder.predict, batch 32, in the dtype the engine picks (float16, or bfloat16 for a
    checkpoint that declares it), on every workload; also the engine's description of the model."""
    with Reranker.from_settings(engine_settings(path, device, "eager-16k")) as reranker:
        model = reranker.model
        described = f"{model.dtype} on {model.device}, max_length {model.max_length}"
        raw = CrossEncoder(str(path), device=device, model_kwargs={"dtype": getattr(torch, model.dtype)})
        raw.max_seq_length = model.max_length
        config = model.cross_encoder.config
        out = []
        for workload in workloads(model.tokenizer, scale):
            for query, docs in workload.requests[:2]:
                raw.predict([(query, d) for d in docs], batch_size=32, show_progress_bar=False)
            tokens = [doc.pair.n_tokens for q, docs in workload.requests
                      for doc in model.encoder.encode(q, docs, None)]
            seconds, _ = run(workload.requests, 1, lambda q, docs: raw.predict(
                [(q, d) for d in docs], batch_size=32, show_progress_bar=False))
            out.append(Baseline(workload, seconds, len(tokens), sum(tokens),
                                sum(flops_per_pair(config, n) for n in tokens)))
    return described, out


def bench_model(name: str, path: Path, device: str, scale: float, nvml: Nvml, variants: Sequence[str],
                profile_dir: Path | None = None) -> None:
    described, measured = baselines(path, device, scale)
    print(f"\n## {name}: {described}")
    print(f"{'workload':45s} {'variant':15s} {'raw pairs/s':>11s} {'pairs/s':>8s} {'ratio':>6s} {'tokens/s':>9s} "
          f"{'MFU':>6s} {'busy':>5s} {'p50 ms':>7s} {'p95 ms':>7s}")
    for variant in variants:
        with Reranker.from_settings(engine_settings(path, device, variant)) as reranker:
            print(f"{variant}: batch tokens {reranker.batch_tokens}, compile {reranker.model.compiled}, "
                  f"load + warm-up {reranker.model.load_seconds:.1f} s")
            for base in measured:
                # CUDA graphs are recorded the first times each padded shape is served: all of them, untimed.
                warm = base.workload.requests if reranker.model.compiled == "cudagraphs" else base.workload.requests[:2]
                for query, docs in warm:
                    reranker.rerank(query, docs)
                with BusySampler(nvml) as busy:
                    seconds, latencies = run(base.workload.requests, base.workload.callers, reranker.rerank)
                print(f"{base.workload.name:45s} {variant:15s} {base.pairs / base.raw_seconds:11.0f} "
                      f"{base.pairs / seconds:8.0f} {base.raw_seconds / seconds:5.2f}x {base.tokens / seconds:9.0f} "
                      f"{base.flops / seconds / PEAK_FLOPS:6.1%} {busy.share:>5s} "
                      f"{percentile(latencies, 0.5) * 1e3:7.0f} {percentile(latencies, 0.95) * 1e3:7.0f}")
            if profile_dir is not None and variant == variants[0]:
                rag = next(base.workload for base in measured if "RAG" in base.workload.name)
                profile(reranker, rag.requests[:4], profile_dir, f"{name.split()[0]}-{variant}")
        torch._dynamo.reset()  # the next variant starts from no compiled code and frees CUDA-graph pools


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    parser.add_argument("--only", choices=["bge", "qwen3", "fidelity"], help="one part only")
    parser.add_argument("--variants", type=lambda raw: raw.split(","),
                        help=f"comma-separated, from: {', '.join(VARIANTS)} (default: all; --smoke: "
                             f"{', '.join(CPU_VARIANTS)})")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="also profile 4 RAG-chunk requests with the first variant: a table and a Chrome trace "
                             "per model shape in DIR")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU and the CUDA build of torch (torch.cuda.is_available() is False "
                 "here); run `python -m bench.gpu --smoke` for a CPU check of the script itself")
    device = "cpu" if args.smoke else "cuda"
    scale = 0.05 if args.smoke else 1.0
    variants = args.variants or (CPU_VARIANTS if args.smoke else list(VARIANTS))
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; use some of: {', '.join(VARIANTS)}")
    nvml = Nvml()
    if args.smoke:
        print("SMOKE RUN on the CPU with tiny shapes: it checks the script, its figures mean nothing")
    elif torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "bge"):
            shape = TINY if args.smoke else BGE_M3
            path = build_xlmr_reranker(Path(tmp) / "bge-reranker-v2-m3-shaped", max_positions=8192,
                                       dtype=torch.float16 if not args.smoke else None, device=device, **shape)
            bench_model("bge-reranker-v2-m3 shape (XLM-RoBERTa-large)", path, device, scale, nvml, variants,
                        args.profile)
        if args.only in (None, "qwen3"):
            shape = {**TINY, "num_key_value_heads": 2, "head_dim": 16} if args.smoke else QWEN3_06B
            path = build_causal_reranker(Path(tmp) / "Qwen3-Reranker-0.6B-shaped",
                                         dtype=torch.bfloat16 if not args.smoke else None, device=device, **shape)
            bench_model("Qwen3-Reranker-0.6B shape", path, device, scale, nvml, variants, args.profile)
    if args.only in (None, "fidelity"):
        fidelity(device, variants, VARIANTS)


if __name__ == "__main__":
    main()
