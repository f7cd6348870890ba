"""The Gradio API of `predict`: inputs Gradio itself refuses are counted, answered 4xx, and print no traceback."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from prometheus_client import CollectorRegistry

from reranker import Reranker
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from tests.conftest import model_settings
from tests.servers import HANG_S, serve
from web.gradio_api import QUEUE_JOIN, RERANK_EVENT, CountedBlocks, RerankEvents
from web.gradio_login import find_gradio_app
from web.http import create_app
from web.ui import QUEUE_POLL_S


@pytest.fixture(scope="module")
def live(bert_model: ScoringModel, bert_dir: Path) -> Iterator[tuple[str, Reranker]]:
    settings = model_settings(bert_dir, max_docs=20, max_doc_chars=2000)
    with Reranker(bert_model, settings, metrics=Metrics(CollectorRegistry())) as reranker:
        with serve(create_app(reranker)) as url:
            yield url, reranker


def ui_requests(reranker: Reranker) -> float:
    registry = reranker.metrics.registry
    return sum(registry.get_sample_value("reranker_requests_total", {"route": "ui", "status": status}) or 0
               for status in ("ok", "invalid", "overloaded", "error"))


def call(url: str, body: bytes) -> tuple[int, str]:
    """POST /gradio_api/call/predict, then read the event stream; (POST status, stream or POST body)."""
    posted = httpx.post(f"{url}/gradio_api/call/predict", content=body,
                        headers={"content-type": "application/json"}, timeout=HANG_S)
    if posted.status_code != 200:
        return posted.status_code, posted.text
    event = posted.json()["event_id"]
    return 200, httpx.get(f"{url}/gradio_api/call/predict/{event}", timeout=HANG_S).text


# Found by tests/test_fuzz.py: each failed inside Gradio (arity check, component preprocessing, FileData
# validation) before the handler ran, so reranker_requests_total never saw it, and Gradio printed a traceback.
REFUSED_BY_GRADIO = [
    ("top_n 1e400", b'{"data": ["q", "a", 1e400, "", false, null]}'),
    ("top_n NaN", b'{"data": ["q", "a", NaN, "", false, null]}'),
    ("top_n -Infinity", b'{"data": ["q", "a", -Infinity, "", false, null]}'),
    ("top_n a word", b'{"data": ["q", "a", "abc", "", false, null]}'),
    ("top_n a list", b'{"data": ["q", "a", [1], "", false, null]}'),
    ("two inputs of six", b'{"data": ["q", "a"]}'),
    ("no inputs", b'{"data": []}'),
    ("file a bare path", b'{"data": ["q", "a", null, "", false, "/etc/passwd"]}'),
    ("file a number", b'{"data": ["q", "a", null, "", false, 5]}'),
]


@pytest.mark.parametrize(("case", "body"), REFUSED_BY_GRADIO, ids=[c[0] for c in REFUSED_BY_GRADIO])
def test_inputs_gradio_refuses_are_counted_without_a_traceback(
        live: tuple[str, Reranker], capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, case: str,
        body: bytes) -> None:
    url, reranker = live
    caplog.set_level(logging.INFO, logger="reranker.requests")
    before = ui_requests(reranker)
    status, stream = call(url, body)
    assert status == 200 and "event: error" in stream
    assert "bad input for the Gradio API" in stream
    direct = httpx.post(f"{url}/gradio_api/api/predict", content=body,
                        headers={"content-type": "application/json"}, timeout=HANG_S)
    assert direct.status_code == 422, direct.text
    assert ui_requests(reranker) == before + 2
    assert "Traceback" not in capfd.readouterr().err
    lines = [record for record in caplog.records if getattr(record, "route", None) == "ui"]
    assert [(line.error_type, line.http_status) for line in lines] == [("invalid_input", 422)] * 2  # type: ignore[attr-defined]


# Found by tests/test_fuzz.py: Gradio's direct route answers any handler exception with 500, so a bad
# query was a server error there; it now gets the status the JSON routes give.
DIRECT_STATUSES = [
    ("empty query", ["", "a", None, "", False, None], 400),
    ("lone surrogate", ["q\ud800", "a", None, "", False, None], 400),
    ("NUL in a document", ["q", "a\u0000b", None, "", False, None], 400),
    ("query not a string", [None, "a", None, "", False, None], 422),
    ("too many documents", ["q", "a\n" * 21, None, "", False, None], 413),
    # Gradio's Number rounded these (precision=0): 1.5 gave the best 2, 0.5 and -0.5 all.
    ("top_n 1.5", ["q", "a", 1.5, "", False, None], 422),
    ("top_n 0.5", ["q", "a", 0.5, "", False, None], 422),
    ("top_n -0.5", ["q", "a", -0.5, "", False, None], 422),
    ("top_n -2", ["q", "a", -2, "", False, None], 400),
]


@pytest.mark.parametrize(("case", "data", "status"), DIRECT_STATUSES, ids=[c[0] for c in DIRECT_STATUSES])
def test_direct_gradio_calls_answer_bad_input_with_a_4xx(
        live: tuple[str, Reranker], capfd: pytest.CaptureFixture[str], case: str, data: list[object],
        status: int) -> None:
    url, reranker = live
    before = ui_requests(reranker)
    response = httpx.post(f"{url}/gradio_api/api/predict", content=json.dumps({"data": data}).encode(),
                          headers={"content-type": "application/json"}, timeout=HANG_S)
    assert response.status_code == status, response.text
    assert response.json()["error"]
    assert ui_requests(reranker) == before + 1
    assert "Traceback" not in capfd.readouterr().err


def test_a_components_own_refusal_is_the_message_not_gradios_wrapping(live: tuple[str, Reranker]) -> None:
    """Gradio wraps a component's refusal in a message that lists every component and repeats the value, the cause
    last: only its first line was kept, so the browser showed "Could not preprocess input component at index 2 ..."
    and never why."""
    url, _ = live
    response = httpx.post(f"{url}/gradio_api/api/predict", json={"data": ["q", "a", 1.5, "", False, None]},
                          timeout=HANG_S)
    assert response.status_code == 422
    assert response.json()["error"] == ("bad input for the Gradio API: input 2 (number): top_n must be a whole "
                                        "number (0 or empty: all), got 1.5")


def test_a_negative_top_n_is_refused_in_the_forms_terms(live: tuple[str, Reranker]) -> None:
    """0 or empty asks for every document on the form and /api/predict: the engine's "a positive integer or null"
    told a user of either to send what it already refused."""
    url, _ = live
    said = "top_n must be a whole number, 0 or more (0 or empty: every document), got -2"
    response = httpx.post(f"{url}/gradio_api/api/predict", json={"data": ["q", "a", -2, "", False, None]},
                          timeout=HANG_S)
    assert response.status_code == 400 and response.json()["error"] == said
    response = httpx.post(f"{url}/api/predict", json={"data": ["q", ["a"], -2]}, timeout=HANG_S)
    assert response.status_code == 400 and response.json()["error"]["message"] == said


@pytest.mark.parametrize("body", [b'{"data": "q"}', b"{}", b"null", b"[" * 200_000, b'{"data": ["\xff"]}'],
                         ids=["data a string", "no data", "null", "200000 [", "invalid UTF-8"])
def test_bodies_gradio_refuses_before_the_queue_are_counted(live: tuple[str, Reranker], body: bytes,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    url, reranker = live
    caplog.set_level(logging.INFO, logger="reranker.requests")
    before = ui_requests(reranker)
    for path in ("/gradio_api/call/predict", "/gradio_api/api/predict"):
        response = httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"},
                              timeout=HANG_S)
        assert 400 <= response.status_code < 500
    assert ui_requests(reranker) == before + 2
    lines = [record for record in caplog.records if getattr(record, "route", None) == "ui"]
    assert [line.error_type for line in lines] == ["gradio_refused"] * 2  # type: ignore[attr-defined]
    assert all(400 <= line.http_status < 500 for line in lines)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("path", "body"), [
    ("/gradio_api/queue/join", b'{"fn_index": 1e999, "data": [], "session_hash": "s"}'),
    ("/gradio_api/run/predict", b'{"fn_index": NaN, "data": []}'),
    ("/gradio_api/queue/join", b'{"fn_index": 3, "trigger_id": -Infinity, "data": [], "session_hash": "s"}'),
], ids=["queue join fn_index 1e999", "run fn_index NaN", "queue join trigger_id -Infinity"])
def test_a_non_finite_number_where_gradio_wants_an_integer_is_a_422_not_a_500(
        live: tuple[str, Reranker], path: str, body: bytes, capfd: pytest.CaptureFixture[str]) -> None:
    """FastAPI's validation answer echoes the bad input, and writing inf as JSON raised: a 500 and a traceback."""
    url, _ = live
    response = httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"}, timeout=HANG_S)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["msg"] == "Input should be a finite number"
    assert "Traceback" not in capfd.readouterr().err


