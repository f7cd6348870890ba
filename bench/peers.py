"""Infinity (PyPI infinity-emb), the peer reranking server: its own venv, its process on loopback, its /rerank.

Use:
    ensure_venv()  # creates or updates .venv-infinity from requirements-infinity.txt
    with Infinity.start(model_dir, workdir=tmp) as peer:  # fastest() variant, a free 127.0.0.1 port
        scores = peer.rerank(query, documents)  # one score per document, in document order

`model_dir` is a sentence-transformers CrossEncoder directory (bench.workload.build_benchmark_model). The
optimum (ONNX Runtime) variants need an ONNX copy of it, which `prepare_model` exports in the peer venv:
Infinity only loads *.onnx files that are already there. Infinity runs offline, with every telemetry off
(ENV below); `rerank` is safe to call from many threads at once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.servers import free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-infinity"
REQUIREMENTS = ROOT / "requirements-infinity.txt"
START_S = 600.0  # seconds: a hang bound for a start (torch import, model load, warm-up) on 2 loaded cores
REQUEST_S = 600.0  # seconds per request: a hang bound, not a latency budget
INSTALL_S = 1800.0
# Offline, and nothing sent home: Infinity's PostHog usage statistics honour the first two (and its client,
# posthog, is not installed); ONNX Runtime >= 1.32, which Infinity imports whatever the engine, otherwise looks
# up its 1DS collector (mobile.events.data.microsoft.com) at start.
ENV = {
    "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    "DO_NOT_TRACK": "1",
    "ORT_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


class PeerError(RuntimeError):
    """The peer could not be installed, prepared or started; the message says what to do."""


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One way to run Infinity on a CPU: its --engine, and the weights' dtype.

    torch: dtype is Infinity's --dtype (bfloat16 and float32 load the model in that dtype; int8 is torch's
    dynamic quantisation of nn.Linear), with Infinity's default BetterTransformer (nested-tensor) layers.
    optimum: ONNX Runtime's CPU provider on an ONNX export, which Infinity graph-optimises at start; float32 is
    the export as is, int8 its dynamic quantisation. Infinity feeds this engine no token_type_ids, so a BERT
    cross-encoder's scores drift from CrossEncoder.predict's (Spearman about 0.986 per query in float32).
    """

    engine: str
    dtype: str

    @property
    def name(self) -> str:
        return f"{'onnx' if self.engine == 'optimum' else self.engine}-{self.dtype}"


TORCH_FP32 = Variant(engine="torch", dtype="float32")
TORCH_BF16 = Variant(engine="torch", dtype="bfloat16")
TORCH_INT8 = Variant(engine="torch", dtype="int8")
ONNX_FP32 = Variant(engine="optimum", dtype="float32")
ONNX_INT8 = Variant(engine="optimum", dtype="int8")
VARIANTS = (TORCH_FP32, TORCH_BF16, TORCH_INT8, ONNX_FP32, ONNX_INT8)


def fastest(native_bf16: bool | None = None) -> Variant:
    """Infinity's fastest CPU setup on this CPU, as measured (MiniLM-L6, 50 passages a request, bench/cpu.py).
    With native bfloat16 (2-core AVX512_BF16 EPYC, 2026-11-30, pairs per server CPU-second): torch bfloat16 30
    (24 without BetterTransformer), onnx int8 23, torch float32 15, onnx float32 13; torch int8 no faster than
    float32. Without it (2-core AVX2-only EPYC, 2026-11-30, pairs/s): onnx int8 32.8 (at Spearman 0.90), onnx
    float32 23.0, torch float32 16.9, torch int8 15.7, torch bfloat16 2.3 (emulated)."""
    if native_bf16 is None:
        from reranker.backends.cpu import kernel_bf16_flags

        native_bf16 = bool(kernel_bf16_flags())
    return TORCH_BF16 if native_bf16 else ONNX_INT8


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path = VENV, requirements: Path = REQUIREMENTS) -> Path:
    """Create or update `venv` from `requirements` unless it already holds exactly them; returns its
    infinity_emb executable. Raises PeerError with pip's last lines if the install fails."""
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    stamp = venv / "requirements.sha256"
    executable = venv / "bin" / "infinity_emb"
    if executable.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return executable
    steps = [[sys.executable, "-m", "venv", str(venv)]] if not _venv_python(venv).exists() else []
    steps.append([str(_venv_python(venv)), "-m", "pip", "install", "-q", "-r", str(requirements)])
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_S, check=False)
        except subprocess.TimeoutExpired as err:
            raise PeerError(f"{' '.join(step)} took over {INSTALL_S:.0f} s") from err
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise PeerError(
                f"could not install Infinity's venv ({' '.join(step)} exited {done.returncode}):\n{tail}\n"
                f"fix it by hand with: python3 -m venv {venv} && {venv}/bin/pip install -r {requirements}"
            )
    if not executable.exists():
        raise PeerError(f"{requirements} installed no {executable}: does it still list infinity-emb[server]?")
    stamp.write_text(digest + "\n")
    return executable


