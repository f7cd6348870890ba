"""Long documents: truncation is counted; chunk mode scores the max over windows that fit."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from reranker import LimitExceededError, Reranker
from reranker.longdocs import window_spans
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from reranker.planning import CHUNK_MARGIN, CHUNK_OVERLAP, document_room, plan
from tests.conftest import model_settings


def test_window_spans_cover_the_document_with_overlap() -> None:
    offsets = [(i * 2, i * 2 + 1) for i in range(10)]  # ten one-character tokens, one apart
    assert window_spans(offsets, 4, 1) == [(0, 7), (6, 13), (12, 19)]
    assert window_spans(offsets, 10, 3) == [(0, 19)]
    assert window_spans(offsets, 4, 0) == [(0, 7), (8, 15), (16, 19)]
    with pytest.raises(ValueError):
        window_spans(offsets, 0, 0)


def test_windows_never_split_a_character_between_its_tokens() -> None:
    """Byte-level tokenizers give each byte of a multi-byte character a token with the character's span."""
    # Characters of 1 or 3 tokens: "a" at 0, "€" at 1 (three tokens), "b" at 2, "€" at 3 (three), ...
    offsets: list[tuple[int, int]] = []
    for char in range(12):
        offsets += [(char, char + 1)] * (3 if char % 2 else 1)
    spans = window_spans(offsets, 5, 2)
    for start, end in spans:
        tokens = [o for o in offsets if start <= o[0] and o[1] <= end]
        assert len(tokens) <= 5, (start, end)  # no window grows back past its budget
    covered = set().union(*(range(start, end) for start, end in spans))
    assert covered == set(range(12))  # and no character is left out


def split_words(text: str, piece: int) -> list[tuple[int, int]]:
    """Offsets of a tokenizer that cuts every word into pieces of `piece` characters (WordPiece's "##" pieces)."""
    return [(i, min(i + piece, word.end())) for word in re.finditer(r"\S+", text)
            for i in range(word.start(), word.end(), piece)]


def test_windows_begin_and_end_between_words_where_the_tokenizer_splits_them() -> None:
    rng = random.Random(1)
    text = " ".join("".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 8))) for _ in range(300))
    offsets = split_words(text, 2)
    spans = window_spans(offsets, 20, 5, text)
    assert all((a == 0 or text[a - 1] == " ") and (b == len(text) or text[b] == " ") for a, b in spans)
    assert max(sum(a <= s and e <= b for s, e in offsets) for a, b in spans) <= 20  # still within the budget
    covered = set().union(*(range(a, b) for a, b in spans))
    assert all(i in covered for i, char in enumerate(text) if char != " ")
    # Without the text, as DocumentClipper cuts: most windows would start or end inside a word.
    plain = window_spans(offsets, 20, 5)
    assert sum((a > 0 and text[a - 1] != " ") or (b < len(text) and text[b] != " ") for a, b in plain) > len(plain) / 2


def test_words_longer_than_the_reach_and_unspaced_scripts_are_cut_where_the_window_falls() -> None:
    one_word = "x" * 400  # a 200-token word (a URL, a hash, base64): no boundary within WORD_TOKENS of any edge
    offsets = split_words(one_word, 2)
    assert window_spans(offsets, 16, 4, one_word) == window_spans(offsets, 16, 4)
    chinese = "数据处理与检索排序模型" * 20  # no spaces between words: any boundary will do
    offsets = [(i, i + 1) for i in range(len(chinese))]
    assert window_spans(offsets, 16, 4, chinese) == window_spans(offsets, 16, 4)


def test_a_window_edge_never_moves_beside_a_zero_width_token() -> None:
    """An empty piece or a special has a zero-width span: an edge moved back onto it left a window of "" (helper-62),
    which was scored as a chunk."""
    text = "abcdef ghi jkl"
    offsets = [(0, 0), (0, 0), (0, 2), (2, 6), (7, 10), (11, 14)]
    spans = window_spans(offsets, 3, 3, text)
    assert all(end > start for start, end in spans) and spans == window_spans(offsets, 3, 3)


