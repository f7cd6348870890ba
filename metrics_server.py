"""The Prometheus endpoint: a Flask app serving one registry on its own port, in a daemon thread."""

from __future__ import annotations

import errno
import socket
import threading
from dataclasses import dataclass

from flask import Flask, Response, request
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from werkzeug.serving import BaseWSGIServer, make_server


class PortError(OSError):
    """A port the service is set to serve on cannot be bound; the message names the variable to change."""


def create_app(registry: CollectorRegistry) -> Flask:
    """`/metrics` in the Prometheus text format and `/healthz`."""
    app = Flask("reranker-metrics")

    @app.get("/metrics")
    def metrics() -> Response:
        # The scraper's Accept header picks the format (Prometheus text or OpenMetrics), as
        # prometheus_client's own exporters do.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return Response(encoder(registry), content_type=content_type)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok\n", content_type="text/plain; charset=utf-8")

    return app


@dataclass
class MetricsServer:
    """A running metrics server; `stop()` shuts it down and joins its thread."""

    server: BaseWSGIServer
    thread: threading.Thread
    port: int

    def stop(self, timeout: float = 5.0) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout)


def bind(host: str, port: int, *, serving: str, variable: str) -> socket.socket:
    """A socket bound to host:port (0 picks a free port), not yet listening; raise PortError naming `variable` (or,
    for an address this machine does not have, its _HOST twin) if the port cannot be had. app.py takes the UI and
    API's port with it before the model loads: bound only, so that a client meanwhile is refused at once rather than
    left waiting for a server that is not up.

    SO_REUSEADDR, so that a restart binds the port that the stopped server's connections hold in TIME_WAIT (Linux
    lets that happen only where the old socket had it too). Two services bound so may share a port until one
    listens: the second to listen is refused then (serve() and start() name the port and exit), as nothing can tell
    a port bound by another service still loading its model from a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise port_error(err, host, port, serving=serving, variable=variable) from err
    return sock


def port_error(err: OSError, host: str, port: int, *, serving: str, variable: str) -> PortError:
    """What to change, for `err` binding or listening on host:port: the port, or the host (`variable`'s _HOST twin)
    where this machine has no such address."""
    if err.errno == errno.EADDRNOTAVAIL or isinstance(err, socket.gaierror):
        host_variable = variable.removesuffix("_PORT") + "_HOST"
        change = f"set {host_variable} to an address of this machine (0.0.0.0 for all, 127.0.0.1 for loopback only)"
    else:
        change = f"set {variable} to a free port"
    return PortError(f"cannot serve {serving} on {host}:{port}: {err.strerror or err}; {change}")


def start(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 9091) -> MetricsServer:
    """Serve `registry` on host:port (0 picks a free port); raise PortError if it is taken."""
    # Bound here rather than in werkzeug, which prints to stderr and exits the process on a taken port.
    listener = bind(host, port, serving="metrics", variable="RERANKER_METRICS_PORT")
    try:
        try:
            listener.listen(128)
        except OSError as err:  # bound beside another service's socket, which listened first
            raise port_error(err, host, port, serving="metrics", variable="RERANKER_METRICS_PORT") from err
        server = make_server(host, port, create_app(registry), threaded=True, fd=listener.fileno())
    finally:
        listener.close()  # the server holds its own duplicate of the socket
    thread = threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True)
    thread.start()
    return MetricsServer(server, thread, int(server.socket.getsockname()[1]))
