"""The preStop hook of a KubeRay pod (deploy/ray/rayservice.yaml): drain this Ray node before Kubernetes stops it.

    python -m deploy.ray.drain --deadline-s 50

A deleted pod's `ray start --block` does not wait for the Serve replicas on it: without this hook, the requests its
ingress and proxy hold are lost. The hook asks Ray's GCS to drain the node (`ray drain-node`, reason preemption, the
deadline from now) and Serve then, in Ray 2.60:

- starts a replacement of each replica on this node on another node, and stops the old one once it runs, gracefully
  (graceful_shutdown_timeout_s: its accepted requests finish);
- puts this node's proxy in DRAINING: its /-/healthz answers 503, so KubeRay takes the pod out of the Serve Service
  and it gets no new connections, while the requests in flight on it finish.

The hook waits, until the deadline, for no Serve replica left on the node and the proxy DRAINED (no request in flight
for RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S, 30 s by default), then returns, and Kubernetes stops the pod. It prints
one JSON line per step; it exits 1 only when the GCS refused the drain.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPLICA_TITLE = b"ServeReplica:"  # the process title Ray gives a Serve replica (ray::ServeReplica:<app>:<deployment>)


def say(event: str, **fields: object) -> None:
    print(json.dumps({"message": event, "logger": "deploy.ray.drain", **fields}), flush=True)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def replicas_on(node_id: str) -> list[int]:
    """The Serve replica processes of the node: those under its raylet (the one naming the node id on its command
    line). None once that raylet is gone (a drained node's raylet may end itself; its workers end with it). Where no
    raylet is seen at all, every replica process here: a pod holds one Ray node."""
    tree = _children()
    raylets = [pid for pids in tree.values() for pid in pids if b"raylet" in _cmdline(pid).split(b"\0")[0]]
    if not raylets:
        return [pid for pids in tree.values() for pid in pids if REPLICA_TITLE in _cmdline(pid)]
    found, todo = [], [pid for pid in raylets if f"--node_id={node_id}".encode() in _cmdline(pid)]
    while todo:
        for child in tree.get(todo.pop(), []):
            todo.append(child)
            if REPLICA_TITLE in _cmdline(child):
                found.append(child)
    return found


def request_drain(address: str | None, node_id: str, deadline_s: int, reason: str) -> subprocess.CompletedProcess[str]:
    """`ray drain-node` for the node: Ray's own command, as its autoscaler drains a node it is about to remove."""
    command = [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--node-id", node_id,
               "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", reason,
               "--deadline-remaining-seconds", str(deadline_s)]
    if address:
        command += ["--address", address]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deadline-s", type=int, default=50,
                        help="how long the node may take to drain: below the pod's terminationGracePeriodSeconds")
    parser.add_argument("--address", default=None, help="the cluster's GCS address (default: this node's cluster)")
    parser.add_argument("--node-id", default=None, help="the node to drain (default: the node of this pod)")
    parser.add_argument("--poll-s", type=float, default=1.0)
    args = parser.parse_args(argv)
    started = time.monotonic()

    import ray
    from ray import serve

    ray.init(address=args.address or "auto", logging_level=logging.WARNING, log_to_driver=False)
    try:
        node_id = args.node_id or ray.get_runtime_context().get_node_id()
        reason = f"pod {os.environ.get('HOSTNAME', '?')} is terminating (preStop)"
        drained = request_drain(args.address, node_id, args.deadline_s, reason)
        if drained.returncode != 0:
            say("drain refused", node_id=node_id, error=(drained.stderr or drained.stdout).strip()[-500:])
            return 1
        say("draining", node_id=node_id, deadline_s=args.deadline_s)
        replicas, proxy = replicas_on(node_id), None
        while time.monotonic() - started < args.deadline_s:
            replicas = replicas_on(node_id)
            proxy = serve.status().proxies.get(node_id)
            if not replicas and proxy in (None, "DRAINED"):
                say("drained", node_id=node_id, seconds=round(time.monotonic() - started, 1))
                return 0
            time.sleep(args.poll_s)
        say("deadline passed before the node drained", node_id=node_id, replicas_left=len(replicas),
            proxy=None if proxy is None else str(proxy))
        return 0
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
