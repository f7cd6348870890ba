"""RERANKER_DTYPE=int8: quantize the converted model with NNCF, and serve it only if it still ranks like the
float32 model on a fixed probe set (RERANKER_INT8_MIN_SPEARMAN); else fall back or exit, as configured."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from scipy.stats import rankdata

from reranker.backends.corpus import Request, build_workload
from reranker.backends.cpu import Precision, int8_dot_products
from reranker.backends.store import ConvertedModels
from reranker.errors import ModelLoadError
from reranker.jsonl import JsonLineError, json_lines
from reranker.settings import Settings
from reranker.tokens import min_document_room

logger = logging.getLogger(__name__)

# Seeded query/document sets from reranker.backends.corpus; the probe shares no query with the calibration.
CALIBRATION: dict[str, int] = {"n_requests": 16, "docs_per_request": 16, "seed": 101}
PROBE: dict[str, int] = {"n_requests": 8, "docs_per_request": 24, "seed": 202}
CALIBRATION_BATCH = 16  # pairs per calibration sample: padded batches, as the service runs them
# At most this many pairs of a calibration file are used, spread evenly over it: a few hundred calibrate as well as
# more (NNCF's own default is 300 samples), and an 8,000-pair file took 40 s of start on a 2-layer test model.
MAX_CALIBRATION_PAIRS = 512
# Of PROBE's queries, the fewest the guard judges on: at a short RERANKER_MAX_LENGTH some leave a document no room
# (the engine would refuse them), and a mean over two or three rankings stands for too little of the model.
MIN_PROBE_QUERIES = 6

Group = list[tuple[str, str]]


def _draw(spec: dict[str, int]) -> list[Request]:
    """CALIBRATION's or PROBE's requests: the corpus's original draw, whose digest names the cached graphs."""
    return build_workload(spec["n_requests"], spec["docs_per_request"], spec["seed"])


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Rank correlation of two score lists (ties averaged); 0 when either is constant."""
    ra, rb = rankdata(a), rankdata(b)
    if np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return 1.0 if np.ptp(ra) == np.ptp(rb) else 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def servable(model: Any, query: str) -> bool:
    """Whether the engine would score `query` at all: it refuses one that leaves a document less room than
    min_document_room. Calibration and the probe take only such queries, so that no sequence they run is longer
    than the model's max_length (one that is, past the position embeddings, fails the pass)."""
    room = model.max_length - model.encoder.overhead(query, None)
    return room >= min_document_room(model.max_length, templated=model.templated)


def calibration_groups(model: Any, settings: Settings) -> list[Group]:
    """The calibration pairs, in batches of CALIBRATION_BATCH: RERANKER_INT8_CALIBRATION's file of JSON lines
    `{"query": ..., "document": ...}`, else the built-in set; those with a query the engine would refuse left
    out (unusable_reason says when too few remain)."""
    pairs = [(query, document) for query, document in _calibration_pairs(settings) if servable(model, query)]
    return [pairs[i:i + CALIBRATION_BATCH] for i in range(0, len(pairs), CALIBRATION_BATCH)]


def _calibration_pairs(settings: Settings) -> list[tuple[str, str]]:
    if settings.int8_calibration is None:
        return [(r.query, d) for r in _draw(CALIBRATION) for d in r.documents]
    pairs = read_calibration(Path(settings.int8_calibration), settings.max_doc_chars)
    forget_calibration()  # read for the last time this start
    if len(pairs) <= MAX_CALIBRATION_PAIRS:
        return pairs
    logger.info("the calibration file has more pairs than calibration takes; using some, spread over the file",
                extra={"calibration_file_pairs": len(pairs), "calibration_pairs_taken": MAX_CALIBRATION_PAIRS})
    step = len(pairs) / MAX_CALIBRATION_PAIRS
    return [pairs[int(i * step)] for i in range(MAX_CALIBRATION_PAIRS)]


