"""The one-pass encoders give exactly CrossEncoder.preprocess's features, for every model kind and length."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from reranker import ValidationError, tokens
from reranker.loading import load_model
from reranker.model import ScoringModel
from reranker.tokens import ChatTemplateEncoder, EncodedPair, ReferenceEncoder, TextPairEncoder, build_encoder
from tests.conftest import model_settings
from tests.servers import HANG_S


@pytest.fixture(scope="session", params=["bert", "xlmr", "causal"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    path: Path = request.getfixturevalue(f"{request.param}_dir")
    return path


def preprocessed(model: ScoringModel, query: str, documents: list[str], instruction: str | None) -> list[EncodedPair]:
    """What CrossEncoder.predict feeds the model, row by row without padding."""
    features = model.cross_encoder.preprocess([(query, d) for d in documents], prompt=instruction)
    mask = features["attention_mask"].bool().numpy()
    types = features.get("token_type_ids")
    return [
        EncodedPair(features["input_ids"].numpy()[i][mask[i]], None if types is None else types.numpy()[i][mask[i]])
        for i in range(len(documents))
    ]


def assert_same(got: list[EncodedPair], want: list[EncodedPair]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_array_equal(a.input_ids, b.input_ids, err_msg=f"input_ids of pair {i}")
        assert (a.token_type_ids is None) == (b.token_type_ids is None)
        if a.token_type_ids is not None:
            np.testing.assert_array_equal(a.token_type_ids, b.token_type_ids, err_msg=f"token_type_ids of pair {i}")


@pytest.mark.parametrize("max_length", [24, 32, 48, 100, 256])  # 24, 32: the probe's own queries are refused
def test_features_equal_preprocess_for_any_length(model_dir: Path, documents: list[str], max_length: int) -> None:
    if "Qwen3" in model_dir.name:
        if max_length < 48:
            pytest.skip("the small lengths are the classic cross-encoders' (a causal one's room is its own)")
        max_length += 160  # the tiny vocabulary spends about 150 tokens on the Qwen3-Reranker prompt
    model = load_model(model_settings(model_dir, max_length=max_length))
    expected_kind = ChatTemplateEncoder if model.is_causal else TextPairEncoder
    assert isinstance(model.encoder, expected_kind)
    instructions = [None, "Find the passage about rivers"] if model.is_causal else [None]
    # Short enough to leave room for a document at the smallest max_length, whatever the template.
    query = "cache" if model.is_causal else "how do I parse json"
    docs = [*documents[:60], "", "  spaces around  ", "tabs\tand\nnewlines", "Ünïcödé ☕ 数据 🙂"]
    for instruction in instructions:
        encoded = model.encoder.encode(query, docs, instruction)
        assert_same([e.pair for e in encoded], preprocessed(model, query, docs, instruction))
        assert all(e.pair.n_tokens <= max_length for e in encoded)
        assert any(not e.fits for e in encoded) and any(e.fits for e in encoded)


def test_a_document_is_cut_exactly_when_it_does_not_fit(bert_model: ScoringModel) -> None:
    query = "json"
    room = bert_model.max_length - bert_model.encoder.overhead(query, None)
    words = ["river"] * (room + 1)  # one token per word in the tiny vocabulary
    at_limit, over = " ".join(words[:room]), " ".join(words)
    fits, cut = bert_model.encoder.encode(query, [at_limit, over], None, offsets=True)
    assert fits.fits and fits.offsets is None and fits.pair.n_tokens == bert_model.max_length
    assert not cut.fits and cut.pair.n_tokens == bert_model.max_length
    assert cut.offsets is not None and len(cut.offsets) == room + 1
    assert cut.offsets[-1] == (len(over) - len("river"), len(over))


def test_a_query_that_leaves_no_room_keeps_no_document(bert_model: ScoringModel) -> None:
    """The engine refuses such a query (min_document_room); called directly (the int8 calibration did), the
    negative room sliced from the document's end and kept nearly all of it: pairs far over max_length, which a
    pass past the position embeddings fails on."""
    query = "json " * bert_model.max_length
    (encoded,) = bert_model.encoder.encode(query, ["river " * 50])
    assert encoded.pair.n_tokens == bert_model.encoder.overhead(query, None) and not encoded.fits
    assert bert_model.max_length - encoded.pair.n_tokens < tokens.min_document_room(bert_model.max_length,
                                                                                     templated=False)


def test_offsets_of_a_cut_causal_document_are_relative_to_the_document(causal_model: ScoringModel) -> None:
    document = "The river flows. " * 400
    [encoded] = causal_model.encoder.encode("which river", [document], None, offsets=True)
    assert not encoded.fits and encoded.offsets is not None
    assert encoded.offsets[0][0] == 0 and encoded.offsets[-1][1] >= len(document.rstrip())
    assert all(0 <= start <= end <= len(document) for start, end in encoded.offsets)


def test_concurrent_encoding_gives_each_caller_its_own_pairs(any_model: ScoringModel, documents: list[str]) -> None:
    queries = [f"question {i} about cache and rivers" for i in range(8)]
    expected = [any_model.encoder.encode(q, documents[i * 10:i * 10 + 80], None) for i, q in enumerate(queries)]
    got: list[object] = [None] * 8
    barrier = threading.Barrier(8)

    def call(i: int) -> None:
        barrier.wait()
        for _ in range(3):
            got[i] = any_model.encoder.encode(queries[i], documents[i * 10:i * 10 + 80], None)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_S)
    for i in range(8):
        result = got[i]
        assert isinstance(result, list)
        assert_same([e.pair for e in result], [e.pair for e in expected[i]])


def test_a_tokenizer_the_fast_path_cannot_reproduce_falls_back_to_preprocess(
    monkeypatch: pytest.MonkeyPatch, bert_model: ScoringModel, documents: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    class OffByOne(TextPairEncoder):
        def encode(self, *args: object, **kwargs: object) -> list[tokens.EncodedDocument]:
            out = super().encode(*args, **kwargs)  # type: ignore[arg-type]
            return [tokens.EncodedDocument(EncodedPair(d.pair.input_ids[:-1]), d.fits, d.offsets) for d in out]

    monkeypatch.setattr(tokens, "TextPairEncoder", OffByOne)
    with caplog.at_level(logging.WARNING, logger="reranker.tokens"):
        encoder = build_encoder(bert_model.cross_encoder, bert_model.tokenizer, bert_model.max_length, templated=False)
    assert isinstance(encoder, ReferenceEncoder)
    assert "slower" in caplog.text
    docs = documents[:20]
    assert_same([e.pair for e in encoder.encode("q", docs, None)], preprocessed(bert_model, "q", docs, None))


def test_a_query_holding_the_template_placeholder_is_encoded_like_preprocess(causal_model: ScoringModel) -> None:
    """The causal encoder renders the prompt around a private-use placeholder; a query or instruction that
    contains it gets another one, not a server error."""
    query, instruction = "where \ue000\ue001\ue000 is", "Find \ue002\ue003\ue002 passages"
    docs = ["a river", "a mountain"]
    encoded = causal_model.encoder.encode(query, docs, instruction)
    assert_same([e.pair for e in encoded], preprocessed(causal_model, query, docs, instruction))
    crowded = "".join(chr(0xE000 + i) + chr(0xE001 + i) + chr(0xE000 + i) for i in range(0, 64, 2))
    with pytest.raises(ValidationError, match="private-use characters"):
        causal_model.encoder.encode(crowded, docs, None)
