"""Scale-out: pairs/s and latency of the single-process service, Ray Serve with 1 replica and with 2, same load.

One run, on the MiniLM benchmark model (bench/workload.py), in rounds (`--rounds`, 3): each round measures every
configuration below once per request size (`--docs`, 20 and 100 documents a request; the bare copies once a
round), each sent the same workload from the same concurrent callers over /v1/rerank after a warm-up pass, and
each ratio is taken within a round and a request size (this kind of 2-core VM moves by a tenth or more from one
minute to the next; two bare copies alone ranged 1.6x-2.1x one copy within 20 minutes). The hop through Serve
costs about the same for a request of 20 documents as for one of 100 (the proxy, the ingress, the handle's call
to a replica), so its share depends on the request's size: both are measured, with the same pairs each (`--pairs`,
in whole requests).

- `single`: app.py, one process with `--threads` threads (default: one per core);
- `serve-1xT`: deploy/ray/serve.yaml on a local loopback Ray, one model replica with as many threads, behind the
  ingress: the same compute as `single`, so their ratio is what the hop through Serve costs (target >= 0.9);
- `serve-1`, `serve-2`: 1 and 2 replicas of one torch thread each: their ratio is how replicas scale
  (target >= 1.7); `serve-2 / single` compares the same cores used either way;
- the host's own ceiling for that ratio (bench/copies.py): 1 and then 2 copies of the bare model, one thread each,
  no service and no Ray. Where the cores give two copies less than 2x one, two replicas cannot reach more.

It prints each round, then per request size and configuration the median pairs/s and range with p50/p95 latency of
its median run, and the median and range of each ratio. The single process waits stopped (SIGSTOP) while the
others run, and Ray is started afresh each round after the single process and the copies are measured, so neither
idles beside them. On a host with fewer cores than replicas + 1, the replicas, the ingress, the proxy and the
callers share the cores.

Run: .venv/bin/python -m bench.scale   (needs requirements-ray.txt and requirements-dev.txt)
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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
from deploy.ray.remote import running_replicas  # noqa: E402
from tests.ray_cluster import ROOT, deploy, local_ray  # noqa: E402
from tests.servers import app_server  # noqa: E402

# Every configuration: float32 on the CPU, no pair-score cache (every pair is scored), request log lines
# sampled away.
ENV = {"RERANKER_DEVICE": "cpu", "RERANKER_DTYPE": "float32", "RERANKER_CACHE_SIZE": "0",
       "RERANKER_LOG_SAMPLE_RATE": "0"}


@dataclass(frozen=True)
class Result:
    name: str
    setup: str
    docs: int
    pairs_per_s: float
    p50_ms: float
    p95_ms: float


@dataclass(frozen=True)
class Load:
    """One request size's timed workload and the warm-up pass before it."""

    docs: int
    warm_up: list[Request]
    workload: list[Request]


