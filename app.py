"""Entry point: settings -> logging -> metrics server -> engine -> FastAPI routes + Gradio UI -> uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

if TYPE_CHECKING:
    from reranker import Reranker, Settings
    from web.lifecycle import Lifecycle

logger = logging.getLogger("reranker.app")

# Set before gradio, huggingface_hub or prometheus_client are imported (in main): nothing phones home or draws
# progress bars, and /metrics has no `_created` series (a creation timestamp per counter and histogram series,
# which Prometheus stores as one more series each from the text format).
QUIET_DEFAULTS = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "true",  # the engine tokenizes each request in one batched call
    "PROMETHEUS_DISABLE_CREATED_SERIES": "True",
}

# At a stop that does not wait: how long the requests it cuts off, and then the app's lifespan, have to end.
CUT_OFF_SECONDS = 2.0


def main() -> int:
    """Run the service until SIGINT/SIGTERM; return the process exit status."""
    for name, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(name, value)

    from reranker.logs import setup_logging
    from reranker.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as err:
        setup_logging("INFO")
        logger.error("configuration error: %s", err, extra={"error_type": "configuration"})
        return 2
    setup_logging(settings.log_level)
    for warning in unknown_variables():
        logger.warning("%s", warning, extra={"error_type": "configuration"})
    from web.uploads import UploadFolderError, private_upload_folder

    try:
        private_upload_folder()  # Gradio's, which it would first write in after the model's load
    except UploadFolderError as err:
        logger.error("configuration error: %s", err, extra={"error_type": "configuration"})
        return 2

    from prometheus_client import CollectorRegistry

    import metrics_server
    from reranker import ModelLoadError, Reranker
    from reranker.gpu import GpuCollector
    from reranker.metrics import Metrics
    from reranker.tracing import Tracing

    registry = CollectorRegistry()
    metrics = Metrics(registry, process_collector=True)
    registry.register(GpuCollector())
    try:
        # Both ports before the model loads: metrics, so that load time and load failures can be scraped; the UI
        # and API's, so that a port in use fails at once rather than after a load of minutes.
        metrics_handle = metrics_server.start(registry, settings.metrics_host, settings.metrics_port)
        try:
            http_socket = metrics_server.bind(settings.host, settings.port, serving="the UI and API",
                                              variable="RERANKER_PORT")
        except metrics_server.PortError:
            metrics_handle.stop()
            raise
    except metrics_server.PortError as err:
        logger.error("%s", err, extra={"error_type": "port"})
        return 1
    logger.info("metrics on http://%s:%d/metrics", settings.metrics_host, metrics_handle.port)
    try:
        tracing = Tracing.from_settings(settings, metrics)
    except Exception as err:  # an OTEL_* value the exporter cannot use
        logger.error("tracing setup failed: %s", err, extra={"error_type": "configuration"})
        http_socket.close()
        metrics_handle.stop()
        return 2
    if tracing.enabled:
        logger.info("tracing on: OTLP over %s", settings.tracing_protocol)
    try:
        try:
            reranker = Reranker.from_settings(settings, metrics=metrics, tracing=tracing)
        except ModelLoadError as err:
            logger.error("model load failed: %s", err, extra={"error_type": "model_load"})
            return 1
        try:
            status = serve(reranker, http_socket)
        finally:
            reranker.close()
    finally:
        tracing.shutdown()  # after the worker's last batch spans; bounded, whatever the collector does
        http_socket.close()
        metrics_handle.stop()
    return status


# RERANKER_* variables read outside Settings: `python -m deploy.ray`'s, and where bench/ finds its model.
READ_ELSEWHERE = ("RERANKER_RAY_METRICS_PORT", "RERANKER_BENCH_MINILM_DIR")


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each RERANKER_* variable that nothing reads, a misspelt one most likely (RERANKER_DTYPES
    would otherwise be ignored without a word), naming the closest variable that is read. `python -m deploy.ray`
    gives them too."""
    from reranker.settings import variables_read

    env = os.environ if environ is None else environ
    known = sorted(variables_read().union(READ_ELSEWHERE))
    warnings = []
    for name in sorted(key for key in env if key.startswith("RERANKER_") and key not in known):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
        hint = f"did you mean {close[0]}? " if close else ""
        warnings.append(f"{name} is not a setting of this service and is ignored; {hint}the settings are listed in "
                        "docs/configuration.md")
    return warnings


