"""When a replica should drain as one process does on SIGTERM: Serve starts stopping it, or `python -m deploy.ray`
announces that it is about to delete the application.

Ray 2.60 tells a deployment nothing before its `__del__`, and Serve calls that only after its own drain, once
every request open on the replica has ended. A browser tab keeps one open for as long as it is open (Gradio's
heartbeat stream), so a UI replica with a tab open would wait out its graceful_shutdown_timeout_s and then be
killed. The controller knows sooner: from the moment the stop begins, the replica is STOPPING in the details
that `serve.status()` reads (one call a second; the UI and the ingress have one replica or few).

Deleting an application stops its ingress and its model replicas at once, so requests the ingress still had
waiting for a model replica (all of them busy) never got one, and new ones got the proxy's 404. So
`python -m deploy.ray` first announces the drain in Ray's key-value store (the GCS): the ingress and UI replicas
then refuse new work with one process's 503 and Retry-After, report what they still have in flight, and only when
that is nothing (or RERANKER_DRAIN_SECONDS have passed) does it delete the applications.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from ray import serve

from web.lifecycle import Lifecycle

if TYPE_CHECKING:
    from deploy.ray.remote import RemoteBackend

logger = logging.getLogger("reranker.ray")

STOPPING = ("STOPPING", "STOPPED")
NAMESPACE = "reranker"  # in Ray's key-value store


def kv_store() -> Any:
    from ray.experimental import internal_kv  # Ray's own key-value store in the GCS (what Serve keeps its state in)

    return internal_kv


def announce_drain(apps: list[str]) -> None:
    """From `python -m deploy.ray`, connected to the cluster: the applications' ingress and UI replicas drain."""
    for app in apps:
        kv_store()._internal_kv_put(f"drain/{app}", b"1", namespace=NAMESPACE)


def announce_cut(apps: list[str]) -> None:
    """From `python -m deploy.ray` on a second signal: the ingress and UI replicas answer everything they still hold
    503 `shutting_down` at once, as one process's second signal cuts off what it is serving."""
    for app in apps:
        kv_store()._internal_kv_put(f"cut/{app}", b"1", namespace=NAMESPACE)


def cut_announced(app: str) -> bool:
    return kv_store()._internal_kv_exists(f"cut/{app}", namespace=NAMESPACE)


def withdraw_drain(apps: list[str]) -> None:
    """After the applications are gone, so that the next deployment of the same names does not drain at once; and
    what its replicas left: cancelled calls one side claimed (deploy/ray/claims.py), Monitoring views (panel.py)."""
    kv = kv_store()
    for app in apps:
        kv._internal_kv_del(f"drain/{app}", namespace=NAMESPACE)
        kv._internal_kv_del(f"cut/{app}", namespace=NAMESPACE)
        kv._internal_kv_del(f"inflight/{app}/", del_by_prefix=True, namespace=NAMESPACE)
        kv._internal_kv_del(f"left/{app}/", del_by_prefix=True, namespace=NAMESPACE)  # deploy/ray/claims.py's
        kv._internal_kv_del(f"panel/{app}/", del_by_prefix=True, namespace=NAMESPACE)  # deploy/ray/panel.py's


def drain_announced(app: str) -> bool:
    return kv_store()._internal_kv_exists(f"drain/{app}", namespace=NAMESPACE)


def report_inflight(app: str, replica: str, count: int) -> None:
    kv_store()._internal_kv_put(f"inflight/{app}/{replica}", str(count).encode(), namespace=NAMESPACE)


def inflight_reports(apps: list[str]) -> dict[str, int]:
    """What each draining replica of `apps` last reported in flight, by `app/replica`."""
    kv, reports = kv_store(), {}
    for app in apps:
        for key in kv._internal_kv_list(f"inflight/{app}/", namespace=NAMESPACE):
            value = kv._internal_kv_get(key, namespace=NAMESPACE)
            if value is not None:
                reports[key.decode().removeprefix("inflight/")] = int(value)
    return reports


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


