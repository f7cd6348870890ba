"""The Gradio API of the Rerank tab: every call counted once, and a bad call answered 4xx, not Gradio's 500."""

from __future__ import annotations

import asyncio
import contextvars
import json
import math
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from gradio.exceptions import ComponentProcessingError, InvalidPathError
from gradio.queueing import Event
from gradio.route_utils import API_PREFIX
from pydantic import TypeAdapter

from reranker.settings import Settings
from web.cancel import handled_cancellation, handling_event
from web.errors import HttpError, client_left
from web.lifecycle import RETRY_AFTER_SECONDS, Lifecycle, Served, current_served
from web.middleware import (
    App,
    Message,
    Receive,
    Scope,
    Send,
    body_deadline,
    declared_length,
    read_body,
    replaying,
    route_path,
)
from web.service import split_lines
from web.tracing import request_context

ROUTE = "ui"  # the metric route of the UI and of the Gradio API alike
PREPROCESS_STATUS = 422
# In Gradio's ComponentProcessingError: "Could not preprocess input component at index 2 (a `number` component) ..."
_COMPONENT = re.compile(r"component at index (\d+) \(a `(\w+)` component\)")

# Gradio's POST routes of a named event, under /gradio_api: direct calls answer in the POST; queued
# calls (/call/) answer in a later event stream, so only their refusals show in the POST's status.
_ROUTES = ("/run/", "/api/", "/call/", "/call/v2/")
# Where the browser, and gradio_client, queue an event by its function's index, given in the body.
QUEUE_JOIN = f"{API_PREFIX}/queue/join"
# Set in an ASGI scope by RerankEvents: whether a Gradio POST calls the Rerank tab's event.
RERANK_EVENT = "reranker.rerank_event"
# RerankEvents reads a body up to this size to find its fn_index; a larger one is the Rerank event's, the only
# one that carries documents (the UI's other events send a few bytes). Bounded, because it reads before the
# login and the drain gate refuse anyone, and parses on the event loop.
PEEK_BYTES = 64 * 1024
# fn_index as Gradio's PredictBody reads it (lax: "2" and 2.0 are 2).
_FN_INDEX: TypeAdapter[int] = TypeAdapter(int)

OnRefuse = Callable[[str, HttpError], None]
# The status a direct call's handler chose for its failure, written where Gradio swallows the exception.
_outcome: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar("gradio_outcome", default=None)


def uploaded_files_only(inputs: list[Any]) -> None:
    """Raise InvalidPathError for a file input Gradio would fetch or take whole: a URL, which Gradio downloads itself
    (the server made requests out, to any public address, with no size cap), or a directory, which it accepted from
    its upload folder and failed to delete at the stop. Files are checked by Gradio: in its upload folder or refused."""
    for value in inputs:
        path = value.get("path") if isinstance(value, dict) else None
        if not isinstance(path, str):
            continue
        if "://" in path or Path(path).is_dir():
            raise InvalidPathError(path)


def refusal_reason(err: Exception) -> str:
    """One line on why Gradio refused an input. A component's own refusal (top_n's "must be a whole number") is the
    cause of Gradio's ComponentProcessingError, whose message names the input, lists every component and repeats
    the value, and ends with the cause: the input's position and the cause's own message are what help."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    if isinstance(err, ComponentProcessingError) and err.__cause__ is not None:
        cause = (str(err.__cause__).strip().splitlines() or [type(err.__cause__).__name__])[0]
        where = _COMPONENT.search(lines[0])
        return f"input {where[1]} ({where[2]}): {cause}" if where else cause
    return lines[0]


class RerankError(gr.Error):
    """A gr.Error for a call the service has already counted and logged; `status` as the JSON routes give it."""

    def __init__(self, error: HttpError) -> None:
        # Already one JSON log line; Gradio would add a traceback on stderr for every bad input.
        # duration None: the message stays until the user closes it (it faded after 10 s, leaving a bare "Error").
        super().__init__(error.message, duration=None, print_exception=False)
        self.status = error.status


def cut_off(lifecycle: Lifecycle, served: Served, on_refuse: OnRefuse) -> RerankError:
    """The answer to a Gradio call that a stop which does not wait cut off (its cancellation caught and dealt
    with): 503 `shutting_down`, booked on the UI's route unless its engine call claimed it first."""
    handled_cancellation()
    return RerankError(lifecycle.cut_off(served, partial(on_refuse, ROUTE)))


