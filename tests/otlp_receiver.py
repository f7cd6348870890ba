"""Tiny OTLP trace receivers on loopback (HTTP and gRPC): decode each export with opentelemetry-proto, keep it."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)


@dataclass
class Received:
    """What the receiver got: decoded requests, and the headers each came with."""

    requests: list[ExportTraceServiceRequest] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def spans(self) -> list[tuple[str, dict[str, object], Any]]:
        """(service.name, resource attributes, span) for every span received so far."""
        out: list[tuple[str, dict[str, object], Any]] = []
        with self.lock:
            requests = list(self.requests)
        for request in requests:
            for resource_spans in request.resource_spans:
                attributes = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    out.extend((str(attributes.get("service.name")), attributes, span) for span in scope_spans.spans)
        return out

    def wait_for(self, names: set[str], timeout: float = 120.0) -> None:  # bounds a hang, not the machine
        deadline = time.monotonic() + timeout
        while not names <= {span.name for _, _, span in self.spans()}:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the receiver never got spans {sorted(names)}")
            time.sleep(0.05)


def _value(value: object) -> object:
    kind = value.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(value, kind) if kind else None


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, Received]]:
    """Serve POST /v1/traces on 127.0.0.1 until the block ends; yields the base URL and what arrives."""
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the http.server hook's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                self.send_error(404)
                return
            request = ExportTraceServiceRequest.FromString(body)
            with received.lock:
                received.requests.append(request)
                received.headers.append({k.lower(): v for k, v in self.headers.items()})
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:  # quiet: tests read what arrived instead
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def grpc_receiver() -> Iterator[tuple[str, Received]]:
    """An OTLP/gRPC TraceService on 127.0.0.1 until the block ends; yields its endpoint URL and what arrives."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    received = Received()

    class Service(TraceServiceServicer):
        def Export(self, request: ExportTraceServiceRequest, context: object) -> ExportTraceServiceResponse:  # noqa: N802
            with received.lock:
                received.requests.append(request)
            return ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.stop(grace=None).wait(5)
