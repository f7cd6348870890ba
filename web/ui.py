"""The Gradio Blocks UI: the Rerank tab (its event is the Gradio API `predict`) and the Monitoring tab."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Callable
from typing import Any

import gradio as gr
from fastapi import FastAPI
from gradio.routes import App as GradioApp

from reranker import RerankResult, Settings, ValidationError
from web.cancel import event_left, run_cancellable
from web.errors import HttpError, to_http_error
from web.gradio_api import ROUTE, CountedBlocks, OnRefuse, RerankError, cut_off, json_safe_validation_errors
from web.gradio_login import find_gradio_app
from web.lifecycle import Lifecycle
from web.monitoring import Monitor, Panel, build_monitoring_tab
from web.request_id import request_age
from web.service import RerankCall, RerankService, form_top_n, split_lines
from web.tracing import ui_span
from web.uploads import read_documents

PREVIEW_CHARS = 300
# With no events waiting, Gradio's queue looks for one every millisecond (on Linux): about 4% of a core in an idle
# service, woken on the event loop that also serves the JSON routes. Every 10 ms costs a tenth of that, and a UI
# click waits at most 10 ms more to start. Its progress loop already polls every 10 ms.
QUEUE_POLL_S = 0.01
HEADERS = ["rank", "score", "index", "document"]
FAILED = "**No results:** the rerank was stopped, or it failed (its message says what to change)."
UPLOAD_CLEANUP = (600, 3600)  # Gradio's delete_cache: every 10 minutes, uploads older than an hour
# Column shares of the results table: Gradio sizes an unset column to its content, past the panel.
COLUMN_WIDTHS: list[str | int] = ["12%", "23%", "13%", "52%"]
# On a phone (390 px) the narrow columns' headers wrapped a letter a line ("r/a/n/k") behind their padding and menu
# button, the upload's label ran under the x that clears its file, and the Monitoring tab squeezed its one-row model
# card into letter-wide columns: it scrolls sideways there.
CSS = """
#upload [data-testid="block-label"] { max-width: calc(100% - 40px); }
@media (max-width: 480px) {
  #results .cell-wrap { padding-left: 3px; padding-right: 3px; font-size: 12px; }
  #results th .cell-wrap { font-size: 11px; }
  #results th .cell-menu-button { display: none; }
  #results th .header { overflow-wrap: normal; word-break: keep-all; }
  #monitor-card table { display: block; overflow-x: auto; }
  #monitor-card th, #monitor-card td { white-space: nowrap; }
}
"""

EXAMPLES = [
    [
        "How do I read a JSON file in Python?",
        "json.load reads a JSON document from a file object and returns Python objects.\n"
        "The csv module reads and writes tabular data in comma-separated form.\n"
        "Paris is the capital and most populous city of France.\n"
        "Use open() with a with-statement, then json.load(f) to parse the file's contents.",
    ],
    [
        "what causes the seasons on earth",
        "The tilt of Earth's axis makes each hemisphere lean toward the Sun for part of the year.\n"
        "Seasons in baseball run from spring training in February to the World Series in October.\n"
        "Earth's distance from the Sun changes little over a year and is not why seasons happen.\n"
        "A season is a division of the year marked by changes in weather and daylight.",
    ],
]


def status_line(result: RerankResult, seconds: float | None = None) -> str:
    """`seconds`: the event's time from when its handler took it up, as its history row, metrics and log line count
    it (an upload read, the wait for queue room, on Ray Serve the hop to a model replica); the engine's alone
    without one."""
    s = result.stats
    took = s.total_seconds if seconds is None else seconds
    return (f"{took * 1000:.0f} ms · {s.n_docs} documents · {s.truncated} truncated · "
            f"{s.chunked} chunked · {s.cache_hits} cache hits · {s.tokens} tokens")


def refusing_fractions(preprocess: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """top_n's preprocessing, refusing a fractional value rather than rounding it: Gradio's Number of precision 0
    made 1.5 the best 2, and 0.5 or -0.5 all, where the JSON routes refuse them. (Not a Number subclass: Gradio
    writes a .pyi stub beside the module of every component class.)"""
    def whole(payload: Any) -> Any:
        if isinstance(payload, float) and math.isfinite(payload) and not payload.is_integer():
            raise ValueError(f"top_n must be a whole number (0 or empty: all), got {payload}")
        return preprocess(payload)
    return whole


def ui_call(query: str, documents: str, top_n: float | None, instruction: str | None, raw_scores: bool,
            file: str | None, settings: Settings, refused: OnRefuse) -> RerankCall:
    """The rerank the form asks for: documents one per line plus the uploaded file's. A file that cannot be
    read, or a top_n the form refuses, is booked with `refused` and raised as a RerankError."""
    docs = split_lines(documents or "")
    try:
        if file:
            docs += read_documents(file, settings.max_body_bytes)
        wanted = form_top_n(top_n)
    except (ValidationError, HttpError) as err:
        error = to_http_error(err)
        refused(ROUTE, error)
        raise RerankError(error) from None
    return RerankCall(query, docs, wanted, instruction or None, bool(raw_scores))


def ui_answer(result: RerankResult) -> tuple[list[list[object]], str]:
    """The results table and the status line (within the event's ui_span, which knows when it arrived)."""
    rows = [[rank, round(r.score, 6), r.index, _preview(r.document)] for rank, r in enumerate(result.results, start=1)]
    return rows, status_line(result, request_age())


def make_predict(service: RerankService) -> Callable[..., tuple[list[list[object]], str]]:
    """The Rerank tab's handler, which is also the Gradio API endpoint `predict`."""
    settings = service.reranker.settings

    def predict(query: str, documents: str, top_n: float | None = None, instruction: str | None = None,
                raw_scores: bool = False, file: str | None = None, request: gr.Request | None = None, *,
                cancel: threading.Event | None = None) -> tuple[list[list[object]], str]:
        """Rank the documents (one per line, plus any uploaded file) against the query, best first."""
        with ui_span(service.reranker.tracing, request.headers if request is not None else None):
            call = ui_call(query, documents, top_n, instruction, raw_scores, file, settings, service.refused)
            try:
                return ui_answer(service.rerank(ROUTE, call, cancel))
            except HttpError as err:
                raise RerankError(err) from None

    return predict


def cancellable(predict: Callable[..., tuple[list[list[object]], str]], lifecycle: Lifecycle,
                refused: OnRefuse) -> Callable[..., Any]:
    """The event handler: `predict` on a worker thread, whose unstarted pairs are dropped if Gradio cancels
    the event (a client's cancel, gradio_client's `Job.cancel()`), which cancels the handler's task, or once its
    client has left (the page closed or reloaded: Gradio only marks the event dead).

    Counted in flight from here. When a stop that does not wait cancels it, it fails with 503 `shutting_down`:
    Gradio turned the cancellation into a 500 with a traceback, counted besides by the engine call."""

    async def rerank(query: str, documents: str, top_n: float | None = None, instruction: str | None = None,
                     raw_scores: bool = False, file: str | None = None,
                     request: gr.Request | None = None) -> tuple[list[list[object]], str]:
        """Rank the documents (one per line, plus any uploaded file) against the query, best first."""
        with lifecycle.serving() as served:
            try:
                return await run_cancellable(lambda cancel: predict(query, documents, top_n, instruction,
                                                                    raw_scores, file, request, cancel=cancel),
                                             event_left, lifecycle.answered_before_cut_off)
            except asyncio.CancelledError:
                if not lifecycle.stopping:
                    raise
                raise cut_off(lifecycle, served, refused) from None

    return rerank


def header(model_id: str, device: str, dtype: str, max_length: int) -> str:
    return f"# Reranker\n`{model_id}` on {device} ({dtype}, max_length {max_length})"


def build_ui(service: RerankService) -> CountedBlocks:
    """The demo UI over this process's engine; `predict(query, documents, top_n, instruction, raw_scores, file)`
    is its API."""
    model = service.reranker.model
    return build_blocks(cancellable(make_predict(service), service.lifecycle, service.refused), service.refused,
                        header(model.model_id, model.device, model.dtype, model.max_length),
                        Monitor(service.reranker, service.history), takes_instruction=model.accepts_instruction,
                        lifecycle=service.lifecycle, traced=service.reranker.tracing.enabled)


def build_blocks(predict: Callable[..., Any], refused: OnRefuse, title: str, panel: Panel, *,
                 takes_instruction: bool, lifecycle: Lifecycle, traced: bool = False) -> CountedBlocks:
    """The Rerank and Monitoring tabs over any scorer: `predict` is the async event handler (the Gradio API
    `predict`), `refused` books calls Gradio refuses before it, `panel` feeds the Monitoring tab, and
    `lifecycle`'s drains wait for the events in Gradio's queue; `traced`: tracing is on, so a queued event
    continues the trace of the request that queued it."""
    # Gradio deletes uploaded files only when told (UPLOAD_CLEANUP; only the files this UI's uploads made, and all
    # of them at a stop): they outlived even restarts, and a long-running service filled its disk with them.
    with CountedBlocks(refused, lifecycle=lifecycle, traced=traced, title="Reranker",
                       delete_cache=UPLOAD_CLEANUP) as demo:
        predict = demo.count(predict, line_inputs=(1,))  # documents
        gr.Markdown(title)
        with gr.Tab("Rerank"):
            with gr.Row():
                with gr.Column():
                    query = gr.Textbox(label="Query", placeholder="What are you looking for?", elem_id="query")
                    documents = gr.Textbox(label="Documents (one per line)", lines=10, elem_id="documents")
                    upload = gr.File(label="…or upload documents (.txt one per line, .jsonl with text, .csv "
                                     "with a text column)", file_types=[".txt", ".jsonl", ".csv"], type="filepath",
                                     elem_id="upload")
                    instruction = gr.Textbox(label="Instruction (optional)", value="", visible=takes_instruction,
                                             placeholder="Given a web search query, retrieve relevant passages "
                                             "that answer the query")
                    with gr.Row():
                        top_n = gr.Number(label="top_n (0 or empty: all)", value=None, precision=0)
                        top_n.preprocess = refusing_fractions(top_n.preprocess)  # type: ignore[method-assign,assignment]
                        raw = gr.Checkbox(label="Raw scores (logits)", value=False)
                    with gr.Row():
                        button = gr.Button("Rerank", variant="primary", elem_id="rerank", scale=3)
                        stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
                with gr.Column():
                    # The label names the API's second output. "status", one of Gradio's i18n keys, logged a warning.
                    status = gr.Markdown(label="Status", elem_id="status")
                    table = gr.Dataframe(headers=HEADERS, datatype=["number", "number", "number", "str"],
                                         label="Ranked documents", interactive=False, wrap=True,
                                         column_widths=COLUMN_WIDTHS, elem_id="results")
            gr.Examples(EXAMPLES, inputs=[query, documents])
        build_monitoring_tab(panel)
        # One event for the button and Enter in the query: a click and an Enter while it runs rerank once.
        rerank = gr.on([button.click, query.submit], predict, api_name="predict", concurrency_limit=16,
                       inputs=[query, documents, top_n, instruction, raw, upload], outputs=[table, status],
                       trigger_mode="once")
        # A failed rerank leaves no earlier query's table on show as if it were this one's. In the browser alone: a
        # call to the server would be refused with the rerank itself by a drain, or wait behind other events.
        cleared = json.dumps([{"headers": HEADERS, "data": [], "metadata": None}, FAILED])
        rerank.failure(None, None, [table, status], js=f"() => {cleared}", api_visibility="private")
        # Gradio cancels the event's task: the engine drops the pairs not yet scored, as when the page closes.
        stop.click(None, None, None, cancels=[rerank], api_visibility="private")
    poll_gently(demo)
    lifecycle.wait_also_for(demo.unfinished_events)
    return demo


def mount_ui(app: FastAPI, demo: gr.Blocks, settings: Settings) -> tuple[FastAPI, GradioApp]:
    """`app` with `demo` mounted at /, and the Gradio app mounted there, as both the single process and the Ray UI
    replica serve it.

    No run history: it uploads each run (query and documents) to a Hugging Face bucket named by a request header,
    with the host's saved HF token for loopback callers (a same-host proxy is one). RERANKER_UI_AUTH puts Gradio's
    login page in front of the UI."""
    app = gr.mount_gradio_app(app, demo, path="/", enable_monitoring=False, footer_links=["api"], show_error=True,
                              run_history=False, auth=list(settings.ui_auth) if settings.ui_auth else None,
                              max_file_size=settings.max_body_bytes, css=CSS)
    # Gradio accepts an input file only from its upload folder once the Blocks "has launched", which launch()
    # records and mount_gradio_app does not: without it, a Gradio API call naming any server path as its file had
    # that file read and ranked (tests/test_gradio_api.py).
    demo.has_launched = True
    gradio = find_gradio_app(app)
    # The mounted app's lifespan runs Gradio's startup events (the queue's loops, its limiter), but mount_gradio_app
    # does not record that, so anyone's GET /gradio_api/startup-events ran them again: a second queue loop, its
    # running jobs forgotten, a new limiter.
    gradio.startup_events_triggered = True
    json_safe_validation_errors(gradio)
    return app, gradio


def poll_gently(demo: gr.Blocks, interval: float = QUEUE_POLL_S) -> None:
    """Make `demo`'s idle queue look for new events every `interval` seconds, not every millisecond."""
    queue = demo._queue
    queue.sleep_when_free = max(queue.sleep_when_free, interval)


def _preview(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "…"
