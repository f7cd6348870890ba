"""Entry point: settings -> logging -> engine -> FastAPI routes + Gradio UI -> uvicorn."""

from __future__ import annotations

import logging
import os
import signal
import sys

# Defaults before gradio or huggingface_hub are imported: nothing phones home unless asked to.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

logger = logging.getLogger("reranker.app")


def main() -> int:
    """Run the service until SIGINT/SIGTERM; return the process exit status."""
    from reranker import ModelLoadError, Reranker, Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        reranker = Reranker.from_settings(settings)
    except ModelLoadError as err:
        logger.error("model load failed: %s", err)
        print(f"error: {err}", file=sys.stderr)
        return 1

    import uvicorn

    from web.http import create_app

    try:
        app = create_app(reranker)
        logger.info("serving on http://%s:%d/", settings.host, settings.port)
        server = uvicorn.Server(uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
            timeout_graceful_shutdown=5,
        ))
        # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler
        # that was there before it. Make that one a no-op so a clean stop exits with status 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: None)
        server.run()
    finally:
        reranker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
