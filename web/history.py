"""The last requests, without their text, for the Monitoring tab."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestSummary:
    time: float
    route: str
    n_docs: int
    latency_ms: float
    status: str
    request_id: str
    trace_id: str = ""  # empty with tracing off


class RequestHistory:
    """A thread-safe ring buffer of the most recent request summaries."""

    def __init__(self, size: int = 20) -> None:
        self._items: deque[RequestSummary] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, route: str, n_docs: int, latency_ms: float, status: str, request_id: str,
            trace_id: str = "") -> None:
        with self._lock:
            self._items.append(RequestSummary(time.time(), route, n_docs, latency_ms, status, request_id, trace_id))

    def latest(self) -> list[RequestSummary]:
        """Newest first."""
        with self._lock:
            return list(reversed(self._items))
