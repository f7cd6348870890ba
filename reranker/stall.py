"""The stall watch: a device whose forward pass never returns (a hung GPU) raises nothing, so it is timed."""

from __future__ import annotations

import threading
from collections.abc import Callable


class StallWatch:
    """Calls `on_stall(seconds)` once, from its own daemon thread, when `stalled_for()` (how long the device thread
    has worked without a pass ending) passes `limit` seconds; looks a few times within each limit."""

    def __init__(self, stalled_for: Callable[[], float], limit: float, on_stall: Callable[[float], None]) -> None:
        self._stalled_for = stalled_for
        self._limit = limit
        self._on_stall = on_stall
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="reranker-stall-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        period = min(1.0, self._limit / 4)
        while not self._stopped.wait(period):
            stalled = self._stalled_for()
            if stalled > self._limit:
                self._on_stall(stalled)
                return

    def close(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
