"""The preStop hook of a KubeRay pod (deploy/ray/rayservice.yaml): drain this Ray node before Kubernetes stops it.

    python -m deploy.ray.drain --deadline-s 50

A deleted pod's `ray start --block` does not wait for the Serve replicas on it: without this hook, the requests its
ingress and proxy hold are lost. The hook asks Ray's GCS to drain the node (`ray drain-node`, reason preemption, with
the hook's own deadline) and Serve then, in Ray 2.60:

- starts a replacement of each replica on this node on another node, and stops the old one gracefully
  (graceful_shutdown_timeout_s: its accepted requests finish) once the replacement runs, or in time to be stopped by
  the deadline, whichever comes first;
- puts this node's proxy in DRAINING: its /-/healthz answers 503, so KubeRay takes the pod out of the Serve Service
  and it gets no new connections, while the requests in flight on it finish. The controller takes the proxy as
  DRAINED once it has drained for RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S (30 s by default) and has no request in
  flight.

The hook waits, until the deadline, for the Serve controller to see no replica on the node and its proxy DRAINED (or
gone), then returns, and Kubernetes stops the pod. It prints one JSON line per step (Kubernetes shows a hook's output
only in a FailedPreStopHook event); it exits 1 only when the drain could not be asked for.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from reranker.logs import setup_logging

logger = logging.getLogger(__name__)

# What the Serve controller sees on a node: its replicas (app:deployment:id) and its proxy's status (None: none).
NodeState = tuple[list[str], str | None]


def node_state(node_id: str) -> NodeState:
    """The replicas the Serve controller places on the node, in any state (a stopping one too), and its proxy's
    status: the controller's own view, as `serve status` and the dashboard read it."""
    from ray.serve.context import _get_global_client  # what serve.status() reads, with each replica's node
    from ray.serve.schema import ServeInstanceDetails

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return [], None
    details = ServeInstanceDetails(**client.get_serve_details())
    replicas = [f"{app}:{name}:{replica.replica_id}" for app, application in details.applications.items()
                for name, deployment in application.deployments.items() for replica in deployment.replicas
                if replica.node_id == node_id]
    proxy = details.proxies.get(node_id)
    return replicas, None if proxy is None else proxy.status.value


def wait_drained(node_id: str, deadline: float, poll_s: float,
                 state: Callable[[str], NodeState] = node_state) -> bool:
    """Poll until the node has no replica and its proxy is DRAINED or gone (True), or `deadline` (time.monotonic())
    passes (False). A poll that fails (the controller restarting) is said and retried."""
    replicas: list[str] = []
    proxy: str | None = None
    while time.monotonic() < deadline:
        try:
            replicas, proxy = state(node_id)
        except Exception as err:  # the hook keeps the pod until the deadline whatever one poll meets
            logger.warning("could not read Serve's state", extra={"error": repr(err)[:300]})
        else:
            if not replicas and proxy in (None, "DRAINED"):
                return True
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))
    logger.warning("deadline passed before the node drained",
                   extra={"node_id": node_id, "replicas_left": replicas, "proxy": proxy})
    return False


def request_drain(address: str, node_id: str, seconds: int, reason: str) -> subprocess.CompletedProcess[str]:
    """`ray drain-node` for the node: Ray's own command, the call its autoscaler makes before it removes a node."""
    command = [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", address, "--node-id", node_id,
               "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", reason,
               "--deadline-remaining-seconds", str(seconds)]
    return subprocess.run(command, capture_output=True, text=True, timeout=max(1, seconds), check=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deadline-s", type=int, default=50,
                        help="how long the node may take to drain: below the pod's terminationGracePeriodSeconds")
    parser.add_argument("--address", default="auto", help="the cluster's GCS address (default: this node's cluster)")
    parser.add_argument("--node-id", default=None, help="the node to drain (default: the node of this pod)")
    parser.add_argument("--poll-s", type=float, default=1.0)
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.deadline_s  # one clock for the hook and the drain it asks for
    setup_logging()  # the project's JSON lines, on stdout

    import ray

    ray.init(address=args.address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        context = ray.get_runtime_context()
        node_id = args.node_id or context.get_node_id()
        left = int(deadline - time.monotonic())
        try:
            asked = request_drain(context.gcs_address, node_id, left, "the pod is terminating (preStop hook)")
        except subprocess.TimeoutExpired:
            logger.error("drain not asked: ray drain-node did not answer in time", extra={"node_id": node_id})
            return 1
        if asked.returncode != 0:
            logger.error("drain refused",
                         extra={"node_id": node_id, "error": (asked.stderr or asked.stdout).strip()[-500:]})
            return 1
        logger.info("draining", extra={"node_id": node_id, "deadline_s": left})
        if wait_drained(node_id, deadline, args.poll_s):
            logger.info("drained", extra={"node_id": node_id,
                                          "seconds": round(args.deadline_s - (deadline - time.monotonic()), 1)})
        return 0
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
