"""RERANKER_UI_AUTH: Gradio's login guards the UI and every Gradio API route; the JSON routes keep their key."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AuthenticationError
from prometheus_client import CollectorRegistry
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from app import exposure_warnings
from reranker import Reranker, Settings
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from tests.browser import ARTIFACTS, browser_page
from tests.conftest import model_settings
from tests.servers import HANG_S, serve
from web.http import create_app
from web.middleware import OTHER_BODY_BYTES

USER, PASSWORD, KEY = "alice", "correct horse", "json-key"
DOCS = ["a cache server keeps hot data", "tea grows on hills"]
NOT_AUTHENTICATED = {"detail": {"error": "Not authenticated", "auth_message": None}}


@pytest.fixture(scope="module")
def url(bert_model: ScoringModel, bert_dir: Path) -> Iterator[str]:
    settings = model_settings(bert_dir, ui_auth=((USER, PASSWORD), ("bob", "other")), api_key=KEY)
    with Reranker(bert_model, settings, metrics=Metrics(CollectorRegistry())) as reranker:
        with serve(create_app(reranker)) as base:
            yield base


@contextmanager
def login(url: str) -> Iterator[httpx.Client]:
    """An HTTP client holding the cookie of a Gradio login, as a browser would."""
    with httpx.Client(base_url=url, timeout=HANG_S) as client:
        response = client.post("/login", data={"username": USER, "password": PASSWORD})
        assert response.status_code == 200 and response.json() == {"success": True}
        yield client


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/config"),
        ("GET", "/gradio_api/info"),
        ("GET", "/gradio_api/openapi.json"),
        ("POST", "/gradio_api/call/predict"),
        ("POST", "/gradio_api/api/predict"),
        ("POST", "/gradio_api/queue/join"),
        ("POST", "/gradio_api/upload"),
        ("GET", "/gradio_api/file=/etc/hostname"),
        # Gradio leaves these open even with auth; web/gradio_login.py closes them.
        ("GET", "/gradio_api/heartbeat/some-session"),
        ("POST", "/gradio_api/cancel"),
        ("POST", "/gradio_api/reset"),
        ("GET", "/gradio_api/startup-events"),
        ("GET", "/gradio_api/app_id"),
        ("GET", "/gradio_api/token"),
        ("GET", "/gradio_api/runs"),
    ],
)
def test_anonymous_gradio_api_calls_get_401(url: str, method: str, path: str) -> None:
    body = {"data": ["cache", "\n".join(DOCS)]} if method == "POST" else None
    for cookies in ({}, {"access-token-unsecure-forged": "forged"}):
        response = httpx.request(method, f"{url}{path}", json=body, cookies=cookies, timeout=HANG_S)
        assert response.status_code == 401 and response.json() == NOT_AUTHENTICATED, path


def test_an_anonymous_websocket_to_the_gradio_api_is_refused(url: str) -> None:
    """docs/security.md: a websocket to /gradio_api/... without the login cookie is closed before it is accepted
    (1008, policy violation), which the server answers the handshake with as HTTP 403."""
    for path in ("/gradio_api/queue/join", "/gradio_api/stream/predict"):
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws{url.removeprefix('http')}{path}", open_timeout=HANG_S).close()
        assert refused.value.response.status_code == 403, path


def test_the_login_form_and_other_paths_take_small_bodies_only(url: str) -> None:
    """POST /login lay outside every body limit: Starlette kept up to 1,000 form fields of 1 MB each in memory for an
    anonymous caller (a 200 MB form was read whole). Every path beyond the JSON routes and the Gradio API now takes
    64 KiB at most."""
    form = {"content-type": "application/x-www-form-urlencoded"}
    big = b"username=alice&password=" + b"x" * OTHER_BODY_BYTES
    for path, body in (("/login", big), ("/login", iter([big[:1000], big[1000:]])),  # declared, then chunked
                       ("/no-such-path", big)):
        response = httpx.post(f"{url}{path}", content=body, headers=form, timeout=HANG_S)
        assert response.status_code == 413, (path, response.text)
        assert f"over {OTHER_BODY_BYTES} bytes" in response.json()["error"]["message"]
    wrong = httpx.post(f"{url}/login", data={"username": "alice", "password": "wrong"}, timeout=HANG_S)
    assert wrong.status_code == 400


def test_failed_logins_are_logged_and_an_address_that_keeps_failing_is_throttled(
        bert_model: ScoringModel, bert_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Gradio's login took 200 guesses in 1.3 s and said nothing of them."""
    caplog.set_level(logging.INFO, logger="reranker.login")
    settings = model_settings(bert_dir, ui_auth=((USER, PASSWORD),), ui_login_attempts=3)
    with Reranker(bert_model, settings, metrics=Metrics(CollectorRegistry())) as reranker:
        with serve(create_app(reranker)) as base, httpx.Client(base_url=base, timeout=HANG_S) as client:
            assert client.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 200
            for _ in range(3):
                assert client.post("/login", data={"username": USER, "password": "guess"}).status_code == 400
            for password in ("guess", PASSWORD):  # the right one too: the address waits out its minute
                throttled = client.post("/login", data={"username": USER, "password": password})
                assert throttled.status_code == 429 and throttled.json()["error"]["type"] == "login_throttled"
                assert 1 <= int(throttled.headers["retry-after"]) <= 60
    lines = [(r.getMessage(), getattr(r, "failures_last_minute", None)) for r in caplog.records]
    assert lines == [("ui login refused", 1), ("ui login refused", 2), ("ui login refused", 3),
                     ("ui login throttled", None), ("ui login throttled", None)]
    assert all("guess" not in str(vars(r)) and PASSWORD not in str(vars(r)) for r in caplog.records)


