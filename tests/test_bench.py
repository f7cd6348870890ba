"""bench/gpu.py cannot be measured here, but its code runs: a smoke run on the CPU, and its no-CUDA exit."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import openvino as ov
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# The smoke run takes 3 min on a quiet 2-core CPU and took 11.5 min under a load average of 10: this bounds a hang.
BENCH_TIMEOUT_S = 1800


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench.gpu", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=BENCH_TIMEOUT_S, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: bench/gpu.py would run for real")
def test_the_benchmark_workload_sends_each_document_once_per_request() -> None:
    """The service scores a repeated document once, raw predict every copy: about 2.5% of the documents repeated
    one beside them, a head start for the service in every ratio."""
    from bench.workload import build_workload

    requests = build_workload(32, 100)
    assert all(len(set(r.documents)) == len(r.documents) == 100 for r in requests)
    assert len({r.query for r in requests}) == 32


def test_gpu_bench_says_it_needs_cuda() -> None:
    result = run_bench()
    assert result.returncode == 1
    assert "needs a CUDA GPU" in result.stderr and "--smoke" in result.stderr


def test_gpu_bench_smoke_run_prints_every_workload_and_variant_for_both_shapes(tmp_path: Path) -> None:
    result = run_bench("--smoke", "--profile", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ["## bge-reranker-v2-m3 shape", "## Qwen3-Reranker-0.6B shape", "32 x 100 short passages",
                 "16 x 100 RAG chunks", "3 x 1000-document requests", "400 x 8 documents, 16 callers",
                 "eager-16k: batch tokens 16384, compile off", "compile-32k: batch tokens 32768, compile on"]:
        assert line in result.stdout
    assert result.stdout.count("x ") >= 20  # ratios printed: 5 workloads x 2 variants x 2 shapes
    # On the CPU every variant runs float32, so each must reproduce float32 raw predict.
    fidelity = [line for line in result.stdout.splitlines() if "Spearman mean" in line]
    assert [line.split()[0] for line in fidelity] == ["eager-16k", "compile-32k"]
    for line in fidelity:
        assert "meets the bar: Spearman mean 1.00000 min 1.00000" in line
        assert float(line.rsplit(" ", 1)[1]) < 1e-4, line  # max |delta|
    # --profile: the first variant's profile per shape, operators from the engine's own threads included
    # (the model runs only on its device thread), every operator listed however little time it took.
    for shape in ("bge-reranker-v2-m3", "Qwen3-Reranker-0.6B"):
        report = (tmp_path / f"profile-{shape}-eager-16k.txt").read_text()
        engine = re.search(r"operators run on the engine's threads: (\d+) of (\d+)", report)
        assert engine is not None and int(engine.group(1)) > 0, report[:500]
        assert "aten::linear" in report or "aten::addmm" in report, report[:500]
        assert (tmp_path / f"trace-{shape}-eager-16k.json.gz").stat().st_size > 1000


def test_gpu_bench_names_the_variants_it_knows() -> None:
    result = run_bench("--smoke", "--variants", "eager-16k,fastest")
    assert result.returncode == 1
    assert "unknown variant(s) fastest" in result.stderr and "cudagraphs-32k" in result.stderr


def test_the_carried_float16_minilm_builds_the_same_float32_benchmark_model(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/gpu_prepare.sh carries a float16 copy of MiniLM to the GPU host; RERANKER_BENCH_MINILM_DIR reads it."""
    import numpy as np
    from scipy.stats import spearmanr
    from sentence_transformers import CrossEncoder

    from bench.workload import build_benchmark_model, export_minilm, minilm_source
    from tests.tiny_models import random_text

    carried = export_minilm(tmp_path / "carried")
    original = CrossEncoder(str(build_benchmark_model(tmp_path / "original")), device="cpu")
    monkeypatch.setenv("RERANKER_BENCH_MINILM_DIR", str(carried))
    assert minilm_source() == carried
    copy = CrossEncoder(str(build_benchmark_model(tmp_path / "copy")), device="cpu")
    assert next(copy.parameters()).dtype == torch.float32  # still the float32 reference
    rng = random.Random(5)
    pairs = [("how do I parse a file", random_text(rng, rng.randint(5, 80))) for _ in range(40)]
    want, got = original.predict(pairs, show_progress_bar=False), copy.predict(pairs, show_progress_bar=False)
    assert spearmanr(want, got).statistic > 0.999
    assert float(np.max(np.abs(want - got))) < 5e-3


