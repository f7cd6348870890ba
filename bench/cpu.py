"""CPU speed of every backend and precision through the service, against raw CrossEncoder.predict (float32)
and the Infinity server, on one workload, in one run.

Each mode is app.py in its own process on a free loopback port (the pair-score cache off, so every pair is
scored), sent a warm-up pass and then the same requests over /v1/rerank from `--clients` concurrent callers.
Infinity (bench/peers.py, its own venv) gets the same requests over its /rerank. Printed per mode: pairs/s,
the ratio to raw predict float32, the Spearman correlation of each query's ranking with raw predict float32
(mean and lowest), p50/p95 latency, and the precision the service says it ran (/info).
int8 is measured as served: when its load-time guard refuses it, the service runs its fallback and the row
says so. `--int8-bar -1` measures int8 whatever its ranking quality (the row is marked).
Run: .venv/bin/python -m bench.cpu   [--requests 16 --docs 50 --clients 4 --no-infinity]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # as start.sh runs the service

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from sentence_transformers import CrossEncoder  # noqa: E402

from bench.report import host, percentile  # noqa: E402
from bench.workload import Request, build_benchmark_model, build_workload  # noqa: E402
from reranker.backends.int8 import spearman  # noqa: E402
from tests.servers import app_process  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# name -> the service's RERANKER_* for that mode (RERANKER_DEVICE=cpu and the cache off in all)
MODES = {
    "torch float32": {"RERANKER_BACKEND": "torch", "RERANKER_DTYPE": "float32"},
    "torch bfloat16": {"RERANKER_BACKEND": "torch", "RERANKER_DTYPE": "bfloat16"},
    "openvino float32": {"RERANKER_BACKEND": "openvino", "RERANKER_DTYPE": "float32"},
    "openvino bfloat16": {"RERANKER_BACKEND": "openvino", "RERANKER_DTYPE": "bfloat16"},
    "default (auto)": {},
    "openvino int8 weights": {"RERANKER_BACKEND": "openvino", "RERANKER_DTYPE": "int8",
                              "RERANKER_INT8_MODE": "weights"},
    "openvino int8 static": {"RERANKER_BACKEND": "openvino", "RERANKER_DTYPE": "int8",
                             "RERANKER_INT8_MODE": "static"},
}


@dataclass(frozen=True)
class Row:
    name: str
    ran: str  # what the service says it ran (backend, dtype, why), or the peer's setup
    pairs_per_s: float
    spearman_mean: float
    spearman_min: float
    p50_ms: float
    p95_ms: float


Scorer = Callable[[Request], np.ndarray]


def run_load(score: Scorer, warm_up: list[Request], workload: list[Request], clients: int
             ) -> tuple[float, list[float], list[np.ndarray]]:
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


def row(name: str, ran: str, workload: list[Request], elapsed: float, latencies: list[float],
        scores: list[np.ndarray], reference: list[np.ndarray]) -> Row:
    rhos = [spearman(a, b) for a, b in zip(scores, reference, strict=True)]
    pairs = sum(len(r.documents) for r in workload)
    return Row(name, ran, pairs / elapsed, float(np.mean(rhos)), min(rhos), percentile(latencies, 0.5) * 1000,
               percentile(latencies, 0.95) * 1000)


def service(model: Path, env: dict[str, str], cache_dir: str) -> AbstractContextManager[str]:
    """app.py in one mode; every mode on the CPU with the pair-score cache off and request lines sampled away."""
    return app_process({"RERANKER_MODEL": str(model), "RERANKER_DEVICE": "cpu", "RERANKER_CACHE_SIZE": "0",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    parser.add_argument("--int8-bar", type=float, default=None, help="RERANKER_INT8_MIN_SPEARMAN for the int8 modes")
    parser.add_argument("--no-infinity", action="store_true")
    parser.add_argument("--infinity", choices=("fastest", "all"), default="all",
                        help="Infinity's fastest CPU setup as bench/peers.py measured it, or every variant")
    args = parser.parse_args()

    workload = build_workload(args.requests, args.docs)
    warm_up = build_workload(4, args.docs, seed=1)
    print(f"host: {host()}; {sum(len(r.documents) for r in workload)} pairs in {len(workload)} requests, "
          f"{args.clients} clients")
    with tempfile.TemporaryDirectory() as tmp:
        model = build_benchmark_model(Path(tmp) / "minilm")
        cache_dir = str(Path(tmp) / "cache")
        raw = CrossEncoder(str(model), device="cpu")

        def predict(r: Request) -> np.ndarray:
            return np.asarray(raw.predict([(r.query, d) for d in r.documents], batch_size=32,
                                          show_progress_bar=False))

        predict(warm_up[0])
        started = time.perf_counter()
        reference = [predict(r) for r in workload]
        raw_elapsed = time.perf_counter() - started
        rows = [row("raw predict float32 (baseline)", "CrossEncoder.predict(batch_size=32), one caller", workload,
                    raw_elapsed, [raw_elapsed / len(workload)] * len(workload), reference, reference)]
        print_row(rows[0], rows[0].pairs_per_s)
        for name in [m.strip() for m in args.modes.split(",") if m.strip()]:
            env = dict(MODES[name])
            if args.int8_bar is not None and "int8" in name:
                env["RERANKER_INT8_MIN_SPEARMAN"] = str(args.int8_bar)
            with service(model, env, cache_dir) as url, httpx.Client(base_url=url, timeout=900) as client:
                info = client.get("/info").json()
                ran = f"{info['backend']} {info['dtype']} ({info['dtype_reason']})"
                elapsed, latencies, scores = run_load(service_scorer(client), warm_up, workload, args.clients)
            rows.append(row(name, ran, workload, elapsed, latencies, scores, reference))
            print_row(rows[-1], rows[0].pairs_per_s)
        if not args.no_infinity:
            rows.extend(infinity_rows(model, Path(tmp), warm_up, workload, args.clients, reference, rows[0],
                                      everything=args.infinity == "all"))
    print()
    print("| mode | pairs/s | x raw predict | Spearman mean / min | p50 / p95 ms | ran |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.pairs_per_s:.1f} | {r.pairs_per_s / rows[0].pairs_per_s:.2f}x | "
              f"{r.spearman_mean:.4f} / {r.spearman_min:.4f} | {r.p50_ms:.0f} / {r.p95_ms:.0f} | {r.ran} |")


def infinity_rows(model: Path, tmp: Path, warm_up: list[Request], workload: list[Request], clients: int,
                  reference: list[np.ndarray], baseline: Row, *, everything: bool) -> list[Row]:
    """Infinity (bench/peers.py) in every CPU variant, or its fastest, the same requests over its /rerank."""
    try:
        from bench import peers
    except ImportError as err:
        print(f"infinity: skipped ({err})")
        return []
    out = []
    try:
        peers.ensure_venv()
        for variant in peers.VARIANTS if everything else (peers.FASTEST,):
            with peers.Infinity.start(model, workdir=tmp, variant=variant) as peer:
                score: Scorer = lambda r: np.asarray(peer.rerank(r.query, r.documents))  # noqa: E731
                elapsed, latencies, scores = run_load(score, warm_up, workload, clients)
            out.append(row(f"infinity {variant.name}", "infinity-emb, requirements-infinity.txt",
                           workload, elapsed, latencies, scores, reference))
            print_row(out[-1], baseline.pairs_per_s)
    except peers.PeerError as err:
        print(f"infinity: skipped ({err})")
    return out


def print_row(r: Row, baseline: float) -> None:
    print(f"{r.name:32s} {r.pairs_per_s:8.1f} pairs/s  {r.pairs_per_s / baseline:5.2f}x raw predict  "
          f"Spearman {r.spearman_mean:.4f} (min {r.spearman_min:.4f})  p50 {r.p50_ms:.0f} ms  p95 {r.p95_ms:.0f} ms  "
          f"[{r.ran}]", flush=True)


if __name__ == "__main__":
    main()