# Run by the peer venv's python. The TorchScript exporter, not optimum's: optimum 1.x's needs onnxscript under
# torch >= 2.9, and Infinity only ever loads the file. int8 is ONNX Runtime's dynamic quantization (MatMul
# weights int8, activations quantised per batch), what optimum's avx512_vnni preset does.
_EXPORT = """
import sys
from pathlib import Path
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
source, dest, dtype = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
dest.mkdir(parents=True, exist_ok=True)
model = AutoModelForSequenceClassification.from_pretrained(source, torch_dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(source)
names = ["input_ids", "attention_mask", "token_type_ids"]
sample = tokenizer(["a query"], ["a document"], return_tensors="pt")
axes = {name: {0: "batch", 1: "sequence"} for name in names} | {"logits": {0: "batch"}}
fp32 = dest / ("model.onnx" if dtype == "float32" else "fp32.onnx.tmp")
with torch.no_grad():
    torch.onnx.export(model, (sample["input_ids"], sample["attention_mask"], sample["token_type_ids"]),
                      str(fp32), input_names=names, output_names=["logits"], dynamic_axes=axes,
                      opset_version=17, dynamo=False)
if dtype == "int8":
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(fp32), str(dest / "model_quantized.onnx"), weight_type=QuantType.QInt8)
    fp32.unlink()
model.config.save_pretrained(dest)
tokenizer.save_pretrained(dest)
"""


def prepare_model(model_dir: Path, variant: Variant, workdir: Path, venv: Path = VENV) -> Path:
    """The directory Infinity should load for `variant`: `model_dir` itself for torch, else an ONNX export
    in `workdir`, made once and reused."""
    if variant.engine == "torch":
        return model_dir
    dest = workdir / f"{model_dir.name}-{variant.name}"
    if any(dest.glob("*.onnx")):
        return dest
    done = subprocess.run(
        [str(_venv_python(venv)), "-c", _EXPORT, str(model_dir), str(dest), variant.dtype],
        capture_output=True, text=True, timeout=START_S, env={**os.environ, **ENV}, check=False,
    )
    if done.returncode != 0 or not any(dest.glob("*.onnx")):
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise PeerError(f"could not export {model_dir} to ONNX ({variant.name}):\n{tail}")
    return dest


class Infinity:
    """A running Infinity server on 127.0.0.1; start one with `Infinity.start`."""

    def __init__(self, url: str, process: subprocess.Popen[Any], variant: Variant, log: Path) -> None:
        self.url = url
        self.process = process
        self.variant = variant
        self.log = log
        # One pooled client for every thread (httpx.Client is thread-safe); enough connections that
        # clients queue in Infinity's batcher, not in this pool.
        self._client = httpx.Client(base_url=url, timeout=REQUEST_S,
                                    limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))

    @classmethod
    @contextmanager
    def start(cls, model_dir: Path, *, workdir: Path, variant: Variant | None = None, batch_size: int = 32,
              venv: Path = VENV, environ: Mapping[str, str] = os.environ,
              timeout: float = START_S) -> Iterator[Infinity]:
        """Serve `model_dir` (prepared for `variant` first) until the block ends, then stop the process:
        SIGTERM, 30 s, SIGKILL. `batch_size` is Infinity's --batch-size (pairs per forward pass); `variant`
        None is fastest() on this CPU."""
        variant = variant or fastest()
        executable = venv / "bin" / "infinity_emb"
        if not executable.exists():
            raise PeerError(f"no {executable}: call bench.peers.ensure_venv() first")
        served = prepare_model(model_dir, variant, workdir, venv)
        port = free_port()
        # Infinity 0.0.78 hands optimum the ONNX file's path as found under --model-id, and optimum matches
        # it against bare file names: so Infinity runs in the model's directory and serves ".".
        command = [
            str(executable), "v2", "--model-id", ".", "--served-model-name", served.name,
            "--engine", variant.engine, "--device", "cpu",
            "--batch-size", str(batch_size), "--host", "127.0.0.1", "--port", str(port),
            "--no-vector-disk-cache", "--log-level", "warning",
        ]
        if variant.engine == "torch":
            command += ["--dtype", variant.dtype]
        log = workdir / f"infinity-{variant.name}-{port}.log"
        # Infinity caches its optimised ONNX graph under HF_HOME by --model-id and reuses any it finds there:
        # one HF_HOME per variant, so that an int8 graph is never served as the float32 one.
        env = {**environ, **ENV, "HF_HOME": str(workdir / f"hf-home-{variant.name}")}
        with log.open("wb") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                       stdin=subprocess.DEVNULL, cwd=served)
        peer = cls(f"http://127.0.0.1:{port}", process, variant, log)
        try:
            peer._wait_ready(timeout)
            yield peer
        finally:
            peer._client.close()
            stop_process(process, grace=30)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PeerError(f"Infinity exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                if self._client.get("/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise PeerError(f"Infinity was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def rerank(self, query: str, documents: list[str], *, raw_scores: bool = False) -> list[float]:
        """One score per document, in the documents' order: sigmoid probabilities, or logits if `raw_scores`
        (Infinity answers best first, with each document's index)."""
        response = self._client.post("/rerank", json={"query": query, "documents": documents,
                                                      "raw_scores": raw_scores})
        if response.status_code != 200:
            raise PeerError(f"Infinity answered {response.status_code}: {response.text[:500]}")
        scores = [0.0] * len(documents)
        for result in response.json()["results"]:
            scores[result["index"]] = float(result["relevance_score"])
        return scores