def test_host_path_bench_prints_ratios_against_raw_predict() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.host_path", "--requests", "2", "--docs", "10"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if "host path" in line]
    assert len(lines) == 3 and "(1.00x)" in lines[0]
    for line in lines[1:]:
        assert "batches of <= 2048 tokens" in line and "ms of host time per batch" in line
        assert float(line.split("(")[1].split("x)")[0]) > 0


def test_roofline_bench_prints_each_precision_against_a_measured_peak_and_where_the_time_goes() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.roofline", "--requests", "2", "--docs", "10"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "20 pairs" in result.stdout and "MFLOP per token" in result.stdout
    ceiling, _, split = result.stdout.partition("where one pass spends its time")

    def table(text: str) -> dict[str, list[str]]:
        return {line.split("|")[1].strip(): line.split("|") for line in text.splitlines()
                if line.startswith(("| f32", "| bf16", "| int8"))}

    rows = table(ceiling)
    assert set(rows) == {"f32", "bf16", "int8"}
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):  # OpenVINO would run it as f32
        assert rows.pop("bf16")[2].strip() == "runs as f32 on this CPU"
    else:
        assert re.search(r"int8's fastest dense layer: \d+\.\d\dx bfloat16's", ceiling)
    for cells in rows.values():
        pairs_per_s, achieved, peak = (float(cells[i]) for i in (2, 3, 4))
        assert pairs_per_s > 0 and achieved > 0 and peak > 0
        assert cells[5].strip().endswith("%")
    shares = table(split)
    assert set(shares) == set(rows)
    for precision, cells in shares.items():
        dense, attention = (re.fullmatch(r"(\d+)%, (\d+)", cells[i].strip()) for i in (2, 4))
        assert dense and attention, cells
        other = int(cells[5].strip().rstrip("%"))
        assert 97 <= int(dense[1]) + int(attention[1]) + other <= 103  # rounded shares of one pass
        assert int(dense[1]) > 0 and int(attention[1]) > 0 and int(dense[2]) > 0 and int(attention[2]) > 0
        in_int8 = int(cells[3].strip().rstrip("%"))
        # Static int8 runs its quantized layers in int8 kernels; the float precisions never do.
        assert in_int8 > 0 if precision == "int8" else in_int8 == 0, cells
        assert re.fullmatch(r"(\w+ \d+%)(, \w+ \d+%){0,2}", cells[6].strip()), cells


def test_roofline_large_encoder_has_bert_large_shapes_under_the_benchmark_tokenizer(tmp_path: Path) -> None:
    """`--encoder large` (too slow to run whole here: NNCF quantizes 335M parameters) builds what it says."""
    from transformers import AutoConfig, AutoTokenizer

    from bench.roofline import build_large_encoder
    from bench.workload import minilm_source

    path = build_large_encoder(tmp_path / "large")
    config = AutoConfig.from_pretrained(path)
    shapes = (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_attention_heads)
    assert shapes == (24, 1024, 4096, 16) and config.num_labels == 1
    assert AutoTokenizer.from_pretrained(path).get_vocab() == AutoTokenizer.from_pretrained(minilm_source()).get_vocab()


def test_start_bench_compares_the_full_load_with_the_start_from_the_cache(bert_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "bench.start", "--model", str(bert_dir), "--repeats", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in result.stdout.splitlines() if line.startswith("| ")}
    assert rows["full load, graph cached"][6].strip() == "torch, transformers"
    assert rows["from the cache"][6].strip() == "neither"
    assert re.search(r"start from the cache: \d+\.\d\dx faster than the full load \(wall\), \d+\.\d\dx less CPU",
                     result.stdout)


