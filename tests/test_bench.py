"""bench/gpu.py cannot be measured here, but its code runs: a smoke run on the CPU, and its no-CUDA exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench.gpu", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: bench/gpu.py would run for real")
def test_gpu_bench_says_it_needs_cuda() -> None:
    result = run_bench()
    assert result.returncode == 1
    assert "needs a CUDA GPU" in result.stderr and "--smoke" in result.stderr


def test_gpu_bench_smoke_run_prints_every_workload_for_both_shapes() -> None:
    result = run_bench("--smoke")
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ["## bge-reranker-v2-m3 shape", "## Qwen3-Reranker-0.6B shape", "32 x 100 short passages",
                 "16 x 100 RAG chunks", "3 x 1000-document requests", "400 x 8 documents, 16 callers"]:
        assert line in result.stdout
    assert result.stdout.count("x ") >= 10  # ratios printed