@pytest.mark.parametrize("kind", ["bert", "causal"])
def test_chunk_mode_scores_windows_that_begin_and_end_between_words(request: pytest.FixtureRequest,
                                                                    kind: str) -> None:
    """Made-up words, which both tokenizers cut into pieces: the engine scores the windows that keep them whole."""
    model: ScoringModel = request.getfixturevalue(f"{kind}_model")
    rng = random.Random(3)
    document = " ".join("".join(rng.choice("bcdfghjkmpqvwxz") for _ in range(rng.randint(4, 9))) for _ in range(300))
    query = "where is the queue server"
    window = model.max_length - model.encode([(query, "")])[0].n_tokens - CHUNK_MARGIN
    offsets = model.tokenizer([document], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][0]
    spans = window_spans(offsets, window, int(window * CHUNK_OVERLAP), document)
    assert len(spans) > 3 and spans != window_spans(offsets, window, int(window * CHUNK_OVERLAP))

    def between_words(at: int) -> bool:
        return at in (0, len(document)) or not (document[at - 1].isalnum() and document[at].isalnum())

    assert all(between_words(a) and between_words(b) for a, b in spans)
    settings = model_settings(Path(model.model_id), long_docs="chunk", cache_size=0)
    with Reranker(model, settings) as reranker:
        got = reranker.rerank_detailed(query, [document], raw_scores=True).results[0].score
    scores = model.cross_encoder.predict([(query, document[a:b]) for a, b in spans],
                                         activation_fn=torch.nn.Identity(), show_progress_bar=False)
    np.testing.assert_allclose(got, float(np.max(scores)), rtol=1e-5, atol=1e-5)


def test_chunks_of_a_multibyte_document_fit_the_causal_model(causal_model: ScoringModel) -> None:
    rng = np.random.default_rng(7)
    words = ["🙂🙂🙂", "数据处理", "Ünïcödé", "cheese", "☕☕"]
    document = " ".join(words[i] for i in rng.integers(0, len(words), 1500))
    settings = model_settings(Path(causal_model.model_id), long_docs="chunk", cache_size=0)
    with Reranker(causal_model, settings) as reranker:
        result = reranker.rerank_detailed("where is the queue server", [document])
    assert result.stats.chunked == 1 and result.stats.truncated == 0  # every window fits as it was cut


def test_truncation_is_counted(bert_reranker: Reranker) -> None:
    short, long = "a short document", "cache " * 1000
    result = bert_reranker.rerank_detailed("cache", [short, long, long + "x"])
    assert result.stats.truncated == 2 and result.stats.chunked == 0
    assert bert_reranker.metrics.registry.get_sample_value("reranker_truncated_documents_total") == 2


def test_truncate_false_refuses_a_cut_but_takes_windows(bert_model: ScoringModel) -> None:
    """TEI's `truncate: false`: a document max_length would cut is refused; chunk mode windows it, cutting nothing."""
    long = "word " * 400
    for long_docs, refused in [("truncate", True), ("chunk", False)]:
        settings = model_settings(Path(bert_model.model_id), long_docs=long_docs)
        with Reranker(bert_model, settings) as reranker:
            if refused:
                with pytest.raises(LimitExceededError, match=r"^documents\[1\] does not fit RERANKER_MAX_LENGTH"):
                    reranker.rerank_detailed("q", ["short", long], truncate=False)
                assert reranker.metrics.registry.get_sample_value("reranker_pairs_scored_total") in (None, 0.0)
            else:
                assert reranker.rerank_detailed("q", ["short", long], truncate=False).stats.chunked == 1


