"""The application builder `serve run` and serve.yaml name: `deploy.ray.app:build`."""

from __future__ import annotations

from typing import Any, cast

from ray.serve import Application, Deployment

from deploy.ray.ingress import Ingress
from deploy.ray.model import RerankModelDeployment


def build(args: dict[str, Any] | None = None) -> Application:
    """The ingress over the model deployment. `args` (serve.yaml's `args`): `env`, RERANKER_* and OTEL_* values
    laid over the replicas' environment (deploy/ray/environment.py; other libraries' variables belong in
    `runtime_env.env_vars`); `tries` and `deadline_s`, the ingress's retry bounds."""
    args = args or {}
    environ = {str(k): str(v) for k, v in (args.get("env") or {}).items()}
    # serve.deployment made Ingress a Deployment; its type hints keep it a class.
    model = RerankModelDeployment.bind(environ)
    return cast(Deployment, Ingress).bind(model, environ, int(args.get("tries", 3)),
                                          float(args.get("deadline_s", 60.0)))
