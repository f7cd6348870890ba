"""CPU speed of every backend and precision through the service, against raw CrossEncoder.predict (float32)
and the Infinity server, on one workload, in one run.

Each mode is app.py in its own process on a free loopback port (the pair-score cache off, so every pair is
scored); Infinity (bench/peers.py, its own venv) runs beside them. All are started first and stay up, each paused
(SIGSTOP) while another is measured. Then, for each of `--rounds` rounds: raw predict scores the workload in
this process, and every contender, in an order rotated each round, gets the same requests over HTTP from
`--clients` concurrent callers (a warm-up pass first, in round 1). A contender's ratio in a round is its pairs/s
over that round's raw predict; the table gives the median ratio and its range over the rounds. On a shared host
whose speed drifts (a 2-core VM's rate moved by up to 1.5x between minutes here), each ratio then rests on a
baseline measured minutes, not a whole run, away, and the range shows how far one round could mislead.
Also printed: the Spearman correlation of each query's ranking with raw predict float32 (mean and lowest),
p50/p95 latency over all rounds, and the precision the service says it ran (/info).
The `(1 stream)` modes are the default and exact float32 with RERANKER_CPU_STREAMS=1: one batch at a time on
every thread, side by side with the default's two streams (docs/cpu.md#streams). `default (2048-token passes)` is
the default at the budget `auto` had before 2026-12-04 on one-thread streams (docs/benchmarks.md#batch-token-budget).
int8 is measured as served: when its load-time guard refuses it, the service runs its fallback and the row
says so. `--int8-bar -1` measures int8 whatever its ranking quality.
Run: .venv/bin/python -m bench.cpu   [--rounds 3 --requests 16 --docs 50 --clients 4 --no-infinity]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # as start.sh runs the service

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from sentence_transformers import CrossEncoder  # noqa: E402

from bench import peers  # noqa: E402
from bench.report import host, percentile  # noqa: E402
from bench.workload import Request, build_benchmark_model, build_workload  # noqa: E402
from reranker.backends.int8 import spearman  # noqa: E402
from tests.servers import app_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# name -> the service's RERANKER_* for that mode (RERANKER_DEVICE=cpu and the cache off in all)
MODES = {
    "torch float32": {"RERANKER_BACKEND": "torch", "RERANKER_DTYPE": "float32"},
    "torch bfloat16": {"RERANKER_BACKEND": "torch", "RERANKER_DTYPE": "bfloat16"},
    "openvino float32": {"RERANKER_BACKEND": "openvino", "RERANKER_DTYPE": "float32"},
    "openvino bfloat16": {"RERANKER_BACKEND": "openvino", "RERANKER_DTYPE": "bfloat16"},
    "default (auto)": {},
    "default (1 stream)": {"RERANKER_CPU_STREAMS": "1"},
    "default (2048-token passes)": {"RERANKER_BATCH_TOKENS": "2048"},
    "openvino float32 (1 stream)": {"RERANKER_BACKEND": "openvino", "RERANKER_DTYPE": "float32",
                                   "RERANKER_CPU_STREAMS": "1"},
    "openvino int8 weights": {"RERANKER_BACKEND": "openvino", "RERANKER_DTYPE": "int8",
                              "RERANKER_INT8_MODE": "weights"},
    "openvino int8 static": {"RERANKER_BACKEND": "openvino", "RERANKER_DTYPE": "int8",
                             "RERANKER_INT8_MODE": "static"},
}


Scorer = Callable[[Request], np.ndarray]


@dataclass(frozen=True)
class Round:
    """One contender's load in one round."""

    pairs_per_s: float
    latencies: list[float]
    scores: list[np.ndarray]


