"""Entry point: settings -> logging -> metrics server -> engine -> FastAPI routes + Gradio UI -> uvicorn."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reranker import Reranker

logger = logging.getLogger("reranker.app")

# Set before gradio or huggingface_hub are imported (in main): nothing phones home or draws progress bars.
QUIET_DEFAULTS = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


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
        # Up before the model loads, so that load time and load failures can be scraped.
        metrics_handle = metrics_server.start(registry, settings.metrics_host, settings.metrics_port)
    except metrics_server.MetricsPortError as err:
        logger.error("%s", err, extra={"error_type": "metrics_port"})
        return 1
    logger.info("metrics on http://%s:%d/metrics", settings.metrics_host, metrics_handle.port)
    try:
        tracing = Tracing.from_settings(settings, metrics)
    except Exception as err:  # an OTEL_* value the exporter cannot use
        logger.error("tracing setup failed: %s", err, extra={"error_type": "configuration"})
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
            serve(reranker)
        finally:
            reranker.close()
    finally:
        tracing.shutdown()  # after the worker's last batch spans; bounded, whatever the collector does
        metrics_handle.stop()
    return 0


def serve(reranker: Reranker) -> None:
    """Serve the UI and API until a signal asks to stop."""
    import uvicorn

    from web.http import create_app
    from web.routes import package_versions

    model, settings = reranker.model, reranker.settings
    logger.info("model ready", extra={
        "model": model.model_id, "device": model.device, "dtype": model.dtype, "max_length": model.max_length,
        "load_seconds": round(model.load_seconds, 3), "batch_tokens": reranker.batch_tokens,
        "versions": package_versions(),
    })
    if settings.api_key and settings.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("RERANKER_API_KEY guards the JSON routes only; the Gradio UI and Gradio API on "
                       "%s are open: put them behind your proxy's authentication", settings.host)
    server = uvicorn.Server(uvicorn.Config(
        create_app(reranker), host=settings.host, port=settings.port,
        log_config=None,  # our JSON handlers on the root logger, not uvicorn's own
        timeout_graceful_shutdown=5,
    ))
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler that
    # was there before it. Make that one a no-op so that a clean stop exits with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    logger.info("serving on http://%s:%d/", settings.host, settings.port)
    server.run()


if __name__ == "__main__":
    sys.exit(main())
