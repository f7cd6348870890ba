"""The engine's contract: validation messages, the cache, metrics it records, edge inputs."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from reranker import LimitExceededError, Reranker, ValidationError
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from reranker.tokens import EncodedPair
from tests.conftest import model_settings
from tests.servers import HANG_S
from tests.test_faults import GatedCall


class CountingScorer:
    def __init__(self, model: ScoringModel) -> None:
        self.model = model
        self.pairs = 0

    def __call__(self, batch: Sequence[EncodedPair]) -> np.ndarray:
        self.pairs += len(batch)
        return self.model.score(batch)


@pytest.fixture
def small_limits(bert_model: ScoringModel, metrics: Metrics) -> Iterator[Reranker]:
    settings = model_settings(Path(bert_model.model_id), max_docs=5, max_doc_chars=50, max_query_chars=40)
    reranker = Reranker(bert_model, settings, metrics=metrics)
    yield reranker
    reranker.close()


@pytest.mark.parametrize(
    ("query", "documents", "kwargs", "error", "message"),
    [
        ("", ["d"], {}, ValidationError, "query is empty"),
        ("   ", ["d"], {}, ValidationError, "query is empty"),
        (None, ["d"], {}, ValidationError, "query must be a string, got NoneType"),
        (5, ["d"], {}, ValidationError, "query must be a string, got int"),
        ("q" * 41, ["d"], {}, LimitExceededError, "query has 41 characters; the limit is RERANKER_MAX_QUERY_CHARS=40$"),
        ("q", [], {}, ValidationError, "documents is empty"),
        ("q", "not a list", {}, ValidationError, "documents must be a list of strings"),
        ("q", None, {}, ValidationError, "documents must be a list of strings"),
        ("q", ["ok", 3], {}, ValidationError, r"documents\[1\] must be a string, got int"),
        ("q", ["ok", None], {}, ValidationError, r"documents\[1\] must be a string, got NoneType"),
        ("q", ["d"] * 6, {}, LimitExceededError, "6 documents sent; the limit is RERANKER_MAX_DOCS=5"),
        ("q", ["x" * 51], {}, LimitExceededError, r"documents\[0\] has 51 characters.*RERANKER_MAX_DOC_CHARS=50"),
        ("q", ["d"], {"top_n": 0}, ValidationError, "top_n must be a positive integer"),
        ("q", ["d"], {"top_n": -2}, ValidationError, "top_n must be a positive integer.* got -2$"),
        ("q", ["d"], {"top_n": 1.5}, ValidationError, "top_n must be a positive integer"),
        ("q", ["d"], {"top_n": True}, ValidationError, "top_n must be a positive integer or null, got a value of "
                                                       "type bool"),
        # A document pasted into the wrong field is named by its type only: the message is logged.
        ("q", ["d"], {"top_n": "secret text"}, ValidationError, r"got a value of type str$"),
        ("q", ["d"], {"instruction": "find"}, ValidationError, "does not take an instruction"),
        ("q", ["d"], {"instruction": 7}, ValidationError, "instruction must be a string"),
    ],
)
def test_bad_input_says_what_to_change(small_limits: Reranker, query: object, documents: object, kwargs: dict,
                                       error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        small_limits.rerank(query, documents, **kwargs)  # type: ignore[arg-type]
    assert len(small_limits.rerank("still serving", ["yes"])) == 1


@pytest.mark.parametrize("cache_size", [0, 100])
def test_a_document_repeated_in_a_request_is_scored_once(bert_model: ScoringModel, cache_size: int) -> None:
    """Each copy was a pair of its own: a pass's worth of work and queue room per copy, and copies in different
    batches could differ in the last bits."""
    scorer = CountingScorer(bert_model)
    long = "cache " * 1000  # cut at max_length: each copy counts as truncated
    docs = ["tea grows on hills", long, "a cache server", "tea grows on hills", long, long]
    with Reranker(bert_model, model_settings(Path(bert_model.model_id), cache_size=cache_size),
                  score_fn=scorer) as reranker:
        result = reranker.rerank_detailed("tea", docs, raw_scores=True)
    assert scorer.pairs == 3 and result.stats.pairs_scored == 3 and result.stats.truncated == 3
    scores = {r.index: r.score for r in result.results}
    assert scores[0] == scores[3] and scores[1] == scores[4] == scores[5] and len(set(scores.values())) == 3
    order = [r.index for r in result.results]
    assert order.index(1) + 1 == order.index(4) == order.index(5) - 1  # equal scores, in the request's order


def test_validation_errors_are_value_errors() -> None:
    assert issubclass(ValidationError, ValueError) and issubclass(LimitExceededError, ValidationError)


def test_empty_string_document_is_scored(bert_reranker: Reranker) -> None:
    results = bert_reranker.rerank("q", ["", "something"])
    assert {r.index for r in results} == {0, 1}
    assert all(0.0 < r.score < 1.0 for r in results)


def test_documents_whose_probabilities_round_to_one_keep_the_order_of_their_logits(bert_model: ScoringModel) -> None:
    """float32 sigmoid is exactly 1.0 from a logit of about 17, which a causal yes/no reranker's clear answers
    reach: ordered on the probabilities, such documents came in request order, and top_n=1 dropped the best."""
    def scorer(batch: Sequence[EncodedPair]) -> np.ndarray:
        return np.asarray([16.0 + pair.n_tokens for pair in batch], dtype=np.float32)  # longer: better

    documents = ["tea", "tea tea tea", "tea tea"]
    with Reranker(bert_model, model_settings(Path(bert_model.model_id), cache_size=0), score_fn=scorer) as reranker:
        ranked = reranker.rerank("q", documents)
        assert [r.index for r in ranked] == [1, 2, 0] and {r.score for r in ranked} == {1.0}
        assert [r.index for r in reranker.rerank("q", documents, top_n=1)] == [1]
        assert [r.index for r in reranker.rerank("q", documents, raw_scores=True)] == [1, 2, 0]


def test_repeated_request_does_not_reach_the_model(bert_model: ScoringModel, metrics: Metrics,
                                                   documents: list[str]) -> None:
    scorer = CountingScorer(bert_model)
    with Reranker(bert_model, model_settings(Path(bert_model.model_id)), metrics=metrics,
                  score_fn=scorer) as reranker:
        first = reranker.rerank_detailed("tea", documents[:20])
        assert scorer.pairs == 20 and first.stats.cache_hits == 0
        second = reranker.rerank_detailed("tea", documents[:20])
        assert scorer.pairs == 20 and second.stats.cache_hits == 20
        assert second.results == first.results
        raw = reranker.rerank("tea", documents[:20], raw_scores=True)
        assert scorer.pairs == 20 and [r.index for r in raw] == [r.index for r in first.results]
        reranker.rerank("coffee", documents[:20])  # another query is another pair
        assert scorer.pairs == 40
    assert metrics.registry.get_sample_value("reranker_cache_requests_total", {"result": "hit"}) == 40
    assert metrics.registry.get_sample_value("reranker_cache_requests_total", {"result": "miss"}) == 40


def test_cache_size_zero_disables_the_cache(bert_model: ScoringModel) -> None:
    scorer = CountingScorer(bert_model)
    settings = model_settings(Path(bert_model.model_id), cache_size=0)
    with Reranker(bert_model, settings, score_fn=scorer) as reranker:
        reranker.rerank("tea", ["a", "b"])
        reranker.rerank("tea", ["a", "b"])
    assert scorer.pairs == 4


def test_cache_is_bounded_and_evicts_least_recently_used() -> None:
    from reranker.cache import ScoreCache, pair_key

    cache = ScoreCache(2)
    a, b, c = pair_key("a"), pair_key("b"), pair_key("c")
    cache.put(a, (1.0, 0))
    cache.put(b, (2.0, 0))
    assert cache.get(a) == (1.0, 0)  # a is now the most recent
    cache.put(c, (3.0, 0))
    assert cache.get(b) is None and cache.get(a) == (1.0, 0) and cache.get(c) == (3.0, 0) and len(cache) == 2
    assert pair_key("ab", "c") != pair_key("a", "bc")


def test_a_lookup_scores_each_missing_text_once_and_fills_every_document() -> None:
    from reranker.cache import ScoreCache, pair_key
    from reranker.lookup import Lookup
    from reranker.planning import CUT, SPLIT, Plan

    cache = ScoreCache(8)
    a, b, c = pair_key("a"), pair_key("b"), pair_key("c")
    cache.put(b, (5.0, SPLIT))
    lookup = Lookup.of(cache, [a, b, a, c, b, a])
    assert (lookup.hits, lookup.misses) == (2, 4)
    assert lookup.scored == [0, 3]  # a's first copy, then c: slot 0 is a, slot 1 is c
    plan = Plan(cut={1})  # c was cut to max_length
    assert lookup.flags(plan) == [0, SPLIT, 0, CUT, SPLIT, 0]
    assert lookup.fill(cache, [1.0, 3.0], plan) == [1.0, 5.0, 1.0, 3.0, 5.0, 1.0]
    assert cache.get(a) == (1.0, 0) and cache.get(c) == (3.0, CUT)
    assert Lookup.of(cache, [c, a]).scored == []


def test_the_cache_tells_absent_keys_without_reordering_or_hashing_under_its_lock() -> None:
    from reranker.cache import ScoreCache, pair_key

    cache = ScoreCache(2)
    a, b = pair_key("a"), pair_key("b")
    cache.put(a, (1.0, 0))
    cache.put(b, (2.0, 0))

    def keys() -> Iterator[bytes]:
        for text in ("a", "c", "c"):
            # Admission hashes a request's documents: the scoring threads' gets and puts must not wait on that.
            assert not cache._lock.locked()
            yield pair_key(text)

    assert cache.absent(keys()) == {pair_key("c")}
    cache.put(pair_key("c"), (3.0, 0))
    assert cache.get(a) is None and cache.get(b) == (2.0, 0)  # the look left a the least recently used
    assert ScoreCache(0).absent([a, a]) == {a}


def test_instruction_is_part_of_the_cache_key(causal_model: ScoringModel) -> None:
    scorer = CountingScorer(causal_model)
    with Reranker(causal_model, model_settings(Path(causal_model.model_id)), score_fn=scorer) as reranker:
        plain = reranker.rerank("q", ["d"], raw_scores=True)
        instructed = reranker.rerank("q", ["d"], instruction="Find code", raw_scores=True)
        blank = reranker.rerank("q", ["d"], instruction="  \n", raw_scores=True)  # no instruction: a cache hit
    assert scorer.pairs == 2 and plain[0].score != instructed[0].score and blank[0].score == plain[0].score


def test_engine_metrics_move(bert_model: ScoringModel, metrics: Metrics, documents: list[str]) -> None:
    with Reranker(bert_model, model_settings(Path(bert_model.model_id), batch_tokens=1024), metrics=metrics) as r:
        stats = r.rerank_detailed("json", documents[:30]).stats

    def value(name: str, labels: dict[str, str] | None = None) -> float:
        sample = metrics.registry.get_sample_value(name, labels)
        assert sample is not None, f"{name} {labels} is not exported"
        return sample

    assert value("reranker_pairs_scored_total") == 30
    assert value("reranker_input_tokens_total") == stats.tokens > 30
    assert value("reranker_batch_size_sum") == 30
    assert value("reranker_batch_size_count") == value("reranker_inference_duration_seconds_count") > 1
    assert value("reranker_batch_tokens_sum") >= stats.tokens
    assert value("reranker_queue_duration_seconds_count") == 1
    assert value("reranker_truncated_documents_total") == stats.truncated > 0
    assert value("reranker_top1_score_count") == 1 and value("reranker_score_stddev_count") == 1
    assert value("reranker_model_info", {"model": bert_model.model_id, "device": "cpu", "backend": "torch",
                                         "backend_reason": "RERANKER_BACKEND=torch", "dtype": "float32",
                                         "dtype_reason": "RERANKER_DTYPE=float32", "max_length": "256",
                                         "compile": "off"}) == 1
    assert value("reranker_model_convert_seconds") == 0
    assert value("reranker_model_load_seconds") > 0


def test_a_blank_instruction_is_no_instruction(bert_reranker: Reranker) -> None:
    """Clients that always send the field send it blank to a model that takes none: that is not an error."""
    assert len(bert_reranker.rerank("q", ["a", "b"], instruction=" \n")) == 2


@pytest.mark.parametrize(("lengths", "limit", "extra", "expected"), [
    ([], 10, 0, []),
    ([3, 3, 3], 10, 0, [(0, 3)]),
    ([5, 5, 5, 5], 10, 0, [(0, 2), (2, 4)]),
    ([4, 30, 4], 10, 0, [(0, 1), (1, 2), (2, 3)]),  # a text over the limit is a slice of its own
    ([0, 0, 11, 2], 10, 0, [(0, 3), (3, 4)]),  # empty texts go with the next
    # Each text tokenized inside a prompt of 4 more characters (a causal reranker's template): 7 a text.
    ([3, 3, 3], 10, 4, [(0, 1), (1, 2), (2, 3)]),
    ([0, 0, 0, 0], 10, 4, [(0, 2), (2, 4)]),
])
def test_char_slices(lengths: list[int], limit: int, extra: int, expected: list[tuple[int, int]]) -> None:
    from reranker.planning import char_slices

    assert list(char_slices(["x" * n for n in lengths], limit, extra)) == expected


def test_each_encoder_weighs_what_it_tokenizes_beside_every_document(bert_model: ScoringModel,
                                                                     causal_model: ScoringModel) -> None:
    """A 4,000-character query with 1,000 short documents was one slice for the causal model: 4 million characters
    of tokenizing, about 2 s with no look at a cancellation, against the ~0.15 s reliability.md promises."""
    query = "q" * 4000
    assert bert_model.encoder.framing_chars(query, None) == 0  # the query is tokenized once
    assert causal_model.encoder.framing_chars(query, "find rivers") > 4000 + len("find rivers")


@pytest.mark.parametrize("long_docs", ["truncate", "chunk"])
def test_tokenizing_in_slices_scores_as_in_one(any_model: ScoringModel, documents: list[str], long_docs: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from reranker import planning

    settings = model_settings(Path(any_model.model_id), cache_size=0, long_docs=long_docs)
    with Reranker(any_model, settings) as reranker:
        whole = reranker.rerank_detailed("cache servers", documents[:60], raw_scores=True)
        monkeypatch.setattr(planning, "SLICE_CHARS", 500)  # about one document a slice
        sliced = reranker.rerank_detailed("cache servers", documents[:60], raw_scores=True)
    assert [r.index for r in sliced.results] == [r.index for r in whole.results]
    np.testing.assert_allclose([r.score for r in sliced.results], [r.score for r in whole.results], atol=1e-6)
    assert (sliced.stats.truncated, sliced.stats.chunked, sliced.stats.tokens) == \
        (whole.stats.truncated, whole.stats.chunked, whole.stats.tokens)


# Twelve documents of about 1,560 characters: two to a slice of 3,200.
CLIPPED = [f"document {i} " + "about cache servers and rivers " * 50 for i in range(12)]


def test_a_cut_to_max_doc_tokens_stops_at_the_next_slice_once_cancelled(bert_model: ScoringModel, bert_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """/v2/rerank's max_tokens_per_doc cut every document in one tokenizer call that never looked at the cancel:
    a client that left, or a stop, waited for it (17 s for 1000 documents of 1500 words)."""
    from reranker import planning
    from reranker.errors import CancelledError
    from reranker.longdocs import DocumentClipper

    monkeypatch.setattr(planning, "SLICE_CHARS", 3200)
    cancel = threading.Event()
    with Reranker(bert_model, model_settings(bert_dir, cache_size=0)) as reranker:
        clipper = GatedCall(reranker._clipper, "clip", monkeypatch, lambda documents, *_: len(documents))
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(reranker.rerank_detailed, "cache", CLIPPED, cancel=cancel, max_doc_tokens=8)
            assert clipper.first_batch.wait(HANG_S)  # cutting the first slice
            cancel.set()
            clipper.gate.set()
            with pytest.raises(CancelledError):
                call.result(HANG_S)
        assert clipper.calls == [2]
        # Uncancelled, the slices' cuts are those of one call.
        whole = reranker.rerank_detailed("cache", CLIPPED, max_doc_tokens=8).stats
        texts, clipped = reranker._clip(CLIPPED, 8)
        expected = DocumentClipper(bert_model.tokenizer).clip(CLIPPED, 8)
    assert clipper.calls[1:] == [2] * 6 + [2] * 6 and whole.truncated == 12 == len(clipped)
    assert list(texts) == [doc if cut is None else cut for doc, cut in zip(CLIPPED, expected, strict=True)]


def test_chunk_mode_refuses_a_request_over_the_queue_at_the_slice_that_shows_it(
        bert_model: ScoringModel, bert_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In chunk mode a long document's windows are known only once it is tokenized: a request needing more passes
    than RERANKER_MAX_QUEUE was refused after all its documents were (7.6 s for 30 documents of 99k characters)."""
    from reranker import planning

    long_docs = [f"document {i} " + "about cache servers and rivers " * 400 for i in range(6)]  # windows each
    monkeypatch.setattr(planning, "SLICE_CHARS", 13_000)  # one document a slice
    settings = model_settings(bert_dir, cache_size=0, long_docs="chunk", max_queue=20)
    with Reranker(bert_model, settings) as reranker:
        sizes: list[int] = []
        encode = bert_model.encoder.encode

        def counted(query: str, documents: Sequence[str], *args: Any, **kwargs: Any) -> Any:
            sizes.append(len(documents))
            return encode(query, documents, *args, **kwargs)

        monkeypatch.setattr(bert_model.encoder, "encode", counted)
        with pytest.raises(LimitExceededError, match="RERANKER_MAX_QUEUE=20"):
            reranker.rerank("cache", long_docs)
    assert sizes == [1]