@dataclass
class Contender:
    name: str
    ran: str  # what the service says it ran (backend, dtype, why), or the peer's setup
    score: Scorer
    pid: int | None = None  # its server process, paused while another contender is measured
    rounds: list[Round] = field(default_factory=list)

    def summary(self, baseline: Contender) -> str:
        """The table's row: median pairs/s and ratio (each round against `baseline` in the same round), their
        ranges, ranking fidelity against the baseline's scores, latency."""
        rhos = [spearman(a, b) for a, b in zip(self.rounds[0].scores, baseline.rounds[0].scores, strict=True)]
        rates = [r.pairs_per_s for r in self.rounds]
        ratios = [r.pairs_per_s / b.pairs_per_s for r, b in zip(self.rounds, baseline.rounds, strict=True)]
        latencies = [latency for r in self.rounds for latency in r.latencies]
        return (f"| {self.name} | {statistics.median(rates):.1f}{spread(rates, '.1f')} | "
                f"{statistics.median(ratios):.2f}x{spread(ratios, '.2f')} | {np.mean(rhos):.4f} / {min(rhos):.4f} | "
                f"{percentile(latencies, 0.5) * 1000:.0f} / {percentile(latencies, 0.95) * 1000:.0f} | {self.ran} |")


def spread(values: list[float], spec: str) -> str:
    return f" ({min(values):{spec}}-{max(values):{spec}})" if min(values) != max(values) else ""


def run_load(score: Scorer, warm_up: list[Request], workload: list[Request], clients: int
             ) -> tuple[float, list[float], list[np.ndarray]]:
    """Send `warm_up`, then `workload` timed, from `clients` concurrent callers: seconds, latencies, scores."""
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(score, warm_up))

        def timed(request: Request) -> tuple[float, np.ndarray]:
            started = time.perf_counter()
            scores = score(request)
            return time.perf_counter() - started, scores

        started = time.perf_counter()
        outcomes = list(pool.map(timed, workload))
        elapsed = time.perf_counter() - started
    return elapsed, [o[0] for o in outcomes], [o[1] for o in outcomes]


def service(model: Path, env: dict[str, str], cache_dir: str
            ) -> AbstractContextManager[tuple[str, subprocess.Popen[bytes]]]:
    """app.py in one mode; every mode on the CPU with the pair-score cache off and request lines sampled away."""
    return app_server({"RERANKER_MODEL": str(model), "RERANKER_DEVICE": "cpu", "RERANKER_CACHE_SIZE": "0",
                        "RERANKER_LOG_SAMPLE_RATE": "0", "RERANKER_CACHE_DIR": cache_dir, **env}, ready_s=900)


def service_scorer(client: httpx.Client) -> Scorer:
    def score(request: Request) -> np.ndarray:
        response = client.post("/v1/rerank", json={"query": request.query, "documents": request.documents,
                                                   "raw_scores": True})
        response.raise_for_status()
        out = np.empty(len(request.documents))
        for result in response.json()["results"]:
            out[result["index"]] = result["relevance_score"]
        return out

    return score


def start_services(stack: ExitStack, model: Path, modes: list[str], cache_dir: str,
                   int8_bar: float | None) -> list[Contender]:
    """Every mode's service, up until `stack` closes."""
    out = []
    for name in modes:
        env = dict(MODES[name])
        if int8_bar is not None and "int8" in name:
            env["RERANKER_INT8_MIN_SPEARMAN"] = str(int8_bar)
        url, process = stack.enter_context(service(model, env, cache_dir))
        client = stack.enter_context(httpx.Client(base_url=url, timeout=900))
        info = client.get("/info").json()
        out.append(Contender(name, f"{info['backend']} {info['dtype']} ({info['dtype_reason']})",
                             service_scorer(client), process.pid))
        print(f"started {name}: {out[-1].ran}", flush=True)
    return out


def peer_scorer(peer: peers.Infinity) -> Scorer:
    return lambda request: np.asarray(peer.rerank(request.query, request.documents))


