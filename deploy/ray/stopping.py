"""When Serve starts stopping this replica: what the UI needs to drain as one process does on SIGTERM.

Ray 2.60 tells a deployment nothing before its `__del__`, and Serve calls that only after its own drain, once
every request open on the replica has ended. A browser tab keeps one open for as long as it is open (Gradio's
heartbeat stream), so a UI replica with a tab open would wait out its graceful_shutdown_timeout_s and then be
killed. The controller knows sooner: from the moment the stop begins, the replica is STOPPING in the details
that `serve.status()` reads (one call a second; the UI has one replica).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

logger = logging.getLogger("reranker.ray")

STOPPING = ("STOPPING", "STOPPED")


def replica_state(details: dict[str, Any], app: str, deployment: str, replica: str) -> str | None:
    """The replica's state in the controller's details (`ServeInstanceDetails` as a dict); "STOPPED" once its
    application or deployment is gone; None while the controller does not list it yet."""
    application = (details.get("applications") or {}).get(app)
    if application is None or deployment not in (application.get("deployments") or {}):
        return "STOPPED"
    for row in application["deployments"][deployment].get("replicas") or []:
        if row.get("replica_id") == replica:
            return str(row.get("state"))
    return None


def _state(app: str, deployment: str, replica: str) -> str | None:
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        raise LookupError("no Serve controller")
    # What serve.status() reads, replicas included (it keeps only their counts).
    return replica_state(client.get_serve_details(), app, deployment, replica)


async def until_stopping(period_s: float = 1.0) -> None:
    """Return once Serve has begun stopping the calling replica (its deployment's update, downscaling, its
    application's deletion, Serve's shutdown)."""
    context = serve.get_replica_context()
    app, deployment, replica = context.app_name, context.deployment, context.replica_id.unique_id
    while True:
        await asyncio.sleep(period_s)
        try:
            # A blocking call to the controller: off the replica's event loop.
            state = await asyncio.to_thread(_state, app, deployment, replica)
        except Exception as err:  # the controller restarting, or gone at shutdown: Serve's own drain remains
            logger.debug("replica state unknown", extra={"error": type(err).__name__})
            continue
        if state in STOPPING:
            return
