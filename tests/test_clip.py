"""max_doc_tokens (Cohere v2's max_tokens_per_doc): documents cut to their first N tokens before scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reranker import InvalidTypeError, Reranker, ValidationError
from reranker.longdocs import DocumentClipper
from reranker.model import ScoringModel
from tests.conftest import model_settings

MULTIBYTE = ["🙂🙂🙂", "数据处理", "Ünïcödé", "cheese", "☕☕", "queue server"]


def _tokens(model: ScoringModel, text: str) -> int:
    return len(model.tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("kind", ["bert", "xlmr", "causal"])
def test_a_cut_document_is_a_prefix_of_about_n_tokens(request: pytest.FixtureRequest, kind: str) -> None:
    model: ScoringModel = request.getfixturevalue(f"{kind}_model")
    rng = np.random.default_rng(3)
    documents = [" ".join(MULTIBYTE[i] for i in rng.integers(0, len(MULTIBYTE), n)) for n in (1, 5, 40, 300)]
    clipper = DocumentClipper(model.tokenizer)
    for max_tokens in (5, 8, 64):  # a first character that alone takes more than N tokens is kept whole
        for doc, cut in zip(documents, clipper.clip(documents, max_tokens), strict=True):
            if _tokens(model, doc) <= max_tokens:
                assert cut is None
                continue
            assert cut is not None and doc.startswith(cut) and len(cut) < len(doc)
            # A cut ends on a character: a byte-level tokenizer's multi-token character is kept whole or left
            # out, so a cut holds at most N tokens and loses at most one character's tokens (4 bytes).
            assert max_tokens - 4 <= _tokens(model, cut) <= max_tokens, (kind, max_tokens, cut)


@pytest.mark.parametrize("kind", ["bert", "causal"])
@pytest.mark.parametrize("long_docs", ["truncate", "chunk"])
def test_scores_are_those_of_the_cut_documents(request: pytest.FixtureRequest, documents: list[str], kind: str,
                                               long_docs: str) -> None:
    model: ScoringModel = request.getfixturevalue(f"{kind}_model")
    query = "where is the queue server"
    docs = documents[:24]
    max_tokens = 40
    cuts = DocumentClipper(model.tokenizer).clip(docs, max_tokens)
    texts = [doc if cut is None else cut for doc, cut in zip(docs, cuts, strict=True)]
    n_cut = sum(cut is not None for cut in cuts)
    assert 5 < n_cut < len(docs)
    settings = model_settings(Path(model.model_id), long_docs=long_docs, cache_size=0)
    with Reranker(model, settings) as reranker:
        result = reranker.rerank_detailed(query, docs, raw_scores=True, max_doc_tokens=max_tokens)
        assert reranker.metrics.registry.get_sample_value("reranker_truncated_documents_total") == n_cut
    expected = model.cross_encoder.predict([(query, t) for t in texts], activation_fn=torch.nn.Identity(),
                                           show_progress_bar=False)
    got = {r.index: r.score for r in result.results}
    np.testing.assert_allclose([got[i] for i in range(len(docs))], expected, rtol=1e-5, atol=1e-5)
    assert result.stats.truncated == n_cut and result.stats.chunked == 0
    assert all(r.document == docs[r.index] for r in result.results)  # the caller's text comes back, not the cut


def test_a_cut_at_or_past_max_length_changes_nothing(bert_reranker: Reranker, documents: list[str]) -> None:
    docs = documents[:20]
    plain = bert_reranker.rerank_detailed("queue server", docs, raw_scores=True)
    capped = bert_reranker.rerank_detailed("queue server", docs, raw_scores=True, max_doc_tokens=4096)
    assert [(r.index, r.score) for r in capped.results] == [(r.index, r.score) for r in plain.results]
    assert capped.stats.cache_hits == len(docs)  # the same pairs, so the same cache entries


def test_the_cache_keeps_cut_and_whole_documents_apart(bert_reranker: Reranker) -> None:
    long = "the queue server keeps the cache warm " * 20
    whole = bert_reranker.rerank_detailed("queue", [long], raw_scores=True)
    cut = bert_reranker.rerank_detailed("queue", [long], raw_scores=True, max_doc_tokens=5)
    assert cut.stats.cache_hits == 0 and cut.results[0].score != whole.results[0].score
    again = bert_reranker.rerank_detailed("queue", [long], raw_scores=True, max_doc_tokens=5)
    assert again.stats.cache_hits == 1 and again.results[0].score == cut.results[0].score


@pytest.mark.parametrize(("value", "error"), [(0, ValidationError), (-3, ValidationError),
                                              (True, InvalidTypeError), ("8", InvalidTypeError),
                                              (2.5, InvalidTypeError)])
def test_a_bad_max_doc_tokens_is_refused_with_the_field_named(bert_reranker: Reranker, value: object,
                                                              error: type[Exception]) -> None:
    with pytest.raises(error, match="max_tokens_per_doc must be a positive integer"):
        bert_reranker.rerank_detailed("q", ["d"], max_doc_tokens=value)  # type: ignore[arg-type]


def test_in_chunk_mode_a_cut_document_is_chunked_as_its_cut_text_would_be(bert_model: ScoringModel) -> None:
    long = " ".join(f"word{i % 50} queue server cache" for i in range(300))  # far over max_length
    settings = model_settings(Path(bert_model.model_id), long_docs="chunk", cache_size=0)
    with Reranker(bert_model, settings) as reranker:
        cut = reranker.rerank_detailed("queue", [long], raw_scores=True, max_doc_tokens=600)
        text = DocumentClipper(bert_model.tokenizer).clip([long], 600)[0]
        assert text is not None
        as_text = reranker.rerank_detailed("queue", [text], raw_scores=True)
    assert cut.stats.chunked == 1 and cut.stats.truncated == 1  # chunked, and its tail was dropped
    assert as_text.stats.chunked == 1 and as_text.stats.truncated == 0
    assert cut.results[0].score == pytest.approx(as_text.results[0].score, abs=1e-6)


def test_a_cut_document_answered_from_the_cache_counts_as_truncated(bert_model: ScoringModel,
                                                                    documents: list[str]) -> None:
    """The cut happens in every request that asks for it: a document whose cut text the cache scored before was
    counted as truncated the first time only."""
    docs = documents[:24]
    n_cut = sum(cut is not None for cut in DocumentClipper(bert_model.tokenizer).clip(docs, 40))
    with Reranker(bert_model, model_settings(Path(bert_model.model_id))) as reranker:
        first = reranker.rerank_detailed("where is the queue server", docs, max_doc_tokens=40).stats
        again = reranker.rerank_detailed("where is the queue server", docs, max_doc_tokens=40).stats
        counted = reranker.metrics.registry.get_sample_value("reranker_truncated_documents_total")
    assert (first.truncated, first.cache_hits) == (n_cut, 0)
    assert (again.truncated, again.cache_hits) == (n_cut, len(docs))
    assert counted == 2 * n_cut
