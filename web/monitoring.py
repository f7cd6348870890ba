"""The Monitoring tab: live plots from snapshots of the in-process registry (or, in Ray Serve mode, of the model
replicas'), a model card, last requests."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime

import gradio as gr
import pandas as pd

from reranker import Reranker
from reranker.gpu import Nvml
from reranker.metrics import STATUSES
from web.history import RequestHistory, RequestSummary
from web.snapshots import GPU_MEMORY, PROCESS_MEMORY, Snapshot, bucket_quantile, model_card, take_snapshot

__all__ = ["Monitor", "Panel", "Snapshot", "bucket_quantile", "build_monitoring_tab", "take_snapshot"]

TICK_SECONDS = 2.0
WINDOW = 5  # snapshots (~10 s) behind each quantile and ratio point
KEEP = 150  # snapshots (~5 min) on the plots


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


class Panel:
    """Keeps recent snapshots and turns them into plot frames; safe to tick from many browser tabs.
    `snapshot`, `card` and `latest` say where they come from: this process's engine (Monitor) or elsewhere."""

    def __init__(self, snapshot: Callable[[], Snapshot], card: Callable[[], str],
                 latest: Callable[[], list[RequestSummary]]) -> None:
        self._snapshot = snapshot
        self._card = card
        self._latest = latest
        self._snapshots: deque[Snapshot] = deque(maxlen=KEEP)
        self._lock = threading.Lock()

    def tick(self) -> None:
        """Add a snapshot, at most one a second whatever the number of open tabs."""
        with self._lock:
            if self._snapshots and time.time() - self._snapshots[-1].time < 1.0:
                return
            self._snapshots.append(self._snapshot())

    def frames(self) -> dict[str, pd.DataFrame]:
        with self._lock:
            snaps = list(self._snapshots)
        rows: dict[str, list[tuple[datetime, float, str]]] = {
            k: [] for k in ("rate", "latency", "docs", "queue", "cache", "memory")}
        for i in range(1, len(snaps)):
            prev, now, old = snaps[i - 1], snaps[i], snaps[max(0, i - WINDOW)]
            at, dt = datetime.fromtimestamp(now.time), max(now.time - prev.time, 1e-6)
            for status in STATUSES:
                rows["rate"].append((at, (now.requests[status] - prev.requests[status]) / dt, status))
            for q, name in ((0.5, "p50"), (0.95, "p95")):
                value = bucket_quantile(q, old.latency_buckets, now.latency_buckets)
                if value is not None:
                    rows["latency"].append((at, value * 1000, name))
            docs = _ratio(now.docs[0] - old.docs[0], now.docs[1] - old.docs[1])
            if docs is not None:
                rows["docs"].append((at, docs, "documents per request"))
            rows["queue"].append((at, now.queue_pairs, "queue depth (pairs)"))
            batch = _ratio(now.batch[0] - old.batch[0], now.batch[1] - old.batch[1])
            if batch is not None:
                rows["queue"].append((at, batch, "batch size (pairs)"))
            hits = now.cache[0] - old.cache[0]
            ratio = _ratio(hits, hits + now.cache[1] - old.cache[1])
            if ratio is not None:
                rows["cache"].append((at, ratio, "cache hit ratio"))
            rows["memory"].append((at, now.memory[0] / 2**30, memory_name(now.memory[2], "used")))
            if now.memory[1]:
                rows["memory"].append((at, now.memory[1] / 2**30, memory_name(now.memory[2], "total")))
        return {k: _frame(v) for k, v in rows.items()}

    def summary(self) -> str:
        with self._lock:
            last = self._snapshots[-1] if self._snapshots else None
        if last is None:
            return "waiting for the first sample…"
        counts = " · ".join(f"{status} {int(last.requests[status])}" for status in STATUSES)
        hits, misses = last.cache
        hit_ratio = f"{hits / (hits + misses):.0%}" if hits + misses else "n/a"
        return (f"**requests** {counts} · **queue** {int(last.queue_pairs)} pairs · **cache hits** {hit_ratio} · "
                f"**{last.memory[2]}** {last.memory[0] / 2**20:.0f} MiB")

    def last_requests(self) -> list[list[object]]:
        return [[datetime.fromtimestamp(r.time).strftime("%H:%M:%S"), r.route, r.n_docs, round(r.latency_ms, 1),
                 r.status, r.trace_id] for r in self._latest()]

    def model_card(self) -> str:
        return self._card()

    def memory_series(self) -> list[str]:
        """The memory plot's series, which its legend names once, when the tab is built: here the GPUs' or the
        processes', whichever the replicas report."""
        return [*GPU_SERIES, memory_name(PROCESS_MEMORY, "used")]


