"""JSON logging for the whole process, and the sampling rule for request lines."""

from __future__ import annotations

import hashlib
import logging
import random
import sys
import threading
from types import TracebackType
from typing import IO

from opentelemetry.trace import SpanContext, format_span_id, format_trace_id
from pythonjsonlogger.json import JsonFormatter

# Libraries that install handlers of their own or print progress bars; all of them go through ours.
THIRD_PARTY = ("uvicorn", "uvicorn.error", "uvicorn.access", "transformers", "sentence_transformers",
               "huggingface_hub", "gradio", "httpx", "httpcore", "werkzeug", "torch", "py.warnings")
# Per-request access lines would duplicate our own request lines (and every scrape); the libraries'
# INFO chatter (config dumps, compile stats) would drown them. DEBUG lets all of it through.
QUIET = ("uvicorn.access", "werkzeug", "httpx", "httpcore", "transformers", "sentence_transformers",
         "huggingface_hub", "gradio", "torch")


class _DropColor(logging.Filter):
    """uvicorn attaches an ANSI-coloured copy of its message; logs are for machines."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)
        return True


def json_formatter() -> JsonFormatter:
    return JsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="timestamp",
        json_ensure_ascii=False,
    )


class _LineHandler(logging.StreamHandler):
    """A StreamHandler that drops records once its stream is gone (a log shipper that closed its end of the pipe):
    logging's own wrote a traceback of several lines to stderr for each record, hundreds by the first request."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handleError(record)


def setup_logging(level: str = "INFO", stream: IO[str] | None = None) -> None:
    """Make every log record, warning and uncaught exception of the process one JSON line on stdout."""
    global _library_level
    handler = _LineHandler(stream or sys.stdout)
    handler.setFormatter(json_formatter())
    handler.addFilter(_DropColor())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    _library_level = logging.NOTSET if level == "DEBUG" else logging.WARNING
    quiet_libraries()
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_exception


_library_level: int | None = None  # set by setup_logging


def quiet_libraries() -> None:
    """The libraries' loggers through the JSON root, the chatty ones at WARNING (all of it at DEBUG), and no
    progress bars. transformers installs a handler of its own when it is imported, and importing it takes a
    second that a start from the conversion cache does without: so it is set here only once imported, and the
    code that imports it calls this again. (nncf is routed while it quantizes: reranker/backends/int8.py; a
    logger named for it here, before its import, would lack the logger class it needs.) Nothing before
    setup_logging: a process that did not set up this logging (a benchmark, a library user) keeps its own."""
    if _library_level is None:
        return
    for name in THIRD_PARTY:
        library_logger = logging.getLogger(name)
        library_logger.handlers.clear()
        library_logger.propagate = True
        library_logger.setLevel(_library_level if name in QUIET else logging.NOTSET)
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()
        transformers_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
    # Child loggers some libraries (torch._dynamo, ...) configured with handlers of their own.
    for name, child in list(logging.root.manager.loggerDict.items()):
        if isinstance(child, logging.Logger) and name.split(".")[0] in THIRD_PARTY and child.handlers:
            child.handlers.clear()
            child.propagate = True


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("reranker").critical("uncaught exception", exc_info=(kind, value, tb))


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None:
        logging.getLogger("reranker").error(
            "uncaught exception in a thread", exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
            extra={"thread": args.thread.name if args.thread else None},
        )


def query_fields(query: str, preview_chars: int) -> dict[str, object]:
    """How a query appears in logs: its length and a short hash, or a preview when configured."""
    fields: dict[str, object] = {"query_chars": len(query)}
    if preview_chars > 0:
        fields["query_preview"] = query[:preview_chars]
    else:
        fields["query_hash"] = hashlib.sha256(query.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return fields


def trace_fields(context: SpanContext) -> dict[str, str]:
    """`trace_id` and `span_id` for a log line, as W3C hex; none when nothing is traced (tracing off)."""
    if not context.is_valid:
        return {}
    return {"trace_id": format_trace_id(context.trace_id), "span_id": format_span_id(context.span_id)}


def should_log(*, ok: bool, latency_ms: float, sample_rate: float, slow_ms: float,
               rng: random.Random | None = None) -> bool:
    """Errors and slow requests always; successful ones at `sample_rate`."""
    if not ok or latency_ms >= slow_ms:
        return True
    return (rng or random).random() < sample_rate
