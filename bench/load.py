"""Load test: concurrent clients on every rerank surface of a server subprocess (app.py, tiny BERT model).

Run: .venv/bin/python -m bench.load   (2,000 requests from 32 clients; prints the figures README.md quotes)

Checks every answer belongs to its own request, counts 5xx, compares the server's reranker_requests_total
(scraped from its metrics port) with what the clients saw per route and status, and measures the server's
resident memory after each half of the load. The baseline is one client sending requests one at a time.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import httpx  # noqa: E402
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.load_calls import BAD_STATUS, GRADIO, SURFACES, Call, build_calls, check, json_body  # noqa: E402
from tests.servers import free_port, stop_process, wait_ready  # noqa: E402
from tests.tiny_models import build_bert_reranker  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600.0  # seconds per request: 500 documents behind 31 other clients on 2 loaded cores; longer is a hang


@dataclass(frozen=True)
class Server:
    url: str
    metrics_url: str
    pid: int


@dataclass(frozen=True)
class Outcome:
    call: Call
    status: int  # HTTP status; a gradio_client refusal is the status its kind gets on the JSON routes
    seconds: float
    problem: str | None = None


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)  # the load
    baseline: list[Outcome] = field(default_factory=list)  # one client, one request at a time, before it
    wall_seconds: float = 0.0
    baseline_seconds: float = 0.0
    rss_bytes: list[int] = field(default_factory=list)  # after each half
    counted: Counter[tuple[str, str]] = field(default_factory=Counter)  # server's requests_total increase
    description: str = ""

    @property
    def seen(self) -> Counter[tuple[str, str]]:
        """What the clients saw, as (metric route, status label)."""
        return Counter((metric_route(o.call.surface), status_label(o.status))
                       for o in self.baseline + self.outcomes)

    @property
    def problems(self) -> list[str]:
        return [f"request {o.call.token} ({o.call.surface}): {o.problem}"
                for o in self.baseline + self.outcomes if o.problem]

    @property
    def server_errors(self) -> int:
        return sum(o.status >= 500 for o in self.baseline + self.outcomes)

    @property
    def rss_growth(self) -> float:
        return self.rss_bytes[1] / self.rss_bytes[0] - 1


# Each route's error body, in its hosted API's shape (docs/api.md#errors).
ERROR_KEYS = {"/v1/rerank": {"error", "message", "detail"}, "/v2/rerank": {"id", "message"},
              "/rerank": {"error", "error_type"}}


def metric_route(surface: str) -> str:
    return "ui" if surface == GRADIO else surface


def status_label(status: int) -> str:
    if status == 200:
        return "ok"
    if status == 429:
        return "overloaded"
    return "invalid" if status < 500 else "error"


@contextmanager
def serve(model_dir: Path, log: Path) -> Iterator[Server]:
    """app.py in a subprocess on free loopback ports; stopped with SIGTERM (killed if it lingers)."""
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "RERANKER_MODEL": str(model_dir), "RERANKER_DEVICE": "cpu", "RERANKER_PORT": str(port),
           "RERANKER_METRICS_PORT": str(metrics_port), "RERANKER_LOG_SAMPLE_RATE": "0",
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)  # tests.servers' bound for a service starting on a loaded machine
        yield Server(url, f"http://127.0.0.1:{metrics_port}/metrics", process.pid)
    finally:
        stop_process(process, grace=20)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def requests_total(server: Server) -> Counter[tuple[str, str]]:
    text = httpx.get(server.metrics_url, timeout=10).text
    return Counter({(s.labels["route"], s.labels["status"]): int(s.value)
                    for family in text_string_to_metric_families(text) if family.name == "reranker_requests"
                    for s in family.samples if s.name == "reranker_requests_total"})


class Clients:
    """One httpx client per worker thread, and one gradio_client shared by all (it runs jobs concurrently)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        # gradio_client's own POSTs (queue/join) default to httpx's 5 s, which 32 clients on two saturated cores
        # came within 2.3x of on a quiet machine.
        self.gradio = Client(server.url, verbose=False, analytics_enabled=False,
                             httpx_kwargs={"timeout": httpx.Timeout(TIMEOUT)})
        self._local = threading.local()
        self._all: list[httpx.Client] = []
        self._lock = threading.Lock()

    def http(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = httpx.Client(base_url=self.server.url, timeout=TIMEOUT)
            with self._lock:
                self._all.append(client)
        return client

    def close(self) -> None:
        for client in self._all:
            client.close()
        self.gradio.close()

    def send(self, call: Call) -> Outcome:
        """Send one call and check its answer; a hang or a dropped connection is a failed check."""
        started = time.perf_counter()
        try:
            return self._send(call, started)
        except Exception as err:
            return Outcome(call, 0, time.perf_counter() - started, f"no answer: {err!r}")

    def _send(self, call: Call, started: float) -> Outcome:
        if call.surface == GRADIO:
            job = self.gradio.submit(call.query, "\n".join(call.documents), call.top_n, api_name="/predict")
            try:
                payload: Any = job.result(timeout=TIMEOUT)
                status = 200
            except AppError:
                status = BAD_STATUS[call.bad] if call.bad else 500
        else:
            response = self.http().post(call.surface, content=json_body(call),
                                        headers={"content-type": "application/json"})
            status, payload = response.status_code, response.json()
        elapsed = time.perf_counter() - started
        expected = BAD_STATUS[call.bad] if call.bad else 200
        if status != expected:
            return Outcome(call, status, elapsed, f"status {status}, expected {expected}: {str(payload)[:200]}")
        if call.bad:
            if call.surface != GRADIO and set(payload) != ERROR_KEYS.get(call.surface, {"error"}):
                return Outcome(call, status, elapsed, f"error body not in the documented shape: {payload}")
            return Outcome(call, status, elapsed)
        return Outcome(call, status, elapsed, check(call, payload))


def run(requests: int = 2000, concurrency: int = 32, max_docs: int = 500, baseline: int = 40,
        seed: int = 0) -> Report:
    """Build the tiny model, start the server, send the baseline and then the load in two halves."""
    report = Report()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_bert_reranker(Path(tmp) / "tiny-bert-reranker")
        with serve(model_dir, Path(tmp) / "server.log") as server:
            info = httpx.get(f"{server.url}/info", timeout=10).json()
            report.description = (f"{platform.machine()}, {os.cpu_count()} cores; server: tiny BERT test model "
                                  f"(2 layers, hidden 32) on {info['device']} in {info['dtype']}, "
                                  f"max_length {info['max_length']}")
            clients = Clients(server)
            try:
                before = requests_total(server)
                started = time.perf_counter()
                report.baseline = [clients.send(c) for c in build_calls(baseline, max_docs, seed + 1, "base")]
                report.baseline_seconds = time.perf_counter() - started
                calls = build_calls(requests, max_docs, seed)
                half = len(calls) // 2
                started = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    for part in (calls[:half], calls[half:]):
                        report.outcomes += list(pool.map(clients.send, part))
                        report.rss_bytes.append(rss_bytes(server.pid))
                report.wall_seconds = time.perf_counter() - started
                report.counted = requests_total(server) - before
            finally:
                clients.close()
    return report


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def documents_scored(outcomes: list[Outcome]) -> int:
    return sum(len(o.call.documents) for o in outcomes if not o.call.bad)


def summary(report: Report, requests: int, concurrency: int, max_docs: int) -> str:
    load = report.outcomes
    rate = len(load) / report.wall_seconds
    docs_rate = documents_scored(load) / report.wall_seconds
    baseline_rate = documents_scored(report.baseline) / report.baseline_seconds
    lines = [
        f"machine: {report.description}",
        f"load: {requests} requests from {concurrency} clients over {', '.join(SURFACES)}; 1-{max_docs} "
        f"documents each, ~10% repeats (cache hits), ~5% bad inputs",
        f"throughput: {rate:.1f} requests/s, {docs_rate:.0f} documents/s ({docs_rate / baseline_rate:.2f}x the "
        f"{len(report.baseline)} requests of one client sending one at a time first: {baseline_rate:.0f} documents/s)",
    ]
    for surface in ("all", *SURFACES):
        seconds = [o.seconds for o in load if surface in ("all", o.call.surface) and not o.call.bad]
        lines.append(f"latency {surface:>14}: p50 {percentile(seconds, .5):6.2f} s   p95 "
                     f"{percentile(seconds, .95):6.2f} s   p99 {percentile(seconds, .99):6.2f} s   ({len(seconds)})")
    statuses = Counter(o.status for o in report.baseline + report.outcomes)
    lines += [
        f"statuses: {dict(sorted(statuses.items()))}; 5xx: {report.server_errors}; failed checks: "
        f"{len(report.problems)}",
        f"server RSS: {report.rss_bytes[0] / 2**20:.1f} MiB after the first half, {report.rss_bytes[1] / 2**20:.1f} "
        f"MiB after the second ({report.rss_growth:+.1%})",
        "reranker_requests_total " + ("matches the clients on every route and status" if report.counted ==
                                      report.seen else f"{dict(report.counted)} != clients' {dict(report.seen)}"),
    ]
    return "\n".join(lines + report.problems[:10])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-docs", type=int, default=500)
    parser.add_argument("--baseline", type=int, default=40, help="requests sent one at a time first")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report = run(args.requests, args.concurrency, args.max_docs, args.baseline, args.seed)
    print(summary(report, args.requests, args.concurrency, args.max_docs))
    sys.exit(1 if report.problems or report.server_errors or report.counted != report.seen else 0)


if __name__ == "__main__":
    main()
