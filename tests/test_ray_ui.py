"""The Gradio UI in Serve mode (serve.yaml's `ui` application at /ui): its page loads, and a Rerank event run
through gradio_client scores on the model replica as one process would; the Monitoring tab sees that replica.
The single-process guards hold there too: RERANKER_UI_AUTH's login on every Gradio API route, the body limit,
and the drain when Serve stops the replica. One Ray cluster for the module; the drain test, last, deletes the UI."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="needs requirements-ray.txt")

import random  # noqa: E402
import re  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402

from reranker import Reranker  # noqa: E402
from reranker.model import ScoringModel  # noqa: E402
from tests.conftest import model_settings  # noqa: E402
from tests.ray_cluster import LocalRay, deploy, device_held, local_ray, worker_log_lines  # noqa: E402
from tests.ray_load import HEADERS  # noqa: E402
from tests.servers import HANG_S  # noqa: E402
from tests.test_ray_serve import app_config, gated, wait_for  # noqa: E402
from tests.tiny_models import random_text  # noqa: E402

DOCS = ["a cache keeps recent answers", "tea is a drink", "caches trade memory for time"]
USER, PASSWORD = "alice", "correct horse"
MAX_BODY = 4_000_000  # above the drain test's event, far below the default
NOT_AUTHENTICATED = {"detail": {"error": "Not authenticated", "auth_message": None}}


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model replica's device gate (tests/ray_cluster.py's device_held): open unless a test holds it."""
    return tmp_path_factory.mktemp("gate")


@pytest.fixture(scope="module")
def cluster(bert_dir: Path, gate: Path) -> Iterator[LocalRay]:
    from deploy.ray.panel import KIND_INGRESS, KIND_MODEL, published

    config = gated(app_config(bert_dir, replicas=1, ui=True, RERANKER_UI_AUTH=f"{USER}:{PASSWORD}",
                              RERANKER_MAX_BODY_BYTES=str(MAX_BODY)), gate)
    with local_ray({}) as running:
        # The model application first, until both its replicas have published a view: the UI's card counts the
        # replicas once as it starts, and the tests below go through that application's ingress.
        deploy({**config, "applications": config["applications"][:1]}, "reranker")
        wait_for(lambda: {view.kind for view in published("reranker").values()} >= {KIND_MODEL, KIND_INGRESS},
                 HANG_S, "the model replica's and the ingress's views")
        deploy(config, "ui")  # the same model application: Serve leaves it as it is
        yield running


@contextmanager
def login(cluster: LocalRay) -> Iterator[httpx.Client]:
    """An HTTP client holding the cookie of a Gradio login to the UI, as a browser would."""
    with httpx.Client(base_url=f"{cluster.url}/ui", timeout=HANG_S) as client:
        response = client.post("/login", data={"username": USER, "password": PASSWORD})
        assert response.status_code == 200 and response.json() == {"success": True}
        yield client


