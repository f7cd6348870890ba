"""start.sh end to end: a local model serves offline, SIGTERM stops it cleanly, load errors are readable."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.servers import HANG_S, START_S, free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent


def start(env_overrides: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RERANKER_PORT": str(free_port()),
           "RERANKER_METRICS_PORT": str(free_port()), **env_overrides}
    return subprocess.Popen([str(ROOT / "start.sh")], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM, which must end it cleanly; killed if it is still running after a failure."""
    try:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=HANG_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=HANG_S)


def test_start_sh_serves_a_local_model_and_stops_on_sigterm(bert_dir: Path) -> None:
    port = free_port()
    # Nothing is in flight at the signal, so the process stops at once, not after this drain deadline: waiting
    # out the deadline would outlast the wait below, which only bounds a hang.
    process = start({"RERANKER_MODEL": str(bert_dir), "RERANKER_PORT": str(port), "RERANKER_DRAIN_SECONDS": "600"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        response = httpx.post(f"{url}/v1/rerank", json={"query": "cache", "documents": ["a cache", "tea"]},
                              timeout=HANG_S)
        assert response.status_code == 200 and len(response.json()["results"]) == 2
        # A connection idle for longer than uvicorn's default keep-alive (5 s, which is httpx's own idle expiry: a
        # request sent as the server closed the connection was reset) still serves (RERANKER_KEEP_ALIVE_SECONDS).
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_S)
        for pause in (6, 0):
            connection.request("GET", "/healthz")
            assert connection.getresponse().read() == b'{"status":"ok"}'
            time.sleep(pause)
        connection.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=HANG_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output, _ = process.communicate(timeout=HANG_S)
    assert f"http://127.0.0.1:{port}/" in output


def test_port_0_serves_on_a_free_port_and_says_which(bert_dir: Path) -> None:
    """The log named port 0 (the setting), not the port the kernel chose; nobody could find the service."""
    process = start({"RERANKER_MODEL": str(bert_dir), "RERANKER_PORT": "0", "RERANKER_METRICS_PORT": "0"})
    try:
        assert process.stdout is not None
        serving = ""
        for line in process.stdout:  # ends with the process, if it never serves
            if '"serving on http://' in line:
                serving = json.loads(line)["message"]
                break
        port = int(serving.rstrip("/").rsplit(":", 1)[-1])
        assert port != 0
        wait_ready(f"http://127.0.0.1:{port}")
    finally:
        stop(process)


def test_relative_paths_are_the_callers_not_the_project_folders(bert_dir: Path, tmp_path: Path) -> None:
    """start.sh moves to its own folder, where `RERANKER_MODEL=tiny-bert-reranker` named nothing."""
    port = free_port()
    cache = os.path.relpath(tmp_path / "cache", bert_dir.parent)
    process = start({"RERANKER_MODEL": bert_dir.name, "RERANKER_PORT": str(port), "RERANKER_CACHE_DIR": cache},
                    cwd=bert_dir.parent)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        assert httpx.get(f"{url}/info", timeout=HANG_S).json()["model"] == str(bert_dir)
    finally:
        stop(process)
    assert (tmp_path / "cache" / "openvino").is_dir()


def test_start_sh_exits_with_the_load_error_not_a_traceback() -> None:
    process = start({"RERANKER_MODEL": "example-org/not-a-cached-reranker"})
    output, _ = process.communicate(timeout=START_S)
    assert process.returncode == 1
    assert "could not load model 'example-org/not-a-cached-reranker'" in output
    assert "RERANKER_MODEL" in output and "Traceback" not in output


def test_start_sh_writes_json_lines_whatever_the_model_path_holds(tmp_path: Path) -> None:
    """Its own first line named the model inside a JSON string unescaped: a quote, a backslash, a tab or a line end
    broke it."""
    name = 'my "best" \\ model\tof\nmany\r\nlines'
    process = start({"RERANKER_MODEL": str(tmp_path / name), "RERANKER_DTYPE": "fp8"})
    output, _ = process.communicate(timeout=START_S)
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert lines[0]["logger"] == "start.sh" and name in lines[0]["message"]


def test_start_sh_rejects_a_bad_setting() -> None:
    process = start({"RERANKER_DTYPE": "fp8"})
    output, _ = process.communicate(timeout=START_S)
    assert process.returncode == 2
    assert "RERANKER_DTYPE='fp8' is not valid; use one of: auto, float32, float16, bfloat16" in output


def test_start_sh_names_an_upload_folder_it_cannot_write_in_before_loading_the_model(tmp_path: Path) -> None:
    """A GRADIO_TEMP_DIR that is a file (or read-only) ended the start after the model's load, in a traceback
    from inside Gradio (NotADirectoryError: '.../vibe_edit_history'); the model named here does not exist, so
    a start that got as far as loading it would say so instead."""
    (tmp_path / "a-file").write_text("")
    process = start({"GRADIO_TEMP_DIR": str(tmp_path / "a-file"), "RERANKER_MODEL": str(tmp_path / "no-model")})
    output, _ = process.communicate(timeout=START_S)
    assert process.returncode == 2, output
    assert f"GRADIO_TEMP_DIR={tmp_path / 'a-file'} is not a folder; set GRADIO_TEMP_DIR to a folder" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(("variable", "message"), [("RERANKER_METRICS_PORT", "cannot serve metrics on"),
                                                    ("RERANKER_PORT", "cannot serve the UI and API on")])
def test_start_sh_names_a_taken_port_before_loading_the_model(bert_dir: Path, variable: str, message: str) -> None:
    """The HTTP port too: it failed after the whole model load, with uvicorn's own line and exit status 3."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = start({"RERANKER_MODEL": str(bert_dir), variable: str(port)})
        output, _ = process.communicate(timeout=START_S)
    assert process.returncode == 1
    assert f"{message} 127.0.0.1:{port}" in output and f"set {variable} to a free port" in output
    assert "model loaded" not in output and "Traceback" not in output  # it stopped before loading the model


def test_start_sh_names_the_package_when_python_cannot_make_a_venv(tmp_path: Path) -> None:
    """Debian's own python3 without python3-venv fails `-m venv` half way, leaving a .venv with no pip: start.sh went
    on to a pip error, and every later run failed the same way. Now it removes the .venv and names the package."""
    project, bin_dir = tmp_path / "project", tmp_path / "bin"
    project.mkdir()
    bin_dir.mkdir()
    (project / "start.sh").write_text((ROOT / "start.sh").read_text(encoding="utf-8"), encoding="utf-8")
    (project / "start.sh").chmod(0o755)
    fake = bin_dir / "python3"  # as Debian's python3 answers without ensurepip
    fake.write_text('#!/bin/sh\nmkdir -p .venv/bin && touch .venv/bin/python\n'
                    'echo "ensurepip is not available" >&2\n'
                    'exit 1\n', encoding="utf-8")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run([str(project / "start.sh")], cwd=tmp_path, env=env, text=True, capture_output=True,
                          timeout=HANG_S)
    assert done.returncode == 1
    (line,) = [json.loads(text) for text in done.stdout.splitlines() if '"ERROR"' in text]
    assert "apt-get install python3-venv" in line["message"] and line["logger"] == "start.sh"
    assert not (project / ".venv").exists()
