"""Reranker: validate, cache, truncate or chunk, batch through the worker, score, sort, top_n."""

from __future__ import annotations

import copy
import logging
import math
import statistics
import threading
import time
from collections.abc import Sequence
from types import TracebackType

from prometheus_client import CollectorRegistry

import reranker.planning as planning
import reranker.spans as spans
from reranker.batcher import Batcher, ScoreFn
from reranker.budgets import batch_token_budget, stall_limit
from reranker.cache import ScoreCache, pair_key
from reranker.errors import LimitExceededError, OverloadedError, RerankerError, ScoringError
from reranker.jobs import Room
from reranker.loading import load_model
from reranker.longdocs import DocumentClipper
from reranker.lookup import Lookup
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from reranker.packing import unpadded
from reranker.planning import CUT, SPLIT, given_up, tokenizer_slices
from reranker.results import RankedDocument, RerankResult, RerankStats, rank
from reranker.settings import Settings
from reranker.tracing import Tracing
from reranker.validation import validate_request

logger = logging.getLogger(__name__)

# What to try when a pass gives NaN or infinity, by the precision it ran at.
NONFINITE_HINTS = {
    "float16": "this usually means float16 overflow: try RERANKER_DTYPE=bfloat16 or float32",
    "float32": "at float32 the model itself produced it: check its weights",
    "other": "try RERANKER_DTYPE=float32",
}