class _EventTable(dict[str, Event]):
    """Gradio's queue's events by id, which every queued event leaves by `pop` once Gradio is done with it:
    after it ran, or when it was dropped unrun (`left` is told of each)."""

    def __init__(self, left: Callable[[Event], None]) -> None:
        super().__init__()
        self._left = left

    def pop(self, event_id: str, default: Any = None) -> Any:
        event = super().pop(event_id, default)
        if isinstance(event, Event):
            self._left(event)
        return event


class CountedBlocks(gr.Blocks):
    """Blocks whose rerank handlers are counted even when Gradio refuses the call before they run.

    Gradio checks the number of inputs, validates files and preprocesses each component (a Number
    given "abc" or 1e400) before it calls the handler; a call that fails there never reaches the
    service. Handlers registered with `count` get such a failure booked as an invalid request, and
    an event of theirs that Gradio's queue drops before running it booked as cancelled.
    """

    def __init__(self, on_refuse: OnRefuse, *, lifecycle: Lifecycle | None = None, traced: bool = False,
                 **kwargs: Any) -> None:
        self._on_refuse = on_refuse
        self._lifecycle = lifecycle
        self._traced = traced
        self._counted: dict[Callable[..., Any], tuple[int, ...]] = {}
        self._started: set[str] = set()  # ids of queued events that reached process_api
        super().__init__(**kwargs)  # which builds the queue

    def queue(self, *args: Any, **kwargs: Any) -> CountedBlocks:
        super().queue(*args, **kwargs)
        self._queue.event_ids_to_events = _EventTable(self._left_queue)
        return self

    def _left_queue(self, event: Event) -> None:
        """Book an event of a counted handler that Gradio dropped from its queue unrun: cancelled with
        gradio_client's Job.cancel(), or with its browser session closed, while it waited for a slot."""
        started = event._id in self._started
        self._started.discard(event._id)
        if started or event.fn.fn not in self._counted:
            return
        error = client_left("the call was cancelled before it ran")
        # In a context of its own: the HTTP request that dropped it (a cancel, a closed stream) is another one.
        contextvars.Context().run(self._on_refuse, ROUTE, error)

    def counted_index(self, body: bytes) -> bool | None:
        """Whether the `fn_index` of a call's JSON `body` names a counted handler's event; None without one."""
        try:
            fn_index = _FN_INDEX.validate_python(json.loads(body)["fn_index"])
        except (ValueError, LookupError, TypeError, RecursionError):  # not JSON, or no usable fn_index
            return None
        block_fn = self.fns.get(fn_index)
        return block_fn is not None and block_fn.fn in self._counted

    def unfinished_events(self) -> int:
        """Events in Gradio's queue, waiting for a slot or running: a drain waits for them (web/lifecycle.py)."""
        return len(self._queue.event_ids_to_events)

    def count(self, handler: Callable[..., Any], *, line_inputs: tuple[int, ...] = ()) -> Callable[..., Any]:
        """Book refusals of `handler`'s calls. `line_inputs`: positions of text inputs holding one item per line,
        which also take a list of one-line strings (gradio_client users send lists, as /api/predict allows)."""
        self._counted[handler] = line_inputs
        return handler

    async def preprocess_data(self, block_fn: Any, inputs: list[Any], state: Any,
                              explicit_call: bool = False) -> Any:
        try:
            inputs = self._lines(block_fn.fn, inputs)
            uploaded_files_only(inputs)
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except Exception as err:
            if block_fn.fn not in self._counted:
                raise
            # A file path outside the upload folder is refused without echoing where the server resolved it.
            reason = refusal_reason(err)
            if isinstance(err, InvalidPathError):
                reason = "the file was not uploaded; upload it first (POST /gradio_api/upload) and pass that path"
            error = HttpError(PREPROCESS_STATUS, "invalid_input", f"bad input for the Gradio API: {reason}")
            self._on_refuse(ROUTE, error)
            raise RerankError(error) from None

    async def postprocess_data(self, *args: Any, **kwargs: Any) -> Any:
        """Gradio's postprocessing after the handler returned, which waits for a worker thread. A stop that cuts a
        direct API call off here, after its engine call booked the answer, lets it finish, so that its client gets
        that answer (it got 503, counted `ok`)."""
        work = asyncio.ensure_future(super().postprocess_data(*args, **kwargs))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            if self._lifecycle is None or not self._lifecycle.answered_before_cut_off():
                work.cancel()
                raise
            handled_cancellation()
            return await work

    def _lines(self, handler: Callable[..., Any], inputs: list[Any]) -> list[Any]:
        """A list given for a text input of lines becomes those lines; a Textbox would make it its repr."""
        positions = [i for i in self._counted.get(handler, ()) if i < len(inputs) and isinstance(inputs[i], list)]
        if not positions:
            return inputs
        inputs = list(inputs)
        for i in positions:
            # Only items that come back from the lines unchanged, so each keeps its position (its index).
            if not all(isinstance(item, str) and split_lines(item) == [item] for item in inputs[i]):
                raise ValueError(f"input {i} is text with one item per line: send a string, or a list of "
                                 "non-blank strings without line breaks or surrounding spaces")
            inputs[i] = "\n".join(inputs[i])
        return inputs

    async def process_api(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # From here the call is counted: as refused by preprocess_data, or by the handler; a queued event's under
        # the id and trace of the request that queued it.
        if kwargs.get("event_id") in self._queue.event_ids_to_events:
            self._started.add(kwargs["event_id"])
        block_fn = kwargs["block_fn"] if "block_fn" in kwargs else args[0]
        handler = getattr(self.fns.get(block_fn) if isinstance(block_fn, int) else block_fn, "fn", None)
        request = kwargs.get("request")
        event_id = kwargs.get("event_id")
        event = self._queue.event_ids_to_events.get(event_id) if isinstance(event_id, str) else None  # direct: None
        try:
            with request_context(request.headers if isinstance(request, gr.Request) else None, self._traced), \
                    handling_event(event):
                try:
                    return await super().process_api(*args, **kwargs)
                except asyncio.CancelledError:
                    # A stop that does not wait cut off a direct API call before its handler ran (Gradio still
                    # preprocessing it): Gradio answered its 500 and printed a traceback. The handler answers its
                    # own (web/ui.py). Only the rerank handler's calls are counted: a cut-off Monitoring refresh is
                    # none.
                    lifecycle, served = self._lifecycle, current_served()
                    if handler not in self._counted or lifecycle is None or not lifecycle.stopping or served is None:
                        raise
                    raise cut_off(lifecycle, served, self._on_refuse) from None
        except RerankError as err:
            outcome = _outcome.get()
            if outcome is not None:
                outcome["status"] = err.status
            raise


def json_safe_validation_errors(gradio: FastAPI) -> None:
    """Answer a Gradio request that fails validation as FastAPI does (422, `detail`), in JSON that can be written.
    FastAPI's own answer echoes the bad input, and a non-finite number (`{"fn_index": 1e999}` parses as inf) made
    writing it raise: a 500 and a traceback."""

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        return JSONResponse({"detail": _finite(jsonable_encoder(errors))}, status_code=422)

    gradio.add_exception_handler(RequestValidationError, invalid)


def _finite(value: Any) -> Any:
    """`value` with each non-finite float written as a string ("inf", "nan"), which JSON can carry."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_finite(item) for item in value]
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return value


def is_api_path(path: str, api_name: str = "predict") -> bool:
    """Whether `path` is one of the Gradio API's routes that call the event `api_name`."""
    prefix, _, name = path.rstrip("/").rpartition("/")
    return name == api_name and prefix.startswith("/gradio_api/") and prefix[len("/gradio_api"):] + "/" in _ROUTES


def _is_api_call(scope: Scope, api_name: str = "predict") -> bool:
    """A call of the event `api_name`: as RerankEvents found, or else by its path."""
    if scope["type"] != "http" or scope.get("method") != "POST":
        return False
    marked = scope.get(RERANK_EVENT)
    return bool(marked) if marked is not None else is_api_path(route_path(scope), api_name)


def counted_route(scope: Scope) -> str:
    """The route a refusal of this request is counted on: `ui` for a call of the Rerank tab's event, its path for
    anything else."""
    return ROUTE if _is_api_call(scope) else route_path(scope)


class RerankEvents:
    """Tell which POSTs to Gradio call the Rerank tab's event, as Gradio will: by the body's `fn_index` where
    the route reads one (queue/join, where the browser and gradio_client queue events; /run/ and /api/, where
    the browser sends every unqueued event, the Monitoring tab's timer too, as `/run/predict`), else by the
    path. The guards inside count the refusals of those calls alone (draining, the UI login, the body limit,
    Gradio's own). The body is read here, up to PEEK_BYTES, and handed on as it came. Outermost, so that the
    drain gate knows too."""

    def __init__(self, app: App, blocks: CountedBlocks,
                 body_timeout: float = Settings.body_timeout_seconds) -> None:
        self.app = app
        self.blocks = blocks
        self.body_timeout = body_timeout  # RERANKER_BODY_TIMEOUT_SECONDS: BodyLimit, inside, answers its 408

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope) if scope["type"] == "http" and scope.get("method") == "POST" else ""
        queued = path == QUEUE_JOIN
        if not (queued or any(path.startswith(f"{API_PREFIX}{route}") for route in ("/run/", "/api/"))):
            await self.app(scope, receive, send)
            return
        by_path = False if queued else is_api_path(path)
        declared = declared_length(scope)
        read: list[Message] = []
        if declared is not None and declared > PEEK_BYTES:
            scope[RERANK_EVENT] = True
        else:
            read, size = await read_body(receive, PEEK_BYTES, body_deadline(scope, self.body_timeout))
            # A body cut short by the client is no JSON, and names no event.
            named = self.blocks.counted_index(b"".join(m.get("body", b"") for m in read))
            scope[RERANK_EVENT] = size > PEEK_BYTES or (by_path if named is None else named)
        await self.app(scope, replaying(read, receive), send)


