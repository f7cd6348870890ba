"""Ray Serve on a GPU: the scale-out mode's KubeRay config scoring on a real device, beside the engine alone.

On one GPU host, a bge-reranker-v2-m3-shaped model (XLM-RoBERTa-large, random weights, float16, built here: no
download), the same requests (100 short passages each) from the same concurrent callers, in this order:

- `engine`: the single-process engine in this process (reranker.Reranker, no HTTP in front): the reference scores;
- `serve-1`: deploy/ray/rayservice.yaml's Serve config (its model deployment as a GPU cluster runs it:
  `num_gpus: 1`, `max_ongoing_requests` 64) on a local loopback Ray, one model replica, callers on /v1/rerank;
- `serve-2`: two model replicas sharing the one GPU (`num_gpus: 0.5` each);
- then one of the two replicas is SIGKILLed under load: every answer must still be 200, and two replicas must run
  again.

Every configuration uses the same settings (`RERANKER_DEVICE=auto`: a replica sees the GPU only because Ray gave it
one). It prints pairs/s, p50/p95 latency and the GPU's busy share for each, the ratios serve-1 / engine and
serve-2 / serve-1, how far each configuration's raw scores are from the engine's (batches differ with arrival
order, and float16 kernels with batch shape), which replica answered how many requests, the replicas'
`reranker_gpu_*` gauges from Ray's metrics agent, and each replica's device from /info. It exits 1 if a check
fails.

Run: python -m bench.gpu_serve [--requests N] [--callers N]   (needs CUDA and requirements-ray.txt; a GPU host
without network gets both from bench/gpu_prepare.sh serve and runs bench/gpu_run.sh serve)
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Read when ray is imported (tests/ray_cluster.py): a one-node Ray on loopback, no usage stats.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import httpx  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from ray import serve  # noqa: E402

from bench.gpu import BGE_M3, TINY, BusySampler, documents_of, percentile  # noqa: E402
from deploy.ray.remote import running_replicas  # noqa: E402
from reranker import Reranker, Settings  # noqa: E402
from reranker.gpu import Nvml  # noqa: E402
from tests.ray_cluster import ROOT, deploy, local_ray, replica_pids  # noqa: E402
from tests.tiny_models import build_xlmr_reranker, random_text  # noqa: E402

ENV = {"RERANKER_DEVICE": "auto", "RERANKER_BACKEND": "torch", "RERANKER_CACHE_SIZE": "0",
       "RERANKER_MAX_LENGTH": "1024", "RERANKER_LOG_SAMPLE_RATE": "0"}
# On the CPU the engine runs on every thread and a replica on one (num_cpus: 1). At bfloat16 (what auto picks on
# AVX512-BF16 or AMX) the two round differently and reorder the tiny model's near-ties (top-10 equal in 9-10 of 12
# requests on the AVX-512 EPYC); at float32 they agree.
SMOKE_ENV = {"RERANKER_DTYPE": "float32"}
Request = tuple[str, list[str]]


class Load:
    """What one configuration's callers got: seconds, latencies, raw scores per request, replicas, statuses."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.latencies: list[float] = []
        self.scores: dict[int, list[float]] = {}
        self.replicas: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.busy = "n/a"


def send(requests: list[Request], callers: int, call: Any, nvml: Nvml) -> Load:
    """`call(i, query, documents) -> (status, replica, scores in document order)` for each request, `callers` at
    a time, timed."""
    load = Load()
    lock = threading.Lock()

    def one(i: int) -> None:
        started = time.perf_counter()
        status, replica, scores = call(i, *requests[i])
        with lock:
            load.latencies.append(time.perf_counter() - started)
            load.statuses[status] += 1
            load.replicas[replica] += 1
            if scores is not None:
                load.scores[i] = scores

    with BusySampler(nvml) as busy, ThreadPoolExecutor(callers) as pool:
        started = time.perf_counter()
        list(pool.map(one, range(len(requests))))
        load.seconds = time.perf_counter() - started
    load.latencies.sort()
    load.busy = busy.share
    return load


@contextmanager
def over_http(url: str) -> Iterator[Any]:
    """A call through the Serve app's /v1/rerank, on one pooled client closed at the end."""
    client = httpx.Client(base_url=url, timeout=300, limits=httpx.Limits(max_connections=64))

    def call(i: int, query: str, documents: list[str]) -> tuple[int, str, list[float] | None]:
        response = client.post("/v1/rerank", json={"query": query, "documents": documents, "raw_scores": True})
        if response.status_code != 200:
            return response.status_code, "-", None
        scores = [0.0] * len(documents)
        for result in response.json()["results"]:
            scores[result["index"]] = result["relevance_score"]
        return 200, response.headers.get("x-reranker-replica", "?"), scores

    with client:
        yield call