def test_a_query_that_leaves_exactly_the_least_room_is_taken(bert_reranker: Reranker) -> None:
    """min_document_room is the least a query may leave a document: exactly that is served, one token less is not."""
    from reranker.tokens import min_document_room

    model = bert_reranker.model
    least = min_document_room(model.max_length, templated=False)
    words = next(n for n in range(1, model.max_length) if model.max_length - model.encoder.overhead("cache " * n, None)
                 <= least)
    query = "cache " * words
    assert model.max_length - model.encoder.overhead(query, None) == least  # one token a word, in this vocabulary
    assert len(bert_reranker.rerank(query, ["doc"])) == 1
    with pytest.raises(LimitExceededError, match=f"so that at least {least} are left"):
        bert_reranker.rerank(query + "cache", ["doc"])


@pytest.mark.parametrize(("instruction", "says"), [
    ("a\x00", "instruction contains a NUL character"),
    ("a\udc00", "instruction is not valid Unicode"),
    (" " * 10_001, "instruction has 10001 characters; the limit is RERANKER_MAX_QUERY_CHARS"),
])
def test_an_instruction_is_checked_as_a_query_is(bert_reranker: Reranker, instruction: str, says: str) -> None:
    """Before the model's own refusal (this one takes no instruction), which would hide what is wrong with it."""
    assert bert_reranker.settings.max_query_chars == 10_000
    with pytest.raises(ValidationError, match=re.escape(says)):
        bert_reranker.rerank("q", ["d"], instruction=instruction)


def test_settings_that_serve_badly_together_are_said_at_start(bert_model: ScoringModel, bert_dir: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Each valid alone, they started without a word: a queue under max_docs refused every large request 413 on an
    idle service; a batch budget under max_length ran each long pair alone."""
    with caplog.at_level("WARNING", "reranker.engine"):
        with Reranker(bert_model, model_settings(bert_dir, max_queue=10, batch_tokens=64)):
            pass
    assert "RERANKER_MAX_QUEUE=10 pairs is below RERANKER_MAX_DOCS=1000: a request of more than 10 documents is " \
           "refused 413" in caplog.text
    assert f"RERANKER_BATCH_TOKENS=64 is below the model's max_length ({bert_model.max_length})" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", "reranker.engine"):
        with Reranker(bert_model, model_settings(bert_dir)):  # the defaults
            pass
    assert [r.getMessage() for r in caplog.records if r.name == "reranker.engine"] == []
