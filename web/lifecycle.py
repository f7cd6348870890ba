"""Drain: once the process is asked to stop, refuse new work with 503 and finish what was accepted.

`Lifecycle` is the one flag and counter that the routes, `/readyz` and app.py share. `DrainGate` is the
ASGI middleware that answers new work with 503 and `Retry-After` while draining; it counts the requests that
start work (the JSON routes, Gradio's POSTs) from arrival to the last byte sent, and RerankService counts every
call in the engine, Gradio's queued events included; a request is counted once (`serving`). A drain ends when
the count is back to zero and no accepted work waits to join it (`wait_also_for`).

A stop that does not wait (a second signal, the drain deadline) cuts off what is still running: `CutOff` answers
each such request 503 `shutting_down`, where the server would send a bare 500 and log a traceback.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

from starlette.exceptions import HTTPException

from web.cancel import handled_cancellation
from web.errors import HttpError
from web.middleware import App, Message, Receive, Scope, Send, rerank_route, route_path

RETRY_AFTER_SECONDS = 5


@dataclass
class Served:
    """One request counted in flight, recorded (metrics, log line) by whoever claims it first: its engine call as
    it starts, or what answers its cut-off when a stop ends it before that. The other records nothing.

    Once its engine call has started, a stop that cuts the request off races the call's end: whichever settles
    first says what the client is answered and what is booked (`settle`), so that the two never differ."""

    _claimed: bool = False
    _settled: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def claim(self) -> bool:
        """True for the first caller only (any thread)."""
        with self._lock:
            claimed, self._claimed = self._claimed, True
            return not claimed

    def settle(self, outcome: str) -> bool:
        """`ANSWERED` (the engine call has the answer) or `CUT` (a stop cut the request off): True if `outcome`
        came first, or was already settled."""
        with self._lock:
            self._settled = self._settled or outcome
            return self._settled == outcome

    @property
    def cut(self) -> bool:
        return self._settled == CUT


ANSWERED = "answered"
CUT = "cut"


# Set while a request is counted in flight: the engine call of a JSON request that the drain gate counts is the
# same request, not a second one. A thread started from the request's context sees the same record.
_serving: contextvars.ContextVar[Served | None] = contextvars.ContextVar("lifecycle_serving", default=None)


def current_served() -> Served | None:
    """The record of the request counted in flight in this context, if any."""
    return _serving.get()


class Lifecycle:
    """Draining state and the number of requests being served."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inflight = 0
        self._pending: list[Callable[[], int]] = []
        self._on_stop: list[Callable[[], object]] = []
        self.draining = False
        self.stopping = False
        self.reason = "the service is shutting down"

    def begin_drain(self, reason: str = "the service is shutting down") -> None:
        self.reason = reason
        self.draining = True

    def on_stop(self, callback: Callable[[], object]) -> None:
        """Call `callback` (on the event loop) when the server closes: streams that only end when told to."""
        self._on_stop.append(callback)

    def stop(self) -> None:
        """The server is closing: a request cancelled from now on is cut off by the stop, not by its client."""
        self.draining = self.stopping = True
        for callback in self._on_stop:
            callback()

    def cut_off_error(self, *, counted: bool = False) -> HttpError:
        return HttpError(503, "shutting_down", f"{self.reason}, and stopped before this request was answered; "
                         "retry it on another instance", counted=counted)

    def cut_off(self, served: Served, book: Callable[[HttpError], None]) -> HttpError:
        """The error for a request the stop cut off, booked with `book` unless its engine call claimed it first."""
        error = self.cut_off_error()
        if served.claim():
            book(error)
        return error

    def answered_before_cut_off(self) -> bool:
        """Settles the current request when a stop cancels it while its answer may be under way (its wait for its
        engine call, Gradio's postprocessing): True if the engine call already had the answer, which is then sent
        as it was booked. Otherwise, and from then on, the request is cut off: its client is answered 503, and
        its call, ending later, books that too. Not a question to ask twice: it decides."""
        served = current_served()
        return self.stopping and served is not None and not served.settle(CUT)

    @contextmanager
    def serving(self) -> Iterator[Served]:
        """Count one request in flight for the block, once: inside a request already counted (its context, or a
        thread started from it) this adds nothing and yields that request's record."""
        current = _serving.get()
        if current is not None:
            yield current
            return
        served = Served()
        token = _serving.set(served)
        with self._lock:
            self._inflight += 1
        try:
            yield served
        finally:
            with self._lock:
                self._inflight -= 1
            _serving.reset(token)

    @property
    def inflight(self) -> int:
        return self._inflight

    def wait_also_for(self, pending: Callable[[], int]) -> None:
        """Make a drain also wait while `pending()` counts work accepted that has not reached the count yet: the
        events in Gradio's queue wait there for one of its slots before their handler runs, and a drain that saw the
        count at zero between two of them ended with the rest unanswered."""
        self._pending.append(pending)

    @property
    def idle(self) -> bool:
        return self._inflight == 0 and not any(pending() for pending in self._pending)

    def wait_idle(self, deadline: float) -> bool:
        """Block until idle or the monotonic deadline; True if idle."""
        while time.monotonic() < deadline:
            if self.idle:
                return True
            time.sleep(0.05)
        return self.idle


