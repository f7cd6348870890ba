"""With a local model directory, start-up and requests reach nothing but loopback (an audit hook watches).

The app runs as start.sh runs it (`python app.py` in the repository), without HF_HUB_OFFLINE and without
the telemetry switches, so the defaults in app.py (QUIET_DEFAULTS) are what is tested. tests/connect_audit.py,
installed as `sitecustomize`, logs every connect, datagram and name lookup of the process and refuses the
non-loopback ones; a control run shows it does catch one, so the test cannot pass vacuously.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import HANG_S, free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent
HOOK = Path(__file__).with_name("connect_audit.py")
# Set by conftest.py or test.sh for the rest of the suite; here they would hide what the app does by itself.
NOT_INHERITED = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "GRADIO_ANALYTICS_ENABLED",
                 "HF_HUB_DISABLE_TELEMETRY", "PYTHONPATH")

CONTROL = """
import os, socket, tempfile
for attempt in (lambda: socket.create_connection(("192.0.2.1", 9), timeout=0.01),  # TEST-NET-1
                lambda: socket.socket().connect(("192.0.2.1", 9)),
                lambda: socket.getaddrinfo("example.org", 443)):
    try:
        attempt()
    except OSError as err:
        print(type(err).__name__)
with socket.create_server(("127.0.0.1", 0)) as server:
    socket.socket().connect(server.getsockname())
path = os.path.join(tempfile.mkdtemp(), "s")
with socket.socket(socket.AF_UNIX) as server:
    server.bind(path)
    server.listen()
    socket.socket(socket.AF_UNIX).connect(path)
"""

@pytest.fixture
def audited(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose Python processes run the audit hook, and the file it writes to."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(HOOK, site / "sitecustomize.py")
    log = tmp_path / "network.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    env.update(PYTHONPATH=str(site), NETAUDIT_LOG=str(log))
    return env, log


def read_log(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


def test_the_hook_logs_and_refuses_non_loopback_use(audited: tuple[dict[str, str], Path]) -> None:
    env, log = audited
    done = subprocess.run([sys.executable, "-c", CONTROL], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["PermissionError"] * 3  # each refused before anything was sent
    seen = [(r["event"], r["address"], r["local"]) for r in read_log(log) if r["event"] != "start"]
    assert seen[:3] == [("socket.getaddrinfo", "192.0.2.1", False), ("socket.connect", ["192.0.2.1", 9], False),
                        ("socket.getaddrinfo", "example.org", False)]
    local = [(event, local) for event, _, local in seen[3:] if event == "socket.connect"]
    assert local == [("socket.connect", True), ("socket.connect", True)]  # loopback TCP, then a UNIX socket


# The default start, and one that converts the model for OpenVINO and quantizes it with NNCF: both libraries
# send usage events to Google Analytics on import and on conversion unless told no (reranker/backends).
@pytest.mark.parametrize("converts", [False, True], ids=["default", "openvino-convert-and-int8"])
def test_start_up_and_requests_reach_only_loopback(bert_dir: Path, audited: tuple[dict[str, str], Path],
                                                   converts: bool, tmp_path: Path) -> None:
    env, log = audited
    port, metrics_port = free_port(), free_port()
    env.update(RERANKER_MODEL=str(bert_dir), RERANKER_PORT=str(port), RERANKER_METRICS_PORT=str(metrics_port))
    if converts:
        env.update(RERANKER_CACHE_DIR=str(tmp_path / "fresh-cache"), RERANKER_BACKEND="openvino",
                   RERANKER_DTYPE="int8", RERANKER_INT8_MIN_SPEARMAN="-1")
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        rerank = httpx.post(f"{url}/v1/rerank", json={"query": "cache", "documents": ["a cache", "tea"]}, timeout=30)
        assert rerank.status_code == 200
        inputs = ["cache", "a cache\ntea", None, "", False, None]
        event = httpx.post(f"{url}/gradio_api/call/predict", json={"data": inputs}, timeout=30).json()["event_id"]
        assert "event: complete" in httpx.get(f"{url}/gradio_api/call/predict/{event}", timeout=30).text
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).status_code == 200
        # Gradio's run history, which writes runs to a Hugging Face bucket, is not there at all.
        assert httpx.get(f"{url}/gradio_api/run-history/buckets", timeout=30).status_code == 404
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=HANG_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output, _ = process.communicate(timeout=HANG_S)
    records = read_log(log)
    assert process.pid in {r["pid"] for r in records if r["event"] == "start"}, "the hook did not run in the app"
    foreign = [r for r in records if not r["local"]]
    assert foreign == [], f"non-loopback network use: {foreign}\n{output[-3000:]}"