@pytest.mark.parametrize("long_docs", ["truncate", "chunk"])
def test_a_cache_hit_counts_its_cut_or_windowed_document_as_the_first_request_did(bert_model: ScoringModel,
                                                                                  long_docs: str) -> None:
    """Its score is of the same cut text, or the same windows: the repeat said 0 truncated, 0 chunked."""
    metrics = Metrics(CollectorRegistry())
    settings = model_settings(Path(bert_model.model_id), long_docs=long_docs)
    with Reranker(bert_model, settings, metrics=metrics) as reranker:
        docs = ["a short document", "cache " * 1000]
        first, again = (reranker.rerank_detailed("cache", docs).stats for _ in range(2))
    assert again.cache_hits == 2 and first.cache_hits == 0
    expected = (1, 0) if long_docs == "truncate" else (0, 1)
    assert (first.truncated, first.chunked) == (again.truncated, again.chunked) == expected
    counted = [metrics.registry.get_sample_value(f"reranker_{kind}_documents_total") for kind in ("truncated",
                                                                                                   "chunked")]
    assert counted == [2 * n for n in expected]


def test_a_cut_to_max_doc_tokens_is_counted_per_request_not_kept_in_the_cache(bert_model: ScoringModel) -> None:
    """The cut text is a key of its own, which a caller may also send whole: sent so, it was not truncated."""
    settings = model_settings(Path(bert_model.model_id), long_docs="chunk")  # where max_tokens_per_doc cuts
    with Reranker(bert_model, settings) as reranker:
        document = "cache servers keep hot data close to the clients"
        [kept], _ = reranker._clip([document], 3)
        assert kept != document
        cut = reranker.rerank_detailed("q", [document], max_doc_tokens=3).stats
        whole = reranker.rerank_detailed("q", [kept]).stats
    assert (cut.truncated, cut.cache_hits) == (1, 0) and (whole.truncated, whole.cache_hits) == (0, 1)


