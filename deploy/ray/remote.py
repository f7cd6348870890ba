"""RemoteBackend: the web routes' Backend over a DeploymentHandle to the model replicas.

Scoring is idempotent, so a call whose replica died (SIGKILL, node lost), or whose replica answered that it cannot
score (its device failed), is retried on another replica, a bounded number of times and only while the request's
deadline allows; Serve itself does not retry. The deadline bounds each try too: the replica that holds the call
stops at the deadline and answers 504 `timeout` itself (and counts it); a call no replica answered within
REPLICA_GRACE_S more gets 504 here, and is cancelled. A full queue at the handle (max_queued_requests) is one
process's overload: 429. Readiness is the controller's view of the model replicas, not a call queued behind
scoring work, and neither is /info: it is what a model replica last published to Ray's key-value store. A request
whose client leaves is counted `cancelled` once: by the replica that held it, or here when
it was still waiting for one (deploy/ray/claims.py settles a call that Ray handed to a replica after it was withdrawn).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

from opentelemetry import propagate
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request

from deploy.ray.claims import claim_left
from deploy.ray.model import AGE, ARRIVED, Reply
from deploy.ray.panel import FORGET_S, KIND_MODEL, ReplicaView, published
from reranker import RerankResult, Settings
from web.cancel import client_gone, event_left
from web.errors import HttpError, client_left
from web.lifecycle import Lifecycle
from web.middleware import OnRefuse
from web.request_id import current_request_id, new_request_id, request_age
from web.service import RerankCall

logger = logging.getLogger("reranker.ray")

# The replica died under the call, or was gone before it started: nothing was answered, so try another.
RETRYABLE = (RayActorError, ReplicaUnavailableError)
# What a replica answers when it cannot score at all (its device failed, its engine closed): nothing was scored.
UNAVAILABLE = (503, "not_ready")
# A replica that cannot score answers at once, so Serve's router, which favours the least busy replica, sends it
# the retry too, until the replica is gone (deploy/ray/model.py: within a health-check period). The retries after
# such an answer wait: BACKOFF_S, then twice that, and so on.
BACKOFF_S = 0.5
# What a replica answers when its own queue (RERANKER_MAX_QUEUE pairs) is full. Serve's router balances requests,
# not pairs, so one replica can hold a few huge requests while another is idle: such an answer is tried once more.
FULL = (429, "overloaded")
# The ingress's X-Reranker-Replica header reads this from the request's scope state.
REPLICA_STATE = "reranker_replica"
# How long past a request's deadline the ingress waits for the replica's own 504 (which it counts once, where the
# ingress's withdrawal would add a `cancelled`): a forward pass under way at the deadline finishes first.
REPLICA_GRACE_S = 2.0
READY_TTL_S = 1.0  # /readyz asks the controller at most once a second
MODEL_ID_WAIT_S = 2.0  # ...and a replica for the model id, before the first answer, this long at most


def overloaded() -> HttpError:
    """Every replica busy and the handle's queue full: one process's full queue, and answered alike."""
    return HttpError(429, "overloaded", "every model replica is busy and the queue to them is full "
                     "(max_queued_requests); retry shortly")


def no_deployment() -> HttpError:
    """The model deployment has no replica and will get none: it failed to deploy (a model that cannot load), or
    it is being deleted. Not retried: it lasts until the next deploy."""
    return HttpError(503, "not_ready", "the model deployment is unavailable: it failed to deploy (`serve status` "
                     "says why) or is being deleted; retry once it runs again")


def no_replica() -> HttpError:
    """The replica died under the call, or none was there to take it."""
    return HttpError(503, "not_ready", "no replica could serve the request; retry shortly")


class RouterRefusalFilter(logging.Filter):
    """Drops the WARNING that Serve's router (logger `ray.serve`, in this process) writes for each call its queue
    refuses ("Request dropped due to backpressure"). Each such call is answered 429 `overloaded` here and logged
    once, by its request line with its id, route and latency; Serve's extra line named no request and read as a lost
    one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Request dropped due to backpressure")


