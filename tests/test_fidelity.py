"""Scores equal sentence-transformers' CrossEncoder.predict on the same model, however they are batched."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from reranker import Reranker
from reranker.loading import load_model
from reranker.model import ScoringModel
from tests.conftest import model_settings
from tests.test_faults import gated_launch, one_round

TOLERANCE = 1e-5


def reference(model: ScoringModel, query: str, documents: list[str], instruction: str | None = None,
              raw: bool = False) -> np.ndarray:
    activation = torch.nn.Identity() if raw else None
    pairs = [(query, doc) for doc in documents]
    return model.cross_encoder.predict(
        pairs, prompt=instruction, activation_fn=activation, batch_size=16, show_progress_bar=False
    )


def by_index(results: list, n: int) -> np.ndarray:
    scores = np.full(n, np.nan)
    for result in results:
        scores[result.index] = result.score
    return scores


@pytest.mark.parametrize("batch_tokens", [64, 512, 16384])
def test_scores_match_predict_for_any_token_budget(
    any_model: ScoringModel, documents: list[str], batch_tokens: int
) -> None:
    settings = model_settings(Path(any_model.model_id), batch_tokens=batch_tokens, cache_size=0)
    query = "how do I parse a json file in python"
    with Reranker(any_model, settings) as reranker:
        raw = reranker.rerank(query, documents, raw_scores=True)
        probabilities = reranker.rerank(query, documents)
    # Raw logits reach |5|: float32 padding noise is relative, so they get rtol as well.
    np.testing.assert_allclose(by_index(raw, len(documents)), reference(any_model, query, documents, raw=True),
                               rtol=TOLERANCE, atol=TOLERANCE)
    np.testing.assert_allclose(by_index(probabilities, len(documents)), reference(any_model, query, documents),
                               rtol=0, atol=TOLERANCE)
    # The raw logits of random tiny models are spread out, so the comparison has teeth.
    assert np.std([r.score for r in raw]) > 0.01


def test_instruction_matches_predict_with_prompt(causal_model: ScoringModel, documents: list[str]) -> None:
    docs = documents[:40]
    instruction = "Given a question about rivers, find the passage that answers it"
    with Reranker(causal_model, model_settings(Path(causal_model.model_id))) as reranker:
        with_instruction = by_index(reranker.rerank("river", docs, instruction=instruction, raw_scores=True), 40)
        without = by_index(reranker.rerank("river", docs, raw_scores=True), 40)
    np.testing.assert_allclose(with_instruction, reference(causal_model, "river", docs, instruction, raw=True),
                               rtol=TOLERANCE, atol=TOLERANCE)
    assert not np.allclose(with_instruction, without)


def test_results_are_sorted_best_first_and_cut_to_top_n(bert_reranker: Reranker, documents: list[str]) -> None:
    results = bert_reranker.rerank("cache server", documents[:50], raw_scores=True)
    scores = [r.score for r in results]
    assert scores == sorted(scores, reverse=True)
    assert sorted(r.index for r in results) == list(range(50))
    assert all(r.document == documents[r.index] for r in results)
    top = bert_reranker.rerank("cache server", documents[:50], top_n=5, raw_scores=True)
    assert top == results[:5]
    assert len(bert_reranker.rerank("cache server", documents[:3], top_n=10)) == 3


def test_concurrent_callers_each_get_exactly_their_own_results(
    any_model: ScoringModel, documents: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    queries = [f"question {i}: {w}" for i, w in enumerate("river music cache token socket tea json year".split())]
    # Each caller sends a different slice, so a mix-up would show as wrong indices or wrong scores.
    slices = [documents[i * 20:(i * 20) + 60] for i in range(8)]
    expected = [reference(any_model, q, docs, raw=True) for q, docs in zip(queries, slices, strict=True)]
    outcomes: list[object] = [None] * 8
    settings = model_settings(Path(any_model.model_id), batch_tokens=2048, cache_size=0)
    held = gated_launch(any_model, monkeypatch)  # the first pass waits until all eight callers wait
    with Reranker(any_model, settings) as reranker:
        def call(i: int) -> None:
            try:
                outcomes[i] = reranker.rerank(queries[i], slices[i], raw_scores=True)
            except Exception as err:  # reported below, with the caller's number
                outcomes[i] = err

        # All 480 pairs wait together, so the collating thread takes them as one round, sorted by length across
        # the callers: its passes mix the callers' pairs.
        one_round(reranker, held, [threading.Thread(target=call, args=(i,)) for i in range(8)], pairs=8 * 60)

    for i in range(8):
        results = outcomes[i]
        assert isinstance(results, list), f"caller {i} failed: {results!r}"
        assert all(r.document == slices[i][r.index] for r in results)
        np.testing.assert_allclose(by_index(results, 60), expected[i], rtol=TOLERANCE, atol=TOLERANCE)
    assert held.calls[:3] == [1, 1, 1] and sum(held.calls[3:]) == 8 * 60  # the held passes, then the callers' one round


def test_scores_are_the_sigmoid_whatever_activation_the_models_config_names(bert_dir: Path, tmp_path: Path,
                                                                             documents: list[str]) -> None:
    """The cross-encoder/ms-marco-* configs name Identity for sentence-transformers, so `predict` returns their
    logits: scores here stay sigmoid probabilities, as TEI, Cohere and Jina answer, and `raw_scores` are exactly what
    `predict` returns for such a model; the ranking is the same (docs/engine.md, Scores)."""
    import json
    import shutil

    identity_dir = Path(shutil.copytree(bert_dir, tmp_path / "identity"))
    config = json.loads((identity_dir / "config.json").read_text())
    config["sentence_transformers"] = {"activation_fn": "torch.nn.modules.linear.Identity"}
    (identity_dir / "config.json").write_text(json.dumps(config))
    model = load_model(model_settings(identity_dir))
    pairs = [("what is a cat", doc) for doc in documents]
    logits = model.cross_encoder.predict(pairs, batch_size=16, show_progress_bar=False)  # the config's Identity
    probabilities = model.cross_encoder.predict(pairs, activation_fn=torch.nn.Sigmoid(), batch_size=16,
                                                show_progress_bar=False)
    assert not np.allclose(logits, probabilities, atol=0.01)  # the config's activation was taken
    with Reranker(model, model_settings(identity_dir, cache_size=0)) as reranker:
        shown = by_index(reranker.rerank("what is a cat", documents), len(documents))
        raw = by_index(reranker.rerank("what is a cat", documents, raw_scores=True), len(documents))
    np.testing.assert_allclose(raw, logits, atol=TOLERANCE)
    np.testing.assert_allclose(shown, probabilities, atol=TOLERANCE)
