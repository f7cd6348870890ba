"""`python -m deploy.ray [CONFIG]` (what `./start.sh --ray` runs): `serve run` of deploy/ray/serve.yaml, drained by
SIGTERM or Ctrl-C.

Without RAY_ADDRESS it starts a one-node Ray of its own, as `serve run` would, but kept to loopback (node address
127.0.0.1), without the dashboard, and with a token for this run only: a local Ray otherwise saves a new one in
~/.ray. RERANKER_HOST and RERANKER_PORT, when set, replace serve.yaml's `http_options` host and port (as they
name the single-process server's address); RERANKER_RAY_METRICS_PORT (8080) is the port of the node's metrics
agent, which exports every replica's metrics for Prometheus. Its Ray offers at least the logical CPUs the config's
replicas claim at most (autoscaled, and a rolling update's surge replica), so that neither waits for ever on a
small host. Served beyond loopback without a login, it warns as ./start.sh does.

On SIGTERM or SIGINT the config's applications drain first, as one process does: their ingress and UI replicas
answer new requests 503 with Retry-After and /readyz 503, and answer what they hold, those still waiting for a
busy model replica included, within RERANKER_DRAIN_SECONDS (deploy/ray/stopping.py). Then the applications are
deleted while Serve's proxies still serve: every replica finishes what it accepted (graceful_shutdown_timeout_s)
and the answers reach their clients. Then, on its own Ray, `serve run` shuts Serve down and Ray stops every
process it started; on a cluster (RAY_ADDRESS) it just exits, leaving Serve and any other application running.
A second signal skips the wait. (`serve run`'s own Ctrl-C shuts the proxies down with the replicas, cutting the
requests in flight, and on a cluster shuts down every application.)

A start that cannot work ends the process, as ./start.sh's does, instead of leaving Serve retrying replicas
forever: a RERANKER_* value the service cannot use exits 2 before Ray starts, and an application that Serve
gives up deploying (DEPLOY_FAILED: a model that cannot be loaded, say) is drained and exits 1 with Serve's
message.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from deploy.ray.shutdown import drain_then_stop, log

if TYPE_CHECKING:
    from reranker.settings import Settings

DEFAULT_CONFIG = "deploy/ray/serve.yaml"
DEFAULT_METRICS_PORT = 8080  # KubeRay's metrics port too
UI_IMPORT_PATH = "deploy.ray.ui:build"  # the application serving the Gradio UI; the others serve the JSON routes


# Read by this launcher from its own environment; in an application's args.env no replica reads them.
LAUNCHER_ONLY = {
    "RERANKER_HOST": "set it where python -m deploy.ray runs, or serve.yaml's http_options.host",
    "RERANKER_PORT": "set it where python -m deploy.ray runs, or serve.yaml's http_options.port",
    "RERANKER_RAY_METRICS_PORT": "set it where python -m deploy.ray runs",
}


class ConfigError(ValueError):
    """A start that cannot go on: a RERANKER_HOST/RERANKER_PORT override that cannot apply, or a cluster whose own
    Serve applications `serve run` would delete."""


def with_address(config: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """`config` with RERANKER_HOST/RERANKER_PORT, where set, as its proxies' host and port. As Settings reads
    them: surrounding spaces are dropped, and a blank value is unset."""
    http = dict(config.get("http_options") or {})
    if host := environ.get("RERANKER_HOST", "").strip():
        http["host"] = host
    if raw := environ.get("RERANKER_PORT", "").strip():
        if not _port_number(raw) or int(raw) > 65535:
            raise ConfigError(f"RERANKER_PORT={raw!r} is not valid; use a port number from 0 to 65535")
        http["port"] = int(raw)
    return {**config, "http_options": http}


def _port_number(raw: str) -> bool:
    """Whether `raw` is a port's worth of ASCII digits ("²" is a digit to str.isdigit and no number to int; int()
    refuses over 4300 digits)."""
    return raw.isascii() and raw.isdigit() and len(raw) <= 5


def cpus_needed(config: Mapping[str, Any]) -> float:
    """Logical CPUs the config's replicas claim at most: every deployment at its most replicas (autoscaling's
    max_replicas, else num_replicas), plus the replicas a rolling update starts first (max_surge_percent)."""
    total = 0.0
    for application in config.get("applications") or []:
        for deployment in application.get("deployments") or []:
            autoscaling = deployment.get("autoscaling_config") or {}
            replicas = int(autoscaling.get("max_replicas") or deployment.get("num_replicas") or 1)
            surge = -(-int(deployment.get("max_surge_percent") or 0) * replicas // 100)  # Serve rounds it up
            per_replica = float((deployment.get("ray_actor_options") or {}).get("num_cpus", 1))
            total += per_replica * (replicas + surge)
    return total


def start_local_ray(environ: MutableMapping[str, str], num_cpus: float | None = None) -> None:
    """A one-node Ray on 127.0.0.1 for this process; Ray stops it when this process exits. `num_cpus`, when above
    the cores, is how many logical CPUs it offers instead (a replica's threads follow its own num_cpus)."""
    # Read when ray is imported: a one-node Ray takes 127.0.0.1, not the interface address, for every agent.
    environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    # Ray also exports each counter not named *_total as a deprecated gauge of its bare name (reranker_requests
    # beside reranker_requests_total): series one process has no twin of. Read by the node's metrics agent.
    environ.setdefault("RAY_EXPORT_COUNTER_AS_GAUGE", "0")
    import ray

    # A fixed port for the node's metrics agent (every replica's reranker_* and Ray's ray_serve_*), which
    # monitoring/prometheus-serve.yml's `ray` job scrapes; Ray would pick a random one.
    port = environ.get("RERANKER_RAY_METRICS_PORT", "").strip() or str(DEFAULT_METRICS_PORT)
    if not _port_number(port) or not 1 <= int(port) <= 65535:
        raise ConfigError(f"RERANKER_RAY_METRICS_PORT={port!r} is not valid; use a port number from 1 to 65535")
    cores = os.cpu_count() or 1
    if num_cpus is not None and num_cpus > cores:
        # Fewer, and a replica that autoscaling or a rolling update's surge asks for is never placed: autoscaling
        # stops short, and a rolling update, which stops an old replica only once its new one runs, never ends.
        log("INFO", f"a local Ray of {cores} cores offers {num_cpus:g} logical CPUs: what serve.yaml's replicas "
            "claim at most, autoscaled and during a rolling update", cores=cores, num_cpus=num_cpus)
    ray.init(namespace="serve", include_dashboard=False, _node_ip_address="127.0.0.1",
             _metrics_export_port=int(port), num_cpus=max(cores, math.ceil(num_cpus or 0)))


def app_settings(application: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    """An application's RERANKER_* as its replicas will read them: this environment (a local Ray's replicas
    inherit it; a remote cluster's have their own) under serve.yaml's `args.env`."""
    from reranker.settings import Settings

    base = {} if environ.get("RAY_ADDRESS") else environ
    return Settings.from_env({**base, **args_env(application)})


def args_env(application: Mapping[str, Any]) -> dict[str, str]:
    """An application's `args.env` in serve.yaml, as strings."""
    return {str(k): str(v) for k, v in ((application.get("args") or {}).get("env") or {}).items()}


def check_settings(config: dict[str, Any], environ: Mapping[str, str]) -> float:
    """Every application's settings (app_settings), each checked; returns the longest RERANKER_DRAIN_SECONDS."""
    from reranker.settings import SettingsError

    drain_seconds = 0.0
    for application in config.get("applications") or []:
        try:
            drain_seconds = max(drain_seconds, app_settings(application, environ).drain_seconds)
        except SettingsError as err:
            raise ConfigError(f"application {application.get('name')!r}: {err}") from None
    return drain_seconds


def failure(app: Any) -> str:
    """Serve's message for a DEPLOY_FAILED application, and the error of each deployment that failed to start: the
    last line of the traceback Serve keeps, where the constructor's own message is (a model that cannot be loaded
    says how to point RERANKER_MODEL at a local directory). Serve's application message names the deployments
    only, and the tracebacks went to its controller's plain-text log."""
    causes = []
    for name, deployment in app.deployments.items():
        lines = [line.strip() for line in str(deployment.message or "").splitlines() if line.strip()]
        if deployment.status == "DEPLOY_FAILED" and lines:
            causes.append(f"{name}: {lines[-1]}")
    return " ".join([app.message, *causes])


class DeployWatch:
    """Polls Serve until each of the config's applications `names` is RUNNING; if one is DEPLOY_FAILED instead,
    records Serve's message and sends this process SIGTERM, which drains what did deploy and ends `serve run`. A
    shared cluster's other applications are not ours: their failures stop nothing here."""

    def __init__(self, names: Sequence[str], period_s: float = 2.0) -> None:
        self.failure: str | None = None
        self._names = set(names)
        self._period_s = period_s
        self._thread = threading.Thread(target=self._watch, name="deploy-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _watch(self) -> None:
        from ray import serve

        while True:
            time.sleep(self._period_s)
            try:
                applications = {name: app for name, app in serve.status().applications.items() if name in self._names}
            except Exception:  # Serve not up yet, or shutting down
                continue
            failed = {name: failure(app) for name, app in applications.items() if app.status == "DEPLOY_FAILED"}
            if failed:
                self.failure = "; ".join(f"{name}: {message}" for name, message in failed.items())
                log("ERROR", f"deploying failed, stopping: {self.failure}", applications=sorted(failed))
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if len(applications) == len(self._names) and all(app.status == "RUNNING" for app in applications.values()):
                return


def replaced_applications(names: Sequence[str]) -> list[str]:
    """The applications a cluster runs from another Serve config (`serve deploy`, a RayService's serveConfigV2) that
    `serve run` of ours would delete: Serve keeps one declarative config per cluster, and applying a config deletes
    that config's applications it does not name."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:  # no Serve on the cluster yet
        return []
    applications = client.get_serve_details().get("applications") or {}
    return sorted(name for name, app in applications.items()
                  if name not in names and app.get("source") == "declarative")  # a str Enum, or its value


def exposure_warnings(config: Mapping[str, Any], environ: Mapping[str, str]) -> list[str]:
    """One process's warnings for routes served beyond loopback without a login, for the proxies' host and the
    replicas' settings (a local Ray's inherit this environment; a cluster's have their own, so none there)."""
    from app import exposure_warnings as warnings_for

    if environ.get("RAY_ADDRESS"):
        return []
    host = str((config.get("http_options") or {}).get("host") or "127.0.0.1")
    warnings, unguarded, with_login = [], [], []
    for application in config.get("applications") or []:
        name = str(application.get("name"))
        settings = dataclasses.replace(app_settings(application, environ), host=host)
        ui = application.get("import_path") == UI_IMPORT_PATH
        # Each application's own settings for what it serves. No metrics server of its own: every replica's
        # metrics go through the Ray node's agent.
        warnings += warnings_for(settings, metrics=False, ui=ui, api=not ui)
        if settings.ui_auth is not None:
            with_login.append(repr(name))
        elif ui or settings.api_key is None:  # the UI, or /api/predict with no key, left without the login
            unguarded.append(repr(name))
    if with_login and unguarded:
        warnings.append(f"RERANKER_UI_AUTH is set for application {', '.join(with_login)} but not for "
                        f"{', '.join(unguarded)}: the ui application's login guards the UI, and the reranker "
                        "application's guards /api/predict where RERANKER_API_KEY is unset; set it in the "
                        "environment (every replica of a local Ray inherits it) or in each application's args.env")
    return warnings


def unknown_settings(config: Mapping[str, Any], environ: Mapping[str, str]) -> list[str]:
    """A warning for each RERANKER_* variable nothing reads, as the single-process service gives: in this
    environment (a local Ray's replicas inherit it, and the launcher reads its address variables) and in each
    application's `args.env`."""
    from app import unknown_variables

    warnings = unknown_variables(environ)
    for application in config.get("applications") or []:
        env = args_env(application)
        warnings += [f"application {application.get('name')!r}, args.env: {warning}"
                     for warning in unknown_variables(env)]
        warnings += [f"application {application.get('name')!r}, args.env: {name} is read by this launcher from its "
                     f"own environment, not by a replica, and is ignored here; {LAUNCHER_ONLY[name]}"
                     for name in sorted(env.keys() & LAUNCHER_ONLY.keys())]
    return warnings


def serve_run(config_path: str, environ: MutableMapping[str, str]) -> None:
    """Run `serve run` on `config_path` (with the address overrides) until SIGTERM or SIGINT."""
    environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    config = with_address(yaml.safe_load(Path(config_path).read_text()), environ)
    drain_seconds = check_settings(config, environ)
    for warning in [*unknown_settings(config, environ), *exposure_warnings(config, environ)]:
        log("WARNING", warning)
    remote = bool(environ.get("RAY_ADDRESS"))
    names = [str(application["name"]) for application in config.get("applications") or []]
    if remote:
        import ray

        # Here, not in `serve run` (which skips its own ray.init then): ray.init replaces the SIGTERM handler.
        ray.init(address=environ["RAY_ADDRESS"], namespace="serve")
        replaced = replaced_applications(names)
        if replaced:
            raise ConfigError(
                f"the cluster at RAY_ADDRESS runs Serve applications from another config ({', '.join(replaced)}), "
                "which `serve run` would delete: a cluster has one Serve config. Add serve.yaml's applications to "
                "that config and deploy it (`serve deploy`, or the RayService's serveConfigV2), or delete those first")
    else:
        start_local_ray(environ, cpus_needed(config))
    # After ray.init, whose own SIGTERM handler exits without deleting the applications.
    from deploy.ray.stopping import withdraw_drain

    withdraw_drain(names)  # one left by a launcher that was killed mid-drain would drain the new replicas at once
    signal.signal(signal.SIGTERM, drain_then_stop(names, drain_seconds, remote=remote))
    signal.signal(signal.SIGINT, drain_then_stop(names, drain_seconds, remote=remote))
    from ray.serve.scripts import cli

    watch = DeployWatch(names)
    watch.start()
    with tempfile.TemporaryDirectory(prefix="reranker-serve-") as folder:
        path = Path(folder) / "serve.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        try:
            cli.main(["run", str(path)], prog_name="serve")
        finally:
            if watch.failure is not None:  # instead of `serve run`'s exit 0 after the drain
                raise DeployFailed(watch.failure)


class DeployFailed(RuntimeError):
    """An application that Serve gave up deploying."""


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        serve_run(args[0] if args else DEFAULT_CONFIG, os.environ)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except DeployFailed:
        sys.exit(1)


if __name__ == "__main__":
    main()