def quiet_router_refusals() -> None:
    """Install RouterRefusalFilter on Serve's logger once per process."""
    serve_logger = logging.getLogger("ray.serve")
    if not any(isinstance(f, RouterRefusalFilter) for f in serve_logger.filters):
        serve_logger.addFilter(RouterRefusalFilter())


def running_replicas(app: str, deployment: str) -> int:
    """RUNNING replicas of the deployment, as the Serve controller sees them (a blocking call)."""
    application = serve.status().applications.get(app)
    status = None if application is None else application.deployments.get(deployment)
    return 0 if status is None else sum(n for state, n in status.replica_states.items() if state == "RUNNING")


def withdrawn_unassigned(response: object) -> bool:
    """Whether cancelling `response` withdrew it before Serve's router gave it to a replica, so that no replica saw
    it. Ray 2.60 keeps that in the response's replica-result future, which cancel() cancels only while no replica
    has the call. No public API tells (awaiting either raises RequestCancelledError): a real cluster checks this
    in tests/test_ray_serve.py, so a Ray upgrade that moves it fails there."""
    future = getattr(response, "_replica_result_future", None)
    return future is not None and future.cancelled()


def assigned(response: object) -> bool:
    """Whether Serve's router has given the call to a replica (the private future withdrawn_unassigned reads)."""
    future = getattr(response, "_replica_result_future", None)
    return future is None or future.done()


def _log_failure(settling: asyncio.Future[None]) -> None:
    """A done callback: log what counting a cancelled call raised (nobody awaits it)."""
    if not settling.cancelled() and settling.exception() is not None:
        logger.error("counting a cancelled request failed", exc_info=settling.exception())