def start_infinity(stack: ExitStack, model: Path, tmp: Path, *, everything: bool) -> list[Contender]:
    """Infinity (bench/peers.py) in every CPU variant, or its fastest, up until `stack` closes."""
    out = []
    try:
        peers.ensure_venv()
        for variant in peers.VARIANTS if everything else (peers.fastest(),):
            peer = stack.enter_context(peers.Infinity.start(model, workdir=tmp, variant=variant))
            out.append(Contender(f"infinity {variant.name}", "infinity-emb, requirements-infinity.txt",
                                 peer_scorer(peer), peer.process.pid))
            print(f"started infinity {variant.name}", flush=True)
    except peers.PeerError as err:
        print(f"infinity: skipped ({err})")
    return out


@contextmanager
def only(running: Contender | None, contenders: list[Contender]) -> Iterator[None]:
    """Pause every contender's server but `running` (None: all of them) for the block: an idle service still
    wakes its event loop, and each of the 8 would take its share of the cores from the one measured."""
    paused = [c.pid for c in contenders if c is not running and c.pid is not None]
    for pid in paused:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in paused:
            os.kill(pid, signal.SIGCONT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    parser.add_argument("--int8-bar", type=float, default=None, help="RERANKER_INT8_MIN_SPEARMAN for the int8 modes")
    parser.add_argument("--no-infinity", action="store_true")
    parser.add_argument("--infinity", choices=("fastest", "all"), default="all",
                        help="Infinity's fastest CPU setup on this CPU as bench/peers.py measured it (torch bfloat16 "
                             "with native bfloat16, else ONNX Runtime int8), or every variant")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or args.rounds < 1:
        parser.error(f"unknown mode(s) {', '.join(unknown)}" if unknown else "--rounds must be at least 1")

    workload = build_workload(args.requests, args.docs)
    warm_up = build_workload(4, args.docs, seed=1)
    pairs = sum(len(r.documents) for r in workload)
    print(f"host: {host()}; {pairs} pairs in {len(workload)} requests, {args.clients} clients, "
          f"{args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        model = build_benchmark_model(Path(tmp) / "minilm")
        raw = CrossEncoder(str(model), device="cpu")

        def predict(r: Request) -> np.ndarray:
            return np.asarray(raw.predict([(r.query, d) for d in r.documents], batch_size=32,
                                          show_progress_bar=False))

        baseline = Contender("raw predict float32 (baseline)", "CrossEncoder.predict(batch_size=32), one caller",
                             predict)
        contenders = start_services(stack, model, modes, str(Path(tmp) / "cache"), args.int8_bar)
        if not args.no_infinity:
            contenders += start_infinity(stack, model, Path(tmp), everything=args.infinity == "all")
        predict(warm_up[0])
        for index in range(args.rounds):
            with only(None, contenders):
                started = time.perf_counter()
                scores = [predict(r) for r in workload]
                elapsed = time.perf_counter() - started
            raw_rate = pairs / elapsed
            baseline.rounds.append(Round(raw_rate, [elapsed / len(workload)] * len(workload), scores))
            print(f"round {index + 1}: raw predict {raw_rate:.1f} pairs/s", flush=True)
            turn = index % len(contenders) if contenders else 0
            for contender in contenders[turn:] + contenders[:turn]:
                with only(contender, contenders):
                    elapsed, latencies, scores = run_load(contender.score, warm_up if index == 0 else [], workload,
                                                          args.clients)
                contender.rounds.append(Round(pairs / elapsed, latencies, scores))
                print(f"round {index + 1}: {contender.name:28s} {pairs / elapsed:7.1f} pairs/s  "
                      f"{pairs / elapsed / raw_rate:5.2f}x raw predict", flush=True)
    print()
    print("| mode | pairs/s: median (range) | x raw predict: median (range) | Spearman mean / min | p50 / p95 ms "
          "| ran |")
    print("|---|---|---|---|---|---|")
    for contender in [baseline, *contenders]:
        print(contender.summary(baseline))


if __name__ == "__main__":
    main()
