"""Run a rerank on a worker thread and cancel its unstarted pairs when nobody will read the answer."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

from reranker.jobs import CancelSignal

T = TypeVar("T")


# The Gradio queue event whose handler runs in this context (set by web/gradio_api.py's CountedBlocks), or None.
_event: contextvars.ContextVar[Any] = contextvars.ContextVar("gradio_event", default=None)
EVENT_POLL_S = 0.2


@contextmanager
def handling_event(event: Any) -> Iterator[None]:
    """Within: `event` (a gradio.queueing.Event, or None) is the one event_left() watches."""
    token = _event.set(event)
    try:
        yield
    finally:
        _event.reset(token)


async def event_left() -> None:
    """Return once the client of the Gradio event being handled has left: its page closed or reloaded, which ends
    the session's event stream. Gradio then marks the event dead and lets its handler run on, to an answer nobody
    reads (a 1,000-document rerank on a CPU: seconds of passes). Never returns outside a queued event."""
    event = _event.get()
    if event is None:
        await asyncio.Event().wait()
    while event.alive:
        await asyncio.sleep(EVENT_POLL_S)


async def client_gone(request: Request) -> None:
    """Return once the ASGI server reports that the client disconnected.

    Once the body has been read, the server's next message for the request is `http.disconnect`, sent the
    moment it sees the connection close; waiting for it notices a client leave at once, where polling
    `is_disconnected` noticed it up to a poll interval later, after more of its pairs had run.
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass  # a stray empty body chunk; keep waiting


async def run_cancellable(work: Callable[[threading.Event], T], gone: Callable[[], Awaitable[None]] | None = None,
                          answer_ready: Callable[[], bool] | None = None) -> T:
    """`work(cancel)` on a worker thread. `cancel` is set when this coroutine is cancelled (Gradio cancelling
    an event, the server stopping) or, with `gone`, as soon as `gone()` returns (the client has left); the
    engine then drops the request's unstarted pairs and `work` ends with its cancellation error.

    When this coroutine is cancelled after `work` already has its answer, which `answer_ready()` says (a stop
    that cut the request off a moment too late), it waits for `work` to return and returns that answer: the call
    was booked as answered, and its client gets the answer rather than an error.
    """
    cancel = CancelSignal()  # the engine watches it: its pairs are dropped the moment it is set
    task = asyncio.ensure_future(anyio.to_thread.run_sync(work, cancel))
    # An abandoned task's error (the cancellation) has no reader: retrieve it so asyncio does not log it.
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    watcher = asyncio.ensure_future(gone()) if gone is not None else None
    try:
        finished, _ = await asyncio.wait({task} if watcher is None else {task, watcher},
                                         return_when=asyncio.FIRST_COMPLETED)
        if task not in finished:
            cancel.set()
            await asyncio.wait({task})  # the cancelled request's error, which nobody reads
        return task.result()
    except asyncio.CancelledError:
        cancel.set()
        if answer_ready is None or not answer_ready():
            raise
        handled_cancellation()
        await asyncio.wait({task})  # only its return is left
        return task.result()
    finally:
        cancel.set()
        if watcher is not None:
            watcher.cancel()


def handled_cancellation() -> None:
    """Tell the current task that the cancellation just caught is dealt with (answered, or answered as a
    cut-off), so that a cancel scope around it does not take it for one still pending."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