class RemoteBackend:
    """Reranks on the model deployment's replicas; readiness asks the controller (`running`: how many of them run;
    serve.status() unless a test gives its own), info reads the views they publish (`views`: Ray's key-value store
    unless a test gives its own). `book` counts and logs a request that no replica will: one whose client left while
    it still waited for a replica."""

    def __init__(self, handle: DeploymentHandle, settings: Settings, *, tries: int = 3,
                 deadline_s: float = 60.0, running: Callable[[], int] | None = None,
                 lifecycle: Lifecycle | None = None, book: OnRefuse | None = None,
                 claim: Callable[[str], bool] | None = None,
                 views: Callable[[], list[ReplicaView]] | None = None, forget_s: float = FORGET_S) -> None:
        if tries < 1 or not deadline_s > 0:
            raise ValueError(f"tries must be at least 1 and deadline_s above 0 (serve.yaml's application args), "
                             f"got tries={tries}, deadline_s={deadline_s}")
        self.handle = handle
        self.settings = settings
        self.tries = tries
        self.deadline_s = deadline_s
        self.lifecycle = lifecycle  # the ingress's drain: /readyz says so
        self.book = book
        # Whether this process counts a withdrawn call whose id it is given: a replica may have been handed it anyway
        # (deploy/ray/claims.py). A blocking call, run off the event loop.
        self.claim = claim or partial(claim_left, handle.app_name)
        self._running = running or (lambda: running_replicas(handle.app_name, handle.deployment_name))
        self._views = views or (lambda: list(published(handle.app_name, KIND_MODEL).values()))
        self._forget_s = forget_s
        self._changed: dict[str, tuple[float, float]] = {}  # replica -> (its view's time, when it last changed here)
        self._ready: tuple[float, HttpError | None] | None = None  # (when, answer) of the last look
        self._looking: asyncio.Lock | None = None
        self._model_id: str | None = None
        # Set by cut_off_waiting: calls no model replica has taken (`_cut`), or all of them (`_cut_held` too), are
        # answered `_cut_error`.
        self._cut, self._cut_held = asyncio.Event(), asyncio.Event()
        self._cut_error: HttpError | None = None

    def cut_off_waiting(self, error: HttpError, *, held_too: bool = False) -> None:
        """The drain's deadline passed: the calls that no model replica has taken yet are withdrawn and answered
        `error` (503 `shutting_down`: nothing was scored, so the caller retries elsewhere), as one process answers
        what its stop cuts off. Serve would otherwise hold them until it kills this replica at the end of its
        graceful shutdown, and its proxy answers them a plain 500. A call a replica holds is answered by it: it
        finishes within its own graceful shutdown. `held_too` (a second signal): those are cancelled and answered
        `error` too, where the proxies' stop would drop their connections."""
        self._cut_error = error
        self._cut.set()
        if held_too:
            self._cut_held.set()

    async def rerank(self, request: Request | None, route: str, call: RerankCall) -> RerankResult:
        # The request's deadline counts from its arrival at the ingress, not from here: a body sent slowly (up to
        # RERANKER_BODY_TIMEOUT_SECONDS) took its time off the deadline's, or the proxy's request_timeout_s ran out
        # first and the client got Serve's plain-text 408.
        deadline = time.monotonic() + self.deadline_s - (request_age() or 0.0)
        if deadline <= time.monotonic():  # its body alone took that long: no replica is asked
            raise HttpError(504, "timeout", f"the request's deadline ({self.deadline_s:g} s) passed before a model "
                            "replica was asked; send the body faster, or fewer documents")
        request_id = current_request_id() or new_request_id()
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # the ingress's server span, when tracing is on
        backoff, full_once = BACKOFF_S, False
        for attempt in range(1, self.tries + 1):
            try:
                # Bounded by what is left: a try can wait in Serve's queue for a replica (one being replaced, say)
                # for as long as the proxy's request_timeout_s, whose 408 is Serve's text, not this API's answer.
                reply = await self._call(request, route, call, request_id, carrier, deadline - time.monotonic())
            except TimeoutError as err:  # the call was cancelled: the replica drops unstarted pairs
                logger.warning("no replica answered within the request's deadline", extra={
                    "request_id": request_id, "route": route, "attempt": attempt, "deadline_s": self.deadline_s})
                raise HttpError(504, "timeout", f"no model replica answered within the request's deadline "
                                f"({self.deadline_s:g} s); retry later, or send fewer documents") from err
            except BackPressureError as err:
                raise overloaded() from err
            except DeploymentUnavailableError as err:
                raise no_deployment() from err
            except RETRYABLE as err:
                failed = no_replica()
                reason, wait = type(err).__name__, 0.0  # Serve's router has dropped the dead replica already
            else:
                if request is not None:
                    request.scope.setdefault("state", {})[REPLICA_STATE] = reply.replica
                self._model_id = reply.model or self._model_id
                if reply.error is None:
                    assert reply.result is not None
                    return reply.result
                failed = HttpError(*reply.error, counted=True, tei_type=reply.tei_type)  # the replica booked it
                if reply.error[:2] == FULL and not full_once:
                    reason, wait, full_once = failed.message, 0.0, True
                elif reply.error[:2] == UNAVAILABLE:
                    reason, wait, backoff = failed.message, backoff, backoff * 2
                else:
                    raise failed
            left = deadline - time.monotonic()
            retry = attempt < self.tries and left > wait
            logger.warning("replica could not serve a request", extra={
                "request_id": request_id, "route": route, "attempt": attempt, "error": reason, "retry": retry})
            if not retry:
                raise failed
            await asyncio.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _call(self, request: Request | None, route: str, call: RerankCall, request_id: str,
                    carrier: dict[str, str], timeout: float) -> Reply:
        """One call to one replica, which answers 504 itself after `timeout` seconds; cancelled REPLICA_GRACE_S later
        (TimeoutError), or as soon as the client disconnects (the replica drops its unstarted pairs)."""
        # Epoch seconds, for the wait in Serve's queue, and the seconds left, for a node whose clock runs behind.
        left = max(timeout, 0.0)
        call_id = uuid.uuid4().hex  # this try's, for deploy/ray/claims.py (a request id may repeat)
        if (age := request_age()) is not None:  # the replica's latency counts from the request's arrival
            carrier = {**carrier, ARRIVED: repr(time.time() - age), AGE: repr(age)}
        response = self.handle.rerank.remote(route, call, request_id, carrier, time.time() + left, left, call_id)
        answer: asyncio.Future[Reply] = asyncio.ensure_future(cast("Awaitable[Reply]", response))
        # Without a request (a UI event): cancelling this task, or the event's client leaving (its page closed).
        watch = client_gone(request) if request is not None else event_left()
        gone: asyncio.Future[Any] = asyncio.ensure_future(watch)
        cut: asyncio.Future[Any] = asyncio.ensure_future(self._cut.wait())
        cut_held: asyncio.Future[Any] = asyncio.ensure_future(self._cut_held.wait())
        waiting = {answer, gone, cut, cut_held}
        until = time.monotonic() + left + REPLICA_GRACE_S
        # Ended without an answer, the call was given up by its client (here, or at Serve's proxy, which then cancels
        # this request), unless its deadline passed or the drain cut it off.
        given_up = True
        try:
            while True:
                done, _ = await asyncio.wait(waiting, timeout=max(until - time.monotonic(), 0.0),
                                             return_when=asyncio.FIRST_COMPLETED)
                if answer in done:
                    return answer.result()
                if gone in done:
                    raise client_left("the client went away", counted=True)
                if cut not in done and cut_held not in done:
                    given_up = False  # the caller answers 504, and counts it
                    raise TimeoutError
                waiting.discard(cut)
                if cut_held in done or not assigned(response):
                    given_up = False
                    response.cancel()
                    assert self._cut_error is not None
                    # Withdrawn unassigned, it is counted by whoever answers it, unless Ray handed it to a replica
                    # anyway and the replica claimed it first; a replica that held it counts it `cancelled`.
                    ours = withdrawn_unassigned(response) and await asyncio.to_thread(self.claim, call_id)
                    raise HttpError(self._cut_error.status, self._cut_error.type, self._cut_error.message,
                                    counted=not ours, tei_type=self._cut_error.tei_type)
        finally:
            gone.cancel()
            cut.cancel()
            cut_held.cancel()
            if not answer.done():
                response.cancel()  # once: Serve's cancel does nothing the second time
                # An abandoned answer's error (the cancellation) has no reader: retrieve it so asyncio does not log it.
                answer.add_done_callback(lambda done: done.cancelled() or done.exception())
                # A replica that held the call counted it `cancelled`; one still waiting for a replica was counted by
                # nobody (Ray's proxy saw a 499, reranker_requests_total nothing): it is counted here, unless a replica
                # was handed it after all and counted it first.
                if given_up and self.book is not None and withdrawn_unassigned(response):
                    self._count_left(route, call_id, self.book)

    def _count_left(self, route: str, call_id: str, book: OnRefuse) -> None:
        """Count a withdrawn call `cancelled` if this process wins its claim: off the event loop (the claim asks the
        GCS), in this request's context (its id and span), and whether or not this task is being cancelled."""
        claim = self.claim
        error = client_left("the client went away while the request waited for a model replica")

        def settle() -> None:
            if claim(call_id):
                book(route, error)

        try:
            settling = asyncio.get_running_loop().run_in_executor(None, contextvars.copy_context().run, settle)
        except RuntimeError:  # the loop's executor is shut down: the replica is stopping; count it here
            book(route, error)
            return
        settling.add_done_callback(_log_failure)

    async def readiness(self) -> HttpError | None:
        """Ready while the controller counts a RUNNING model replica: one that has loaded and warmed its model and
        passes its health checks (a failed device fails them). Not a call to a replica, which would queue behind
        its scoring work (max_ongoing_requests) and time out under load. Looked up at most once a second. Not
        ready while this replica drains."""
        if self.lifecycle is not None and self.lifecycle.draining:
            return HttpError(503, "shutting_down", self.lifecycle.reason)
        if self._looking is None:
            self._looking = asyncio.Lock()
        async with self._looking:  # concurrent probes share one look
            if self._ready is None or time.monotonic() - self._ready[0] >= READY_TTL_S:
                self._ready = (time.monotonic(), await self._look())
            return self._ready[1]

    async def _look(self) -> HttpError | None:
        try:
            running = await asyncio.to_thread(self._running)  # a blocking call to the controller
        except Exception as err:  # the controller restarting
            logger.warning("readiness: the Serve controller did not answer", extra={"error": type(err).__name__})
            return HttpError(503, "not_ready", "the Serve controller did not answer; retry shortly")
        return None if running > 0 else HttpError(503, "not_ready", "no model replica is running")

    async def model_id(self) -> str:
        """What the replicas last said they serve. Before any answer (a new ingress), one replica's /info, waited for
        MODEL_ID_WAIT_S at most (without a fresh view it is a call, queued behind their scoring work, and /readyz
        must not be), else RERANKER_MODEL as configured: the replicas read the same."""
        if self._model_id is None:
            try:
                self._model_id = str((await asyncio.wait_for(self.info(), MODEL_ID_WAIT_S))["model"])
            except (TimeoutError, HttpError):
                return self.settings.model
        return self._model_id

    async def info(self) -> dict[str, Any]:
        """One model replica's /info: the newest view a replica published (each does every PUBLISH_S), so that it
        answers at once while the replicas are busy scoring; else (Ray's store away, no fresh view, a replica of a
        version that published none) a call to one, answered as a rerank's is."""
        try:
            views = await asyncio.to_thread(self._views)  # blocking reads of the GCS
        except Exception as err:
            logger.debug("info: could not read the replicas' views", extra={"error": repr(err)})
            views = []
        fresh = self._fresh([view for view in views if view.info is not None])
        if fresh:
            return dict(fresh[0].info or {})
        return await self._ask_info()

    def _fresh(self, views: list[ReplicaView]) -> list[ReplicaView]:
        """The views that changed within `forget_s` by this process's clock, most recently changed first. A view
        seen for the first time is judged by its own time against this node's clock (another node's may differ); after
        that only by whether it changes, as the Monitoring tab judges them (deploy/ray/panel.Replicas): a replica killed
        before it could delete its view, on a node whose clock runs ahead, is stale once its view stops changing."""
        now, wall = time.monotonic(), time.time()
        changed = {}
        for view in views:
            last = self._changed.get(view.replica)
            if last is None:  # how long ago it changed, as far as its own time tells
                changed[view.replica] = (view.snapshot.time, now - max(wall - view.snapshot.time, 0.0))
            elif last[0] != view.snapshot.time:
                changed[view.replica] = (view.snapshot.time, now)
            else:
                changed[view.replica] = last
        self._changed = changed  # a replica whose view is gone is forgotten
        fresh = [view for view in views if now - changed[view.replica][1] <= self._forget_s]
        return sorted(fresh, key=lambda view: (changed[view.replica][1], view.snapshot.time), reverse=True)

    async def _ask_info(self) -> dict[str, Any]:
        """A replica's /info by a call, queued behind its scoring work. Given up (model_id's wait), the call is
        withdrawn: Serve does not cancel a call whose awaiting task is cancelled, so each early /readyz left one
        queued behind the replicas' scoring."""
        response = self.handle.info.remote()
        try:
            return await cast("Awaitable[dict[str, Any]]", response)
        except asyncio.CancelledError:
            response.cancel()
            raise
        except BackPressureError as err:
            raise overloaded() from err
        except DeploymentUnavailableError as err:
            raise no_deployment() from err
        except RETRYABLE as err:
            raise no_replica() from err
