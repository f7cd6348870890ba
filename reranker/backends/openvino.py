"""The OpenVINO backend: the loaded PyTorch model converted once (and cached on disk), compiled for the CPU
with dynamic batch and sequence axes, at float32 (exact), bfloat16 or int8."""

from __future__ import annotations

import logging
import os
import time
from contextlib import suppress
from typing import Any

import numpy as np
import openvino as ov

from reranker.backends import ConversionError, Finished, Padded, Pending
from reranker.backends.cpu import (
    Precision,
    auto_precision,
    explicit,
    int8_dot_products,
    kernel_bf16_flags,
    physical_cores,
    torch_native_bf16,
)
from reranker.backends.keys import fingerprint
from reranker.backends.store import ConvertedModels
from reranker.settings import Settings

logger = logging.getLogger(__name__)

HINTS = {"float32": "f32", "bfloat16": "bf16"}  # OpenVINO's INFERENCE_PRECISION_HINT per RERANKER_DTYPE
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def compiled_precision(compiled: ov.CompiledModel) -> str:
    """The precision OpenVINO runs the float operations of `compiled` in ('f32', 'bf16'), whatever was asked."""
    return str(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())


def native_bf16(core: ov.Core) -> list[str]:
    """The CPU features behind OpenVINO's BF16 capability, as the kernel names them (torch's names where it names
    none); OpenVINO's own word when neither does."""
    if "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return []
    return kernel_bf16_flags() or torch_native_bf16() or ["OpenVINO CPU capability BF16"]


def cpu_threads() -> int:
    """The threads torch would use, worked out without importing it: both backends follow OMP_NUM_THREADS (which
    Ray sets for each replica from its num_cpus), and default to torch's choice, one per physical core."""
    configured = os.environ.get("OMP_NUM_THREADS", "").strip()
    if configured.isascii() and configured.isdigit() and int(configured) > 0:
        return int(configured)
    return physical_cores()


