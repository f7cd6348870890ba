"""Run an ASGI app on a free loopback port in a thread, and always stop it."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

HANG_S = 120.0  # seconds: tests wait this long only for what hangs, never for what a loaded machine is slow at
# A whole service process starting (torch, transformers, Gradio, a model): 90 s were seen on a 2-core machine
# under a load average of 10, where a quiet one takes 10 s.
START_S = 600.0


def _ephemeral_start() -> int:
    """Where the kernel's ephemeral ports begin: the ports bind(0) and outgoing connections take."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_FIRST_PORT = 20000  # above Ray's worker ports (10002-19999 by default)
_given: set[int] = set()
_given_lock = threading.Lock()


def free_port() -> int:
    """A loopback port free now, below the ephemeral range and never given before in this process: a port from
    bind(0) is released at once, and a later bind(0) (another call, or Ray starting its servers) could take it
    again before its user binds it."""
    rng = random.SystemRandom()
    last = max(_ephemeral_start(), _FIRST_PORT + 1000)
    with _given_lock:
        while True:
            port = rng.randrange(_FIRST_PORT, last)
            if port in _given:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _given.add(port)
            return port


@contextmanager
def serve(app: Any, server_class: Callable[[uvicorn.Config], uvicorn.Server] = uvicorn.Server) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 until the block ends; yields its base URL."""
    port = free_port()
    server = server_class(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"test-server-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + HANG_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(60)


def post_head(url: str, path: str, length: int, headers: dict[str, str] | None = None) -> bytes:
    """The request line and headers of a JSON POST of `length` bytes, for tests that send on a raw socket."""
    fields = {**(headers or {}), "Host": url.removeprefix("http://").split(":")[0],
              "Content-Type": "application/json", "Content-Length": str(length)}
    return (f"POST {path} HTTP/1.1\r\n" + "".join(f"{name}: {value}\r\n" for name, value in fields.items())
            + "\r\n").encode()


def wait_ready(url: str, timeout: float = START_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} never became ready")


def stop_process(process: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM, `grace` seconds to drain and exit, then SIGKILL."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextmanager
def app_process(env: dict[str, str], *, ready_s: float = START_S) -> Iterator[str]:
    """app.py (the single-process service) with `env` over this process's environment, on free loopback ports;
    its URL once ready, and the process stopped by id afterwards, whatever happened."""
    with app_server(env, ready_s=ready_s) as (url, _):
        yield url


@contextmanager
def app_server(env: dict[str, str], *, ready_s: float = START_S,
               root: Path | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """app_process, with the process too (bench/cpu.py pauses the services it is not measuring). `root`: another
    checkout's app.py, run by its own .venv where it has one (bench/burst.py compares two)."""
    port = free_port()
    full = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "RERANKER_PORT": str(port),
            "RERANKER_METRICS_PORT": str(free_port()), **env}
    python = sys.executable
    if root is not None and (root / ".venv/bin/python").exists():
        python = str(root / ".venv/bin/python")
    process = subprocess.Popen([python, "app.py"], cwd=root or Path(__file__).resolve().parent.parent, env=full,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout=ready_s)
        yield url, process
    finally:
        stop_process(process, grace=60)
