"""The load test of bench/load.py, smaller for CI time but the same shape: every check must hold."""

from __future__ import annotations

from bench import load
from bench.load_calls import BAD_STATUS, GRADIO, SURFACES, build_calls, check

CI_REQUESTS = 400  # `python -m bench.load` sends 2,000; this is the same mix over the same surfaces


def test_calls_have_the_mix_the_load_test_promises() -> None:
    calls = build_calls(2000, 500)
    repeats = sum(c.number != int(c.token[1:6]) for c in calls if c.token.startswith("r") and not c.bad)
    bad = [c for c in calls if c.bad]
    assert {c.surface for c in calls} == set(SURFACES)
    assert 0.07 < repeats / len(calls) < 0.13 and 0.03 < len(bad) / len(calls) < 0.07
    assert {c.bad for c in bad} == set(BAD_STATUS)
    assert all(c.bad in ("empty query", "top_n negative", "too many documents", "document too long")
               for c in bad if c.surface == GRADIO)
    sizes = [len(c.documents) for c in calls if not c.bad]
    assert min(sizes) >= 1 and max(sizes) <= 500 and max(sizes) > 400
    assert len({c.token for c in calls}) > 0.85 * len(calls)


def test_check_rejects_another_requests_document() -> None:
    first, second = [c for c in build_calls(200, 5) if not c.bad and c.surface == "/rerank" and c.top_n is None
                     and len(c.documents) > 1][:2]
    good = [{"index": i, "score": 1.0 - i / 10, "text": d} for i, d in enumerate(first.documents)]
    assert check(first, good) is None
    assert "not this request's document" in str(check(first, [{**good[0], "text": second.documents[0]}, *good[1:]]))
    assert "not this request's document" in str(check(first, [{**good[0], "index": 1}, {**good[1], "index": 0},
                                                               *good[2:]]))
    assert "sorted" in str(check(first, good[::-1]))
    assert "results, expected" in str(check(first, good[1:]))


def test_load_over_every_surface() -> None:
    """About two minutes on two cores: 400 requests of 1-500 documents from 32 clients."""
    report = load.run(requests=CI_REQUESTS, concurrency=32, max_docs=500, baseline=10)
    print(load.summary(report, CI_REQUESTS, 32, 500))
    assert len(report.outcomes) == CI_REQUESTS
    assert report.problems == []
    assert report.server_errors == 0
    assert report.counted == report.seen
    assert report.rss_growth < 0.10
