"""Tracing at the HTTP edge: the server span (opentelemetry-instrumentation-fastapi), `traceresponse`, UI spans."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

from fastapi import FastAPI
from opentelemetry import context, propagate, trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.propagators import TraceResponsePropagator

from reranker import spans
from reranker.tracing import Tracing
from web.errors import CLIENT_CLOSED
from web.middleware import App, Message, Receive, Scope, Send
from web.request_id import bound_request_id, current_request_id, given_request_id

# Probes, static files and the Gradio page's own chatter (heartbeat, the Monitoring tab's refresh every two
# seconds, event streams) are not requests anyone wants a trace of. Regexes, searched in the full URL.
EXCLUDED_URLS = ",".join([
    r"/healthz$", r"/readyz$", r"/gradio_api/heartbeat/", r"/gradio_api/queue/data", r"/gradio_api/upload_progress",
    r"/gradio_api/run/", r"/gradio_api/info", r"/gradio_api/file=", r"/assets/", r"/static/", r"/favicon\.ico$",
    r"/theme\.css", r"/manifest\.json$", r"/config$",
])
UI_SPAN = "reranker.ui.predict"
_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})
_ID = re.compile(r"/[0-9a-fA-F-]{16,}(?=/|$)")
_NAMED_BY_PATH = "reranker.span_named_by_path"  # in the ASGI scope


def instrument(app: FastAPI, tracing: Tracing) -> None:
    """Give every request to `app` (our routes and the mounted Gradio app alike) a server span, continued
    from an incoming `traceparent`, and answer its `traceresponse`. Does nothing with tracing off."""
    if tracing.provider is None:
        return
    app.add_middleware(TraceContext)
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=tracing.provider, excluded_urls=EXCLUDED_URLS, server_request_hook=_name_mounted,
        exclude_spans=["receive", "send"],  # a span per ASGI message would bury the ones that matter
    )


class TraceContext:
    """Hands the server span's context on: to the caller as W3C Trace Context Level 2 `traceresponse:
    00-{trace id}-{span id}-{flags}`, and to the app as the request's `traceparent`, because Gradio's queue
    runs the UI handler apart from the request that queued it, and the request headers are what survive."""

    _response = TraceResponsePropagator()

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not trace.get_current_span().get_span_context().is_valid:
            await self.app(scope, receive, send)
            return
        answer: dict[str, str] = {}
        self._response.inject(answer)  # the server span is current: the instrumentation wraps this middleware
        onward: dict[str, str] = {}
        propagate.inject(onward)
        scope["headers"] = [*((k, v) for k, v in scope.get("headers", []) if k.lower() not in _TRACE_HEADERS),
                            *_encode(onward)]

        async def send_with_trace(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_encode(answer)]
                if message.get("status") == 404 and scope.get(_NAMED_BY_PATH):
                    # No route served it (a scanner's /wp-login.php, a typo): named by its path, every such URL
                    # would be an operation of its own in the trace backend. The bare method, as OpenTelemetry's
                    # HTTP conventions name a request no route matched.
                    trace.get_current_span().update_name(scope.get("method", "HTTP"))
            await send(message)

        await self.app(scope, receive, send_with_trace)


def _encode(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def _name_mounted(span: trace.Span, scope: dict[str, Any]) -> None:
    """The instrumentation names spans by our route templates; the mounted Gradio app's routes get the bare
    method. Name those by path, with event ids and the like as `{id}` so that names stay few."""
    method = scope.get("method", "")
    if scope.get("type") == "http" and span.is_recording() and getattr(span, "name", None) == method:
        span.update_name(f"{method} {_ID.sub('/{id}', str(scope.get('path', '')))}")
        scope[_NAMED_BY_PATH] = True  # TraceContext takes the path back out of the name if nothing serves it


@contextmanager
def request_context(headers: Mapping[str, str] | None, traced: bool) -> Iterator[None]:
    """For a Gradio event run by its queue, apart from the request that queued it: that request's id and, when
    `traced`, its trace context, from the headers RequestIdMiddleware and TraceContext left on it, so that what
    the event books (a refusal by Gradio's preprocessing, the handler's call) carries them; a refusal is timed
    from here, as the handler's call is from its start (Gradio's queue wait left out). Inside the request itself,
    nothing."""
    if current_request_id() is not None:
        yield
        return
    parent = propagate.extract(headers or {}) if traced else None
    with ExitStack() as stack:
        stack.enter_context(bound_request_id(given_request_id(headers), arrived=time.perf_counter()))
        if parent is not None and trace.get_current_span(parent).get_span_context().is_valid:
            token = context.attach(parent)
            stack.callback(context.detach, token)
        yield


@contextmanager
def ui_span(tracing: Tracing, headers: Mapping[str, str] | None) -> Iterator[None]:
    """The UI handler's span: a child of the current span, or after Gradio's queue (which loses it) of the
    request's `traceparent` (see TraceContext)."""
    if tracing.provider is None:
        yield
        return
    parent = None if trace.get_current_span().get_span_context().is_valid else propagate.extract(headers or {})
    with tracing.tracer.start_as_current_span(UI_SPAN, context=parent, record_exception=False,
                                              set_status_on_exception=False) as span:
        try:
            yield
        except Exception as err:  # the handler's errors carry their HTTP status: a cancellation is 499
            spans.fail(span, err, cancelled=getattr(err, "status", None) == CLIENT_CLOSED)
            raise