def probe_set(model: Any) -> list[Request]:
    """The guard's probe queries that the engine would take (servable), with their documents."""
    return [request for request in _draw(PROBE) if servable(model, request.query)]


def unusable_reason(model: Any, settings: Settings, groups: list[Group], probes: list[Request]) -> str | None:
    """Why int8 cannot be made or checked at this RERANKER_MAX_LENGTH, before any quantizing; None when it can."""
    limit = f"leave a document room within RERANKER_MAX_LENGTH={model.max_length} tokens"
    calibrated = sum(len(group) for group in groups)
    if settings.int8_mode == "static" and calibrated < CALIBRATION_BATCH:
        source = ("the built-in calibration set" if settings.int8_calibration is None
                  else f"RERANKER_INT8_CALIBRATION={settings.int8_calibration!r}")
        return (f"int8 (static) refused: {calibrated} pairs of {source} have a query that would {limit}; static "
                f"int8 calibrates on at least {CALIBRATION_BATCH} (use shorter queries, a longer "
                "RERANKER_MAX_LENGTH, or RERANKER_INT8_MODE=weights)")
    if len(probes) < MIN_PROBE_QUERIES:
        return (f"int8 ({settings.int8_mode}) refused: {len(probes)} of the guard's {PROBE['n_requests']} probe "
                f"queries {limit}, and it judges on at least {MIN_PROBE_QUERIES}, so int8 cannot be checked (use a "
                "longer RERANKER_MAX_LENGTH)")
    return None


def read_calibration(path: Path, max_doc_chars: int) -> list[tuple[str, str]]:
    """The pairs of a calibration file; ModelLoadError naming the line of the first bad one. A document is held to
    RERANKER_MAX_DOC_CHARS, as a request's is (a 25 MB line took a minute and 3.5 GB to tokenize). Read once per
    start: the check before loading reads it, and calibration takes those pairs while the file is unchanged."""
    try:
        found = path.stat()
    except OSError:
        return list(_parse_calibration(path, max_doc_chars))  # its own error: cannot be read
    identity = (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns)
    return list(_read_once(path, identity, max_doc_chars))


def forget_calibration() -> None:
    """Drop the pairs `read_calibration` keeps for a start (reranker.loading.load_model calls it when one ends)."""
    _read_once.cache_clear()


@functools.lru_cache(maxsize=1)
def _read_once(path: Path, identity: tuple[int, ...], max_doc_chars: int) -> tuple[tuple[str, str], ...]:
    return _parse_calibration(path, max_doc_chars)


def _parse_calibration(path: Path, max_doc_chars: int) -> tuple[tuple[str, str], ...]:
    name = f"RERANKER_INT8_CALIBRATION={str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8-sig")  # as an upload is read: a BOM (Windows editors) is no JSON
    except (OSError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{name} cannot be read ({err}); name a UTF-8 file of JSON lines "
                             '{"query": "...", "document": "..."}') from err
    pairs = []
    shape = 'a JSON object with "query" and "document" strings that are not blank'
    try:
        for number, row in json_lines(text):
            query, document = (row.get("query"), row.get("document")) if isinstance(row, dict) else (None, None)
            if not isinstance(query, str) or not isinstance(document, str) or not query.strip() or \
                    not document.strip():
                raise ModelLoadError(f"{name}: line {number} is not {shape}")
            if len(document) > max_doc_chars:
                raise ModelLoadError(f"{name}: line {number}'s document has {len(document)} characters; the limit is "
                                     f"RERANKER_MAX_DOC_CHARS={max_doc_chars}, as for a request's")
            pairs.append((query, document))
    except JsonLineError as err:
        raise ModelLoadError(f"{name}: {err}; each line is {shape}") from None
    if len(pairs) < CALIBRATION_BATCH:
        raise ModelLoadError(f"{name} has {len(pairs)} pairs; give at least {CALIBRATION_BATCH} (a few hundred "
                             "from your own traffic calibrate best)")
    return tuple(pairs)