def test_the_ui_reranks_through_the_model_replicas(cluster: LocalRay, bert_dir: Path,
                                                   bert_model: ScoringModel) -> None:
    from gradio_client import Client
    from prometheus_client import CollectorRegistry

    from deploy.ray.panel import KIND_UI, Replicas, ReplicaView
    from reranker.metrics import Metrics
    from web.snapshots import metrics_snapshot

    with login(cluster) as browser:
        page = browser.get("/", follow_redirects=True)
    assert page.status_code == 200 and "gradio" in page.text.lower()
    assert "Monitoring" in page.text and bert_dir.name in page.text  # the tabs, and the model in the header
    # The Monitoring tab's card, from the views the replicas publish.
    assert "1 model replica(s) and 1 ingress replica(s) on Ray Serve" in page.text

    client = Client(f"{cluster.url}/ui/", auth=(USER, PASSWORD), verbose=False)
    rows, status = client.predict("what is a cache", "\n".join(DOCS), api_name="/predict")
    with Reranker(bert_model, model_settings(bert_dir)) as local:
        expected = local.rerank("what is a cache", DOCS)
    assert [row[2] for row in rows["data"]] == [r.index for r in expected]
    assert all(abs(row[1] - round(r.score, 6)) < 1e-5 for row, r in zip(rows["data"], expected, strict=True))
    assert "3 documents" in status
    client.close()

    # What the Monitoring tab reads each tick: the views the replicas publish. The model replica booked the event;
    # the ingress, a bad request it answered itself (which the tab once missed).
    bad = httpx.post(f"{cluster.url}/v1/rerank", content=b"{bad",
                     headers={**HEADERS, "content-type": "application/json"}, timeout=HANG_S)
    assert bad.status_code == 400
    own = ReplicaView("ui", metrics_snapshot(Metrics(CollectorRegistry())), [], kind=KIND_UI)
    replicas = Replicas("reranker", lambda: own)
    # Each replica publishes on its own one-second tick, so the ingress's 400 can be in the store before the model
    # replica's next view carries the UI's event: wait for both.
    def both_views() -> bool:
        requests = replicas.snapshot().requests
        return requests["invalid"] >= 1 and requests["ok"] >= 1 and {"ui", "/v1/rerank"} <= {
            r.route for r in replicas.latest()}
    wait_for(both_views, HANG_S, "the model replica's view with the UI's call and the ingress's with its 400")
    assert sorted(view.kind for view in replicas.refresh()) == ["ingress", "model", "ui"]


def test_every_gradio_api_route_needs_the_login(cluster: LocalRay) -> None:
    """web/gradio_login.py in front of the routes Gradio's own auth leaves open, under Serve's /ui prefix."""
    from gradio_client import Client

    url = f"{cluster.url}/ui"
    for method, path in [("GET", "/gradio_api/heartbeat/some-session"), ("POST", "/gradio_api/cancel"),
                         ("GET", "/gradio_api/startup-events"), ("GET", "/gradio_api/app_id"),
                         ("POST", "/gradio_api/call/predict"), ("GET", "/gradio_api/info")]:
        body = {"data": ["cache", "\n".join(DOCS)]} if method == "POST" else None
        for cookies in ({}, {"access-token-unsecure-forged": "forged"}):
            response = httpx.request(method, f"{url}{path}", json=body, cookies=cookies, timeout=HANG_S)
            assert response.status_code == 401 and response.json() == NOT_AUTHENTICATED, path
    wrong = httpx.post(f"{url}/login", data={"username": USER, "password": "wrong"}, timeout=HANG_S)
    assert wrong.status_code == 400 and "access-token" not in wrong.headers.get("set-cookie", "")
    with pytest.raises(ValueError, match="Could not login"):
        Client(f"{url}/", auth=(USER, "wrong"), verbose=False)
    with login(cluster) as client:
        assert client.get("/gradio_api/app_id").status_code == 200
        assert "/predict" in client.get("/gradio_api/info").json()["named_endpoints"]


def test_refused_calls_of_the_rerank_event_are_counted_and_no_other_event(cluster: LocalRay) -> None:
    """As in one process (tests/test_accounting.py): the login's 401 for a call of the Rerank event is counted on
    the `ui` route however the call came (the Gradio API, a queue join naming it by fn_index), and the same 401
    for the Monitoring tab's timer is not. The login stood outside the counting here, so none was counted."""
    from tests.ray_cluster import replica_pids

    with login(cluster) as client:
        dependencies = client.get("/config").json()["dependencies"]
    [rerank] = [d["id"] for d in dependencies if d["api_name"] == "predict"]
    [tick] = [d["id"] for d in dependencies if any(target[1] == "tick" for target in d["targets"])]
    [pid] = replica_pids("ui", "UI")

    def refusals() -> list[dict[str, object]]:
        return [line for line in worker_log_lines(cluster, pid) if line.get("message") == "rerank refused"
                and line.get("http_status") == 401]

    before = len(refusals())
    url = f"{cluster.url}/ui/gradio_api"
    inputs = ["cache", "\n".join(DOCS), None, "", False, None]
    for path, body in [("/call/predict", {"data": inputs}),
                       ("/queue/join", {"data": inputs, "fn_index": rerank, "session_hash": "anonymous"}),
                       ("/queue/join", {"data": [], "fn_index": tick, "session_hash": "anonymous"}),
                       ("/run/predict", {"data": [], "fn_index": tick, "session_hash": "anonymous"})]:
        assert httpx.post(f"{url}{path}", json=body, timeout=HANG_S).status_code == 401, path
    wait_for(lambda: len(refusals()) >= before + 2, HANG_S, "two refusals in the UI replica's request log")
    time.sleep(1)  # anything more would have come by now: each line is written as the request is answered
    lines = refusals()[before:]
    assert [(line["route"], line["status"]) for line in lines] == [("ui", "invalid")] * 2, lines


