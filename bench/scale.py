"""Scale-out: pairs/s and latency of the single-process service, Ray Serve with 1 replica and with 2, same load.

One run, three configurations, on the MiniLM benchmark model (bench/workload.py), each sent the same workload
from the same concurrent callers over /v1/rerank after a warm-up pass:

- `single`: app.py, one process, its torch with `--threads` threads (default: one per core);
- `serve-1xT`: deploy/ray/serve.yaml on a local loopback Ray, one model replica with as many threads, behind the
  ingress: the same compute as `single`, so their ratio is what the hop through Serve costs (target >= 0.9);
- `serve-1`, `serve-2`: 1 and 2 replicas of one torch thread each: their ratio is how replicas scale
  (target >= 1.7); `serve-2 / single` compares the same cores used either way;
- the host's own ceiling for that ratio (bench/copies.py): 1 and then 2 copies of the bare model, one thread each,
  no service and no Ray. Where the cores give two copies less than 2x one, two replicas cannot reach more.

It prints pairs/s, p50/p95 latency, the ratios and what each configuration had. On a host with fewer cores than
replicas + 1, the replicas, the ingress, the proxy and the callers share the cores.

Run: .venv/bin/python -m bench.scale   (needs requirements-ray.txt and requirements-dev.txt)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import yaml  # noqa: E402

from bench.copies import run_copies  # noqa: E402
from bench.report import host, percentile  # noqa: E402
from bench.workload import Request, build_benchmark_model, build_workload  # noqa: E402
from tests.ray_cluster import ROOT, deploy, local_ray, running_replicas  # noqa: E402
from tests.servers import app_process  # noqa: E402

# Every configuration: float32 on the CPU, no pair-score cache (every pair is scored), request log lines
# sampled away.
ENV = {"RERANKER_DEVICE": "cpu", "RERANKER_DTYPE": "float32", "RERANKER_CACHE_SIZE": "0",
       "RERANKER_LOG_SAMPLE_RATE": "0"}


@dataclass(frozen=True)
class Result:
    name: str
    setup: str
    pairs_per_s: float
    p50_ms: float
    p95_ms: float


def measure(name: str, setup: str, url: str, warm_up: list[Request], workload: list[Request],
            clients: int) -> Result:
    """Send `warm_up`, then `workload` timed, from `clients` concurrent callers."""
    with httpx.Client(base_url=url, timeout=600) as client, ThreadPoolExecutor(clients) as pool:
        def call(request: Request) -> float:
            started = time.perf_counter()
            response = client.post("/v1/rerank", json={"query": request.query, "documents": request.documents})
            response.raise_for_status()
            return time.perf_counter() - started

        list(pool.map(call, warm_up))
        started = time.perf_counter()
        latencies = list(pool.map(call, workload))
        elapsed = time.perf_counter() - started
    pairs = sum(len(r.documents) for r in workload)
    return Result(name, setup, pairs / elapsed, percentile(latencies, 0.5) * 1000, percentile(latencies, 0.95) * 1000)


def single_process(model: Path, threads: int) -> AbstractContextManager[str]:
    """app.py on a free loopback port, its torch on `threads` threads."""
    return app_process({**ENV, "RERANKER_MODEL": str(model), "OMP_NUM_THREADS": str(threads)}, ready_s=300)


def serve_config(model: Path, replicas: int, threads: int) -> dict[str, Any]:
    """deploy/ray/serve.yaml's reranker application with `replicas` fixed model replicas of `threads` torch
    threads each."""
    config: dict[str, Any] = yaml.safe_load((ROOT / "deploy/ray/serve.yaml").read_text())
    del config["http_options"]  # local_ray started Serve on a free loopback port
    app = config["applications"][0]
    config["applications"] = [app]
    app["args"]["env"] = {**ENV, "RERANKER_MODEL": str(model)}
    model_deployment = app["deployments"][0]
    del model_deployment["autoscaling_config"]
    model_deployment["num_replicas"] = replicas
    # Ray sets a replica's OMP_NUM_THREADS from its num_cpus; said explicitly, as the comparison rests on it.
    model_deployment["ray_actor_options"]["num_cpus"] = threads
    model_deployment["ray_actor_options"]["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(threads)}}
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96, help="timed requests per configuration")
    parser.add_argument("--docs", type=int, default=20, help="documents per request")
    parser.add_argument("--clients", type=int, default=8, help="concurrent callers")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the single process (default: one per core)")
    args = parser.parse_args()

    workload = build_workload(args.requests, args.docs)
    warm_up = build_workload(args.clients * 2, args.docs, seed=1)
    results: list[Result] = []
    started_load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        model = build_benchmark_model(Path(folder) / "minilm")
        copies = [sum(run_copies(model, n, cache_dir=Path(folder) / "cache")) for n in (1, 2)]
        with single_process(model, args.threads) as url:
            results.append(measure("single", f"1 process x {args.threads} torch threads", url, warm_up,
                                   workload, args.clients))
        with local_ray({}) as cluster:
            for name, replicas, threads in (("serve-1xT", 1, args.threads), ("serve-1", 1, 1), ("serve-2", 2, 1)):
                deploy(serve_config(model, replicas, threads), "reranker", timeout=600)
                deadline = time.monotonic() + 300
                while running_replicas("reranker", "RerankModel") != replicas and time.monotonic() < deadline:
                    time.sleep(0.5)
                setup = f"{replicas} replica(s) x {threads} torch thread(s) + ingress"
                results.append(measure(name, setup, cluster.url, warm_up, workload, args.clients))

    print(f"host: {host()}; load average {started_load:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{args.requests} requests x {args.docs} documents, {args.clients} concurrent callers, /v1/rerank, "
          "after a warm-up pass")
    print(f"{'configuration':<10} {'what it had':<42} {'pairs/s':>8} {'p50 ms':>8} {'p95 ms':>8}")
    for r in results:
        print(f"{r.name:<10} {r.setup:<42} {r.pairs_per_s:>8.1f} {r.p50_ms:>8.0f} {r.p95_ms:>8.0f}")
    single, same, one, two = results
    print(f"serve-1xT / single: {same.pairs_per_s / single.pairs_per_s:.2f}x (the hop; target >= 0.9)")
    print(f"serve-2 / serve-1: {two.pairs_per_s / one.pairs_per_s:.2f}x (replicas; target >= 1.7)")
    print(f"the host's ceiling for that: 2 bare copies of the model / 1 = {copies[1] / copies[0]:.2f}x "
          f"({copies[0]:.1f} -> {copies[1]:.1f} pairs/s, one thread each, no service, no Ray)")
    print(f"serve-2 / single: {two.pairs_per_s / single.pairs_per_s:.2f}x (the same cores either way)")


if __name__ == "__main__":
    main()
