"""Does OpenVINO still score int8 graphs wrongly on two streams on this CPU? The check behind
reranker/backends/openvino.py's `int8_streams`, and the reproducer for a report upstream.

On the 2-core AMD EPYC with AVX-512 VNNI/BF16 and no AMX, OpenVINO 2026.4.1's CPU plugin gave logits of -200 where
float32 gave -0.2 for the benchmark model's weights-only int8 graph compiled for NUM_STREAMS=2, even with one call
at a time (docs/cpu.md#streams). So int8 gets one stream on a CPU without AMX-INT8. Run this after an OpenVINO
upgrade on such a CPU: when every two-stream row agrees with float32, and the service at static int8 on two
streams also survives a few hundred requests (it corrupted its heap there, while scoring right), that rule can go.

The benchmark model (all-MiniLM-L6-v2 weights under a fresh head) is converted as the service converts it and
quantized as RERANKER_DTYPE=int8 quantizes it, weights-only and static. Each graph is compiled with plain OpenVINO
properties (printed, for the report): one stream on every thread and two streams, as the service would compile
it, then two streams under PERFORMANCE_HINT LATENCY, one stream of one thread, and two streams at float32
(INFERENCE_PRECISION_HINT f32). Each compile scores
the same batches one call at a time, and each row compares its logits with the float32 compile's.
Run: .venv/bin/python -m bench.int8_streams   [--requests 4 --docs 24]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import openvino as ov  # noqa: E402

from bench.report import host  # noqa: E402
from bench.workload import batcher_batches, build_benchmark_model, build_workload  # noqa: E402
from reranker.backends.convert import convert  # noqa: E402
from reranker.backends.int8 import calibration_groups, quantize, spearman  # noqa: E402
from reranker.backends.openvino import compiled_precision, cpu_properties, cpu_threads  # noqa: E402
from reranker.loading import load_model  # noqa: E402
from reranker.settings import Settings  # noqa: E402

# Logits further from float32's than this are wrong, not int8's rounding (which moved them by < 0.05 here).
WRONG = 1.0


def properties(streams: int, threads: int, precision: str | None, hint: str | None = None) -> dict[str, Any]:
    """The CPU plugin's properties as the service sets them, unless `hint` names another PERFORMANCE_HINT."""
    config = cpu_properties(streams, threads, precision)
    if hint is not None:
        config["PERFORMANCE_HINT"] = hint
    return config


def logits(compiled: ov.CompiledModel, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Every batch through one infer request, one call at a time."""
    request = compiled.create_infer_request()
    return np.concatenate([np.asarray(request.infer(arrays)[0], dtype=np.float64).reshape(-1) for arrays in batches])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--docs", type=int, default=24)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    args = parser.parse_args()
    threads = cpu_threads()
    print(f"host: {host()}")
    print(f"openvino {ov.get_version()}; {threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        path = build_benchmark_model(Path(tmp) / "minilm")
        model = load_model(Settings.from_env({"RERANKER_MODEL": str(path), "RERANKER_DEVICE": "cpu",
                                              "RERANKER_BACKEND": "torch", "RERANKER_DTYPE": "float32"}))
        workload = build_workload(args.requests, args.docs, seed=7)
        batches = [model.collate(batch).arrays() for batch in batcher_batches(model, workload, args.batch_tokens)]
        graph = convert(model.cross_encoder, model.extras, model.collate(model.encode([("q", "d")] * 2)),
                        causal=False)
        calibration = [model.collate(model.encode(group)).arrays()
                       for group in calibration_groups(model, Settings.from_env({"RERANKER_MODEL": str(path)}))]
        core = ov.Core()
        reference = logits(core.compile_model(graph, "CPU", properties(1, threads, "f32")), batches)
        print(f"{reference.size} pairs in {len(batches)} batches; float32 logits span "
              f"{reference.min():.3f} to {reference.max():.3f}")
        print("| graph | properties asked | compiled: streams, threads, precision | max abs error vs float32 "
              "| Spearman vs float32 | scores |")
        print("|---|---|---|---|---|---|")
        faults = 0
        for mode in ("weights", "static"):
            quantized = quantize(graph, calibration, mode)
            # As the service compiles it (precision left to OpenVINO: bfloat16 where the CPU has it), then the
            # variations that tell where the fault is: two streams under the other performance hint, one thread
            # alone, and two streams at float32.
            variants = [(1, threads, None, None), (2, threads, None, None), (2, threads, None, "LATENCY"),
                        (1, 1, None, None), (2, threads, "f32", None)]
            for streams, count, precision, hint in variants if threads >= 2 else variants[:1]:
                config = properties(streams, count, precision, hint)
                compiled = core.compile_model(quantized, "CPU", config)
                ran = (f"{compiled.get_property('NUM_STREAMS')}, {compiled.get_property('INFERENCE_NUM_THREADS')}, "
                       f"{compiled_precision(compiled)}")  # what OpenVINO made of them
                scores = logits(compiled, batches)
                error = float(np.max(np.abs(scores - reference)))
                wrong = error > WRONG or not np.all(np.isfinite(scores))
                faults += wrong and streams > 1
                print(f"| int8 {mode} | {config} | {ran} | {error:.4f} | {spearman(scores, reference):.4f} | "
                      f"{'WRONG' if wrong else 'right'} |")
        if threads < 2:
            print("one thread: no two-stream compile to check")
        elif faults:
            print(f"the fault reproduces: {faults} int8 graph(s) score wrongly on two streams here; keep int8 on one")
        else:
            print("no fault: every int8 graph scores right on two streams here; before giving int8 two streams, also "
                  "serve static int8 on two streams for a few hundred requests (it corrupted the heap there)")


if __name__ == "__main__":
    main()