def test_a_body_over_the_limit_gets_413_and_is_counted(cluster: LocalRay) -> None:
    """web/middleware.py's BodyLimit on the Gradio API, before Gradio parses anything; the refusal is booked on
    the `ui` route of the UI's metrics, which Ray exports (deployment UI)."""
    with login(cluster) as client:
        big = client.post("/gradio_api/call/predict", content=b'{"data": ["' + b"x" * MAX_BODY + b'"]}',
                          headers={"content-type": "application/json"})
        assert big.status_code == 413 and big.json()["error"]["type"] == "limit_exceeded"
        assert "RERANKER_MAX_BODY_BYTES" in big.json()["error"]["message"]
        # Not a limit on what the UI may send under it.
        inputs = ["cache", "\n".join(DOCS), None, "", False, None]  # query, documents, top_n, instruction, raw, file
        assert client.post("/gradio_api/call/predict", json={"data": inputs}).status_code == 200
    series = re.compile(r'^ray_reranker_requests_total\{[^}]*deployment="UI"[^}]*\} ', re.M)

    def refusal_exported() -> bool:
        text = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=HANG_S).text
        return any('route="ui"' in line and 'status="invalid"' in line and float(line.rsplit(" ", 1)[1]) >= 1
                   for line in text.splitlines() if series.match(line))

    wait_for(refusal_exported, HANG_S, "the UI's 413 in ray_reranker_requests_total{deployment=\"UI\"}")
    # And among its answers by status code, which RerankerServeProxyRefusing takes off the proxy's: the UI's own 429s
    # (its login throttle) were counted as the proxy's refusals.
    answers = re.compile(r'^ray_reranker_ingress_answers_total\{[^}]*deployment="UI"[^}]*status_code="413"[^}]*\} ',
                         re.M)

    def answer_exported() -> bool:
        text = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=HANG_S).text
        return any(float(line.rsplit(" ", 1)[1]) >= 1 for line in text.splitlines() if answers.match(line))

    wait_for(answer_exported, HANG_S, "the UI's 413 in ray_reranker_ingress_answers_total{deployment=\"UI\"}")


def stream(client: httpx.Client, path: str, into: dict[str, object]) -> threading.Thread:
    """Read a server-sent event stream in a thread: `into` gets its text and how it ended ("eof" or the error)."""
    def read() -> None:
        chunks = []
        try:
            with client.stream("GET", path, timeout=httpx.Timeout(HANG_S, read=None)) as response:
                into["status"] = response.status_code
                for chunk in response.iter_text():
                    chunks.append(chunk)
            into["end"] = "eof"
        except httpx.HTTPError as err:
            into["end"] = f"{type(err).__name__}: {err}"
        into["text"] = "".join(chunks)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_an_event_id_gradio_does_not_hold_gets_its_error_event_and_a_clean_end(cluster: LocalRay) -> None:
    """As one process (tests/test_api.py): the stream Gradio breaks off with its 404 ends after the error event."""
    def errors() -> int:
        return sum(line.get("level") == "ERROR" for line in worker_log_lines(cluster))

    before = errors()
    with login(cluster) as client:
        unknown = client.get("/gradio_api/call/predict/no-such-event")
    assert (unknown.status_code, unknown.text) == (200, 'event: error\ndata: "404: Not Found"\n\n')
    assert errors() == before


