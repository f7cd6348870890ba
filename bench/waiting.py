"""What requests waiting for the worker cost the process while they wait: the CPU of N callers blocked in
`Batcher.wait`, each with a plain threading.Event as its cancel (the waiting thread looks at it every 50 ms) against
a CancelSignal (it calls the batcher back when set, and the thread sleeps until its job ends), in one run.

The device is held (a scorer that waits on a gate), so nothing is scored: the process's CPU time over the window
is what waiting costs. Rounds alternate the two kinds, so a drift of the machine falls on both.

Run: .venv/bin/python -m bench.waiting   [--waiting 40 --seconds 5 --rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry

from reranker.batcher import Batcher
from reranker.jobs import CancelSignal
from reranker.metrics import Metrics
from reranker.tokens import EncodedPair

KINDS: dict[str, Callable[[], threading.Event]] = {"threading.Event": threading.Event, "CancelSignal": CancelSignal}


def cpu_share(kind: Callable[[], threading.Event], waiting: int, seconds: float) -> float:
    """The process's CPU time over `seconds` with `waiting` callers blocked in Batcher.wait, as a share of one
    core."""
    gate = threading.Event()

    def held(batch: Sequence[EncodedPair]) -> np.ndarray:
        gate.wait()
        return np.zeros(len(batch), dtype=np.float32)

    batcher = Batcher(held, batch_tokens=10, max_queue=waiting + 1, metrics=Metrics(CollectorRegistry()))
    jobs = [batcher.submit([EncodedPair(np.arange(10))]) for _ in range(waiting)]
    cancels = [kind() for _ in jobs]
    threads = [threading.Thread(target=batcher.wait, args=(job, cancel)) for job, cancel in zip(jobs, cancels,
                                                                                                  strict=True)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # every caller is waiting
    wall, cpu = time.perf_counter(), time.process_time()
    time.sleep(seconds)
    share = (time.process_time() - cpu) / (time.perf_counter() - wall)
    for cancel in cancels:
        cancel.set()
    gate.set()
    for thread in threads:
        thread.join()
    batcher.close()
    return share


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiting", type=int, default=40, help="callers waiting at once (anyio lends 40 threads)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    shares: dict[str, list[float]] = {name: [] for name in KINDS}
    for _ in range(args.rounds):
        for name, kind in KINDS.items():
            shares[name].append(cpu_share(kind, args.waiting, args.seconds))
    print(f"{args.waiting} callers waiting, {args.seconds:g} s x {args.rounds} rounds; CPU as a share of one core")
    baseline = statistics.median(shares["threading.Event"])
    for name, values in shares.items():
        median = statistics.median(values)
        ratio = median / baseline if baseline > 0 else float("nan")
        print(f"{name:16s} {median * 100:6.2f}% of a core (rounds {', '.join(f'{v * 100:.2f}' for v in values)}); "
              f"{ratio:.3f}x threading.Event")


if __name__ == "__main__":
    main()
