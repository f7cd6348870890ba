"""Start time of a new process on the OpenVINO backend: the full load against the start from the conversion cache.

Each start is a fresh interpreter that imports the engine and loads the model, as a restarted service or a
replacement Ray Serve replica does. Three kinds, on one model and one cache directory:

- first start: nothing cached, the model is loaded in PyTorch and converted;
- full load, graph cached: what every restart did before the cache stored how to tokenize (serving.json is
  removed before each such start);
- start from the cache: the tokenizer and graph only, no torch, transformers or sentence-transformers import.

Printed per kind: wall time of the process (interpreter start to model warm), its CPU time, peak memory and
which of torch and transformers it imported; and the ratio of the full load to the start from the cache.

Run: .venv/bin/python -m bench.start [--model PATH] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from bench.report import host  # noqa: E402
from bench.workload import build_benchmark_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# The started process: loads the model and reports what that cost it.
CHILD = """
import json, resource, sys, time
from reranker.loading import load_model
from reranker.settings import Settings

model = load_model(Settings(model=sys.argv[1], cache_dir=sys.argv[2], backend="openvino", dtype="float32",
                            device="cpu", max_length=512))
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu_s": usage.ru_utime + usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024,
                  "from_cache": model.from_cache,
                  "imported": [name for name in ("torch", "transformers") if name in sys.modules]}))
"""


def start(model: Path, cache: Path) -> dict:
    """One fresh process loading `model` with `cache`: its report plus the wall time the parent saw."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(model), str(cache)], capture_output=True, text=True,
                          env=env, timeout=600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the start failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": wall}


def forget_tokenizing(cache: Path) -> None:
    for stored in (cache / "openvino").glob("*/serving.json"):
        stored.unlink()


def row(name: str, runs: list[dict]) -> str:
    def median(key: str) -> float:
        return statistics.median(run[key] for run in runs)

    imported = sorted({name for run in runs for name in run["imported"]})
    return (f"| {name} | {len(runs)} | {median('wall_s'):.2f} s | {median('cpu_s'):.2f} s | "
            f"{median('peak_mib'):.0f} MiB | {', '.join(imported) or 'neither'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local model directory (default: the MiniLM-L6 benchmark model)")
    parser.add_argument("--repeats", type=int, default=3, help="starts of each cached kind, interleaved")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else build_benchmark_model(Path(tmp) / "minilm-l6-reranker")
        cache = Path(tmp) / "cache"
        first = [start(model, cache)]
        full: list[dict] = []
        cached: list[dict] = []
        for _ in range(args.repeats):  # interleaved, so that a busy moment hits both kinds alike
            forget_tokenizing(cache)
            full.append(start(model, cache))  # stores serving.json again
            cached.append(start(model, cache))
    if not all(run["from_cache"] and not run["imported"] for run in cached):
        raise SystemExit("the start from the cache loaded the model in full: is it a text-pair cross-encoder?")

    print(f"machine: {host()}")
    print(f"model: {model.name}, OpenVINO float32; median of each kind (wall: interpreter start to model warm)")
    print("| start | runs | wall | CPU | peak memory | torch / transformers imported |")
    print("|---|---|---|---|---|---|")
    print(row("first (convert)", first))
    print(row("full load, graph cached", full))
    print(row("from the cache", cached))
    wall = statistics.median(r["wall_s"] for r in full) / statistics.median(r["wall_s"] for r in cached)
    cpu = statistics.median(r["cpu_s"] for r in full) / statistics.median(r["cpu_s"] for r in cached)
    print(f"start from the cache: {wall:.2f}x faster than the full load (wall), {cpu:.2f}x less CPU")


if __name__ == "__main__":
    main()
