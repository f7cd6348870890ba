"""A real browser: headless Chromium loads the UI, reranks, and shows the empty-query error."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from reranker import Reranker
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from tests.browser import ARTIFACTS, WAIT_MS, browser_page
from tests.conftest import model_settings
from tests.servers import serve
from tests.tiny_models import random_text
from web.http import create_app
from web.ui import EXAMPLES


@pytest.fixture(scope="module")
def ui_server(bert_model: ScoringModel, bert_dir: Path) -> Iterator[tuple[str, Reranker]]:
    with Reranker(bert_model, model_settings(bert_dir), metrics=Metrics(CollectorRegistry())) as reranker:
        with serve(create_app(reranker)) as url:
            yield url, reranker


@pytest.fixture(scope="module")
def ui_url(ui_server: tuple[str, Reranker]) -> str:
    return ui_server[0]


def test_rerank_in_the_browser(ui_url: str) -> None:
    from playwright.sync_api import expect

    # Lines long enough that a document column sized to its content ran past the panel (Gradio's default).
    docs = ["the cache server keeps hot data in memory, so that a repeated read never waits for the disk",
            "tea grows on hills", "a queue server hands each message to one worker and retries it on failure",
            "json token parse"]
    page: Any
    with browser_page() as page:
        page.goto(ui_url, wait_until="networkidle")
        page.locator("#query textarea").fill("which server keeps a cache")
        page.locator("#documents textarea").fill("\n".join(docs))
        page.locator("#rerank").click()
        page.locator(f'#results [data-testid="cell-{len(docs) - 1}-3"]').wait_for()
        page.get_by_text("cache hits").wait_for()

        def cell(row: int, col: int) -> str:
            return str(page.locator(f'#results [data-testid="cell-{row}-{col}"]').inner_text()).strip()

        table = [[cell(row, col) for col in range(4)] for row in range(len(docs))]
        page.screenshot(path=str(ARTIFACTS / "ui-rerank.png"), full_page=True)

        assert [row[0] for row in table] == ["1", "2", "3", "4"]
        assert sorted(int(row[2]) for row in table) == [0, 1, 2, 3]
        assert all(row[3] == docs[int(row[2])] for row in table)
        scores = [float(row[1]) for row in table]
        assert scores == sorted(scores, reverse=True)
        # The document column takes what the narrow ones leave, and wraps there: nothing scrolls sideways.
        assert page.evaluate(OVERFLOWING, "#results") == []

        page.locator("#query textarea").fill("")
        page.locator("#rerank").click()
        page.get_by_text("query is empty").first.wait_for()
        # The last query's table goes, and the status says why there is none. The message stays until closed: it
        # faded after 10 s, leaving a bare "Error" over the earlier query's results.
        page.locator("#status").get_by_text("the rerank was stopped, or it failed").wait_for()
        expect(page.locator('#results [data-testid="cell-0-3"]')).to_have_count(0, timeout=WAIT_MS)
        page.wait_for_timeout(11_000)
        expect(page.get_by_text("query is empty").first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "ui-error.png"), full_page=True)
        # What the user typed is kept.
        assert page.locator("#documents textarea").input_value() == "\n".join(docs)

        # An example fills the form, and Enter in the query box reranks as the button does.
        # Gradio 6 asks the server for an example's values: the boxes fill a round trip after the click (read at
        # once, they were still empty in 3 runs of 10).
        page.get_by_text(EXAMPLES[0][0], exact=True).first.click()
        expect(page.locator("#query textarea")).to_have_value(EXAMPLES[0][0], timeout=WAIT_MS)
        expect(page.locator("#documents textarea")).to_have_value(EXAMPLES[0][1], timeout=WAIT_MS)
        page.locator("#query textarea").press("Enter")
        example_docs = EXAMPLES[0][1].splitlines()
        page.locator("#results").get_by_text(example_docs[2], exact=True).wait_for()  # the new table
        shown = sorted(cell(row, 3) for row in range(len(example_docs)))
        assert shown == sorted(example_docs)


def test_a_click_and_an_enter_while_it_runs_rerank_once(ui_server: tuple[str, Reranker]) -> None:
    """The button and Enter in the query were two events, so an Enter while a click's rerank ran sent it again."""
    url, reranker = ui_server
    rng = random.Random(5)
    # Long enough that the Enter lands while the click's rerank still runs (1.5-2.5 s here).
    docs = [random_text(rng, 300) for _ in range(1000)]

    def received() -> float:  # requests the engine took, counted as one arrives (whatever becomes of it)
        return reranker.metrics.registry.get_sample_value("reranker_documents_per_request_count") or 0.0

    page: Any
    with browser_page() as page:
        page.goto(url, wait_until="networkidle")
        page.locator("#query textarea").fill("a query sent once")
        page.locator("#documents textarea").fill("\n".join(docs))
        before = received()
        page.locator("#rerank").click()
        page.locator("#query textarea").press("Enter")
        page.get_by_text("cache hits").wait_for()
        page.wait_for_timeout(3000)  # time for a second run to arrive, were one started
    assert received() - before == 1


