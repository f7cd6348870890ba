"""A replica's settings: its process environment with the application's `args.env` on top."""

from __future__ import annotations

import os
from collections.abc import Mapping

from reranker.settings import Settings


def replica_settings(environ: Mapping[str, str] | None) -> Settings:
    """Settings from this replica's environment under `environ` (serve.yaml's `args.env`). The OTEL_* variables
    of `environ` are put into the process environment as well, where the OpenTelemetry SDK reads them: before,
    an endpoint given there turned tracing on while the exporter sent to the SDK's default endpoint."""
    overlay = {str(name): str(value) for name, value in (environ or {}).items()}
    os.environ.update({name: value for name, value in overlay.items() if name.startswith("OTEL_")})
    return Settings.from_env({**os.environ, **overlay})