def build_loads(sizes: list[int], pairs: int, clients: int) -> list[Load]:
    """Per request size, `pairs` timed pairs (at least one request per caller) and a warm-up of one request per
    caller."""
    return [Load(docs, build_workload(clients, docs, seed=1), build_workload(max(clients, pairs // docs), docs))
            for docs in sizes]


def measure(name: str, setup: str, url: str, load: Load, clients: int) -> Result:
    """Send `load`'s warm-up, then its workload timed, from `clients` concurrent callers."""
    with httpx.Client(base_url=url, timeout=600) as client, ThreadPoolExecutor(clients) as pool:
        def call(request: Request) -> float:
            started = time.perf_counter()
            response = client.post("/v1/rerank", json={"query": request.query, "documents": request.documents})
            response.raise_for_status()
            return time.perf_counter() - started

        list(pool.map(call, load.warm_up))
        started = time.perf_counter()
        latencies = list(pool.map(call, load.workload))
        elapsed = time.perf_counter() - started
    pairs = sum(len(r.documents) for r in load.workload)
    return Result(name, setup, load.docs, pairs / elapsed, percentile(latencies, 0.5) * 1000,
                  percentile(latencies, 0.95) * 1000)


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


def serve_round(model: Path, order: list[tuple[str, int, int]], loads: list[Load], clients: int) -> list[Result]:
    """Each Serve configuration of `order` on a Ray started for this round (so that no idle Ray takes CPU from the
    single process or the bare copies measured before it)."""
    results: list[Result] = []
    with local_ray({}) as cluster:
        for name, replicas, threads in order:
            deploy(serve_config(model, replicas, threads), "reranker", timeout=600)
            deadline = time.monotonic() + 300
            while running_replicas("reranker", "RerankModel") != replicas and time.monotonic() < deadline:
                time.sleep(0.5)
            setup = f"{replicas} replica(s) x {threads} thread(s) + ingress"
            results.extend(measure(name, setup, cluster.url, load, clients) for load in loads)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, nargs="+", default=[20, 100], help="documents per request, one load each")
    parser.add_argument("--pairs", type=int, default=2400,
                        help="timed pairs per configuration and request size (2400: 120 x 20 or 24 x 100)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent callers")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads of the single process (default: one per core)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of every configuration; the ratios are taken within a round")
    args = parser.parse_args()

    loads = build_loads(list(dict.fromkeys(args.docs)), args.pairs, args.clients)
    rounds: list[dict[tuple[str, int], Result]] = []
    ceilings: list[float] = []
    started_load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        model = build_benchmark_model(Path(folder) / "minilm")
        with app_server({**ENV, "RERANKER_MODEL": str(model), "OMP_NUM_THREADS": str(args.threads)},
                        ready_s=300) as (url, process):
            process.send_signal(signal.SIGSTOP)
            for number in range(args.rounds):
                copies = [sum(run_copies(model, n, cache_dir=Path(folder) / "cache")) for n in (1, 2)]
                ceilings.append(copies[1] / copies[0])
                process.send_signal(signal.SIGCONT)
                single = [measure("single", f"1 process x {args.threads} threads", url, load, args.clients)
                          for load in loads]
                process.send_signal(signal.SIGSTOP)  # an idle service still wakes; it waits, stopped, for its turn
                # serve-1 and serve-2 swap places every round: neither is always the one measured later.
                order = [("serve-1xT", 1, args.threads), ("serve-1", 1, 1), ("serve-2", 2, 1)]
                if number % 2:
                    order[1], order[2] = order[2], order[1]
                served = serve_round(model, order, loads, args.clients)
                measured = {(r.name, r.docs): r for r in [*single, *served]}
                rounds.append(measured)
                print(f"round {number + 1}: " + ", ".join(f"{r.name} x{r.docs} {r.pairs_per_s:.1f}"
                                                          for r in measured.values())
                      + f" pairs/s; 2 bare copies / 1 = {ceilings[-1]:.2f}x ({copies[0]:.1f} -> {copies[1]:.1f})",
                      flush=True)
            process.send_signal(signal.SIGCONT)  # to be stopped by app_server

    print(f"host: {host()}; load average {started_load:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{args.clients} concurrent callers, /v1/rerank, after a warm-up pass; {args.rounds} round(s), each "
          "configuration once per round and request size")
    print(f"the host's ceiling for the replicas' ratio: 2 bare copies of the model / 1 = {median_range(ceilings)} "
          "(one thread each, no service, no Ray)")
    for load in loads:
        report(load, rounds, ceilings)


def median_range(values: list[float]) -> str:
    spread = f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
    return f"{statistics.median(values):.2f}x{spread}"


def report(load: Load, rounds: list[dict[tuple[str, int], Result]], ceilings: list[float]) -> None:
    """`load`'s table and ratios over `rounds`."""
    print(f"\n{len(load.workload)} requests x {load.docs} documents:")
    print(f"{'configuration':<10} {'what it had':<42} {'pairs/s (median, range)':>24} {'p50 ms':>8} {'p95 ms':>8}")
    names = [(r.name, r.setup) for r in rounds[0].values() if r.docs == load.docs]
    for name, setup in names:
        runs = [measured[name, load.docs] for measured in rounds]
        rates = [r.pairs_per_s for r in runs]
        middle = sorted(runs, key=lambda r: r.pairs_per_s)[len(runs) // 2]
        print(f"{name:<10} {setup:<42} {statistics.median(rates):>8.1f} ({min(rates):.1f}-{max(rates):.1f})"
              f"{'':>4} {middle.p50_ms:>8.0f} {middle.p95_ms:>8.0f}")

    def per_round(over: str, under: str) -> list[float]:
        return [m[over, load.docs].pairs_per_s / m[under, load.docs].pairs_per_s for m in rounds]

    replicas = per_round("serve-2", "serve-1")
    print(f"serve-1xT / single: {median_range(per_round('serve-1xT', 'single'))} (the hop; target >= 0.9)")
    print(f"serve-2 / serve-1: {median_range(replicas)} (replicas; target >= 1.7)")
    print("replicas / the host's ceiling, in the same round: "
          + median_range([r / c for r, c in zip(replicas, ceilings, strict=True)]))
    print(f"serve-2 / single: {median_range(per_round('serve-2', 'single'))} (the same cores either way)")


if __name__ == "__main__":
    main()