def test_a_good_call_is_counted_once(live: tuple[str, Reranker]) -> None:
    url, reranker = live
    before = ui_requests(reranker)
    data = ["cache server", "a cache\ntea", None, "", False, None]
    status, stream = call(url, json.dumps({"data": data}).encode())
    assert status == 200 and "event: complete" in stream
    direct = httpx.post(f"{url}/gradio_api/api/predict", json={"data": data}, timeout=HANG_S)
    assert direct.status_code == 200
    assert ui_requests(reranker) == before + 2


def test_gradio_api_calls_refused_while_draining_are_counted(bert_model: ScoringModel, bert_dir: Path) -> None:
    from web.lifecycle import Lifecycle

    lifecycle = Lifecycle()
    with Reranker(bert_model, model_settings(bert_dir), metrics=Metrics(CollectorRegistry())) as reranker:
        with serve(create_app(reranker, lifecycle=lifecycle)) as url:
            lifecycle.begin_drain()
            body = {"data": ["q", "a\nb"]}
            for route in ("/gradio_api/api/predict", "/gradio_api/call/predict", "/v1/rerank"):
                response = httpx.post(f"{url}{route}", json=body, timeout=HANG_S)
                assert response.status_code == 503 and response.headers["retry-after"], route
        registry = reranker.metrics.registry
        assert registry.get_sample_value("reranker_requests_total", {"route": "ui", "status": "error"}) == 2
        assert registry.get_sample_value("reranker_requests_total", {"route": "/v1/rerank", "status": "error"}) == 1