def test_stop_cancels_a_running_rerank(ui_server: tuple[str, Reranker]) -> None:
    """The Stop button cancels the Rerank event: the engine drops the pairs not yet scored (counted `cancelled`),
    the table is cleared, and the next rerank runs."""
    url, reranker = ui_server
    rng = random.Random(6)
    docs = [random_text(rng, 300) for _ in range(1000)]  # 1.5-2.5 s here: Stop lands while it runs

    def count(status: str) -> float:
        return reranker.metrics.registry.get_sample_value(
            "reranker_requests_total", {"route": "ui", "status": status}) or 0.0

    page: Any
    with browser_page() as page:
        page.goto(url, wait_until="networkidle")
        page.locator("#query textarea").fill("a query stopped")
        page.locator("#documents textarea").fill("\n".join(docs))
        before = {status: count(status) for status in ("ok", "cancelled")}
        page.locator("#rerank").click()
        page.wait_for_timeout(200)
        page.locator("#stop").click()
        page.locator("#status").get_by_text("the rerank was stopped").wait_for()
        deadline = time.monotonic() + WAIT_MS / 1000
        while count("cancelled") == before["cancelled"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (count("ok"), count("cancelled")) == (before["ok"], before["cancelled"] + 1)
        page.locator("#documents textarea").fill("a cache server\ntea grows on hills")
        page.locator("#rerank").click()
        page.get_by_text("2 documents").wait_for()
    assert count("ok") == before["ok"] + 1


def test_monitoring_tab_moves_with_traffic(ui_url: str) -> None:
    import httpx

    page: Any
    with browser_page() as page:
        page.goto(ui_url, wait_until="networkidle")
        page.get_by_role("tab", name="Monitoring").click()
        summary = page.locator("#monitor-summary")
        summary.get_by_text("requests").wait_for()
        before = summary.inner_text()
        with httpx.Client(timeout=WAIT_MS / 1000) as client:
            for i in range(5):
                client.post(f"{ui_url}/v1/rerank", json={"query": f"monitor {i}", "documents": ["a", "b"]})
            client.post(f"{ui_url}/v1/rerank", json={"query": "", "documents": ["a"]})
        # Until a tick shows all six: the summary shows every status from the first tick on, so any change
        # (a tick between two of the requests) is not yet the end of the traffic.
        want = {"ok": count(before, "ok") + 5, "invalid": count(before, "invalid") + 1}
        page.wait_for_function(
            "(want) => { const el = document.querySelector('#monitor-summary'); if (!el) return false;"
            " const n = (s) => { const m = el.innerText.match(new RegExp('\\\\b' + s + ' (\\\\d+)'));"
            " return m ? Number(m[1]) : -1; };"
            " return n('ok') >= want.ok && n('invalid') >= want.invalid; }",
            arg=want,
        )
        page.locator('#recent-requests [data-testid="cell-0-4"]').wait_for()
        page.wait_for_timeout(2500)  # one more tick for the screenshot, so the plots have two points
        after = summary.inner_text()
        page.screenshot(path=str(ARTIFACTS / "ui-monitoring.png"), full_page=True)
    assert count(after, "ok") - count(before, "ok") == 5
    assert count(after, "invalid") - count(before, "invalid") == 1


def test_the_ui_fits_a_phone_screen(ui_url: str, tmp_path: Path) -> None:
    """At 390 px the results headers wrapped a letter a line ("r/a/n/k"), the upload's label ran under the x that
    clears its file, and the Monitoring tab's model card squeezed its columns to a letter's width."""
    page: Any
    with browser_page() as page:
        page.set_viewport_size({"width": 390, "height": 844})
        page.goto(ui_url, wait_until="networkidle")
        page.locator("#query textarea").fill("which server keeps a cache")
        page.locator("#documents textarea").fill("the cache server keeps hot data in memory\ntea grows on hills")
        page.locator("#rerank").click()
        page.locator('#results [data-testid="cell-1-3"]').wait_for()
        page.screenshot(path=str(ARTIFACTS / "ui-phone.png"), full_page=True)
        assert page.evaluate(BROKEN, "#results th .header") == []
        assert page.evaluate(BROKEN, "#results td:nth-child(2) .cell-wrap") == []  # the scores
        assert page.evaluate(OVERFLOWING, "#results") == []
        upload = tmp_path / "documents.txt"
        upload.write_text("a cache server\n")
        page.locator("#upload input[type=file]").set_input_files(str(upload))
        clear = page.locator('#upload button[aria-label="Clear"]')
        clear.wait_for()
        label = page.locator('#upload [data-testid="block-label"]').bounding_box()
        assert label["x"] + label["width"] <= clear.bounding_box()["x"]
        page.get_by_role("tab", name="Monitoring").click()
        page.locator("#monitor-card th").first.wait_for()
        page.screenshot(path=str(ARTIFACTS / "ui-phone-monitoring.png"), full_page=True)
        assert page.evaluate(BROKEN, "#monitor-card th") == []


# The elements of `selector` whose text runs over more than one line or past their box (Gradio's table keeps empty
# sizing cells beside the shown ones).
BROKEN = """(selector) => [...document.querySelectorAll(selector)].filter((el) => el.innerText.trim()).filter((el) => {
        const range = document.createRange();
        range.selectNodeContents(el);
        const lines = new Set([...range.getClientRects()].map((rect) => Math.round(rect.top)));
        return lines.size > 1 || el.scrollWidth > el.clientWidth + 1;
    }).map((el) => el.innerText)"""


# The results table's scrolling viewport when what it shows is wider than it is (it scrolls sideways).
OVERFLOWING = """(selector) => [...document.querySelectorAll(selector + ' .virtual-table-viewport')]
    .filter((el) => el.clientWidth > 0 && el.scrollWidth > el.clientWidth + 1)
    .map((el) => el.scrollWidth + ' > ' + el.clientWidth + ' px')"""


def count(summary: str, status: str) -> int:
    found = re.search(rf"\b{status} (\d+)", summary)
    assert found, summary
    return int(found.group(1))


def test_the_api_docs_page_renders_from_this_server_alone(ui_url: str) -> None:
    """/docs is Swagger UI served by the app: FastAPI's default loaded its script from cdn.jsdelivr.net (a blank
    page offline, and third-party code on the UI's origin). Every other host is refused here."""
    page: Any
    elsewhere: list[str] = []
    with browser_page() as page:
        def only_here(route: Any) -> None:
            if route.request.url.startswith(ui_url):
                route.continue_()
            else:
                elsewhere.append(route.request.url)
                route.abort()

        page.route("**/*", only_here)
        page.goto(f"{ui_url}/docs", wait_until="networkidle")
        page.get_by_text("/v1/rerank", exact=True).first.wait_for()  # rendered from /openapi.json
        page.get_by_text("/v2/rerank", exact=True).first.wait_for()
        page.screenshot(path=str(ARTIFACTS / "api-docs.png"), full_page=True)
        # "Try it out" sends each route's example body as it stands (web/schemas.py). Swagger UI made its own of
        # the schema before, which three routes of the four refused.
        answers = {}
        for route in ("/v1/rerank", "/v2/rerank", "/rerank", "/api/predict"):
            block = page.locator(f'.opblock-post:has(.opblock-summary-path[data-path="{route}"])').first
            block.locator(".opblock-summary").click()
            block.get_by_role("button", name="Try it out").click()
            block.get_by_role("button", name="Execute").click()
            status = block.locator(".live-responses-table .response .response-col_status").first
            answers[route] = status.inner_text().strip()
    assert elsewhere == []
    assert answers == {route: "200" for route in answers}
