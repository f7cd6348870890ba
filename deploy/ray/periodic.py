"""A replica's background chores: one daemon thread each that runs a job every few seconds until closed (the Ray
gauges' refresh, the GPU readings, the Monitoring tab's view)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger("reranker.ray")


class Periodic:
    """Runs `work()` every `period_s` (and once at the start, with `now`) on a daemon thread named `name`, until
    close(). A failure is logged and the next round tries again: Ray shutting down under the thread, the GCS away."""

    def __init__(self, work: Callable[[], object], period_s: float, name: str, *, now: bool = False) -> None:
        self.work = work
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(now,), name=name, daemon=True)
        self._thread.start()

    def _run(self, now: bool) -> None:
        if now:
            self._once()
        while not self._stop.wait(self.period_s):
            self._once()

    def _once(self) -> None:
        try:
            self.work()
        except Exception as err:
            logger.debug("a periodic job failed", extra={"thread": self._thread.name, "error": repr(err)})

    def close(self) -> None:
        """Stop, and wait for a round under way to end."""
        self._stop.set()
        self._thread.join(self.period_s + 5)
