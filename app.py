"""Entry point: settings -> logging -> metrics server -> engine -> FastAPI routes + Gradio UI -> uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reranker import Reranker, Settings

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
        try:
            reranker = Reranker.from_settings(settings, metrics=metrics)
        except ModelLoadError as err:
            logger.error("model load failed: %s", err, extra={"error_type": "model_load"})
            return 1
        try:
            serve(reranker)
        finally:
            reranker.close()
    finally:
        metrics_handle.stop()
    return 0


def open_ui_warning(settings: Settings) -> str | None:
    """What to tell an operator who serves the Gradio UI beyond loopback without a login, else None."""
    if settings.ui_auth or _is_loopback(settings.host):
        return None
    return (f"the Gradio UI and Gradio API on {settings.host} are open to anyone who can reach it "
            "(RERANKER_API_KEY, if set, guards only the JSON routes): set RERANKER_UI_AUTH to user:password, or "
            "to a file of such lines, to require a login")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    warning = open_ui_warning(settings)
    if warning:
        logger.warning("%s", warning)
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