def test_a_running_event_whose_page_closes_is_cancelled_on_the_model_replica(cluster: LocalRay, gate: Path) -> None:
    """As one process (tests/test_accounting.py): Gradio only marks the event of a closed tab dead, so the UI
    replica's handle call watches it, and the model replica gives the request up while its first pass is still
    held on the device: the rest of its pairs are never scored."""
    rng = random.Random(5)
    docs = "\n".join(random_text(rng, 300).replace("\n", " ") for _ in range(200))  # tens of passes
    session = "closed-tab"

    def cancelled() -> list[dict[str, Any]]:
        return [line for line in worker_log_lines(cluster) if line.get("message") in ("rerank", "slow rerank")
                and line.get("route") == "ui" and line.get("status") == "cancelled"]

    before = len(cancelled())
    with login(cluster) as client:
        [rerank] = [d["id"] for d in client.get("/config").json()["dependencies"] if d["api_name"] == "predict"]
        with device_held(gate) as holding:
            joined = client.post("/gradio_api/queue/join", json={
                "data": ["which cache", docs, None, "", False, None], "fn_index": rerank, "session_hash": session})
            assert joined.status_code == 200, joined.text
            with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as events:
                lines = events.iter_lines()  # held in a name: dropping it would close the stream at once
                assert next(lines).startswith("data:")
                wait_for(holding.exists, HANG_S, "the event's first pass held on the model replica")
            # The tab is closed; the device still holds the first pass.
            wait_for(lambda: len(cancelled()) > before, HANG_S, "the model replica's line of the cancelled event")
    [line] = cancelled()[before:]
    assert line["error_type"] == "cancelled" and line["n_docs"] == 200, line


def test_serve_stopping_the_ui_drains_it(cluster: LocalRay, gate: Path) -> None:
    """As one process on SIGTERM: once Serve starts stopping the replica, the event in flight finishes, and the
    replica then ends an open browser tab's heartbeat stream (which Serve's own drain waits for) instead of being
    killed at graceful_shutdown_timeout_s with the stream cut. The event is held on the model replica's device
    until the drain has begun, so it is certainly in flight then."""
    from ray import serve

    def drain_lines() -> list[dict[str, Any]]:
        return [line for line in worker_log_lines(cluster)
                if line.get("logger") == "reranker.ray" and line.get("message") == "draining: new requests get 503"]

    rng = random.Random(11)
    docs = "\n".join(random_text(rng, 300).replace("\n", " ") for _ in range(800))  # about 2 MB
    with login(cluster) as client:
        tab: dict[str, object] = {}
        heartbeat = stream(client, "/gradio_api/heartbeat/open-tab", tab)
        wait_for(lambda: "status" in tab, HANG_S, "the heartbeat stream open")
        with device_held(gate) as holding:
            event = client.post("/gradio_api/call/predict",
                                json={"data": ["which cache", docs, None, "", False, None]})
            assert event.status_code == 200, event.text
            result: dict[str, object] = {}
            reader = stream(client, f"/gradio_api/call/predict/{event.json()['event_id']}", result)
            wait_for(holding.exists, HANG_S, "the event's first batch held on the model replica")
            started = time.monotonic()
            serve.delete("ui", _blocking=False)
            wait_for(drain_lines, HANG_S, "the UI replica draining")
        reader.join(HANG_S)
        heartbeat.join(HANG_S)
        wait_for(lambda: "ui" not in serve.status().applications, HANG_S, "the UI application deleted")
    print(f"UI stopped {time.monotonic() - started:.1f} s after the delete")
    assert result.get("end") == "eof" and "event: complete" in str(result.get("text")), result
    assert tab.get("end") == "eof", f"the heartbeat stream was cut, not ended: {tab.get('end')}"
    (drain,) = drain_lines()
    assert int(drain["inflight"]) >= 1  # the event, held, when the drain began
    messages = [line.get("message") for line in worker_log_lines(cluster) if line.get("logger") == "reranker.ray"]
    assert "drained: every accepted request was answered" in messages
