"""A replica's settings: its process environment with the application's `args.env` on top."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence

from reranker.settings import Settings

logger = logging.getLogger("reranker.ray")


def replica_settings(environ: Mapping[str, str] | None) -> Settings:
    """Settings from this replica's environment under `environ` (serve.yaml's `args.env`). The OTEL_* variables
    of `environ` are put into the process environment as well, where the OpenTelemetry SDK reads them: before,
    an endpoint given there turned tracing on while the exporter sent to the SDK's default endpoint."""
    overlay = {str(name): str(value) for name, value in (environ or {}).items()}
    os.environ.update({name: value for name, value in overlay.items() if name.startswith("OTEL_")})
    return Settings.from_env({**os.environ, **overlay})


def on_assigned_device(settings: Settings, gpu_ids: Sequence[object]) -> Settings:
    """A model replica's settings for the GPUs Ray assigned it (`ray.get_gpu_ids()`). With none (`num_gpus: 0`),
    RERANKER_DEVICE=auto is the CPU: Ray 2.60 leaves CUDA_VISIBLE_DEVICES as it is for a replica without GPUs, so
    `auto` found the node's GPUs and every such replica of a GPU node loaded onto cuda:0, outside Ray's accounting.
    An explicit `cuda` is kept, with a warning."""
    if gpu_ids:
        return settings
    if settings.device == "auto":
        from reranker.devices import cuda_available

        if cuda_available():
            logger.warning("Ray assigned this replica no GPU (num_gpus: 0), so it runs on the CPU though this node "
                           "has a GPU; set the model deployment's ray_actor_options.num_gpus (1, or a fraction) to "
                           "use it", extra={"device": "cpu"})
        return dataclasses.replace(settings, device="cpu")
    if settings.device.startswith("cuda"):
        logger.warning("RERANKER_DEVICE names a GPU but Ray assigned this replica none (num_gpus: 0): it uses a GPU "
                       "Ray does not account for, which other replicas may share; set the model deployment's "
                       "ray_actor_options.num_gpus (1, or a fraction) instead", extra={"device": settings.device})
    return settings
