"""The Gradio UI in Serve mode (serve.yaml's `ui` application at /ui): its page loads, and a Rerank event run
through gradio_client scores on the model replica as one process would; the Monitoring tab sees that replica."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="needs requirements-ray.txt")

from pathlib import Path  # noqa: E402

import httpx  # noqa: E402

from reranker import Reranker  # noqa: E402
from reranker.model import ScoringModel  # noqa: E402
from tests.conftest import model_settings  # noqa: E402
from tests.ray_cluster import deploy, local_ray  # noqa: E402
from tests.servers import HANG_S  # noqa: E402
from tests.test_ray_serve import app_config  # noqa: E402

DOCS = ["a cache keeps recent answers", "tea is a drink", "caches trade memory for time"]


def test_the_ui_reranks_through_the_model_replicas(bert_dir: Path, bert_model: ScoringModel) -> None:
    from gradio_client import Client
    from ray import serve

    from deploy.ray.panel import Replicas

    with local_ray({}) as cluster:
        deploy(app_config(bert_dir, replicas=1, ui=True), "ui")
        page = httpx.get(f"{cluster.url}/ui/", timeout=HANG_S, follow_redirects=True)
        assert page.status_code == 200 and "gradio" in page.text.lower()
        assert "Monitoring" in page.text and bert_dir.name in page.text  # the tabs, and the model in the header
        assert "1 model replica(s) on Ray Serve" in page.text  # the Monitoring tab's card, from the replica

        client = Client(f"{cluster.url}/ui/", verbose=False)
        rows, status = client.predict("what is a cache", "\n".join(DOCS), api_name="/predict")
        with Reranker(bert_model, model_settings(bert_dir)) as local:
            expected = local.rerank("what is a cache", DOCS)
        assert [row[2] for row in rows["data"]] == [r.index for r in expected]
        assert all(abs(row[1] - round(r.score, 6)) < 1e-5 for row, r in zip(rows["data"], expected, strict=True))
        assert "3 documents" in status
        client.close()

        # What the Monitoring tab reads, each tick, from a Gradio worker thread: the replica booked the event.
        replicas = Replicas(serve.get_deployment_handle("RerankModel", "reranker"))
        assert replicas.snapshot().requests["ok"] >= 1
        assert [r.route for r in replicas.latest()][:1] == ["ui"]