def file_data(path: str) -> dict[str, object]:
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


def test_a_file_must_come_from_gradios_upload_folder(live: tuple[str, Reranker], tmp_path: Path) -> None:
    """A Gradio API call naming a server path as its file is refused: only uploaded files are read."""
    url, reranker = live
    secret = tmp_path / "secret.txt"
    secret.write_text("the server's private line\n")
    for path in (str(secret), str(tmp_path / "missing.txt")):
        data = ["q", "a", None, "", False, file_data(path)]
        response = httpx.post(f"{url}/gradio_api/api/predict", json={"data": data}, timeout=HANG_S)
        assert response.status_code == 422, response.text
        assert "the file was not uploaded; upload it first" in response.json()["error"]
        assert "private line" not in response.text and str(tmp_path) not in response.text
    uploaded = httpx.post(f"{url}/gradio_api/upload", files={"files": ("docs.txt", b"a cache\nsome tea\n")},
                          timeout=HANG_S)
    assert uploaded.status_code == 200
    [path] = uploaded.json()
    data = ["cache", "", None, "", False, file_data(path)]
    response = httpx.post(f"{url}/gradio_api/api/predict", json={"data": data}, timeout=HANG_S)
    assert response.status_code == 200, response.text
    assert sorted(row[3] for row in response.json()["data"][0]["data"]) == ["a cache", "some tea"]


def test_a_url_a_folder_or_another_gradio_apps_file_is_no_upload(live: tuple[str, Reranker]) -> None:
    """Gradio downloads a file input given as a URL itself (requests out to any public address, no size cap); took
    a folder inside its upload folder (its cleanup then failed at the stop); and used /tmp/gradio, every Gradio
    app's on the host, so that another's file passed as uploaded here, was read, and was deleted at the stop."""
    url, _ = live
    upload_folder = Path(os.environ["GRADIO_TEMP_DIR"])
    assert upload_folder.stat().st_mode & 0o077 == 0 and upload_folder != Path(tempfile.gettempdir()) / "gradio"
    shared = Path(tempfile.gettempdir()) / "gradio" / f"another-app-{os.getpid()}"
    shared.mkdir(parents=True, exist_ok=True)
    victim = shared / "theirs.txt"
    victim.write_text("another app's line\n")
    try:
        for path in ("http://203.0.113.7/docs.txt", "https://hf.co/docs.txt", str(upload_folder), str(victim)):
            started = time.monotonic()
            data = ["q", "a", None, "", False, file_data(path)]
            response = httpx.post(f"{url}/gradio_api/api/predict", json={"data": data}, timeout=HANG_S)
            assert response.status_code == 422, (path, response.text)
            assert "the file was not uploaded; upload it first" in response.json()["error"]
            assert time.monotonic() - started < 5  # refused, not fetched until a connection timed out
        assert victim.read_text() == "another app's line\n"
    finally:
        shutil.rmtree(shared)


