"""Run a rerank on a worker thread and cancel its unstarted pairs when nobody will read the answer."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

T = TypeVar("T")
DISCONNECT_POLL_SECONDS = 0.1


async def run_cancellable(work: Callable[[threading.Event], T],
                          disconnected: Callable[[], Awaitable[bool]] | None = None) -> T:
    """`work(cancel)` on a worker thread. `cancel` is set when this coroutine is cancelled (Gradio cancelling
    an event, the server stopping) or, with `disconnected`, polled, once the client has gone; the engine then
    drops the request's unstarted pairs and `work` ends with its cancellation error.
    """
    cancel = threading.Event()
    task = asyncio.ensure_future(anyio.to_thread.run_sync(work, cancel))
    # An abandoned task's error (the cancellation) has no reader: retrieve it so asyncio does not log it.
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        while True:
            finished, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS if disconnected else None)
            if finished:
                return task.result()
            if disconnected is not None and await disconnected():
                cancel.set()
                return await task  # raises the cancelled request's error; nobody reads it
    finally:
        cancel.set()
