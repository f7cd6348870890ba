"""The automatic budgets, by device: RERANKER_BATCH_TOKENS=auto (the padded tokens of one forward pass) and
RERANKER_STALL_SECONDS=auto (how long a pass may run before the device is taken as hung)."""

from __future__ import annotations

# Padded tokens per forward pass when RERANKER_BATCH_TOKENS=auto. On the CPU, passes beyond a few
# thousand tokens fall out of cache and get slower per pair (bench/throughput.py: 2048 tokens ran
# MiniLM-L6 2.2x faster than 16384, float32 and bfloat16 alike); a GPU wants large passes.
# OpenVINO with one thread per stream (two streams on two threads, its default there) ran MiniLM-L6 1.12-1.13x faster
# at 1024 than at 2048, bfloat16 and float32 alike, and 1024 was level with 2048 on one stream of two threads (AVX-512
# EPYC, in-process, 4 callers): about 1024 tokens per thread of a pass.
CUDA_BATCH_TOKENS = 16384
CPU_BATCH_TOKENS = 2048
CPU_TOKENS_PER_THREAD = 1024
# RERANKER_STALL_SECONDS=auto: how long the device thread may work without a pass ending before the device is taken
# as hung. Far above the longest pass at the automatic budget: a GPU's take well under a second (recording a CUDA
# graph for a new bucket, a few), a 4B-parameter model's 2,048 tokens on a small CPU a minute or two.
CUDA_STALL_SECONDS = 120.0
CPU_STALL_SECONDS = 600.0


def batch_token_budget(device: str, stream_threads: int | None = None) -> int:
    """The automatic RERANKER_BATCH_TOKENS for a device; on the CPU, for the threads one pass runs on
    (`stream_threads`: an OpenVINO stream's; None for torch, whose pass takes them all)."""
    if device.startswith("cuda"):
        return CUDA_BATCH_TOKENS
    return CPU_BATCH_TOKENS if stream_threads is None else min(CPU_BATCH_TOKENS, CPU_TOKENS_PER_THREAD * stream_threads)


def stall_limit(device: str) -> float:
    """The automatic RERANKER_STALL_SECONDS for a device."""
    return CUDA_STALL_SECONDS if device.startswith("cuda") else CPU_STALL_SECONDS