def test_gradio_bodies_and_uploads_are_held_to_the_body_limit(bert_model: ScoringModel, bert_dir: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="reranker.requests")
    settings = model_settings(bert_dir, max_body_bytes=20_000)
    with Reranker(bert_model, settings, metrics=Metrics(CollectorRegistry())) as reranker:
        with serve(create_app(reranker)) as url:
            data = ["q", "a document\n" * 3000, None, "", False, None]  # 33 kB
            for route in ("/gradio_api/api/predict", "/gradio_api/call/predict"):
                response = httpx.post(f"{url}{route}", json={"data": data}, timeout=HANG_S)
                assert response.status_code == 413, (route, response.text)
            upload = httpx.post(f"{url}/gradio_api/upload", files={"files": ("big.txt", b"x\n" * 20_000)},
                                timeout=HANG_S)
            assert upload.status_code == 413, upload.text
            # Many files, each under the limit: Gradio took them all (30 of the limit each, kept on disk).
            many = [("files", (f"part{i}.txt", b"x\n" * 5_000)) for i in range(30)]
            upload = httpx.post(f"{url}/gradio_api/upload", files=many, timeout=HANG_S)
            assert upload.status_code == 413 and "RERANKER_MAX_BODY_BYTES" in upload.json()["error"]["message"]
            one = httpx.post(f"{url}/gradio_api/upload", files=many[:1], timeout=HANG_S)
            assert one.status_code == 200 and len(one.json()) == 1
            # Streamed on to Gradio, not read into memory first: so its length must be declared.
            form = httpx.Request("POST", f"{url}/gradio_api/upload", files=many[:1])
            chunked = httpx.post(f"{url}/gradio_api/upload", content=iter([form.read()]), timeout=HANG_S,
                                 headers={"content-type": form.headers["content-type"]})
            assert chunked.status_code == 411 and "Content-Length" in chunked.json()["error"]["message"]
        assert ui_requests(reranker) == 2
    refusals = [r for r in caplog.records if r.getMessage() == "rerank refused"]
    assert [getattr(r, "error_type", None) for r in refusals] == ["limit_exceeded"] * 2


def test_a_content_length_past_any_body_marks_a_rerank_event_unread() -> None:
    """uvicorn refuses such a header itself; RerankEvents does not count on its server doing so (int() of a
    5,000-digit number raises)."""
    seen: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope[RERANK_EVENT])

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body was read")

    async def send(message: Any) -> None:
        raise AssertionError("answered")

    scope = {"type": "http", "method": "POST", "path": QUEUE_JOIN, "root_path": "",
             "headers": [(b"content-length", b"9" * 5000)]}
    asyncio.run(RerankEvents(app, cast(CountedBlocks, None))(scope, receive, send))
    assert seen == [True]


def test_the_api_names_its_parameters_and_outputs(live: tuple[str, Reranker]) -> None:
    """gradio_client's view_api lists the endpoint as docs/api.md gives it: no `value_NN` placeholders."""
    from gradio_client import Client

    info = Client(live[0], verbose=False).view_api(return_format="dict", print_info=False)
    endpoint = info["named_endpoints"]["/predict"]
    assert [p["parameter_name"] for p in endpoint["parameters"]] == [
        "query", "documents", "top_n", "instruction", "raw_scores", "file"]
    assert [r["label"] for r in endpoint["returns"]] == ["Ranked documents", "Status"]


