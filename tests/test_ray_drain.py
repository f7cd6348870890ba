"""The KubeRay preStop hook (deploy/ray/drain.py) on a real three-node Ray on loopback: under load, it drains a worker
node holding a model replica, Serve moves the replicas elsewhere, and the node then killed loses no request. The
proxies run on the head only: on one machine every node's proxy shares one port, so a client cannot keep to the
others while one drains; the hook's wait for a draining proxy is checked on its own."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="needs requirements-ray.txt")

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray._private.authentication_test_utils import reset_auth_token_state  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from deploy.ray.drain import node_state, wait_drained  # noqa: E402
from deploy.ray.remote import running_replicas  # noqa: E402
from tests.ray_cluster import ROOT, deploy, descendants, stop  # noqa: E402
from tests.ray_load import Load  # noqa: E402
from tests.servers import free_port  # noqa: E402
from tests.test_ray_serve import APP, MODEL, app_config, wait_for  # noqa: E402


@pytest.fixture(scope="module")
def nodes(bert_dir: Path) -> Iterator[tuple[Cluster, str, list[Any]]]:
    """A head with no CPUs (the controller and the one proxy) and two one-CPU workers, on loopback: the Serve app
    with its replicas on the workers; everything stopped by process id afterwards."""
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    (Path(temp) / "ray").mkdir()  # Cluster writes the cluster's address there
    # Ray's files under `temp`, and a token of its own (else a local Ray saves one in ~/.ray), as local_ray does.
    environ = {"RAY_TMPDIR": temp, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    saved = {name: os.environ.get(name) for name in environ}
    os.environ.update(environ)
    reset_auth_token_state()
    before = descendants(os.getpid())
    started: set[int] = set()
    cluster = None
    try:
        common: dict[str, Any] = {"node_ip_address": "127.0.0.1", "temp_dir": temp}
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **common})
        assert cluster.address.startswith("127.0.0.1:"), cluster.address  # loopback only
        workers = [cluster.add_node(num_cpus=1, **common) for _ in range(2)]
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        config = app_config(bert_dir)
        config["proxy_location"] = "HeadOnly"  # the clients' connections stay up while a worker goes
        for deployment in config["applications"][0]["deployments"]:
            deployment["ray_actor_options"]["num_cpus"] = 0.25  # all of them fit on one worker
        deploy(config, APP)
        started = descendants(os.getpid()) - before  # now: some are reparented once the cluster stops
        yield cluster, f"http://127.0.0.1:{port}", workers
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
            stop(started | (descendants(os.getpid()) - before))
            shutil.rmtree(temp, ignore_errors=True)
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            reset_auth_token_state()


def model_replicas_on(node: Any) -> int:
    """The model replicas the Serve controller places on the node."""
    return sum(replica.startswith(f"{APP}:{MODEL}:") for replica in node_state(node.node_id)[0])


def test_the_prestop_hook_drains_a_node_and_its_removal_loses_no_request(nodes: tuple[Cluster, str, list[Any]]
                                                                          ) -> None:
    cluster, url, workers = nodes
    wait_for(lambda: sum(model_replicas_on(worker) for worker in workers) == 2, 60, "both model replicas placed")
    victim = next(worker for worker in workers if model_replicas_on(worker))
    load = Load(url, clients=4, seed=5).start()
    try:
        wait_for(lambda: load.total >= 40, 60, "40 answers before the drain")
        hook = subprocess.run([sys.executable, "-m", "deploy.ray.drain", "--address", cluster.address,
                               "--node-id", victim.node_id, "--deadline-s", "90", "--poll-s", "0.5"],
                              cwd=ROOT, capture_output=True, text=True, timeout=150)
        lines = [json.loads(line) for line in hook.stdout.splitlines() if line.startswith("{")]
        assert hook.returncode == 0 and lines[-1]["message"] == "drained", (hook.stdout, hook.stderr[-2000:])
        assert node_state(victim.node_id) == ([], None) and running_replicas(APP, MODEL) == 2
        answered = load.total
        cluster.remove_node(victim)  # what Kubernetes does once the hook returns
        wait_for(lambda: load.total >= answered + 40, 60, "40 answers after the node went")
    finally:
        load.stop()
    assert load.failures == {}, load.failures
    assert running_replicas(APP, MODEL) == 2


def test_the_hook_waits_for_the_nodes_proxy_to_drain_and_gives_up_at_its_deadline() -> None:
    """The controller's view as the hook polls it: replicas leaving, then the proxy DRAINING until DRAINED."""
    views = iter([(["reranker:RerankModel:a", "reranker:Ingress:b"], "HEALTHY"), (["reranker:Ingress:b"], "DRAINING"),
                  ([], "DRAINING"), ([], "DRAINING"), ([], "DRAINED")])
    seen: list[Any] = []

    def state(node_id: str) -> Any:
        seen.append(node_id)
        view = next(views)
        if len(seen) == 2:
            raise ConnectionError("the controller is restarting")  # one failed poll is retried
        return view

    assert wait_drained("n1", time.monotonic() + 30, 0.01, state) and len(seen) == 5
    assert not wait_drained("n1", time.monotonic() + 0.1, 0.01, lambda node: ([], "DRAINING"))
    assert wait_drained("n1", time.monotonic() + 30, 0.01, lambda node: ([], None))  # a node with no proxy