def serve_config(env: dict[str, str], replicas: int, gpus: float) -> dict[str, Any]:
    """rayservice.yaml's embedded Serve config, the reranker application only (the UI needs Gradio, which a bare
    GPU host lacks), with `replicas` fixed model replicas of `gpus` GPUs each, reading `env`."""
    manifest = yaml.safe_load((ROOT / "deploy/ray/rayservice.yaml").read_text())
    config: dict[str, Any] = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    del config["http_options"]  # local_ray started Serve on a free loopback port
    app = next(a for a in config["applications"] if a["name"] == "reranker")
    config["applications"] = [app]
    app["args"]["env"] = env
    model_deployment = next(d for d in app["deployments"] if d["name"] == "RerankModel")
    del model_deployment["autoscaling_config"]
    model_deployment["num_replicas"] = replicas
    model_deployment["ray_actor_options"]["num_gpus"] = gpus
    for deployment in app["deployments"]:
        if deployment["name"] == "Ingress":
            deployment["num_replicas"] = 1
    return config


def wait_replicas(n: int, timeout: float) -> float:
    started = time.monotonic()
    while running_replicas("reranker", "RerankModel") != n:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{n} RerankModel replicas not RUNNING after {timeout} s")
        time.sleep(0.2)
    return time.monotonic() - started


def series(metrics_port: int, family: str) -> list[str]:
    """The lines of one metric family in Ray's node agent export, which prefixes our names with `ray_`."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
    return [line for line in text.splitlines() if line.startswith(f"ray_{family}{{")]


def distance(load: Load, reference: dict[int, list[float]]) -> str:
    """Max |raw score - the engine's| over every pair, and how many requests ranked their top 10 alike."""
    deltas = [abs(a - b) for i, scores in load.scores.items() for a, b in zip(scores, reference[i], strict=True)]
    if not deltas:
        return "no answer to compare"

    def top(scores: list[float]) -> list[int]:
        return sorted(range(len(scores)), key=lambda j: -scores[j])[:10]

    same = sum(top(scores) == top(reference[i]) for i, scores in load.scores.items())
    return f"max |delta| {max(deltas):.2e}, top-10 order equal in {same}/{len(load.scores)} requests"