class Reranker:
    """Thread-safe reranking over one model; only the batcher's worker thread runs the model."""

    def __init__(self, model: ScoringModel, settings: Settings, *, metrics: Metrics | None = None,
                 score_fn: ScoreFn | None = None, tracing: Tracing | None = None) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics or Metrics(CollectorRegistry())
        self.tracing = tracing or Tracing()  # the caller owns it and shuts it down after close()
        self._tracer = self.tracing.tracer
        self._model_attributes = {"reranker.model": model.model_id, "reranker.device": model.device,
                                  "reranker.dtype": model.dtype}
        self._cache = ScoreCache(settings.cache_size)
        self._clipper = DocumentClipper(model.tokenizer)
        self.batch_tokens = settings.batch_tokens or self.auto_batch_tokens()
        self.stall_seconds = stall_limit(model.device) if settings.stall_seconds is None else settings.stall_seconds
        self._batcher = Batcher(
            score_fn or model, batch_tokens=self.batch_tokens, max_queue=settings.max_queue,
            metrics=self.metrics, probe=model.encode([("warm-up query", "warm-up document")]),
            batch_spans=spans.BatchSpans(self._tracer, self._model_attributes),
            shape=model.padded_shape if score_fn is None else unpadded,
            stall_seconds=self.stall_seconds, cut_ins=settings.cut_ins,
        )
        self.metrics.model_info.info({
            "model": model.model_id, "device": model.device, "backend": model.backend.name,
            "backend_reason": model.backend_reason, "dtype": model.dtype, "dtype_reason": model.dtype_reason,
            "max_length": str(model.max_length), "compile": model.compiled,
        })
        self.metrics.model_load_seconds.set(model.load_seconds)
        self.metrics.model_convert_seconds.set(model.convert_seconds)
        self.metrics.queue_capacity_pairs.set(settings.max_queue)
        for warning in self.settings_warnings():
            logger.warning("%s", warning, extra={"error_type": "configuration"})

    def auto_batch_tokens(self) -> int:
        """RERANKER_BATCH_TOKENS=auto for this model's device and backend."""
        return batch_token_budget(self.model.device, self.model.backend.stream_threads)

    def settings_warnings(self) -> list[str]:
        """Settings each valid alone that together serve badly, said once at start: the service runs with them."""
        s, warnings = self.settings, []
        if s.max_queue < s.max_docs:
            warnings.append(f"RERANKER_MAX_QUEUE={s.max_queue} pairs is below RERANKER_MAX_DOCS={s.max_docs}: a "
                            f"request of more than {s.max_queue} documents is refused 413 however idle the service "
                            "is; raise RERANKER_MAX_QUEUE, or lower RERANKER_MAX_DOCS to match")
        if s.batch_tokens is not None and s.batch_tokens < self.model.max_length:
            warnings.append(f"RERANKER_BATCH_TOKENS={self.batch_tokens} is below the model's max_length "
                            f"({self.model.max_length}): a pair that long has a forward pass to itself, and short "
                            f"ones few companions; auto is {self.auto_batch_tokens()} on this device")
        return warnings

    @classmethod
    def from_settings(cls, settings: Settings, *, metrics: Metrics | None = None,
                      tracing: Tracing | None = None) -> Reranker:
        """Load the configured model and start the worker."""
        return cls(load_model(settings), settings, metrics=metrics, tracing=tracing)

    def __enter__(self) -> Reranker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Finish queued work and stop the worker."""
        self._batcher.close()

    @property
    def ready(self) -> bool:
        """True from a loaded, warmed model until close(), or until the worker or the device fails."""
        return not self._batcher.closed and self._batcher.fault is None

    @property
    def fault(self) -> str | None:
        """Why this reranker can score nothing any more (dead worker, poisoned device): restart the process."""
        return self._batcher.fault

    @property
    def queued_pairs(self) -> int:
        return self._batcher.queued_pairs

    def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None,
               instruction: str | None = None, raw_scores: bool = False) -> list[RankedDocument]:
        """Documents best first; scores are sigmoid probabilities unless `raw_scores`."""
        return self.rerank_detailed(query, documents, top_n, instruction, raw_scores).results

    def room(self) -> Room:
        """An empty hold on RERANKER_MAX_QUEUE, for a caller that admits a request before it runs
        (web.service.RerankService.admit): pass it to rerank_detailed, which uses it up."""
        return self._batcher.room()

    def hold(self, room: Room, query: str, documents: Sequence[str], instruction: str | None = None,
             max_doc_tokens: int | None = None, max_chunks: int | None = None) -> None:
        """Hold `room` for a valid request before it runs: for all its documents, or, with the queue too full for
        that, for those the cache lacks (`pairs_to_hold`), so that a request the cache answers whole is served. The
        cache is looked at only then: that hashes every document. Raises as `Room.need` does."""
        try:
            room.need(len(documents))
        except OverloadedError:
            room.need(self.pairs_to_hold(query, documents, instruction, max_doc_tokens, max_chunks))

    def pairs_to_hold(self, query: str, documents: Sequence[str], instruction: str | None = None,
                      max_doc_tokens: int | None = None, max_chunks: int | None = None) -> int:
        """The queue room a valid request needs as the cache stands: its distinct documents the cache lacks (as
        `rerank_detailed` counts them after its lookup), or all of them where a tokenizer pass must cut them to
        `max_doc_tokens` before they can be looked up. Looks, without moving anything in the LRU."""
        if self._clips(max_doc_tokens) or not self._cache.capacity:
            return len(documents)
        instruction, max_chunks = self._scoring_mode(instruction, max_chunks)
        return len(self._cache.absent(self._key(query, text, instruction, max_chunks) for text in documents))

    def _scoring_mode(self, instruction: str | None, max_chunks: int | None) -> tuple[str | None, int | None]:
        """What of the instruction and the window cap changes a score: a blank instruction is none, and the cap
        only means something in chunk mode (every document is one window in truncate mode)."""
        return (instruction if instruction and instruction.strip() else None,
                max_chunks if self.settings.long_docs == "chunk" else None)

    def rerank_detailed(self, query: str, documents: Sequence[str], top_n: int | None = None,
                        instruction: str | None = None, raw_scores: bool = False,
                        cancel: threading.Event | None = None, *,
                        max_doc_tokens: int | None = None, documents_field: str = "documents",
                        room: Room | None = None, truncate: bool = True, max_chunks: int | None = None) -> RerankResult:
        """As `rerank`, with the call's statistics; traced as a `reranker.rerank` span (reranker.spans).

        Setting `cancel` (the caller went away) drops the pairs that have not started and raises
        CancelledError. `max_doc_tokens` cuts each document to its first N tokens before anything else
        (Cohere v2's `max_tokens_per_doc`); a cut document counts as truncated. `documents_field` is the name the
        caller's API gives the documents (TEI's `texts`), for validation messages. `room`: queue room the caller
        already holds for the request (`room()`), released when this returns. With `truncate` false (TEI's
        `truncate: false`) a document the model would cut to its max length is refused (LimitExceededError) before
        anything is scored; one that chunk mode windows is not cut. `max_chunks` (Cohere v1's `max_chunks_per_doc`)
        scores at most a document's first N windows in chunk mode, counting one with more as truncated; a document
        that fits is one window, so in truncate mode it changes nothing."""
        held = room if room is not None else self._batcher.room()
        with spans.step(self._tracer, spans.REQUEST, self._model_attributes) as span, held:
            try:
                result = self._rerank(query, documents, top_n, instruction, raw_scores, cancel, max_doc_tokens,
                                      documents_field, held, truncate, max_chunks)
            except Exception as err:  # recorded by step: an exception event, with status ERROR unless cancelled
                if isinstance(err, RerankerError) and err.stats is not None:  # what it cost by then
                    spans.describe_request(span, err.stats, top_n)
                span.set_attribute(spans.OUTCOME, spans.outcome(err))
                raise
            spans.describe_request(span, result.stats, top_n)
            return result

    def _rerank(self, query: str, documents: Sequence[str], top_n: int | None, instruction: str | None,
                raw_scores: bool, cancel: threading.Event | None, max_doc_tokens: int | None,
                documents_field: str, room: Room, truncate: bool = True,
                max_chunks: int | None = None) -> RerankResult:
        started = time.perf_counter()
        with spans.step(self._tracer, spans.VALIDATE):
            self.validate(query, documents, top_n, instruction, max_doc_tokens, documents_field=documents_field,
                          max_chunks=max_chunks)
        instruction, max_chunks = self._scoring_mode(instruction, max_chunks)
        self.metrics.documents_per_request.observe(len(documents))
        given_up(cancel)  # a caller gone while the request waited for a thread: its room is given back already
        room_left = planning.document_room(self.model, query, instruction)  # before any tokenizer pass over them
        # A full queue refuses before any tokenizer pass, and the room (released by rerank_detailed) is held until
        # the pairs are queued: a burst past RERANKER_MAX_QUEUE costs its refused requests no tokenizing.
        if self._clips(max_doc_tokens):
            room.need(len(documents))
        texts, clipped = self._clip(documents, max_doc_tokens, cancel)
        with spans.step(self._tracer, spans.CACHE) as span:
            lookup = Lookup.of(self._cache, [self._key(query, text, instruction, max_chunks) for text in texts])
            span.set_attribute("reranker.cache_hits", lookup.hits)
        scored = lookup.scored
        room.need(len(scored))  # what the cache did not answer
        with spans.step(self._tracer, spans.TOKENIZE) as span:
            plan = planning.Plan()
            if scored:
                plan = planning.plan(self.model, query, [texts[i] for i in scored], instruction, room_left,
                                     chunking=self.settings.long_docs == "chunk", cancel=cancel, need=room.need,
                                     max_chunks=max_chunks)
            clipped_scored = {slot for slot, i in enumerate(scored) if i in clipped}
            spans.describe_plan(span, len(scored), plan.pairs, len(plan.cut | clipped_scored), len(plan.split))
        # A document cut to max_doc_tokens counts as cut in this request (the cache keeps no such flag: the cut
        # text, a key of its own, may also be sent whole).
        flags = lookup.flags(plan)
        if not truncate:
            self._refuse_cuts(flags, documents_field)
        given_up(cancel)
        job = room.submit(plan.pairs)
        truncated = sum(bool(flag & CUT) or i in clipped for i, flag in enumerate(flags))
        chunked = sum(bool(flag & SPLIT) for flag in flags)
        # Counted once the work is accepted, whatever becomes of it: a refused request looked up nothing.
        tokens = sum(pair.n_tokens for pair in plan.pairs)
        self.metrics.cache_requests.labels(result="hit").inc(lookup.hits)
        self.metrics.cache_requests.labels(result="miss").inc(lookup.misses)
        self.metrics.input_tokens.inc(tokens)
        self.metrics.truncated_documents.inc(truncated)
        self.metrics.chunked_documents.inc(chunked)
        self._batcher.wait(job, cancel)

        def cost(pairs_scored: int, top1: float | None = None, spread: float | None = None) -> RerankStats:
            """What the call cost: for its answer, or for the error it ends with."""
            queued = (job.started - job.submitted) if job.started is not None else 0.0
            return RerankStats(
                n_docs=len(documents), tokens=tokens, truncated=truncated, chunked=chunked, cache_hits=lookup.hits,
                pairs_scored=pairs_scored, queue_seconds=queued,
                inference_seconds=job.inference_seconds, total_seconds=time.perf_counter() - started,
                top1_score=top1, score_std=spread)

        spans.record_wait(self._tracer, len(plan.pairs), job.submitted, job.started, job.batch_spans, job.error)
        if job.error is not None:
            # One error object can fail several requests (a batch, a failed device): each caller raises its
            # own copy, so their tracebacks never mix and none keeps another's frames alive.
            error = copy.copy(job.error)
            error.__cause__ = job.error.__cause__
            if isinstance(error, RerankerError):  # what it cost until then, for its log line and span
                error.stats = cost(sum(not math.isnan(score) for score in job.scores))
            raise error
        with spans.step(self._tracer, spans.POSTPROCESS):
            best = [-math.inf] * len(scored)
            for owner, score in zip(plan.owners, job.scores, strict=True):
                if not math.isfinite(score):
                    self.metrics.nonfinite_scores.inc()
                    raise ScoringError(
                        f"the model produced a non-finite score for document {scored[owner]}; "
                        f"{NONFINITE_HINTS.get(self.model.dtype, NONFINITE_HINTS['other'])}"
                    )
                best[owner] = max(best[owner], score)
            logits = lookup.fill(self._cache, best, plan)
            results, probabilities = rank(documents, logits, raw_scores=raw_scores, top_n=top_n)

        top1 = max(probabilities)
        spread = statistics.pstdev(probabilities)
        self.metrics.top1_score.observe(top1)
        self.metrics.score_stddev.observe(spread)
        return RerankResult(results, cost(len(plan.pairs), top1, spread))

    def _refuse_cuts(self, flags: Sequence[int], documents_field: str) -> None:
        """Raise for the first document that max_length cut, for a caller that asked for nothing to be cut."""
        cut = next((i for i, flag in enumerate(flags) if flag & CUT), None)
        if cut is not None:
            raise LimitExceededError(
                f"{documents_field}[{cut}] does not fit RERANKER_MAX_LENGTH={self.model.max_length} tokens with the "
                "query, and this request asked for no cutting (truncate: false): shorten it, or allow cutting to "
                "score its start"
            )

    def validate(self, query: object, documents: object, top_n: object = None,
                 instruction: object = None, max_doc_tokens: object = None, *,
                 documents_field: str = "documents", max_chunks: object = None) -> None:
        """Raise ValidationError (LimitExceededError for sizes) saying what to change."""
        validate_request(self.settings, self.model, query, documents, top_n, instruction, max_doc_tokens,
                         documents_field=documents_field, max_chunks=max_chunks)

    def _clip(self, documents: Sequence[str], max_doc_tokens: int | None,
              cancel: threading.Event | None = None) -> tuple[Sequence[str], set[int]]:
        """The texts to score (documents cut to `max_doc_tokens`) and the positions of those that were cut; a slice
        at a time, raising CancelledError between slices once `cancel` is set, as the tokenizing does."""
        if max_doc_tokens is None or not self._clips(max_doc_tokens):
            return documents, set()
        with spans.step(self._tracer, spans.CLIP) as span:
            cuts: list[str | None] = []
            for start, end in tokenizer_slices(documents, cancel):
                cuts += self._clipper.clip(documents[start:end], max_doc_tokens)
            clipped = {i for i, cut in enumerate(cuts) if cut is not None}
            span.set_attribute("reranker.clipped", len(clipped))
        return [doc if cut is None else cut for doc, cut in zip(documents, cuts, strict=True)], clipped

    def _clips(self, max_doc_tokens: int | None) -> bool:
        """Whether `max_doc_tokens` takes a tokenizer pass to cut documents to. Truncation keeps a pair's first
        tokens and never lets a document past max_length: a cut at or past that changes nothing."""
        if max_doc_tokens is None:
            return False
        return not (self.settings.long_docs == "truncate" and max_doc_tokens >= self.model.max_length and
                    self.model.tokenizer.truncation_side != "left")

    def _key(self, query: str, document: str, instruction: str | None, max_chunks: int | None = None) -> bytes:
        # A cap on windows is a mode of its own: a long document capped scores its first windows only.
        mode = self.settings.long_docs if max_chunks is None else f"{self.settings.long_docs}:{max_chunks}"
        return pair_key(
            self.model.model_id, str(self.model.max_length), mode,
            "\x00" if instruction is None else instruction, query, document,
        )