def test_cpu_bench_measures_each_mode_against_raw_predict_in_every_round() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.cpu", "--rounds", "2", "--requests", "2", "--docs", "8",
                             "--clients", "2", "--modes", "openvino float32", "--no-infinity"], cwd=ROOT,
                            capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "16 pairs in 2 requests, 2 clients, 2 rounds" in result.stdout
    for index in (1, 2):  # each round measures its own baseline, then the mode against it
        assert re.search(rf"round {index}: raw predict \d+\.\d pairs/s", result.stdout)
        assert re.search(rf"round {index}: openvino float32 +\d+\.\d pairs/s +\d+\.\d\dx raw predict", result.stdout)
    rows = {line.split("|")[1].strip(): line.split("|") for line in result.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) == {"mode", "raw predict float32 (baseline)", "openvino float32"}
    cells = rows["openvino float32"]
    assert re.fullmatch(r" \d+\.\d\dx( \(\d+\.\d\d-\d+\.\d\d\))? ", cells[3])  # the median ratio and its range
    assert cells[4].strip().startswith("1.0000 /")  # float32 ranks as raw predict float32 does
    assert cells[6].strip() == "openvino float32 (RERANKER_DTYPE=float32)"


def test_cpu_bench_names_the_modes_it_knows() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.cpu", "--modes", "openvino fp8", "--no-infinity"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "unknown mode(s) openvino fp8" in result.stderr


def test_streams_bench_alternates_one_and_two_streams_in_process() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.streams", "--rounds", "2", "--requests", "2", "--docs", "8",
                             "--clients", "2"], cwd=ROOT, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "16 pairs in 2 requests, 2 callers, 2 rounds; OpenVINO " in result.stdout
    rounds = re.findall(r"round \d: one stream (\d+\.\d) pairs/s, two (\d+\.\d): (\d+\.\d\d)x", result.stdout)
    assert len(rounds) == 2 and all(float(one) > 0 and float(two) > 0 for one, two, _ in rounds), result.stdout
    assert re.search(r"two streams / one: \d+\.\d\dx \(median; \d+\.\d\d-\d+\.\d\dx\)", result.stdout)


def test_int8_streams_bench_scores_each_compile_against_float32_and_says_whether_the_fault_is_here() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.int8_streams", "--requests", "1", "--docs", "8"], cwd=ROOT,
                            capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "8 pairs in " in result.stdout
    rows = re.findall(r"^\| int8 (weights|static) \| \{.*'NUM_STREAMS': (\d).*\} \| (\d), (\d), (bf16|f32) \| "
                      r"(\d+\.\d{4}) \| (-?\d\.\d{4}|nan) \| (right|WRONG) \|$", result.stdout, re.MULTILINE)
    assert len(rows) == 10, result.stdout  # five compiles of each graph
    wrong = sum(row[-1] == "WRONG" for row in rows)
    verdict = "the fault reproduces" if wrong else "no fault: every int8 graph scores right on two streams here"
    assert verdict in result.stdout


def test_infinity_is_measured_in_its_fastest_setup_for_this_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import peers
    from reranker.backends import cpu

    assert peers.fastest(native_bf16=True) == peers.TORCH_BF16  # torch emulates bfloat16 without it: 0.17x
    assert peers.fastest(native_bf16=False) == peers.ONNX_INT8
    monkeypatch.setattr(cpu, "cpuinfo", lambda: [{"processor": "0", "flags": "avx2 avx512_bf16"}])
    assert peers.fastest() == peers.TORCH_BF16
    monkeypatch.setattr(cpu, "cpuinfo", lambda: [{"processor": "0", "flags": "avx2 fma"}])
    assert peers.fastest() == peers.ONNX_INT8


def test_copies_bench_runs_concurrent_copies_of_the_bare_model() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.copies", "--copies", "1,2", "--seconds", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    one = re.search(r"1 copy x 1 thread: (\d+\.\d) pairs/s in all \((\d+\.\d)\); 1\.00x 1 copy", result.stdout)
    two = re.search(r"2 copies x 1 thread: (\d+\.\d) pairs/s in all \((\d+\.\d), (\d+\.\d)\); (\d+\.\d\d)x 1 copy",
                    result.stdout)
    assert one is not None and two is not None, result.stdout
    assert float(one.group(1)) > 0 and float(two.group(2)) > 0 and float(two.group(3)) > 0  # every copy scored
    # The printed ratio is of the unrounded rates: allow for the rates' rounding (0.05 each) and its own (0.005).
    rate_one, rate_two, ratio = float(one.group(1)), float(two.group(1)), float(two.group(4))
    assert abs(rate_two / rate_one - ratio) <= 0.005 + ratio * 0.05 * (1 / rate_one + 1 / rate_two) + 1e-9