def _should_drain(app: str, deployment: str, replica: str, stopping: bool) -> bool:
    return drain_announced(app) or (stopping and _state(app, deployment, replica) in STOPPING)


async def until_stopping(period_s: float = 1.0, *, stopping: bool = True) -> None:
    """Return once a drain of the calling replica's application is announced or, with `stopping`, once Serve has
    begun stopping the replica (its deployment's update, downscaling, its application's deletion, Serve's
    shutdown)."""
    context = serve.get_replica_context()
    app, deployment, replica = context.app_name, context.deployment, context.replica_id.unique_id
    while True:
        await asyncio.sleep(period_s)
        try:
            # Blocking calls to the GCS and the controller: off the replica's event loop.
            if await asyncio.to_thread(_should_drain, app, deployment, replica, stopping):
                return
        except Exception as err:  # the controller restarting, or gone at shutdown: Serve's own drain remains
            logger.debug("replica state unknown", extra={"error": type(err).__name__})


async def drain(lifecycle: Lifecycle, reason: str, drain_seconds: float, period_s: float = 0.25) -> bool:
    """As one process on SIGTERM: new work gets 503 (lifecycle's DrainGate), and what is in flight finishes within
    `drain_seconds`; the count is reported for `python -m deploy.ray` to wait on, until it is nothing. False if the
    deadline passed, or a second signal came (announce_cut), with requests still in flight."""
    context = serve.get_replica_context()
    app, replica = context.app_name, context.replica_id.unique_id
    lifecycle.begin_drain(reason)
    logger.info("draining: new requests get 503", extra={"inflight": lifecycle.inflight,
                                                         "drain_seconds": drain_seconds})
    deadline = time.monotonic() + drain_seconds
    while True:
        count = await _report(lifecycle, app, replica)
        if not count:
            break
        if await _cut(app):  # a second signal: cut_off answers the rest
            return False
        if time.monotonic() >= deadline:
            logger.warning("drain deadline reached with requests still in flight: those no model replica holds get "
                           "503", extra={"inflight": lifecycle.inflight})
            return False
        await asyncio.sleep(period_s)
    logger.info("drained: every accepted request was answered")
    return True


async def _report(lifecycle: Lifecycle, app: str, replica: str) -> int:
    """Report what the replica holds (work accepted but not yet counted, such as events in the UI's Gradio queue,
    counts as one) for the launcher to wait on; the count."""
    count = 0 if lifecycle.idle else max(lifecycle.inflight, 1)
    try:
        await asyncio.to_thread(report_inflight, app, replica, count)
    except Exception as err:  # the GCS unreachable: the launcher's own deadline remains
        logger.debug("in-flight count not reported", extra={"error": type(err).__name__})
    return count


async def _cut(app: str) -> bool:
    try:
        return await asyncio.to_thread(cut_announced, app)
    except Exception:  # the GCS unreachable: no second signal can be heard
        return False


async def cut_off(lifecycle: Lifecycle, backend: RemoteBackend, drained: bool, period_s: float = 0.25,
                  report_s: float = 3.0) -> None:
    """After the drain: at its deadline (`drained` False) the calls still waiting for a model replica are answered
    503 `shutting_down`; on a second signal (announce_cut) every call the replica still holds is, and the count is
    reported until it is nothing, for the launcher to stop Serve on (at most `report_s`)."""
    context = serve.get_replica_context()
    app, replica = context.app_name, context.replica_id.unique_id
    if not drained:
        backend.cut_off_waiting(lifecycle.cut_off_error())
    while not await _cut(app):
        await asyncio.sleep(period_s)
    backend.cut_off_waiting(lifecycle.cut_off_error(), held_too=True)
    logger.warning("second signal: what is still in flight is answered 503", extra={"inflight": lifecycle.inflight})
    deadline = time.monotonic() + report_s
    while await _report(lifecycle, app, replica) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