class GradioApiStatus:
    """For POSTs to the Gradio API of `api_name`: a handler's refusal gets its 4xx instead of Gradio's
    500 (direct calls), and a call Gradio refuses before making it an event (not JSON, no `data`
    list) is counted as an invalid request on the `ui` route."""

    def __init__(self, app: App, on_refuse: OnRefuse, api_name: str = "predict") -> None:
        self.app = app
        self.on_refuse = on_refuse
        self.api_name = api_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _is_api_call(scope, self.api_name):
            await self.app(scope, receive, send)
            return
        outcome: dict[str, int] = {}
        token = _outcome.set(outcome)

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if "status" in outcome:  # counted by the handler, or by preprocess_data
                    if status == 500 and outcome["status"] != 500:
                        message["status"] = outcome["status"]
                        if outcome["status"] == 503:  # not ready, or cut off by a stop: worth a retry elsewhere
                            message["headers"] = [*message.get("headers", []),
                                                  (b"retry-after", str(RETRY_AFTER_SECONDS).encode())]
                elif status == 413:  # web.middleware.BodyLimit, inside this middleware
                    self.on_refuse(ROUTE, HttpError(status, "limit_exceeded", "the request body is over "
                                                    "RERANKER_MAX_BODY_BYTES"))
                elif status >= 400:
                    self.on_refuse(ROUTE, HttpError(status, "gradio_refused", f"Gradio answered {status}"))
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            _outcome.reset(token)
