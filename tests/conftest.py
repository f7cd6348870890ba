"""Shared fixtures: tiny random rerankers built once per session, offline; fresh metrics per test."""

from __future__ import annotations

import os
import shutil
import tempfile

# Before anything imports huggingface_hub: no test may reach the network or phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Read by Ray when it is imported (tests/ray_cluster.py): a one-node Ray on 127.0.0.1, not the machine's
# interface address, and no usage stats.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Converted models (the OpenVINO backend) go to a folder of this run, never the user's ~/.cache; every
# service a test starts inherits it, and pytest_sessionfinish removes it. A script a test runs that imports this
# module (tests/test_drain.py's FAULTY_APP) keeps the run's folder rather than making one nobody removes.
TEST_CACHE_PREFIX = "reranker-test-cache-"
if not os.path.basename(os.environ.get("RERANKER_CACHE_DIR", "")).startswith(TEST_CACHE_PREFIX):
    os.environ["RERANKER_CACHE_DIR"] = tempfile.mkdtemp(prefix=TEST_CACHE_PREFIX)

import random  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from reranker import Reranker, Settings  # noqa: E402
from reranker.loading import load_model  # noqa: E402
from reranker.metrics import Metrics  # noqa: E402
from reranker.model import ScoringModel  # noqa: E402
from tests.tiny_models import (  # noqa: E402
    build_bert_reranker,
    build_causal_reranker,
    build_xlmr_reranker,
    random_text,
)

TEST_MAX_LENGTH = 256


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bert_reranker(tmp_path_factory.mktemp("models") / "tiny-bert-reranker")


@pytest.fixture(scope="session")
def xlmr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # bge-reranker-v2-m3's layout: a SentencePiece-style vocabulary, <s> A </s></s> B </s>, no type ids.
    return build_xlmr_reranker(tmp_path_factory.mktemp("models") / "tiny-xlmr-reranker")


@pytest.fixture(scope="session")
def causal_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The name matters: the loader gives Qwen3-Reranker checkpoints their model card's prompt.
    return build_causal_reranker(tmp_path_factory.mktemp("models") / "tiny-Qwen3-Reranker")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(os.environ["RERANKER_CACHE_DIR"], ignore_errors=True)


def model_settings(path: Path, **overrides: object) -> Settings:
    # torch unless a test asks for another backend: most tests compare with CrossEncoder.predict's own module.
    values: dict = {"model": str(path), "dtype": "float32", "device": "cpu", "max_length": TEST_MAX_LENGTH,
                    "backend": "torch", "cache_dir": os.environ["RERANKER_CACHE_DIR"]}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def bert_model(bert_dir: Path) -> ScoringModel:
    return load_model(model_settings(bert_dir))


@pytest.fixture(scope="session")
def causal_model(causal_dir: Path) -> ScoringModel:
    return load_model(model_settings(causal_dir))


@pytest.fixture(scope="session")
def xlmr_model(xlmr_dir: Path) -> ScoringModel:
    return load_model(model_settings(xlmr_dir))


@pytest.fixture(scope="session")
def ov_bert_model(bert_dir: Path) -> ScoringModel:
    """The tiny BERT on OpenVINO at float32."""
    return load_model(model_settings(bert_dir, backend="openvino"))


@pytest.fixture(params=["bert", "xlmr", "causal"])
def any_model(request: pytest.FixtureRequest) -> ScoringModel:
    model: ScoringModel = request.getfixturevalue(f"{request.param}_model")
    return model


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def bert_reranker(bert_model: ScoringModel, bert_dir: Path, metrics: Metrics) -> Iterator[Reranker]:
    with Reranker(bert_model, model_settings(bert_dir), metrics=metrics) as reranker:
        yield reranker


@pytest.fixture(scope="session")
def documents() -> list[str]:
    """200 seeded documents of 1-600 words: many fit, many are truncated at 256 tokens."""
    rng = random.Random(1234)
    return [random_text(rng, rng.randint(1, 600)) for _ in range(200)]