def exposure_warnings(settings: Settings, *, metrics: bool = True, ui: bool = True, api: bool = True) -> list[str]:
    """What to tell an operator who serves beyond loopback with the UI, the JSON routes or the metrics left open,
    of those this process serves (`metrics`, `ui`, `api`)."""
    warnings = []
    if metrics and not _is_loopback(settings.metrics_host):
        warnings.append(f"the metrics on {settings.metrics_host}:{settings.metrics_port} are open to anyone who can "
                        "reach them, with no login (they name the model and its traffic): keep RERANKER_METRICS_HOST "
                        "on loopback or a network only Prometheus reaches")
    if _is_loopback(settings.host):
        return warnings
    if ui and not settings.ui_auth:
        warnings.append(f"the Gradio UI and Gradio API on {settings.host} are open to anyone who can reach it "
                        "(RERANKER_API_KEY, if set, guards only the JSON routes): set RERANKER_UI_AUTH to "
                        "user:password, or to a file of such lines, to require a login")
    if api and not settings.api_key:
        from web.middleware import LIMITED_PATHS

        routes = ", ".join(sorted(LIMITED_PATHS))
        warnings.append(f"the JSON routes ({routes}) on {settings.host} are open to anyone "
                        "who can reach them: set RERANKER_API_KEY to require Authorization: Bearer <key>")
    return warnings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(reranker: Reranker, sock: socket.socket | None = None) -> int:
    """Serve the UI and API, on `sock` (bound to the configured port) or else on the configured host and port,
    until a signal (drain, exit 0) or a device fault (exit 1) stops it."""
    import metrics_server
    from web.http import create_app
    from web.lifecycle import Lifecycle
    from web.routes import package_versions

    model, settings = reranker.model, reranker.settings
    logger.info("model ready", extra={
        "model": model.model_id, "device": model.device, "backend": model.backend.name,
        "backend_reason": model.backend_reason, "dtype": model.dtype, "dtype_reason": model.dtype_reason,
        "compile": model.compiled,
        "max_length": model.max_length, "load_seconds": round(model.load_seconds, 3),
        "from_cache": model.from_cache, "batch_tokens": reranker.batch_tokens, "versions": package_versions(),
    })
    for warning in exposure_warnings(settings):
        logger.warning("%s", warning)
    lifecycle = Lifecycle()
    server = DrainingServer(uvicorn.Config(
        create_app(reranker, lifecycle=lifecycle), host=settings.host, port=settings.port,
        log_config=None,  # our JSON handlers on the root logger, not uvicorn's own
        timeout_graceful_shutdown=5,  # after the drain: only responses still being written remain
        timeout_keep_alive=settings.keep_alive_seconds,  # uvicorn's 5 s raced clients' own 5 s (reset requests)
    ), lifecycle, settings.drain_seconds)
    if sock is not None:
        try:  # here, not in uvicorn: a port another service listens on now (bound beside ours) is named, exit 1
            sock.listen(server.config.backlog)
        except OSError as err:
            error = metrics_server.port_error(err, settings.host, settings.port, serving="the UI and API",
                                              variable="RERANKER_PORT")
            logger.error("%s", error, extra={"error_type": "port"})
            return 1
    # uvicorn re-raises the stopping signal to the handler that was there before it. Make that one a
    # no-op so that a clean stop exits with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    threading.Thread(target=watch_faults, args=(reranker, server), name="fault-watch", daemon=True).start()
    # The bound port: RERANKER_PORT=0 takes a free one.
    logger.info("serving on http://%s:%d/", settings.host, sock.getsockname()[1] if sock else settings.port)
    server.run(sockets=None if sock is None else [sock])
    return 1 if server.fault else 0


class DrainingServer(uvicorn.Server):
    """uvicorn, whose first SIGTERM/SIGINT drains: new work gets 503, accepted work finishes within the
    drain time, then it stops. A second signal, or the deadline, stops it at once."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_seconds: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_seconds = drain_seconds
        self.fault: str | None = None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.lifecycle.stop()  # what is cancelled from here on was cut off by this stop
        await super().shutdown(sockets)
        # uvicorn leaves the requests that a forced stop (or its graceful timeout) cuts off to the closing event
        # loop, which cancels them without a word, and skips the app's lifespan: each then got a bare 500 and logged
        # a traceback. Cancel them while the server still answers (CutOff: 503), and end the lifespan.
        running = [task for task in self.server_state.tasks if not task.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=CUT_OFF_SECONDS)
        # uvicorn ran the lifespan's shutdown unless the stop was forced before it began.
        ended = getattr(self.lifespan, "shutdown_event", None)
        if ended is not None and not ended.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.lifespan.shutdown(), timeout=CUT_OFF_SECONDS)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.lifecycle.draining:
            logger.warning("second stop signal: exiting without waiting for accepted requests",
                           extra={"inflight": self.lifecycle.inflight})
            self.force_exit = self.should_exit = True
            return
        self.drain("stop signal received")

    def drain(self, reason: str) -> None:
        """Stop taking work now; stop serving once what was accepted is answered, or at the deadline."""
        self.lifecycle.begin_drain("the service is shutting down" if self.fault is None else
                                   "the scoring device failed; the service is restarting")
        deadline = time.monotonic() + self.drain_seconds
        logger.info("draining: new requests get 503", extra={
            "reason": reason, "inflight": self.lifecycle.inflight, "drain_seconds": self.drain_seconds})

        def finish() -> None:
            idle = self.lifecycle.wait_idle(deadline)
            if self.force_exit:  # a second signal, which said so: what it cut off was not answered
                return
            if idle:
                logger.info("drained: every accepted request was answered")
            else:
                logger.warning("drain deadline reached with requests still in flight",
                               extra={"inflight": self.lifecycle.inflight})
                self.force_exit = True
            self.should_exit = True

        threading.Thread(target=finish, name="drain", daemon=True).start()


def watch_faults(reranker: Reranker, server: DrainingServer, interval: float = 0.5) -> None:
    """A dead worker or a poisoned device cannot recover in-process: answer what can be, then exit 1."""
    while not server.should_exit:
        fault = reranker.fault
        if fault is not None and not server.lifecycle.draining:
            logger.error("scoring device fault: stopping so that the orchestrator restarts the service",
                         extra={"error_type": "device_fault", "cause": fault})
            server.fault = fault
            server.drain("device fault")
            return
        time.sleep(interval)


if __name__ == "__main__":
    sys.exit(main())
