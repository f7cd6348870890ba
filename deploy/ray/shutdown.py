"""The launcher's stop (`python -m deploy.ray`): on the first SIGTERM or SIGINT the config's applications drain as one
process does, then Serve stops; a second signal answers what the ingress and UI replicas still hold 503 and stops
sooner; a third stops at once. On a cluster (RAY_ADDRESS) only the config's applications are deleted. Also `log`,
the launcher's JSON line."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


def log(level: str, message: str, **fields: Any) -> None:
    """One JSON line on stderr, as the replicas log (logging is Ray's and Serve's in this process). The whole line
    goes to the file descriptor in one write: print wrote the text and its newline apart, and Ray's thread that
    prints the replicas' log lines on the same stream got in between (a test read a JSON line run into Ray's)."""
    line = json.dumps({"level": level, "logger": "deploy.ray", **fields, "message": message[:4000]}) + "\n"
    data = line.encode()
    while data:
        data = data[os.write(sys.stderr.fileno(), data):]


# A second signal: how long the ingress and UI replicas get to answer what they hold 503 (they look 4 times a second).
CUT_WAIT_S = 3.0

# The deployments that take requests from Serve's proxies and drain on the announcement (deploy/ray/stopping.py).
FRONT_DEPLOYMENTS = ("Ingress", "UI")


def front_replicas(apps: Sequence[str]) -> set[str]:
    """`app/replica_id` of every running ingress and UI replica of `apps`."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    details = client.get_serve_details() if client is not None else {}
    found = set()
    for app in apps:
        deployments = ((details.get("applications") or {}).get(app) or {}).get("deployments") or {}
        for name in FRONT_DEPLOYMENTS:
            for replica in (deployments.get(name) or {}).get("replicas") or []:
                if replica.get("state") == "RUNNING":
                    found.add(f"{app}/{replica['replica_id']}")
    return found


def drain_fronts(apps: list[str], drain_seconds: float) -> None:
    """Announce the drain and wait until every ingress and UI replica has answered what it holds (those still
    waiting for a busy model replica included) or `drain_seconds` have passed; new requests meanwhile get one
    process's 503 with Retry-After."""
    from deploy.ray.stopping import announce_drain, inflight_reports

    fronts = front_replicas(apps)
    announce_drain(apps)
    log("INFO", "draining: new requests get 503; the ingress answers what it holds",
        applications=apps, replicas=len(fronts), drain_seconds=drain_seconds)
    if not until_fronts_idle(apps, fronts, drain_seconds + 2.0, 0.25):  # the replicas look once a second
        log("WARNING", "drain deadline reached with requests still in flight at the ingress",
            inflight=inflight_reports(apps))


def until_fronts_idle(apps: list[str], fronts: set[str], seconds: float, period_s: float = 0.1) -> bool:
    """Wait until every one of `fronts` reports nothing in flight, for `seconds` at most; whether they did."""
    from deploy.ray.stopping import inflight_reports

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reports = inflight_reports(apps)
        if all(reports.get(front) == 0 for front in fronts):
            return True
        time.sleep(period_s)
    return False


def running_applications(names: Sequence[str]) -> list[str]:
    """Those of `names` that Serve runs (a shared cluster's others are not ours)."""
    from ray import serve

    return [name for name in serve.status().applications if name in names]


def drain_applications(names: Sequence[str], drain_seconds: float) -> None:
    """Drain the config's Serve applications (a shared cluster's others are not ours), then delete them and wait
    until they are gone: Serve stops routing to their replicas, which finish the requests they accepted (up to
    graceful_shutdown_timeout_s), and the proxies pass the answers on."""
    from ray import serve

    from deploy.ray.stopping import withdraw_drain

    running = running_applications(names)
    drain_fronts(running, drain_seconds)
    log("INFO", "draining: deleting the applications; their replicas finish what they accepted", applications=running)
    for name in running:
        serve.delete(name, _blocking=False)
    # Serve bounds each replica's stop by its graceful_shutdown_timeout_s.
    while any(name in names for name in serve.status().applications):
        time.sleep(0.5)
    withdraw_drain(running)


def drain_then_stop(names: Sequence[str], drain_seconds: float, *, remote: bool) -> Callable[[int, object], None]:
    """The handler of the first SIGTERM or SIGINT: drain `names`, then end `serve run`. On our own Ray, by
    KeyboardInterrupt, on which `serve run` shuts Serve down and Ray stops with this process; on a cluster
    (RAY_ADDRESS), by SystemExit(0), which `serve run` does not catch: its serve.shutdown() would stop every
    application on the cluster. A second signal interrupts the drain (cut_then_stop)."""
    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, cut_then_stop(names, remote=remote))
        signal.signal(signal.SIGINT, cut_then_stop(names, remote=remote))
        try:
            drain_applications(names, drain_seconds)
        except Exception as err:  # the controller gone already: nothing left to drain
            log("WARNING", f"drain failed: {type(err).__name__}: {err}")
        if remote:
            raise SystemExit(0)
        raise KeyboardInterrupt

    return handler


def cut_then_stop(names: Sequence[str], wait_s: float = CUT_WAIT_S, *, remote: bool = False
                  ) -> Callable[[int, object], None]:
    """The handler of a second signal, as one process's: what the ingress and UI replicas still hold is answered
    503 `shutting_down` (announce_cut), for up to `wait_s`, and then the drain is interrupted and Serve stops. Before,
    the proxies stopped at once and every client still waiting saw its connection closed without an answer. A
    third signal stops at once. On a cluster (`remote`) only the config's applications are deleted, unwaited, and
    the process exits 1, there as on a third signal: `serve run`'s KeyboardInterrupt path would shut Serve down for
    every application on the cluster."""
    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, exit_now if remote else signal.default_int_handler)
        signal.signal(signal.SIGINT, exit_now if remote else signal.default_int_handler)
        running = list(names)
        try:
            from deploy.ray.stopping import announce_cut

            running = running_applications(names)
            fronts = front_replicas(running)
            announce_cut(running)
            log("WARNING", "second signal: what the ingress holds is answered 503, then "
                + ("its applications are deleted" if remote else "Serve stops"), applications=running)
            until_fronts_idle(running, fronts, wait_s)
        except Exception as err:  # the controller gone already: nothing left to answer
            log("WARNING", f"cut-off failed: {type(err).__name__}: {err}")
        finally:  # also when a third signal (exit_now) ends the wait: nothing of ours is left running there
            if remote:
                delete_applications(running)
        if remote:
            raise SystemExit(1)
        raise KeyboardInterrupt

    return handler


def delete_applications(names: Sequence[str]) -> None:
    """Ask Serve to delete `names`, without waiting for their replicas to stop."""
    from ray import serve

    for name in names:
        try:
            serve.delete(name, _blocking=False)
        except Exception as err:  # the controller gone already
            log("WARNING", f"could not delete {name}: {type(err).__name__}: {err}")


def exit_now(signum: int, frame: object) -> None:
    """A third signal on a cluster: end this process and nothing on the cluster."""
    raise SystemExit(1)