def test_scale_bench_sends_each_request_size_the_same_pairs() -> None:
    """20- and 100-passage requests, measured side by side: each size gets --pairs in whole requests (at least one
    per caller) after a warm-up of one request per caller."""
    import warnings

    with warnings.catch_warnings():  # bench.scale imports Ray Serve, whose pydantic models warn on import
        warnings.simplefilter("ignore", DeprecationWarning)
        from bench.scale import build_loads

    loads = build_loads([20, 100], 2400, clients=8)
    assert [(load.docs, len(load.workload), len(load.warm_up)) for load in loads] == [(20, 120, 8), (100, 24, 8)]
    assert all(len(r.documents) == load.docs for load in loads for r in [*load.workload, *load.warm_up])
    assert len(build_loads([500], 2400, clients=8)[0].workload) == 8


def test_burst_bench_measures_the_admitted_request_and_the_refusals_against_the_lone_request(bert_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "bench.burst", "--rounds", "1", "--callers", "4", "--docs", "10",
                             "--chars", "300", "--model", str(bert_dir), "--compare", str(ROOT)], cwd=ROOT,
                            capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "burst: 4 requests x 10 passages of ~300 characters at once, RERANKER_MAX_QUEUE=15" in result.stdout
    for name in ("this checkout", str(ROOT)):  # the checkout compared, measured in the same rounds
        section = result.stdout.split(f"\n{name}\n", 1)[1]
        admitted = re.search(r"lone request: \d+\.\d\d s\n  admitted in the burst: \d+\.\d\d s, \d+\.\d\dx the lone "
                             r"request \(\d+\.\d\d-\d+\.\d\d\); admitted per round: \[(\d)\]", section)
        refused = re.search(r"429s: (\d)", section)
        assert admitted is not None and refused is not None, section
        assert int(admitted.group(1)) >= 1 and int(admitted.group(1)) + int(refused.group(1)) == 4
        assert re.search(r"server CPU for the burst: \d+\.\d\dx the lone request's", section)


def test_waiting_bench_measures_both_cancels_against_the_plain_event() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.waiting", "--waiting", "8", "--seconds", "0.3",
                             "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^(threading\.Event|CancelSignal) +(\d+\.\d\d)% of a core .*; (\d+\.\d{3})x threading\.Event$",
                      result.stdout, re.M)
    assert [row[0] for row in rows] == ["threading.Event", "CancelSignal"], result.stdout
    assert rows[0][2] == "1.000"


def test_mixed_bench_measures_small_requests_beside_bulk_ones_both_ways() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.mixed", "--rounds", "2", "--bulk", "1", "--docs", "24",
                             "--small-docs", "2", "--seconds", "0.5"], cwd=ROOT, capture_output=True, text=True,
                            timeout=BENCH_TIMEOUT_S, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 bulk callers x 24 documents, one caller of 2-document requests" in result.stdout
    runs = re.findall(r"^round (\d) +(cut-ins|none): small p50 \d+ ms, p95 \d+ ms \((\d+) requests; alone \d+ ms\), "
                      r"bulk (\d+\.\d) pairs/s, all (\d+\.\d), \d+ tokens/s, padding \d+\.\d%$", result.stdout, re.M)
    # Alternating: with cut-ins first in round 1, without in round 2.
    assert [(r[0], r[1]) for r in runs] == [("1", "cut-ins"), ("1", "none"), ("2", "none"), ("2", "cut-ins")], \
        result.stdout
    assert all(int(r[2]) >= 1 and 0 < float(r[3]) <= float(r[4]) for r in runs), result.stdout
    for line in ("small p95, none / cut-ins", "bulk pairs/s, cut-ins / none", "tokens/s, cut-ins / none",
                 "all pairs/s, cut-ins / none"):
        assert re.search(rf"^{line}: \d+\.\d\dx \(median; \d+\.\d\d-\d+\.\d\dx\)$", result.stdout, re.M), line