# What static int8 leaves in float (bfloat16 where the CPU has it), by the converted graph's operation names:
# - the scoring head (BERT's pooler and classifier, a sequence-classification `score`, a causal model's
#   lm_head): a few rows of work, and a fresh or weakly trained head spreads its scores over a narrow band that
#   int8 rounding reorders;
# - each block's feed-forward down projection (BERT/RoBERTa `layer.N.output.dense`, Llama/Qwen `mlp.down_proj`):
#   its input, after GELU/SiLU, holds the activation outliers that per-tensor int8 scales clip.
# On the MiniLM benchmark model this moved the probe's Spearman from 0.9837 to 0.9908 for about a sixth of the
# speed static int8 gains over bfloat16 (docs/benchmarks.md).
KEEP_FLOAT = (r".*\.pooler\..*", r".*\.classifier.*", r".*\.score/.*", r".*lm_head.*",
              r".*\.layer\.\d+\.output\.dense.*", r".*\.mlp\.down_proj.*")
QUANTIZE_FORMAT = 2  # in the cache key: graphs quantized under other rules are not reused


def quantize(graph: ov.Model, samples: list[dict[str, np.ndarray]], mode: str) -> ov.Model:
    """An int8 copy of `graph`: weights only, or weights and activations calibrated on `samples` (static),
    KEEP_FLOAT's operations excepted."""
    try:
        import nncf
    except ImportError as err:
        raise ModelLoadError("RERANKER_DTYPE=int8 needs the nncf package, which quantizes the model and cannot be "
                             f"imported ({err}): pip install -r requirements.txt") from err
    # nncf logs to stdout in plain text at INFO, and prints progress bars and tables (rich) to the console, between
    # the JSON lines of the log; the log's handler holds the real stdout. The redirection is the whole process's,
    # but this runs at start, before anything is served, and the other threads then (the metrics server) write
    # through the log.
    with _nncf_through_the_log(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        if mode == "weights":
            return nncf.compress_weights(graph.clone(), mode=nncf.CompressWeightsMode.INT8_ASYM)
        # validate=False: a pattern that matches nothing in this architecture is not an error.
        keep = nncf.IgnoredScope(patterns=list(KEEP_FLOAT), validate=False)
        return nncf.quantize(graph.clone(), nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(samples), ignored_scope=keep)


@contextlib.contextmanager
def _nncf_through_the_log() -> Iterator[None]:
    """nncf's logger through the process's own handlers, at WARNING, while it quantizes; as it was after."""
    nncf_logger = logging.getLogger("nncf")
    handlers, propagate, level = list(nncf_logger.handlers), nncf_logger.propagate, nncf_logger.level
    nncf_logger.handlers.clear()
    nncf_logger.propagate = True
    nncf_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        nncf_logger.handlers[:] = handlers
        nncf_logger.propagate = propagate
        nncf_logger.setLevel(level)


def agreement(model: Any, reference: ov.CompiledModel, candidate: ov.CompiledModel,
              probes: list[Request]) -> list[float]:
    """Per probe query, the Spearman correlation of the candidate's ranking with the reference's."""
    out = []
    for request in probes:
        arrays = model.collate(model.encode([(request.query, d) for d in request.documents])).arrays()
        scores = [np.array(compiled(arrays)[0]).reshape(-1) for compiled in (reference, candidate)]
        out.append(spearman(scores[0], scores[1]))
    return out


# (graph, precision hint or None for OpenVINO's choice, RERANKER_CPU_STREAMS or None for auto) -> a model compiled
# for the CPU
Compile = Callable[[ov.Model, "str | None", "int | None"], ov.CompiledModel]


@dataclass(frozen=True)
class Int8Choice:
    """What to serve: `compiled` is the int8 model the guard judged, compiled as it is served; None when int8 was
    refused (`graph` is the float graph then, to compile at `precision`)."""

    graph: ov.Model
    precision: Precision
    compiled: ov.CompiledModel | None = None


def choose_int8(model: Any, settings: Settings, compile_graph: Compile, graph: ov.Model, store: ConvertedModels,
                key: str, *, streams: int | None, fallback: Precision) -> Int8Choice:
    """The int8 model when it passes the guard, judged as compiled for serving (`streams`); else the float graph
    at `fallback` (RERANKER_INT8_ON_FAIL=fallback) or ModelLoadError (exit)."""
    if not int8_dot_products():
        logger.warning("int8 on a CPU without VNNI or AMX-INT8: expect about the speed of float32, not more",
                       extra={"dtype": "int8"})
    # Weights-only int8 calibrates on nothing: no set is read, and none goes into its key.
    groups = calibration_groups(model, settings) if settings.int8_mode == "static" else []
    probes = probe_set(model)
    if (unusable := unusable_reason(model, settings, groups, probes)) is not None:
        return refuse(unusable, settings, graph, fallback)
    # Static int8's activation ranges come from the calibration pairs as tokenized at this max_length.
    digest = hashlib.sha256(json.dumps([model.max_length, groups]).encode()).hexdigest()[:12] if groups \
        else "uncalibrated"
    key8 = f"{key}-int8-{settings.int8_mode}-{digest}-q{QUANTIZE_FORMAT}"
    quantized = store.load(key8)
    if quantized is None:
        started = time.perf_counter()
        samples = [model.collate(model.encode(group)).arrays() for group in groups]
        quantized = quantize(graph, samples, settings.int8_mode)
        seconds = time.perf_counter() - started
        store.save(key8, quantized, seconds=seconds, int8_mode=settings.int8_mode)
        model.convert_seconds += seconds
        logger.info("model quantized to int8", extra={"int8_mode": settings.int8_mode,
                                                      "quantize_seconds": round(seconds, 2),
                                                      "calibration_pairs": sum(len(group) for group in groups)})
    # Judged as served: the compiled model the guard scores is the one served, streams and all.
    served = compile_graph(quantized, None, streams)
    rhos, bar = agreement(model, compile_graph(graph, "f32", 1), served, probes), settings.int8_min_spearman
    mean, lowest = float(np.mean(rhos)), min(rhos)
    figures = (f"Spearman {mean:.4f} against float32 (mean over {len(rhos)} probe queries, lowest {lowest:.4f})")
    if mean >= bar:
        logger.info("int8 passed its guard", extra={"spearman_mean": round(mean, 4), "spearman_min": round(lowest, 4),
                                                    "bar": bar})
        return Int8Choice(quantized, Precision("int8", f"RERANKER_DTYPE=int8 ({settings.int8_mode}): {figures} "
                                                       f">= {bar}"), served)
    refusal = f"int8 ({settings.int8_mode}) refused: {figures} is below RERANKER_INT8_MIN_SPEARMAN={bar}"
    advice = ("try RERANKER_INT8_MODE=weights, or calibrate on your own traffic (RERANKER_INT8_CALIBRATION)"
              if settings.int8_mode == "static" else "or lower RERANKER_INT8_MIN_SPEARMAN to accept this figure "
              "(weights-only is the closer of the two int8 modes)")
    return refuse(refusal, settings, graph, fallback, advice=advice,
                  spearman_mean=round(mean, 4), spearman_min=round(lowest, 4), bar=bar)


def refuse(refusal: str, settings: Settings, graph: ov.Model, fallback: Precision, *, advice: str = "",
           **fields: Any) -> Int8Choice:
    """int8 refused: ModelLoadError (RERANKER_INT8_ON_FAIL=exit), else a warning and the float graph at
    `fallback`."""
    if settings.int8_on_fail == "exit":
        raise ModelLoadError(f"{refusal}; set RERANKER_INT8_ON_FAIL=fallback to serve {fallback.dtype} instead"
                             + (f", {advice}" if advice else ""))
    logger.warning(refusal + f"; serving {fallback.dtype}", extra=fields)
    return Int8Choice(graph, Precision(fallback.dtype, f"{refusal}; {fallback.reason}"))
