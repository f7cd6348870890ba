"""The engine on a real CUDA GPU: half-precision fidelity, concurrency, a real out-of-memory, NVML, one device thread.

Run on a GPU host with `pytest -m gpu`. Without CUDA every test here is skipped with that reason. This module
imports nothing from web/: the GPU machine may have no FastAPI or Gradio.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from scipy.stats import spearmanr

from reranker import Reranker, Settings
from reranker.gpu import GpuCollector
from reranker.metrics import Metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real all-MiniLM-L6-v2 weights under a fresh head (bench/workload.py), so fp16 error is realistic."""
    from bench.workload import build_benchmark_model, minilm_source

    if minilm_source() is None:
        pytest.skip("no MiniLM weights: requirements-dev.txt, or RERANKER_BENCH_MINILM_DIR (bench/gpu_prepare.sh)")

    return build_benchmark_model(tmp_path_factory.mktemp("models") / "minilm-l6-reranker")


@pytest.fixture(scope="module")
def workload() -> list[tuple[str, list[str]]]:
    from bench.workload import build_workload

    return [(r.query, r.documents) for r in build_workload(8, 60)]


def settings(path: Path, **env: str) -> Settings:
    return Settings.from_env({"RERANKER_MODEL": str(path), "RERANKER_DEVICE": "cuda", "RERANKER_CACHE_SIZE": "0",
                              "RERANKER_MAX_LENGTH": "256", **env})


def by_index(reranker: Reranker, query: str, documents: list[str]) -> np.ndarray:
    scores = np.empty(len(documents))
    for result in reranker.rerank(query, documents, raw_scores=True):
        scores[result.index] = result.score
    return scores


@pytest.fixture(scope="module")
def fp16(minilm_dir: Path) -> Iterator[Reranker]:
    with Reranker.from_settings(settings(minilm_dir)) as reranker:
        yield reranker


def test_auto_dtype_is_float16_and_scores_match_float32(minilm_dir: Path, fp16: Reranker,
                                                         workload: list[tuple[str, list[str]]]) -> None:
    assert fp16.model.dtype == "float16" and fp16.model.device.startswith("cuda")
    with Reranker.from_settings(settings(minilm_dir, RERANKER_DTYPE="float32")) as fp32:
        pairs = [(by_index(fp16, q, docs), by_index(fp32, q, docs)) for q, docs in workload]
    rhos = [spearmanr(half, full).statistic for half, full in pairs]
    worst = max(float(np.max(np.abs(half - full))) for half, full in pairs)
    print(f"fp16 vs fp32: Spearman min {min(rhos):.5f}, max |delta| {worst:.2e}")
    assert min(rhos) >= 0.999


def test_eight_concurrent_callers_get_exactly_their_own_results(fp16: Reranker,
                                                                workload: list[tuple[str, list[str]]]) -> None:
    alone = [by_index(fp16, q, docs) for q, docs in workload]
    barrier = threading.Barrier(8)

    def call(i: int) -> tuple[np.ndarray, list[str]]:
        barrier.wait()
        query, docs = workload[i]
        results = fp16.rerank(query, docs, raw_scores=True)
        assert sorted(r.index for r in results) == list(range(len(docs)))
        assert all(r.document == docs[r.index] for r in results)
        return by_index(fp16, query, docs), [r.document for r in results]

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(call, range(8)))
    for i, (scores, _) in enumerate(together):
        # Other batch shapes may pick other fp16 kernels: equal to rounding, never another request's scores.
        np.testing.assert_allclose(scores, alone[i], atol=2e-3, rtol=0, err_msg=f"caller {i}")


@pytest.mark.parametrize("mode", ["on", "cudagraphs"])
def test_compiled_engines_score_like_eager_with_eight_callers(minilm_dir: Path, fp16: Reranker, mode: str,
                                                              workload: list[tuple[str, list[str]]]) -> None:
    eager = [by_index(fp16, q, docs) for q, docs in workload]
    with Reranker.from_settings(settings(minilm_dir, RERANKER_COMPILE=mode)) as compiled:
        assert compiled.model.compiled == mode
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda request: by_index(compiled, *request), workload))
        # CUDA graphs replay into the same output memory: scores read after later replays are still their own.
        again = [by_index(compiled, q, docs) for q, docs in workload]
    for i, (scores, want) in enumerate(zip(got, eager, strict=True)):
        np.testing.assert_allclose(scores, want, atol=2e-3, rtol=0, err_msg=f"{mode}, caller {i}")
        np.testing.assert_allclose(again[i], scores, atol=2e-3, rtol=0, err_msg=f"{mode}, request {i} again")
    assert min(spearmanr(a, b).statistic for a, b in zip(got, eager, strict=True)) >= 0.999


@pytest.mark.parametrize("mode", ["off", "cudagraphs"])  # recording a CUDA graph can run out of memory too
def test_a_real_out_of_memory_is_split_and_every_request_still_gets_its_scores(
    minilm_dir: Path, workload: list[tuple[str, list[str]]], mode: str
) -> None:
    big = [(q, docs * 8) for q, docs in workload[:4]]  # 480 documents each
    env = {"RERANKER_BATCH_TOKENS": str(2**20), "RERANKER_MAX_QUEUE": "100000",  # one huge pass unless it fails
           "RERANKER_COMPILE": mode}
    with Reranker.from_settings(settings(minilm_dir, **env)) as reranker:
        expected = [by_index(reranker, q, docs) for q, docs in big]
    metrics = Metrics(CollectorRegistry())
    with Reranker.from_settings(settings(minilm_dir, **env), metrics=metrics) as reranker:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        # Room for the weights and a few hundred MB of activations: a pass over 4 x 480 pairs needs far more.
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 384 * 2**20) / total)
        try:
            with ThreadPoolExecutor(4) as pool:
                got = list(pool.map(lambda r: by_index(reranker, *r), big))
            after = reranker.rerank("still serving?", ["yes", "no"])
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
    assert (metrics.registry.get_sample_value("reranker_oom_retries_total") or 0) > 0
    for i, (scores, want) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_allclose(scores, want, atol=2e-3, rtol=0, err_msg=f"request {i}")
    assert len(after) == 2


def test_nvml_gauges_read_the_real_gpu() -> None:
    registry = CollectorRegistry()
    registry.register(GpuCollector())
    total = registry.get_sample_value("reranker_gpu_memory_total_bytes", {"gpu": "0"})
    used = registry.get_sample_value("reranker_gpu_memory_used_bytes", {"gpu": "0"})
    busy = registry.get_sample_value("reranker_gpu_utilization_ratio", {"gpu": "0"})
    assert total is not None and total > 2**30
    assert used is not None and 0 < used <= total
    assert busy is not None and 0.0 <= busy <= 1.0


def test_no_cuda_work_happens_outside_the_device_thread(fp16: Reranker,
                                                        workload: list[tuple[str, list[str]]]) -> None:
    from torch.profiler import ProfilerActivity, profile

    device = fp16._batcher._device.thread
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda r: fp16.rerank(*r), workload))
        torch.cuda.synchronize()
    # CUDA runtime calls that put work on the GPU: kernel launches and copies.
    launches = ("cudaLaunchKernel", "cudaMemcpy", "cuLaunchKernel", "cudaGraphLaunch")
    runtime = [e for e in prof.events() if e.name.startswith(launches)]
    threads = {e.thread for e in runtime}
    assert runtime, "the profiler saw no CUDA launches at all"
    # This thread's synchronize above is a wait, not a launch, and is not in the list.
    assert threads == {device.native_id}, f"CUDA launches from threads {threads}, device thread {device.native_id}"