def _starts_work(scope: Scope) -> bool:
    """Rerank requests, and Gradio POSTs (a queue join or an API call); pages, streams and health pass."""
    return rerank_route(scope) is not None or (scope.get("method") == "POST" and
                                                route_path(scope).startswith("/gradio_api"))


class DrainGate:
    """While draining, new work gets 503 with Retry-After; requests that start work are counted in flight. A
    refusal is booked on the route that `route` names (by default the path)."""

    def __init__(self, app: App, lifecycle: Lifecycle, on_refuse: Callable[[str, HttpError], None],
                 route: Callable[[Scope], str] = route_path) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.on_refuse = on_refuse
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _starts_work(scope):
            await self.app(scope, receive, send)
            return
        if self.lifecycle.draining:
            error = HttpError(503, "shutting_down", f"{self.lifecycle.reason}; retry on another instance")
            self.on_refuse(self.route(scope), error)
            await retry_later(error, scope)(scope, receive, send)
            return
        # Counted until the last byte, once: a JSON request's engine call, or a direct Gradio API call's handler,
        # runs in this context and adds nothing. A queued Gradio event runs in Gradio's queue, counted there
        # (RerankService, and `wait_also_for` while it waits): its queue join is counted here until it is queued.
        with self.lifecycle.serving() as served:
            try:
                await self.app(scope, receive, send)
            except asyncio.CancelledError:
                if self.lifecycle.stopping:
                    self.lifecycle.cut_off(served, partial(self.on_refuse, self.route(scope)))
                raise


def retry_later(error: HttpError, scope: Scope) -> App:
    """The 503 answer to a request the service will not serve now: try another instance after Retry-After."""
    return error.response(route_path(scope), {"Retry-After": str(RETRY_AFTER_SECONDS)})


class CutOff:
    """A request that a stop cuts off (a second signal, the drain deadline) is cancelled. uvicorn would answer it
    with a bare 500 and log the cancellation as an application error; this answers 503 `shutting_down` with
    Retry-After instead, and ends an event stream already under way (an open tab's heartbeat). The cancellation
    is the stop's, which ends the task anyway, so it is not passed on.

    It also ends an event stream whose app raised an HTTP error after the stream had started: Gradio does that
    for an event id it does not hold (`GET /gradio_api/call/<api>/<id>`), after sending `event: error`. No answer
    can follow a started one, so Starlette raised, the server logged two tracebacks and cut the stream
    mid-chunk; the client has its error event, and the stream now ends there."""

    def __init__(self, app: App, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"started": False, "done": False, "stream": False}

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                state["stream"] = any(name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                                      for name, value in message.get("headers", []))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["done"] = True
            await send(message)

        end_of_stream = {"type": "http.response.body", "body": b"", "more_body": False}
        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if not self.lifecycle.stopping:
                raise
            handled_cancellation()
            if not state["started"]:
                await retry_later(self.lifecycle.cut_off_error(), scope)(scope, receive, send)
            elif state["stream"] and not state["done"]:  # events end at any message; other bodies stay cut short
                await send(end_of_stream)
        except RuntimeError as err:
            if not (state["stream"] and not state["done"] and isinstance(err.__cause__, HTTPException)):
                raise
            await send(end_of_stream)
