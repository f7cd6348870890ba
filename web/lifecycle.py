"""Drain: once the process is asked to stop, refuse new work with 503 and finish what was accepted.

`Lifecycle` is the one flag and counter that the routes, `/readyz` and app.py share. `DrainGate` is the
ASGI middleware that answers new work with 503 and `Retry-After` while draining; it counts the requests that
start work (the JSON routes, Gradio's POSTs) from arrival to the last byte sent, and RerankService counts every
call in the engine, Gradio's queued events included; a request is counted once (`serving`). A drain ends when
the count is back to zero and no accepted work waits to join it (`wait_also_for`).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from web.errors import HttpError
from web.middleware import App, Receive, Scope, Send, rerank_route, route_path

RETRY_AFTER_SECONDS = 5
# Set while a request is counted in flight: the engine call of a JSON request that the drain gate counts is the
# same request, not a second one.
_serving: contextvars.ContextVar[bool] = contextvars.ContextVar("lifecycle_serving", default=False)


class Lifecycle:
    """Draining state and the number of requests being served."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inflight = 0
        self._pending: list[Callable[[], int]] = []
        self.draining = False
        self.reason = "the service is shutting down"

    def begin_drain(self, reason: str = "the service is shutting down") -> None:
        self.reason = reason
        self.draining = True

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Count one request in flight for the block, once: inside a request already counted (its context, or a
        thread started from it) this adds nothing."""
        if _serving.get():
            yield
            return
        token = _serving.set(True)
        with self._lock:
            self._inflight += 1
        try:
            yield
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
            await error.response(route_path(scope), {"Retry-After": str(RETRY_AFTER_SECONDS)})(scope, receive, send)
            return
        # Counted until the last byte, once: a JSON request's engine call, or a direct Gradio API call's handler,
        # runs in this context and adds nothing. A queued Gradio event runs in Gradio's queue, counted there
        # (RerankService, and `wait_also_for` while it waits): its queue join is counted here until it is queued.
        with self.lifecycle.serving():
            await self.app(scope, receive, send)
