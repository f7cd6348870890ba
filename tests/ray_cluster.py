"""A local Ray cluster for tests: one node on loopback, no dashboard, no usage stats, stopped by process id.

Two switches Ray reads when it is imported, set here and in tests/conftest.py (which pytest imports before
any test module can import ray): RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes a one-node Ray take 127.0.0.1 as
its node address (it otherwise picks the machine's interface address, and its agents listen there), and
RAY_USAGE_STATS_ENABLED=0 keeps it from phoning home.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_EXPORT_COUNTER_AS_GAUGE"] = "0"  # as the launcher's local Ray (deploy/ray/__main__.py)

import json  # noqa: E402
import logging  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterable, Iterator, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray._private.authentication_test_utils import reset_auth_token_state  # noqa: E402
from ray.serve.context import _get_global_client  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from tests.servers import HANG_S, START_S, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class LocalRay:
    url: str  # Serve's HTTP proxy
    metrics_port: int  # the node's metrics agent: ray_serve_* and every ray.util.metrics metric
    pids: frozenset[int]  # Ray's processes when it was up
    temp: Path  # Ray's temp dir: session_latest/logs holds every worker's stdout


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def replica_pids(app: str, deployment: str) -> list[int]:
    """Processes of a deployment's replicas, found by the title Ray gives them."""
    title = f"ServeReplica:{app}:{deployment}".encode()
    pids = []
    for pid in descendants(os.getpid()):
        try:
            if title in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return pids


@contextmanager
def local_ray(env: dict[str, str], num_cpus: int = 8) -> Iterator[LocalRay]:
    """Ray and Serve on loopback with `env` in every worker's environment; everything stopped afterwards."""
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    before = descendants(os.getpid())
    metrics_port, http_port = free_port(), free_port()
    pids: frozenset[int] = frozenset()
    # A local Ray turns token authentication on and saves a new token in ~/.ray unless it is given one.
    token = os.environ.get("RAY_AUTH_TOKEN")
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # Ray caches the token it read first: a second cluster in this process (another test module) would be
    # refused by its own GCS without this.
    reset_auth_token_state()
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp,
                 _metrics_export_port=metrics_port, log_to_driver=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), **env}})
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        pids = frozenset(descendants(os.getpid()) - before)
        yield LocalRay(f"http://127.0.0.1:{http_port}", metrics_port, pids, Path(temp))
    finally:
        started = (descendants(os.getpid()) - before) | pids
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            stop(started)
            shutil.rmtree(temp, ignore_errors=True)
            if token is None:
                del os.environ["RAY_AUTH_TOKEN"]
            else:
                os.environ["RAY_AUTH_TOKEN"] = token


def stop(pids: set[int], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is left after `grace` seconds; each process by its id."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            if alive(pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in pids:  # reap our own children
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def deploy(config: dict[str, Any], app: str, timeout: float = START_S) -> None:
    """Deploy a serve.yaml-shaped config (as `serve run` does) and wait until `app` is RUNNING."""
    client = _get_global_client()  # what `serve run` deploys a config file through
    assert client is not None
    client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            why = "; ".join(f"{name}: {d.message}" for name, d in status.deployments.items() if d.message)
            raise RuntimeError(f"{app} failed to deploy: {status.message} {why}")
        time.sleep(0.5)
    raise TimeoutError(f"{app} not running after {timeout} s: {serve.status().applications.get(app)}")


def worker_log_lines(cluster: LocalRay, pid: int | None = None) -> list[dict[str, Any]]:
    """Every JSON line the workers (replicas), or the one of process `pid`, wrote to stdout so far."""
    return json_log_lines((cluster.temp / "session_latest" / "logs").glob(f"worker-*-{pid or '*'}.out"))


def json_log_lines(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """The JSON lines of the log files `paths`, in order; other lines are skipped."""
    lines = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    continue
    return lines


def faulty_app(args: dict[str, Any] | None = None) -> Any:
    """deploy.ray.app:build (serve.yaml's import_path), but each model replica can be told `fail_device()`: what its
    batcher does when the device fails every pass (a poisoned CUDA context) or its worker thread dies."""
    from typing import cast

    from ray.serve import Deployment

    from deploy.ray.ingress import Ingress
    from deploy.ray.model import RerankModel

    class FaultyModel(RerankModel):
        def fail_device(self) -> str:
            """Fail this replica's device as reranker/pipeline.py does on a fault; its replica id."""
            batcher = self.reranker._batcher
            batcher._device.fault = "the device failed (injected by the test)"
            batcher._on_fault(batcher._device.fault)
            return self.replica

    args = args or {}
    environ = {str(k): str(v) for k, v in (args.get("env") or {}).items()}
    model = serve.deployment(name="RerankModel")(FaultyModel).bind(environ)
    return cast(Deployment, Ingress).bind(model, environ, int(args.get("tries", 3)), float(args.get("deadline_s", 60)))


class FileGate:
    """Scores as `model` does, but each batch first creates `holding` in `directory`, then waits while `closed`
    is there: a test holds every replica's device from outside their processes (a handle call to the replica
    would queue behind the request it holds), so that "still running" is a state it sets, not a race against
    how fast the machine scores."""

    def __init__(self, model: Any, directory: Path) -> None:
        self.model = model
        self.directory = directory

    def __call__(self, batch: Sequence[Any]) -> Any:
        (self.directory / "holding").touch()
        (self.directory / f"holding-{os.getpid()}").touch()  # which replica holds one
        deadline = time.monotonic() + HANG_S  # frees the replica of a test that failed before opening the gate
        while (self.directory / "closed").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.model.score(batch)


@contextmanager
def device_held(directory: Path) -> Iterator[Path]:
    """Close the gate of gated_app's replicas for the block; yields the file that shows a batch is held (and
    `holding-<pid>` shows which replica holds one)."""
    for holding in directory.glob("holding*"):
        holding.unlink(missing_ok=True)
    (directory / "closed").touch()
    try:
        yield directory / "holding"
    finally:
        (directory / "closed").unlink(missing_ok=True)


def gated_app(args: dict[str, Any] | None = None) -> Any:
    """deploy.ray.app:build (serve.yaml's import_path), but every model replica's device passes through a
    FileGate on `args["gate"]`, a directory (see device_held)."""
    from typing import cast

    from ray.serve import Deployment

    from deploy.ray.ingress import Ingress
    from deploy.ray.model import RerankModel
    from reranker import Reranker
    from web.service import RerankService

    class GatedModel(RerankModel):
        def __init__(self, environ: dict[str, str], gate: str) -> None:
            super().__init__(environ)
            engine = self.reranker
            engine.close()
            self.reranker = Reranker(engine.model, engine.settings, metrics=self.metrics, tracing=self.tracing,
                                     score_fn=FileGate(engine.model, Path(gate)))
            self.service = RerankService(self.reranker)

    args = args or {}
    environ = {str(k): str(v) for k, v in (args.get("env") or {}).items()}
    model = serve.deployment(name="RerankModel")(GatedModel).bind(environ, str(args["gate"]))
    return cast(Deployment, Ingress).bind(model, environ, int(args.get("tries", 3)), float(args.get("deadline_s", 60)))
