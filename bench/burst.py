"""A burst past the queue's bound: what the refused requests cost, and what they cost the one that gets in.

`--callers` copies of one request of `--docs` long passages arrive at once at a service whose RERANKER_MAX_QUEUE
holds one of them: one is admitted, the others get 429. Measured per round, on the MiniLM benchmark model through
/v1/rerank (the pair-score cache off):

- the admitted request's latency against the same request sent alone just before and after the burst (the
  baseline, in the same round): 1.00x means the refused requests cost it nothing;
- how long the 429s took, p50 and max;
- the server's CPU time for the burst against the lone request's.

`--compare PATH` runs the same rounds, alternating, against app.py of another checkout (e.g. a `git worktree` of
an older commit) and prints the two side by side.

Run: .venv/bin/python -m bench.burst [--rounds 3] [--callers 30] [--docs 40] [--chars 9000] [--compare PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import httpx  # noqa: E402

from bench.report import host, percentile  # noqa: E402
from bench.workload import build_benchmark_model, build_workload  # noqa: E402
from tests.servers import app_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600.0


@dataclass(frozen=True)
class Service:
    client: httpx.Client  # one pool of connections for every caller: a client each cost more than a 429 here
    pid: int


@dataclass(frozen=True)
class Round:
    alone_s: float  # the lone request's latency
    alone_cpu_s: float  # the server's CPU time for it
    admitted_s: float  # the latency of the burst's admitted request (the slowest, if several got in)
    admitted: int
    refused_s: list[float]  # the 429s' latencies
    burst_cpu_s: float  # the server's CPU time for the whole burst


@contextmanager
def service(root: Path, model: Path, max_queue: int) -> Iterator[Service]:
    """app.py of the checkout at `root` (tests.servers.app_server), with one client for every caller."""
    env = {"RERANKER_MODEL": str(model), "RERANKER_DEVICE": "cpu", "RERANKER_MAX_QUEUE": str(max_queue),
           "RERANKER_CACHE_SIZE": "0", "RERANKER_LOG_SAMPLE_RATE": "0", "TOKENIZERS_PARALLELISM": "false"}
    with app_server(env, root=root) as (url, process):
        with httpx.Client(base_url=url, timeout=TIMEOUT, limits=httpx.Limits(max_connections=None)) as client:
            yield Service(client, process.pid)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def body(docs: int, chars: int, seed: int) -> bytes:
    """One request: real passages, each repeated to about `chars` characters."""
    request = build_workload(1, docs, seed=seed)[0]
    documents = [" ".join([d] * max(1, chars // (len(d) + 1))) for d in request.documents]
    return json.dumps({"query": request.query, "documents": documents}).encode()


def send(client: httpx.Client, body: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    answer = client.post("/v1/rerank", content=body, headers={"content-type": "application/json"})
    return answer.status_code, time.perf_counter() - started


def alone(svc: Service, request: bytes) -> tuple[float, float]:
    """The request's latency sent alone, and the server's CPU time for it."""
    before = cpu_seconds(svc.pid)
    status, seconds = send(svc.client, request)
    if status != 200:
        raise SystemExit(f"the lone request got {status}")
    return seconds, cpu_seconds(svc.pid) - before


def burst(svc: Service, request: bytes, callers: int) -> Round:
    """`request` alone before and after (the baseline: their mean), and `callers` copies of it at once."""
    first = alone(svc, request)
    results: list[tuple[int, float]] = []
    gate = threading.Barrier(callers)

    def caller() -> None:
        gate.wait()
        results.append(send(svc.client, request))

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    before = cpu_seconds(svc.pid)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    time.sleep(0.5)  # let the server finish whatever the refused requests left running
    burst_cpu = cpu_seconds(svc.pid) - before
    second = alone(svc, request)
    unexpected = sorted({status for status, _ in results} - {200, 429})
    if unexpected:
        raise SystemExit(f"the burst got statuses {unexpected}: expected only 200 and 429")
    admitted = [seconds for status, seconds in results if status == 200]
    return Round((first[0] + second[0]) / 2, (first[1] + second[1]) / 2, max(admitted, default=float("nan")),
                 len(admitted), [seconds for status, seconds in results if status == 429], burst_cpu)


def describe(name: str, rounds: list[Round]) -> str:
    alone = statistics.median(r.alone_s for r in rounds)
    slowdown = [r.admitted_s / r.alone_s for r in rounds]
    cpu = [r.burst_cpu_s / r.alone_cpu_s for r in rounds]
    refused = [s for r in rounds for s in r.refused_s]
    refused_text = "none"
    if refused:
        p50 = percentile(refused, 0.5)
        refused_text = f"p50 {p50:.3f} s ({p50 / alone:.3f}x the lone request), max {max(refused):.3f} s"
    return (f"{name}\n"
            f"  lone request: {alone:.2f} s\n"
            f"  admitted in the burst: {statistics.median(r.admitted_s for r in rounds):.2f} s, "
            f"{statistics.median(slowdown):.2f}x the lone request ({min(slowdown):.2f}-{max(slowdown):.2f}); "
            f"admitted per round: {sorted({r.admitted for r in rounds})}\n"
            f"  429s: {len(refused)}, {refused_text}\n"
            f"  server CPU for the burst: {statistics.median(cpu):.2f}x the lone request's "
            f"({min(cpu):.2f}-{max(cpu):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--callers", type=int, default=30)
    parser.add_argument("--docs", type=int, default=40)
    parser.add_argument("--chars", type=int, default=9000, help="about this many characters per passage")
    parser.add_argument("--model", type=Path, help="default: the MiniLM benchmark model, built afresh")
    parser.add_argument("--compare", type=Path, help="another checkout's root: its app.py is measured alongside")
    args = parser.parse_args()
    roots = {"this checkout": ROOT}
    if args.compare:
        roots[f"{args.compare}"] = args.compare.resolve()
    print(f"host: {host()}")
    print(f"burst: {args.callers} requests x {args.docs} passages of ~{args.chars} characters at once, "
          f"RERANKER_MAX_QUEUE={args.docs + args.docs // 2} (room for one), {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_benchmark_model(Path(tmp) / "minilm")
        measured: dict[str, list[Round]] = {name: [] for name in roots}
        for number in range(args.rounds):
            request = body(args.docs, args.chars, seed=number)
            for name, root in roots.items():
                with service(root, model, args.docs + args.docs // 2) as svc:
                    send(svc.client, body(args.docs, args.chars, seed=1000 + number))  # warm-up
                    measured[name].append(burst(svc, request, args.callers))
        for name, rounds in measured.items():
            print(describe(name, rounds))


if __name__ == "__main__":
    main()
