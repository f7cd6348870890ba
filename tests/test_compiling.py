"""RERANKER_COMPILE on the CPU: real torch.compile (inductor), same scores, no recompiles after warm-up.

CUDA graphs cannot run here: their shape buckets are tested on the CPU below, the graphs in tests/test_gpu.py.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch._dynamo.utils import counters

from reranker import Reranker
from reranker.compiling import ROW_BUCKET, TOKEN_BUCKET, bucketed, compile_model
from reranker.errors import ModelLoadError
from reranker.loading import load_model
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from reranker.packing import cut_batches
from tests.conftest import model_settings
from tests.tiny_models import random_text


def varied_pairs(seed: int) -> list[list[tuple[str, str]]]:
    """Batches of every size from 1 to 12 rows with documents of 1-300 words, and batches of equal pairs
    (no padding at all): many distinct shapes."""
    rng = random.Random(seed)
    varied = [[(random_text(rng, 6), random_text(rng, rng.randint(1, 300))) for _ in range(rows)]
              for rows in range(1, 13)]
    return varied + [[varied[0][0]] * rows for rows in (2, 5)]


@pytest.fixture(scope="module", params=["bert", "causal"])
def compiled(request: pytest.FixtureRequest) -> tuple[ScoringModel, ScoringModel, float]:
    """(eager, compiled) loads of the same tiny model, and the seconds the compile and its warm-up took."""
    path: Path = request.getfixturevalue(f"{request.param}_dir")
    eager = request.getfixturevalue(f"{request.param}_model")
    spent: list[float] = []

    def timed(model: ScoringModel, setting: str) -> float:
        spent.append(compile_model(model, setting))
        return spent[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("reranker.compiling.compile_model", timed)  # load_model imports it when it compiles
        model = load_model(model_settings(path, compile="on"))
    return eager, model, spent[0]


def test_compiled_scores_equal_eager_and_never_recompile(compiled: tuple[ScoringModel, ScoringModel, float]) -> None:
    eager, model, compile_seconds = compiled
    assert model.compiled == "on"
    # The compile and its warm-up count as loading (a comparison with the eager load's time would be a race of
    # two timings on a shared CPU).
    assert compile_seconds > 0 and model.load_seconds >= compile_seconds
    graphs = counters["stats"]["unique_graphs"]
    for pairs in varied_pairs(7):
        batch = model.encode(pairs)
        torch.testing.assert_close(model.score(batch), eager.score(batch), atol=1e-5, rtol=1e-4)
    # The warm-up reached every graph: a dozen new batch shapes compiled nothing more.
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize(("rows", "width", "expected"), [
    (1, 5, (ROW_BUCKET, 16)),
    (2, 17, (8, 32)),
    (8, 33, (8, TOKEN_BUCKET)),
    (8, 64, (8, 64)),
    (9, 65, (16, 128)),
    (3, 250, (8, 256)),
])
def test_bucketed_rounds_each_dimension_up(rows: int, width: int, expected: tuple[int, int]) -> None:
    assert bucketed(rows, width, max_width=1024) == expected


def test_bucketed_width_never_passes_the_model_limit() -> None:
    assert bucketed(3, 250, max_width=256) == (8, 256)
    assert bucketed(3, 200, max_width=230) == (8, 230)


def test_bucketed_batches_score_like_unpadded_ones(any_model: ScoringModel) -> None:
    """CUDA-graph buckets pad rows (repeating the first pair) and columns; only the real rows come back."""
    for pairs in varied_pairs(3)[:5]:
        batch = any_model.encode(pairs)
        plain = any_model.score(batch)
        any_model.compiled = "cudagraphs"  # collate and launch behave as they do under CUDA graphs
        try:
            features = any_model.collate(batch)
            padded = any_model.launch(features).wait()
        finally:
            any_model.compiled = "off"
        rows, width = features.shape
        assert rows % ROW_BUCKET == 0 and (width % TOKEN_BUCKET == 0 or width == any_model.max_length)
        torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-4)


def test_cudagraphs_without_cuda_is_refused_at_load(bert_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="RERANKER_COMPILE=cudagraphs needs a CUDA device"):
        load_model(model_settings(bert_dir, compile="cudagraphs"))


def test_a_compile_failure_names_the_setting(bert_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(function: object, **options: object) -> object:
        def run(*args: object, **kwargs: object) -> object:
            raise RuntimeError("inductor could not build a kernel")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(ModelLoadError, match="inductor could not build a kernel.*RERANKER_COMPILE=off"):
        load_model(model_settings(bert_dir, compile="on"))


def test_batches_are_cut_by_their_padded_shape_under_cuda_graphs(bert_model: ScoringModel) -> None:
    """The token budget holds for what the device runs: rows and width after bucketing."""
    lengths = [20] * 100 + [70] * 40
    bert_model.compiled = "cudagraphs"
    try:
        batches = cut_batches(lengths, 1024, bert_model.padded_shape)
        shapes = [bert_model.padded_shape(len(b), max(lengths[i] for i in b)) for b in batches]
    finally:
        bert_model.compiled = "off"
    assert sorted(i for b in batches for i in b) == list(range(140))
    assert all(rows * width <= 1024 for rows, width in shapes), shapes
    # Uncompiled, the same pairs fill batches to the budget by their real lengths.
    assert bert_model.padded_shape(13, 20) == (13, 20)
    assert len(cut_batches(lengths, 1024, bert_model.padded_shape)) < len(batches)


def test_serving_through_the_device_thread_compiles_nothing_more(
        compiled: tuple[ScoringModel, ScoringModel, float], metrics: Metrics) -> None:
    """The warm-up ran on the loading thread; requests of new sizes, scored on the device thread, reuse it."""
    eager, model, _ = compiled
    graphs = counters["stats"]["unique_graphs"]
    settings = model_settings(Path(model.model_id), compile="on", cache_size=0)
    with Reranker(model, settings, metrics=metrics) as reranker, Reranker(eager, settings, metrics=Metrics(
            CollectorRegistry())) as reference:
        for pairs in varied_pairs(11):
            query, documents = pairs[0][0], [document for _, document in pairs]
            got = {r.index: r.score for r in reranker.rerank(query, documents, raw_scores=True)}
            want = {r.index: r.score for r in reference.rerank(query, documents, raw_scores=True)}
            assert got.keys() == want.keys()
            assert all(abs(got[i] - want[i]) < 1e-4 for i in got)
    assert counters["stats"]["unique_graphs"] == graphs


def test_retries_under_cuda_graphs_run_uncompiled_at_their_own_shape(bert_model: ScoringModel,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that runs out of memory in its bucket is retried at its own shape, on the class's forward:
    halves are not padded back to eight rows, and no graph is recorded for a one-off shape."""
    settings = model_settings(Path(bert_model.model_id), cache_size=0)
    documents = ["cache eviction", "a longer document about caches and how they evict entries", "tea", "x y"]
    with Reranker(bert_model, settings) as plain:
        expected = {r.index: r.score for r in plain.rerank("q", documents, raw_scores=True)}
        alone = plain.rerank("q", documents[1:2], raw_scores=True)[0].score

    network = bert_model.cross_encoder.transformers_model
    assert network is not None
    eager_rows: list[int] = []
    eager_forward = type(network).forward

    def counting_forward(self: torch.nn.Module, *args: object, **kwargs: object) -> object:
        eager_rows.append(len(kwargs["input_ids"]))  # type: ignore[arg-type]
        return eager_forward(self, *args, **kwargs)

    def graphed_out_of_memory(*args: object, **kwargs: object) -> object:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(type(network), "forward", counting_forward)
    monkeypatch.setattr(network, "forward", graphed_out_of_memory, raising=False)  # the compiled forward
    monkeypatch.setattr(bert_model, "compiled", "cudagraphs")
    metrics = Metrics(CollectorRegistry())
    with Reranker(bert_model, settings, metrics=metrics) as reranker:
        got = {r.index: r.score for r in reranker.rerank("q", documents, raw_scores=True)}
        lone = reranker.rerank("q", documents[1:2], raw_scores=True)[0].score
    assert got == pytest.approx(expected, abs=1e-5)
    assert lone == pytest.approx(alone, abs=1e-5)  # not blamed on a bucket of eight copies of itself
    assert eager_rows == [2, 2, 1]  # two halves of four, then the lone pair: never a padded bucket
    assert network.forward is graphed_out_of_memory  # the compiled forward is back after each retry
    assert metrics.registry.get_sample_value("reranker_oom_retries_total") == 2


def test_pairs_fill_the_padding_a_bucket_already_pays_for(bert_model: ScoringModel) -> None:
    """With a budget under one bucket (8 rows x 256 > 1024), pairs share the bucket instead of each paying
    for eight rows alone."""
    bert_model.compiled = "cudagraphs"
    try:
        batches = cut_batches([200] * 12, 1024, bert_model.padded_shape)
    finally:
        bert_model.compiled = "off"
    assert [len(batch) for batch in batches] == [8, 4]


def test_batch_tokens_count_the_bucket_a_pass_runs(bert_model: ScoringModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bert_model, "compiled", "cudagraphs")  # buckets only: the network stays uncompiled
    metrics = Metrics(CollectorRegistry())
    with Reranker(bert_model, model_settings(Path(bert_model.model_id), cache_size=0), metrics=metrics) as reranker:
        stats = reranker.rerank_detailed("q", ["a", "bb", "a short document"]).stats
    longest = max(pair.n_tokens for pair in bert_model.encode([("q", "a short document")]))
    assert stats.pairs_scored == 3
    assert metrics.registry.get_sample_value("reranker_batch_tokens_sum") == 8 * bucketed(3, longest, 256)[1]