def test_behind_a_loopback_proxy_each_forwarded_client_has_its_own_login_throttle(
        bert_model: ScoringModel, bert_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A proxy on loopback (FORWARDED_ALLOW_IPS' default, as app.py runs uvicorn) names each client in
    X-Forwarded-For: one that keeps failing waits its minute, and the next client through the same proxy does not."""
    caplog.set_level(logging.INFO, logger="reranker.login")
    settings = model_settings(bert_dir, ui_auth=((USER, PASSWORD),), ui_login_attempts=2)
    guesser, other = {"X-Forwarded-For": "203.0.113.5"}, {"X-Forwarded-For": "203.0.113.6"}
    with Reranker(bert_model, settings, metrics=Metrics(CollectorRegistry())) as reranker:
        with serve(create_app(reranker)) as base, httpx.Client(base_url=base, timeout=HANG_S) as client:
            for _ in range(2):
                assert client.post("/login", data={"username": USER, "password": "guess"},
                                   headers=guesser).status_code == 400
            throttled = client.post("/login", data={"username": USER, "password": PASSWORD}, headers=guesser)
            assert throttled.status_code == 429
            assert client.post("/login", data={"username": USER, "password": PASSWORD},
                               headers=other).status_code == 200
    assert [getattr(r, "client", None) for r in caplog.records if r.getMessage() == "ui login refused"] == [
        "203.0.113.5", "203.0.113.5"]


def test_the_login_page_is_served_and_wrong_passwords_are_refused(url: str) -> None:
    assert httpx.get(f"{url}/", timeout=HANG_S).status_code == 200  # the page that shows the login form
    wrong = httpx.post(f"{url}/login", data={"username": USER, "password": "wrong"}, timeout=HANG_S)
    assert wrong.status_code == 400 and "access-token" not in wrong.headers.get("set-cookie", "")


def test_a_logged_in_session_reaches_the_gradio_api(url: str) -> None:
    with login(url) as client:
        assert client.get("/gradio_api/app_id").status_code == 200
        assert "/predict" in client.get("/gradio_api/info").json()["named_endpoints"]
        inputs = ["cache", "\n".join(DOCS), None, "", False, None]  # query, documents, top_n, instruction, raw, file
        event = client.post("/gradio_api/call/predict", json={"data": inputs})
        assert event.status_code == 200
        stream = client.get(f"/gradio_api/call/predict/{event.json()['event_id']}").text
        assert "event: complete" in stream and "tea grows on hills" in stream


def test_gradio_client_logs_in(url: str) -> None:
    rows, status = Client(url, auth=(USER, PASSWORD), verbose=False).predict(
        "cache server", "\n".join(DOCS), api_name="/predict")
    assert sorted(row[2] for row in rows["data"]) == [0, 1] and "2 documents" in status
    with pytest.raises(ValueError, match="Could not login"):
        Client(url, auth=(USER, "wrong"), verbose=False)
    with pytest.raises(AuthenticationError):
        Client(url, verbose=False)


def test_json_routes_keep_their_key_and_ignore_the_ui_login(url: str) -> None:
    bearer = {"Authorization": f"Bearer {KEY}"}
    body = {"query": "cache", "documents": DOCS}
    # No Gradio login needed, only the key...
    assert httpx.post(f"{url}/v1/rerank", json=body, headers=bearer, timeout=HANG_S).status_code == 200
    assert httpx.post(f"{url}/api/predict", json={"data": ["cache", DOCS]}, headers=bearer,
                      timeout=HANG_S).status_code == 200
    assert httpx.get(f"{url}/healthz", timeout=HANG_S).status_code == 200
    assert httpx.get(f"{url}/readyz", timeout=HANG_S).status_code == 200
    # ...and a Gradio login is no substitute for it.
    with login(url) as client:
        refused = client.post("/v1/rerank", json=body)
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "unauthorized"


def test_without_an_api_key_the_gradio_style_predict_needs_the_ui_login(bert_model: ScoringModel,
                                                                          bert_dir: Path) -> None:
    """/api/predict is part of the Gradio API (SPEC): with only RERANKER_UI_AUTH set, it needs the login."""
    settings = model_settings(bert_dir, ui_auth=((USER, PASSWORD),))
    with Reranker(bert_model, settings, metrics=Metrics(CollectorRegistry())) as reranker:
        with serve(create_app(reranker)) as base:
            body = {"data": ["cache", DOCS]}
            anonymous = httpx.post(f"{base}/api/predict", json=body, timeout=HANG_S)
            assert anonymous.status_code == 401 and "log in to the UI" in anonymous.json()["error"]["message"]
            with login(base) as client:
                assert client.post("/api/predict", json=body).status_code == 200
            # The other JSON routes are the API key's to guard, and there is none.
            assert httpx.post(f"{base}/v1/rerank", json={"query": "q", "documents": DOCS},
                              timeout=HANG_S).status_code == 200
        assert reranker.metrics.registry.get_sample_value(
            "reranker_requests_total", {"route": "/api/predict", "status": "invalid"}) == 1


def test_login_in_the_browser(url: str) -> None:
    page: Any
    with browser_page() as page:
        page.goto(url, wait_until="networkidle")
        page.locator('input[data-testid="textbox"]').fill(USER)
        page.locator('input[data-testid="password"]').fill(PASSWORD)
        page.get_by_role("button", name="Login").click()
        page.locator("#query textarea").fill("which server keeps a cache")
        page.locator("#documents textarea").fill("\n".join(DOCS))
        page.locator("#rerank").click()
        page.locator('#results [data-testid="cell-1-3"]').wait_for()
        page.screenshot(path=str(ARTIFACTS / "ui-login.png"), full_page=True)


@pytest.mark.parametrize(
    ("env", "fixes"),
    [
        ({}, []),
        ({"RERANKER_HOST": "127.0.0.2"}, []),
        ({"RERANKER_HOST": "::1"}, []),
        ({"RERANKER_HOST": "0.0.0.0"}, ["RERANKER_UI_AUTH", "RERANKER_API_KEY"]),
        # Each guards its own routes only.
        ({"RERANKER_HOST": "0.0.0.0", "RERANKER_API_KEY": "k"}, ["RERANKER_UI_AUTH"]),
        ({"RERANKER_HOST": "0.0.0.0", "RERANKER_UI_AUTH": "alice:pw"}, ["RERANKER_API_KEY"]),
        ({"RERANKER_HOST": "0.0.0.0", "RERANKER_UI_AUTH": "alice:pw", "RERANKER_API_KEY": "k"}, []),
        ({"RERANKER_METRICS_HOST": "0.0.0.0"}, ["keep RERANKER_METRICS_HOST"]),
    ],
)
def test_serving_beyond_loopback_unguarded_warns_with_the_fix(env: dict[str, str], fixes: list[str]) -> None:
    warnings = exposure_warnings(Settings.from_env(env))
    assert len(warnings) == len(fixes)
    for warning, fix in zip(warnings, fixes, strict=True):
        assert (fix if fix.startswith("keep") else f"set {fix}") in warning and "0.0.0.0" in warning
        if fix == "RERANKER_API_KEY":  # every route the key guards
            assert all(path in warning for path in ("/v1/rerank", "/v2/rerank", "/rerank", "/api/predict"))