def test_gradio_client_may_send_documents_as_a_list(live: tuple[str, Reranker]) -> None:
    """The documents Textbox takes lines; a list of one-line strings is those lines, not its repr."""
    from gradio_client import Client

    url, reranker = live
    client = Client(url, verbose=False)
    table, status = client.predict("cache", ["a cache server", "some tea"], api_name="/predict")
    assert sorted(row[3] for row in table["data"]) == ["a cache server", "some tea"] and "2 documents" in status
    before = ui_requests(reranker)
    # Items the lines would not give back unchanged, at their positions, are refused rather than reindexed.
    for bad in (["one line", "two\nlines"], ["alpha", "", "gamma"], ["  padded  "], ["x\ry"]):
        data = ["cache", bad, None, "", False, None]
        response = httpx.post(f"{url}/gradio_api/api/predict", json={"data": data}, timeout=HANG_S)
        assert response.status_code == 422 and "without line breaks" in response.json()["error"], bad
    assert ui_requests(reranker) == before + 4
    # A line ends at \n, \r\n or \r only: a form feed or U+2028 stays inside its item.
    table, _ = client.predict("cache", ["beta\u2028cache", "x\x0cy"], api_name="/predict")
    assert sorted(row[3] for row in table["data"]) == ["beta\u2028cache", "x\x0cy"]


def test_startup_events_cannot_be_run_a_second_time(live: tuple[str, Reranker]) -> None:
    """The server's lifespan ran them; an anonymous GET must not restart Gradio's queue."""
    url, reranker = live
    assert httpx.get(f"{url}/gradio_api/startup-events", timeout=HANG_S).json() is False
    status, stream = call(url, json.dumps({"data": ["cache", "a cache\ntea", None, "", False, None]}).encode())
    assert status == 200 and "event: complete" in stream


def test_an_idle_queue_looks_for_events_every_10_ms_not_every_millisecond(live: tuple[str, Reranker]) -> None:
    """Gradio's 1 ms poll cost an idle service 3.6% of a core on its event loop (1.4% at 10 ms); a click still runs."""
    url, reranker = live
    queue = find_gradio_app(create_app(reranker)).get_blocks()._queue
    assert queue.sleep_when_free == QUEUE_POLL_S == 0.01
    started = time.perf_counter()
    status, stream = call(url, json.dumps({"data": ["cache", "a cache\ntea", None, "", False, None]}).encode())
    assert status == 200 and "event: complete" in stream
    assert time.perf_counter() - started < HANG_S


def test_uploaded_files_are_deleted_once_old(bert_model: ScoringModel, bert_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradio keeps uploads until the process stops unless its Blocks has delete_cache: a long-running service
    filled its disk. Here with a one-second schedule instead of web.ui.UPLOAD_CLEANUP's ten minutes."""
    from web import ui

    monkeypatch.setattr(ui, "UPLOAD_CLEANUP", (1, 1))
    with Reranker(bert_model, model_settings(bert_dir), metrics=Metrics(CollectorRegistry())) as reranker, \
            serve(create_app(reranker)) as url:
        uploaded = httpx.post(f"{url}/gradio_api/upload", files={"files": ("docs.txt", b"a cache\nsome tea\n")},
                              timeout=HANG_S)
        (path,) = uploaded.json()
        assert Path(path).is_file()
        deadline = time.monotonic() + HANG_S
        while Path(path).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(path).exists()
        # A tab that still shows the file gets told what to do.
        data = ["cache", "", None, "", False, file_data(path)]
        response = httpx.post(f"{url}/gradio_api/api/predict", json={"data": data}, timeout=HANG_S)
        assert response.status_code == 400 and "upload it again" in response.json()["error"], response.text


def test_an_upload_folder_gradio_cannot_write_in_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked by app.py before the model loads (tests/test_start.py runs it); made where it is missing."""
    from web.uploads import UploadFolderError, private_upload_folder

    (tmp_path / "a-file").write_text("")
    for configured, message in ((tmp_path / "a-file", "is not a folder"),
                                (tmp_path / "a-file" / "under", "cannot be written in: Not a directory")):
        monkeypatch.setenv("GRADIO_TEMP_DIR", str(configured))
        with pytest.raises(UploadFolderError, match=f"GRADIO_TEMP_DIR={configured} {message}; set GRADIO_TEMP_DIR"):
            private_upload_folder()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "new" / "uploads"))
    assert private_upload_folder() == str(tmp_path / "new" / "uploads")
    assert (tmp_path / "new" / "uploads").is_dir() and not list((tmp_path / "new" / "uploads").iterdir())