def memory_name(what: str, kind: str) -> str:
    """A memory plot series: GPU_MEMORY or PROCESS_MEMORY, used or total."""
    return f"{what} {kind} (GiB)"


GPU_SERIES = [memory_name(GPU_MEMORY, "used"), memory_name(GPU_MEMORY, "total")]


class Monitor(Panel):
    """The panel over this process's engine and request history."""

    def __init__(self, reranker: Reranker, history: RequestHistory, nvml: Nvml | None = None) -> None:
        self.reranker = reranker
        self.history = history
        self.nvml = nvml or Nvml()
        super().__init__(lambda: take_snapshot(reranker, self.nvml), lambda: model_card(reranker), history.latest)

    def memory_series(self) -> list[str]:
        """Without NVML, this process's memory alone: a legend of GPU series that never get a point helps nobody.
        With it, the GPUs' too (a tick whose GPU reads all fail plots the process's)."""
        process = [memory_name(PROCESS_MEMORY, "used")]
        return [*GPU_SERIES, *process] if self.nvml.available() else process


def _frame(rows: list[tuple[datetime, float, str]]) -> pd.DataFrame:
    # Typed even when empty, so that the plot treats time as temporal and value as quantitative.
    now = datetime.now()
    frame = pd.DataFrame([((t - now).total_seconds(), v, name) for t, v, name in rows],
                         columns=["time", "value", "series"])
    return frame.astype({"time": "float64", "value": "float64", "series": "object"})


PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2")


def _plot(title: str, series: list[str]) -> gr.LinePlot:
    # The legend's domain is fixed when the plot is built, so every series name is given up front.
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(series)}
    start = _frame([(datetime.now(), 0.0, name) for name in series])
    # The whole kept window on a fixed axis from 0 up: fitted to the points instead, the axis moved on every tick,
    # and a first lone point spanned a few microseconds of "seconds ago" ticks. Values without trailing zeros: a flat
    # 0 was labelled "0.000000".
    return gr.LinePlot(start, x="time", y="value", color="series", color_map=colors, title=title,
                       x_title="seconds ago", y_title="", height=240, x_lim=[-KEEP * TICK_SECONDS, 0],
                       y_lim=[0, None], y_axis_format=",~g")


def build_monitoring_tab(monitor: Panel) -> None:
    """The tab's components and its timer; call inside `gr.Blocks`."""
    with gr.Tab("Monitoring"):
        card = gr.Markdown(monitor.model_card(), elem_id="monitor-card")  # on Ray Serve the replicas come and go
        summary = gr.Markdown(elem_id="monitor-summary")
        with gr.Row():
            rate = _plot("requests/s by status", list(STATUSES))
            latency = _plot("latency p50 / p95 (ms)", ["p50", "p95"])
        with gr.Row():
            docs = _plot("documents per request", ["documents per request"])
            queue = _plot("queue depth and batch size", ["queue depth (pairs)", "batch size (pairs)"])
        with gr.Row():
            cache = _plot("cache hit ratio", ["cache hit ratio"])
            memory = _plot("memory", monitor.memory_series())
        recent = gr.Dataframe(headers=["time", "route", "documents", "latency ms", "status", "trace id"],
                              interactive=False, label="last 20 requests", elem_id="recent-requests")
    timer = gr.Timer(TICK_SECONDS)

    def refresh() -> tuple[object, ...]:
        monitor.tick()
        f = monitor.frames()
        return (monitor.model_card(), monitor.summary(), f["rate"], f["latency"], f["docs"], f["queue"], f["cache"],
                f["memory"], monitor.last_requests())

    # Private and outside the queue: the panel never waits behind reranks, and is no API.
    timer.tick(refresh, outputs=[card, summary, rate, latency, docs, queue, cache, memory, recent],
               api_visibility="private", queue=False, show_progress="hidden")
