"""The Monitoring tab's data: windowed quantiles and ratios from registry snapshots, the last requests."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from reranker import Reranker
from reranker.gpu import Nvml
from reranker.metrics import Metrics
from reranker.model import ScoringModel
from tests.conftest import model_settings
from tests.test_metrics import FakeNvml
from web.history import RequestHistory
from web.http import create_app
from web.monitoring import Monitor, bucket_quantile


def test_bucket_quantile_interpolates_like_prometheus() -> None:
    start = [(0.1, 0.0), (0.5, 0.0), (1.0, 0.0), (float("inf"), 0.0)]
    end = [(0.1, 10.0), (0.5, 90.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert bucket_quantile(0.05, start, end) == pytest.approx(0.05)
    assert bucket_quantile(0.5, start, end) == pytest.approx(0.1 + 0.4 * 40 / 80)
    assert bucket_quantile(0.95, start, end) == pytest.approx(0.5 + 0.5 * 5 / 10)
    assert bucket_quantile(0.5, end, end) is None  # nothing happened in the window
    overflow = [(0.1, 0.0), (float("inf"), 4.0)]
    assert bucket_quantile(0.9, [(0.1, 0.0), (float("inf"), 0.0)], overflow) == 0.1


def test_monitor_turns_traffic_into_series(bert_model: ScoringModel, bert_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("web.monitoring.time.time", lambda: clock[0])
    history = RequestHistory()
    with Reranker(bert_model, model_settings(bert_dir), metrics=Metrics(CollectorRegistry())) as reranker:
        client = TestClient(create_app(reranker, ui=False, history=history))
        monitor = Monitor(reranker, history, Nvml(FakeNvml()))
        monitor.tick()
        for i in range(4):
            client.post("/v1/rerank", json={"query": f"q{i}", "documents": ["a", "b", "c"]})
        client.post("/v1/rerank", json={"query": "", "documents": ["a"]})
        reranker.metrics.requests.labels(route="/v1/rerank", status="cancelled").inc()  # as a client gone counts
        clock[0] += 2
        monitor.tick()
        clock[0] += 0.5
        monitor.tick()  # under a second later: ignored, whatever the number of open tabs
        frames = monitor.frames()
        rates = frames["rate"].set_index("series")["value"]
        assert rates["ok"] == pytest.approx(2.0) and rates["invalid"] == pytest.approx(0.5)
        assert rates["cancelled"] == pytest.approx(0.5)
        assert set(frames["latency"]["series"]) == {"p50", "p95"}
        assert frames["docs"]["value"].iloc[-1] == pytest.approx(3.0)
        assert set(frames["memory"]["series"]) == {"GPU memory used (GiB)", "GPU memory total (GiB)"}
        assert monitor.memory_series() == [  # the plot's legend
            "GPU memory used (GiB)", "GPU memory total (GiB)", "process memory used (GiB)"]
        assert "ok 4" in monitor.summary() and "invalid 1" in monitor.summary() and "cancelled 1" in monitor.summary()
        recent = monitor.last_requests()
        assert len(recent) == 5 and recent[0][1] == "/v1/rerank" and recent[0][4] == "invalid"
        assert "| `" + bert_model.model_id + "` | cpu | float32 | 256 |" in monitor.model_card()


class NoDriver:
    """pynvml on a host without a GPU driver."""

    def nvmlInit(self) -> None:  # noqa: N802 (NVML's name)
        raise OSError("NVML Shared Library Not Found")


def test_without_a_gpu_the_memory_plot_names_the_process_alone(bert_model: ScoringModel, bert_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Its legend listed GPU memory used and total on every CPU host, series it never plots there."""
    clock = [1000.0]
    monkeypatch.setattr("web.monitoring.time.time", lambda: clock[0])
    with Reranker(bert_model, model_settings(bert_dir), metrics=Metrics(CollectorRegistry())) as reranker:
        monitor = Monitor(reranker, RequestHistory(), Nvml(NoDriver()))
        monitor.tick()
        clock[0] += 2
        monitor.tick()
        assert monitor.memory_series() == ["process memory used (GiB)"]
        assert set(monitor.frames()["memory"]["series"]) == set(monitor.memory_series())
        assert "**process memory**" in monitor.summary()


def test_the_plots_show_the_kept_window_on_fixed_axes() -> None:
    """Fitted to their points, the axes moved on every tick, and a lone first point spanned microseconds."""
    import gradio as gr

    from web.monitoring import KEEP, TICK_SECONDS, _plot

    with gr.Blocks():
        plot = _plot("requests/s by status", ["ok", "error"])
    assert plot.x_lim == [-KEEP * TICK_SECONDS, 0]
    assert plot.y_lim == [0, None]


def test_history_keeps_the_last_twenty() -> None:
    history = RequestHistory()
    for i in range(25):
        history.add("/rerank", i, 1.0, "ok", str(i))
    latest = history.latest()
    assert len(latest) == 20 and latest[0].n_docs == 24 and latest[-1].n_docs == 5
