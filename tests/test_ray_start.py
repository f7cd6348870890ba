"""`python -m deploy.ray` (what `./start.sh --ray` execs) end to end: serve.yaml as shipped, on a one-node Ray
of its own, answers on loopback (JSON routes and UI); SIGTERM stops it with exit status 0 and no Ray process
left, nor a ~/.ray."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="needs requirements-ray.txt")

import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402

from tests.ray_cluster import ROOT, alive, stop  # noqa: E402
from tests.servers import HANG_S, free_port, wait_ready  # noqa: E402


def session_members(sid: int) -> set[int]:
    """Every live process of session `sid`: Ray's daemons and actors stay in the session of the process that
    started them, whatever process group they take."""
    members = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                members.add(int(entry.name))
    return members


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def listeners(port: int) -> set[str]:
    """Local addresses listening on `port`, as /proc/net/tcp writes them (hex)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.add(local.rsplit(":", 1)[0])
    return found


def test_serve_yaml_runs_on_loopback_and_stops_on_sigterm(bert_dir: Path) -> None:
    port = free_port()
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    home_ray = Path.home() / ".ray"
    had_home_ray = home_ray.exists()
    env = {**os.environ, "RAY_TMPDIR": temp, "RERANKER_PORT": str(port), "RERANKER_MODEL": str(bert_dir),
           "RERANKER_DEVICE": "cpu", "RERANKER_DTYPE": "float32", "HF_HUB_OFFLINE": "1"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RERANKER_HOST"):
        env.pop(name, None)
    process = subprocess.Popen([sys.executable, "-m", "deploy.ray"], cwd=ROOT, env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started: set[int] = set()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout=2 * HANG_S)  # a Ray node, two deployments and a model load
        answer = httpx.post(f"{url}/v1/rerank", json={"query": "cache", "documents": ["a cache", "tea"]},
                            timeout=HANG_S)
        assert answer.status_code == 200 and len(answer.json()["results"]) == 2
        assert listeners(port) == {"0100007F"}, "serve.yaml's proxy listens on 127.0.0.1 only"
        deadline = time.monotonic() + HANG_S  # the UI is its own application: it may come up after /readyz
        while httpx.get(f"{url}/ui/", timeout=HANG_S).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "Monitoring" in httpx.get(f"{url}/ui/", timeout=HANG_S).text
        started = session_members(process.pid)
        assert len(started) > 5, "Ray's processes run in the session of the process that started them"
        # Ray's API server process runs either way; without the dashboard it serves no web UI.
        dashboards = [cmdline(pid) for pid in started if b"dashboard/dashboard.py" in cmdline(pid)]
        assert all(b"--disable-frontend" in line for line in dashboards), "the dashboard is off"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=HANG_S) == 0
        deadline = time.monotonic() + HANG_S  # Ray's own processes stop on their owner's exit, shortly after
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in started if alive(pid)], "Ray processes left after the exit"
    finally:
        if process.poll() is None:
            process.kill()
        stop(session_members(process.pid) | started)
        output, _ = process.communicate(timeout=HANG_S)
        shutil.rmtree(temp, ignore_errors=True)
    assert "Got KeyboardInterrupt, shutting down" in output, output[-3000:]
    assert had_home_ray or not home_ray.exists(), "a local Ray saved a token in ~/.ray"