@pytest.mark.parametrize(("kind", "max_chunks"), [("bert", None), ("causal", None), ("bert", 2), ("causal", 1)])
def test_chunk_mode_is_the_max_over_independently_scored_windows(
    request: pytest.FixtureRequest, documents: list[str], kind: str, max_chunks: int | None
) -> None:
    """`max_chunks` (Cohere's max_chunks_per_doc): the max over a document's first N windows, and one that had
    more counted as truncated."""
    model: ScoringModel = request.getfixturevalue(f"{kind}_model")
    query = "where is the queue server"
    docs = documents[:30]
    settings = model_settings(Path(model.model_id), long_docs="chunk", cache_size=0)
    with Reranker(model, settings) as reranker:
        result = reranker.rerank_detailed(query, docs, raw_scores=True, max_chunks=max_chunks)
    assert result.stats.chunked > 5

    # The windows again, from the tokenizer itself: the document alone, with offsets.
    room = model.max_length - model.encode([(query, "")])[0].n_tokens
    window = room - CHUNK_MARGIN
    offsets = model.tokenizer(docs, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    expected = []
    capped = 0
    for doc, doc_offsets in zip(docs, offsets, strict=True):
        texts = [doc] if len(doc_offsets) <= room else [
            doc[a:b] for a, b in window_spans(doc_offsets, window, int(window * CHUNK_OVERLAP), doc)
        ]
        if max_chunks is not None and len(texts) > max_chunks:
            texts = texts[:max_chunks]
            capped += 1
        scores = model.cross_encoder.predict(
            [(query, t) for t in texts], activation_fn=torch.nn.Identity(), show_progress_bar=False
        )
        expected.append(float(np.max(scores)))
    got = {r.index: r.score for r in result.results}
    np.testing.assert_allclose([got[i] for i in range(len(docs))], expected, rtol=1e-5, atol=1e-5)
    assert result.stats.truncated == capped and (capped > 3) == (max_chunks is not None)


def test_a_cap_on_windows_keys_the_cache_apart(bert_model: ScoringModel) -> None:
    """A capped document scores its first windows only: the same pair uncapped is not answered from its entry, and
    in truncate mode, where every document is one window, a cap shares the uncapped entries."""
    document = "the queue server keeps jobs " * 200
    for long_docs, hits in [("chunk", [0, 0, 1]), ("truncate", [0, 1, 1])]:
        settings = model_settings(Path(bert_model.model_id), long_docs=long_docs)
        with Reranker(bert_model, settings) as reranker:
            got = [reranker.rerank_detailed("queue", [document], max_chunks=n).stats.cache_hits for n in (1, None, 1)]
        assert got == hits, long_docs


def test_both_cohere_routes_pass_max_chunks_per_doc_on(bert_model: ScoringModel, documents: list[str]) -> None:
    """The Cohere SDKs send it; both routes cap each document's windows with it, as the engine does."""
    from fastapi.testclient import TestClient

    from web.http import create_app

    long_docs = [" ".join(documents[i:i + 12]) for i in (0, 12, 24)]  # several windows each
    settings = model_settings(Path(bert_model.model_id), long_docs="chunk", cache_size=0)
    with Reranker(bert_model, settings) as reranker:
        expected = {cap: {r.index: r.score for r in reranker.rerank_detailed("queue", long_docs,
                                                                           max_chunks=cap).results}
                    for cap in (1, None)}
        assert expected[1] != expected[None]  # the later windows matter to these documents
        client = TestClient(create_app(reranker, ui=False))
        for cap in (1, None):
            extra = {} if cap is None else {"max_chunks_per_doc": cap}
            v1 = client.post("/v1/rerank", json={"query": "queue", "documents": long_docs, **extra}).json()
            # Past v2's default max_tokens_per_doc (4,096), which would cut these before their windows.
            v2 = client.post("/v2/rerank", json={"model": "m", "query": "queue", "documents": long_docs,
                                                 "max_tokens_per_doc": 100_000, **extra}).json()
            for answer in (v1, v2):
                got = {r["index"]: r["relevance_score"] for r in answer["results"]}
                assert got == pytest.approx(expected[cap], abs=1e-6), cap


def test_chunk_windows_fit_without_cutting_the_query(bert_model: ScoringModel) -> None:
    query = "where is the queue server"
    settings = model_settings(Path(bert_model.model_id), long_docs="chunk")
    with Reranker(bert_model, settings):
        planned = plan(bert_model, query, ["token " * 3000], None, document_room(bert_model, query, None),
                       chunking=True)
    assert len(planned.pairs) > 10
    for pair in planned.pairs:
        assert pair.n_tokens <= bert_model.max_length
        text = bert_model.tokenizer.decode(pair.input_ids)
        assert text.startswith("[CLS] where is the queue server [SEP]")


def test_a_query_that_leaves_no_room_is_rejected(bert_reranker: Reranker, monkeypatch: pytest.MonkeyPatch) -> None:
    from reranker import LimitExceededError

    # Before max_tokens_per_doc's pass over every document (up to 1,000 of 100,000 characters), not after it.
    monkeypatch.setattr(bert_reranker._clipper, "clip", lambda *args: pytest.fail("clipped for a refused query"))
    with pytest.raises(LimitExceededError, match=r"^the query takes 203 of the model.s 256 tokens"):
        bert_reranker.rerank_detailed("cache " * 200, ["doc"], max_doc_tokens=5)

    with pytest.raises(LimitExceededError, match=r"^the query takes 203 of the model.s 256 tokens, leaving 53 for a "
                                                 r"document; shorten it so that at least 128 are left for a document$"):
        bert_reranker.rerank("cache " * 200, ["doc"])
    # Over the model's limit: said so, not as a negative number of tokens left.
    with pytest.raises(LimitExceededError, match=r"^the query takes 403 tokens, over the model.s limit of 256; "
                                                 r"shorten it so that at least 128 are left for a document$"):
        bert_reranker.rerank("cache " * 400, ["doc"])