class OpenVINOBackend:
    """Runs padded batches through one compiled model. With two streams (two or more threads) a launch returns
    at once and the pass runs while the device thread launches the next batch on the other stream: the
    pipeline's one batch in flight (reranker.pipeline) keeps both streams busy. A batch launched with nothing
    else in flight is split across the streams instead, so a lone request still has every thread. Only the
    device thread launches and waits."""

    name = "openvino"
    device = "cpu"

    def __init__(self, compiled: ov.CompiledModel, dtype: str) -> None:
        self.dtype = dtype
        self.compiled = compiled
        self.streams = int(compiled.get_property("NUM_STREAMS"))
        self.stream_threads = max(1, int(compiled.get_property("INFERENCE_NUM_THREADS")) // self.streams)
        self._inputs = {port.get_any_name() for port in compiled.inputs}
        self._idle = [compiled.create_infer_request() for _ in range(self.streams)]
        self._busy = 0  # infer requests launched and not yet waited for

    @property
    def in_flight(self) -> int:
        """Infer requests launched and not yet waited for."""
        return self._busy

    def padded_shape(self, rows: int, width: int) -> tuple[int, int]:
        return rows, width  # dynamic axes: every shape runs as it is, no recompiling

    def launch(self, batch: Padded) -> Pending:
        arrays = {name: array for name, array in batch.arrays().items() if name in self._inputs}
        if self.streams == 1:
            request = self._idle[0]
            # Copied: the request reuses its output buffer on the next pass.
            return Finished(np.array(request.infer(arrays)[0], dtype=np.float32).reshape(-1)[:batch.rows])
        parts = max(1, self.streams - self._busy)
        bounds = np.linspace(0, batch.rows, min(parts, batch.rows) + 1).round().astype(int)
        running: list[ov.InferRequest] = []
        try:
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                request = self._idle.pop() if self._idle else self.compiled.create_infer_request()
                self._busy += 1
                running.append(request)
                request.start_async({name: array[start:end] for name, array in arrays.items()})
        except Exception:
            Running(self, running, 0).release()
            raise
        return Running(self, running, batch.rows)

    def collect(self, request: ov.InferRequest) -> tuple[np.ndarray, float]:
        """Wait for one launched part and take back its request: its scores and how long it ran (seconds)."""
        try:
            request.wait()
            scores = np.array(request.get_output_tensor(0).data, dtype=np.float32).reshape(-1)
            return scores, request.latency / 1000  # OpenVINO's own start-to-end time of this inference, in ms
        finally:
            self._busy -= 1
            self._idle.append(request)


class Running:
    """The scores of a batch whose parts run on the compiled model's streams."""

    ran = False

    def __init__(self, backend: OpenVINOBackend, requests: list[ov.InferRequest], rows: int) -> None:
        self._backend = backend
        self._requests = requests
        self._rows = rows
        self.seconds: float | None = None  # the longest part's run time, once waited for

    def wait(self) -> np.ndarray:
        parts = []
        failure: Exception | None = None
        for request in self._requests:  # every part waited for and its request freed, even after a failure
            try:
                scores, seconds = self._backend.collect(request)
                parts.append(scores)
                self.seconds = max(self.seconds or 0.0, seconds)
            except Exception as err:
                failure = failure or err
        self._requests = []
        if failure is not None:
            raise failure
        return np.concatenate(parts)[:self._rows]

    def release(self) -> None:
        """Wait for the parts that started and free every request, for a launch that failed part-way."""
        with suppress(Exception):  # the launch's own error is the one raised
            self.wait()


def stream_count(configured: int | None, threads: int) -> int:
    """RERANKER_CPU_STREAMS, or auto: two streams where there are two threads or more (one batch runs while the
    next is launched), else one; never more streams than threads."""
    wanted = configured if configured is not None else 2
    return max(1, min(wanted, threads))


def cpu_properties(streams: int, threads: int, hint: str | None) -> dict[str, Any]:
    """OpenVINO's CPU properties for `streams` streams sharing `threads` threads, at the precision `hint` (None:
    OpenVINO's choice)."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT", "NUM_STREAMS": streams,
                              "INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": False}
    if hint is not None:
        config["INFERENCE_PRECISION_HINT"] = hint
    return config


def compile_for_cpu(core: ov.Core, model: ov.Model, hint: str | None, streams: int | None = 1) -> ov.CompiledModel:
    """`streams` (RERANKER_CPU_STREAMS: None is auto) sharing `cpu_threads()` threads; `hint` None leaves the
    precision of the operations int8 does not cover to OpenVINO (bfloat16 where the CPU has it)."""
    threads = cpu_threads()
    # No pinning: OpenVINO would pin its threads to the first cores, and two replicas of one thread each on
    # one machine (Ray Serve) would then share one core while the other idled.
    count = stream_count(streams, threads)
    if streams is not None and count < streams:
        logger.warning("RERANKER_CPU_STREAMS is more than the threads: each stream needs one", extra={
            "cpu_streams": streams, "threads": threads, "streams": count})
    try:
        return core.compile_model(model, "CPU", cpu_properties(count, threads, hint))
    except Exception as err:
        raise ConversionError(f"compiling failed: {type(err).__name__}: {err}".splitlines()[0][:300]) from err


def int8_streams(streams: int | None) -> int | None:
    """The streams int8 is compiled for: one, unless the CPU has AMX-INT8.

    On an AVX-512 VNNI/BF16 CPU without AMX (AMD EPYC), OpenVINO 2026.4's CPU plugin ran int8 graphs wrongly on two
    streams of one thread: weights-only int8 gave logits of -200 where float32 gave -0.2 (Spearman 0.36 through the
    service), and static int8, though it scored right, corrupted the heap (glibc aborted the process, or it
    segfaulted, a few calls later). One stream on both threads ran right, on the benchmark model and the tiny test
    models alike. On AMX, two streams served bench/cpu.py's rounds of both int8 modes at the right rankings.
    bench/int8_streams.py checks whether the fault still happens on the CPU it runs on."""
    if stream_count(streams, cpu_threads()) == 1 or "amx_int8" in int8_dot_products():
        return streams
    logger.log(logging.WARNING if streams is not None else logging.INFO,  # a warning where more was asked for
               "int8 runs on one OpenVINO stream on a CPU without AMX: OpenVINO's int8 kernels go wrong on two there",
               extra={"cpu_streams": streams, "streams": 1})
    return 1


def load_openvino(model: Any, settings: Settings) -> None:
    """Put `model` (a reranker.model.ScoringModel) on OpenVINO at the precision RERANKER_DTYPE asks for.

    Raises ConversionError when OpenVINO cannot take the model (the caller serves it with torch), and
    ModelLoadError when int8 fails its guard and RERANKER_INT8_ON_FAIL=exit."""
    core = ov.Core()
    native = native_bf16(core)
    precision = explicit(settings.dtype) if settings.dtype != "auto" else auto_precision(native)
    streams = settings.cpu_streams
    if model.is_causal and native and precision.dtype != "float32":
        # OpenVINO 2026.4's CPU plugin dies of SIGFPE (no Python error to catch) compiling a causal LM's bfloat16
        # graph for one thread per stream: seen on AMX with Qwen3's shapes and the tiny test model alike. So a
        # causal model keeps every thread on one stream, and on a single thread it is left to torch.
        if cpu_threads() < 2:
            raise ConversionError("OpenVINO cannot compile a causal model at bfloat16 on one thread (one core, "
                                  "or OMP_NUM_THREADS=1); give it 2 threads or more, or RERANKER_DTYPE=float32")
        streams = 1
    store = ConvertedModels(settings.cache_dir, core, settings.cache_max_age_days)
    key = fingerprint(model.model_id, settings.trust_remote_code, digests=store.digests)
    example = model.collate(model.encode([("an example query", "an example document to trace")] * 2))
    started = time.perf_counter()
    graph = store.load(key)
    if graph is None and model.from_cache:
        # The entry serving.json came from was damaged (and removed, as logged), or removed by another process.
        raise ConversionError("the cache's converted model could not be used (damaged, or removed during the start)")
    if graph is None:
        from reranker.backends.convert import convert

        graph = convert(model.cross_encoder, model.extras, example, causal=model.is_causal)
        store.save(key, graph, seconds=time.perf_counter() - started)
        model.convert_seconds = time.perf_counter() - started
        logger.info("model converted for OpenVINO",
                    extra={"model": model.model_id, "convert_seconds": round(model.convert_seconds, 2),
                           "cache": str(store.path(key))})
    else:
        logger.info("converted model taken from the cache", extra={"cache": str(store.path(key))})

    compiled = None
    if precision.dtype == "int8":
        from reranker.backends.int8 import choose_int8

        chosen = choose_int8(model, settings, lambda g, hint, count: compile_for_cpu(core, g, hint, count), graph,
                             store, key, streams=int8_streams(streams),
                             fallback=auto_precision(native))
        graph, precision, compiled = chosen.graph, chosen.precision, chosen.compiled
    if compiled is None:
        compiled = compile_for_cpu(core, graph, HINTS.get(precision.dtype), streams)
    if precision.dtype == "bfloat16" and compiled_precision(compiled) != "bf16":
        # OpenVINO takes a bf16 hint on a CPU without bf16 and runs float32: say what runs, not what was asked.
        precision = Precision("float32", f"{precision.reason} asked; this CPU has no native bfloat16 "
                                         "(no AMX-BF16 or AVX512-BF16), so OpenVINO runs float32")
        logger.warning("bfloat16 asked on a CPU without native bfloat16: OpenVINO runs float32",
                       extra={"dtype": "float32"})
    model.backend = OpenVINOBackend(compiled, precision.dtype)
    logger.info("model compiled for the CPU", extra={"dtype": precision.dtype, "streams": model.backend.streams,
                                                     "threads": compiled.get_property("INFERENCE_NUM_THREADS")})
    model.dtype_reason = precision.reason
    if not model.from_cache:
        from reranker.backends.convert import release_weights

        release_weights(model.cross_encoder)
        if model.tokenizes_alone:
            store.save_serving(key, model.serving_spec())


def cached_serving(settings: Settings) -> dict[str, Any] | None:
    """What an earlier start stored of how to serve RERANKER_MODEL on OpenVINO without loading it in PyTorch."""
    store = ConvertedModels(settings.cache_dir, ov.Core())
    return store.load_serving(fingerprint(settings.model, settings.trust_remote_code, digests=store.digests))