def line(name: str, load: Load, pairs: int) -> str:
    return (f"{name:8s} {pairs / load.seconds:8.0f} pairs/s  p50 {percentile(load.latencies, 0.5) * 1e3:6.0f} ms  "
            f"p95 {percentile(load.latencies, 0.95) * 1e3:6.0f} ms  GPU busy {load.busy:>4s}  "
            f"statuses {dict(load.statuses)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48, help="timed requests per configuration (48)")
    parser.add_argument("--callers", type=int, default=8, help="concurrent callers (8)")
    parser.add_argument("--docs", type=int, default=100, help="documents per request (100)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model on the CPU (num_gpus 0), few requests: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        print("SMOKE RUN on the CPU with a tiny model: it checks the script, its figures mean nothing")
        args.requests, args.docs = min(args.requests, 16), min(args.docs, 10)
    elif not torch.cuda.is_available():
        sys.exit("bench/gpu_serve.py needs a CUDA GPU (torch.cuda.is_available() is False here); "
                 "`python -m bench.gpu_serve --smoke` checks the script on the CPU")
    else:
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    nvml = Nvml()
    device, gpus = ("cpu", 0.0) if args.smoke else ("cuda", 1.0)
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        model = build_xlmr_reranker(Path(tmp) / "bge-reranker-v2-m3-shaped", max_positions=8192,
                                    dtype=None if args.smoke else torch.float16, device=device,
                                    **(TINY if args.smoke else BGE_M3))
        print(f"model built and saved in {time.monotonic() - started:.0f} s", flush=True)
        rng = random.Random(0)
        env = {**ENV, **(SMOKE_ENV if args.smoke else {}), "RERANKER_MODEL": str(model)}
        settings = Settings.from_env(env)
        loads: dict[str, Load] = {}
        with Reranker.from_settings(settings) as engine:
            tokenizer = engine.model.tokenizer
            requests = [(f"question {i}: " + random_text(rng, 8), documents_of(tokenizer, rng, args.docs, 180))
                        for i in range(args.requests + 8)]
            warm, timed = requests[:8], requests[8:]
            print(f"engine: {engine.model.dtype} on {engine.model.device}, batch tokens {engine.batch_tokens}",
                  flush=True)

            def in_process(i: int, query: str, documents: list[str]) -> tuple[int, str, list[float]]:
                scores = [0.0] * len(documents)
                for result in engine.rerank(query, documents, raw_scores=True):
                    scores[result.index] = result.score
                return 200, "engine", scores

            send(warm, args.callers, in_process, nvml)
            loads["engine"] = send(timed, args.callers, in_process, nvml)
        if not args.smoke:
            torch.cuda.empty_cache()
        pairs = sum(len(documents) for _, documents in timed)
        reference = loads["engine"].scores
        print(f"\n{len(timed)} requests x {args.docs} documents (~180 tokens/pair), {args.callers} callers, raw scores")

        def report(name: str) -> None:  # as measured: a run cut short keeps what it measured
            print(line(name, loads[name], pairs))
            print(f"         replicas {dict(loads[name].replicas)}; vs engine: {distance(loads[name], reference)}",
                  flush=True)

        report("engine")
        site = os.environ.get("PYTHONPATH", "")
        with local_ray({"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), site) if p)},
                       num_cpus=max(4, (os.cpu_count() or 4) - 2)) as cluster, over_http(cluster.url) as call:
            for name, replicas, share in (("serve-1", 1, gpus), ("serve-2", 2, gpus / 2)):
                # Each configuration afresh: on a host whose GPUs are all held, a rolling update's surge replica
                # (max_surge_percent) finds no GPU, is never RUNNING, and the old replica is never stopped.
                serve.delete("reranker")
                started = time.monotonic()
                # Bounded well inside a device call's 600 s, so that a stuck deploy ends with its reason.
                deploy(serve_config(env, replicas, share), "reranker", timeout=240)
                wait_replicas(replicas, 120)
                print(f"{name}: {replicas} replica(s) x num_gpus {share} running in "
                      f"{time.monotonic() - started:.0f} s", flush=True)
                send(warm, args.callers, call, nvml)
                loads[name] = send(timed, args.callers, call, nvml)
                report(name)
                info = httpx.get(cluster.url + "/info", timeout=30).json()
                print(f"{name} /info: device {info['device']}, dtype {info['dtype']}, "
                      f"batch tokens {info['limits']['batch_tokens']}", flush=True)
            time.sleep(12)  # replicas set their GPU gauges every 5 s; Ray's agent exports them a few seconds later
            # The GPU gauges (on the CPU, where there are none, the queue's: the same parsing), from serve-2's own
            # replicas: a series of serve-1's deleted replica may linger in the agent's export.
            family = "reranker_queue_capacity_pairs" if args.smoke else "reranker_gpu_memory_used_bytes"
            gauges = series(cluster.metrics_port, family)
            print(f"replicas' {family}:", *gauges, sep="\n  ")
            reporting = {r for r in loads["serve-2"].replicas if any(f'replica="{r}"' in g for g in gauges)}
            print(f"{family} exported by {len(reporting)} of serve-2's replicas", flush=True)
            if len(reporting) < 2:
                failures.append(f"{family} from {len(reporting)} of serve-2's replicas, 2 expected")

            before = set(replica_pids("reranker", "RerankModel"))
            if not before:
                sys.exit("FAILED: no RerankModel replica process found to kill; " + "; ".join(failures))
            victim = min(before)
            killed: list[float] = []

            def kill_a_quarter_in(i: int, query: str, documents: list[str]) -> tuple[int, str, list[float] | None]:
                answer = call(i, query, documents)
                if i == len(timed) // 4 and not killed:
                    os.kill(victim, signal.SIGKILL)
                    killed.append(time.monotonic())
                return answer

            loads["kill"] = send(timed, args.callers, kill_a_quarter_in, nvml)
            report("kill")
            # Back once a replacement process runs (Serve has seen the death) and two replicas are RUNNING.
            while not set(replica_pids("reranker", "RerankModel")) - before \
                    or running_replicas("reranker", "RerankModel") != 2:
                if time.monotonic() - killed[0] > 120:
                    failures.append("the killed replica was not replaced within 120 s")
                    break
                time.sleep(0.2)
            print(f"replica {victim} SIGKILLed a quarter into the load: statuses {dict(loads['kill'].statuses)}, "
                  f"two replicas running again {time.monotonic() - killed[0]:.1f} s after the kill", flush=True)
            if set(loads["kill"].statuses) != {200}:
                failures.append(f"answers under a replica kill: {dict(loads['kill'].statuses)}")
    for name, load in loads.items():
        if name != "engine" and set(load.statuses) != {200}:
            failures.append(f"{name}: {dict(load.statuses)}")
    rate = {name: pairs / load.seconds for name, load in loads.items()}
    print(f"serve-1 / engine: {rate['serve-1'] / rate['engine']:.2f}x   "
          f"serve-2 / serve-1: {rate['serve-2'] / rate['serve-1']:.2f}x (two replicas on one GPU)")
    if len(loads["serve-2"].replicas) < 2:
        failures.append(f"serve-2 answered from {dict(loads['serve-2'].replicas)}: one replica only")
    if failures:
        sys.exit("FAILED: " + "; ".join(failures))
    print("every check passed")


if __name__ == "__main__":
    main()
