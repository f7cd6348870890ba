"""A mixed load of JSON-route requests from client threads, recording every status and serving replica."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.tiny_models import random_text

KEY = "ray-test-key"
HEADERS = {"authorization": f"Bearer {KEY}"}


def mixed_request(rng: random.Random) -> tuple[str, dict[str, Any], str, list[str]]:
    """(path, body, query, documents) of one of the four rerank routes, with 1-12 documents."""
    query = random_text(rng, rng.randint(1, 8))
    docs = [random_text(rng, rng.randint(1, 80)) for _ in range(rng.randint(1, 12))]
    path = rng.choice(["/v1/rerank", "/v2/rerank", "/rerank", "/api/predict"])
    bodies: dict[str, dict[str, Any]] = {
        "/v1/rerank": {"query": query, "documents": docs},
        "/v2/rerank": {"model": "m", "query": query, "documents": docs},
        "/rerank": {"query": query, "texts": docs},
        "/api/predict": {"data": [query, docs]},
    }
    return path, bodies[path], query, docs


def scores_of(path: str, answer: Any) -> dict[int, float]:
    """index -> score from any of the four routes' answers."""
    rows = {"/v1/rerank": lambda: answer["results"], "/v2/rerank": lambda: answer["results"],
            "/rerank": lambda: answer, "/api/predict": lambda: answer["data"][0]}[path]()
    return {r["index"]: r.get("relevance_score", r.get("score")) for r in rows}


@dataclass
class Load:
    """Client threads posting mixed requests until stop(); `statuses` counts every answer (or error)."""

    url: str
    clients: int = 4
    seed: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    replicas: Counter[str] = field(default_factory=Counter)
    answers: list[tuple[str, str, list[str], dict[int, float]]] = field(default_factory=list)
    slowest_s: float = 0.0  # the longest a request took
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for i in range(self.clients):
            thread = threading.Thread(target=self._client, args=(random.Random(self.seed * 100 + i),), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def failures(self) -> dict[str, int]:
        return {status: n for status, n in self.statuses.items() if status != "200"}

    def _client(self, rng: random.Random) -> None:
        with httpx.Client(timeout=120, headers=HEADERS) as client:
            while not self._stop.is_set():
                path, body, query, docs = mixed_request(rng)
                started = time.monotonic()
                try:
                    response = client.post(self.url + path, json=body)
                    status = str(response.status_code)
                except httpx.HTTPError as err:
                    status, response = type(err).__name__, None
                with self._lock:
                    self.statuses[status] += 1
                    self.slowest_s = max(self.slowest_s, time.monotonic() - started)
                    if response is not None and response.status_code == 200:
                        self.replicas[response.headers.get("x-reranker-replica", "")] += 1
                        self.answers.append((path, query, docs, scores_of(path, response.json())))
