"""RemoteBackend: the web routes' Backend over a DeploymentHandle to the model replicas.

Scoring is idempotent, so a call whose replica died (SIGKILL, node lost) is retried on another replica,
a bounded number of times and only while the request's deadline allows; Serve itself does not retry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, cast

from opentelemetry import propagate
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request

from deploy.ray.model import Reply
from reranker import RerankResult, Settings
from web.cancel import client_gone
from web.errors import CLIENT_CLOSED, HttpError
from web.request_id import current_request_id, new_request_id
from web.service import RerankCall

logger = logging.getLogger("reranker.ray")

# The replica died under the call, or was gone before it started: nothing was answered, so try another.
RETRYABLE = (RayActorError, ReplicaUnavailableError)
# The ingress's X-Reranker-Replica header reads this from the request's scope state.
REPLICA_STATE = "reranker_replica"


class RemoteBackend:
    """Reranks on the model deployment's replicas; readiness and info ask one of them."""

    def __init__(self, handle: DeploymentHandle, settings: Settings, *, tries: int = 3,
                 deadline_s: float = 60.0) -> None:
        self.handle = handle
        self.settings = settings
        self.tries = tries
        self.deadline_s = deadline_s
        self._model_id: str | None = None

    async def rerank(self, request: Request | None, route: str, call: RerankCall) -> RerankResult:
        deadline = time.monotonic() + self.deadline_s
        request_id = current_request_id() or new_request_id()
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # the ingress's server span, when tracing is on
        for attempt in range(1, self.tries + 1):
            try:
                reply = await self._call(request, route, call, request_id, carrier)
            except RETRYABLE as err:
                left = deadline - time.monotonic()
                logger.warning("replica lost a request", extra={
                    "request_id": request_id, "route": route, "attempt": attempt, "error": type(err).__name__,
                    "retry": attempt < self.tries and left > 0})
                if attempt < self.tries and left > 0:
                    continue
                raise HttpError(503, "not_ready", "no replica could serve the request; retry shortly") from err
            if request is not None:
                request.scope.setdefault("state", {})[REPLICA_STATE] = reply.replica
            if reply.error is not None:
                raise HttpError(*reply.error, counted=True)  # the replica booked it
            assert reply.result is not None
            return reply.result
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _call(self, request: Request | None, route: str, call: RerankCall, request_id: str,
                    carrier: dict[str, str]) -> Reply:
        """One call to one replica; a client that disconnects cancels it (the replica drops its pairs)."""
        response = self.handle.rerank.remote(route, call, request_id, carrier)
        answer: asyncio.Future[Reply] = asyncio.ensure_future(cast("Awaitable[Reply]", response))
        # Without a request (a UI event), only cancelling this task cancels the call.
        watch = client_gone(request) if request is not None else asyncio.Event().wait()
        gone: asyncio.Future[Any] = asyncio.ensure_future(watch)
        try:
            waiting: set[asyncio.Future[Any]] = {answer, gone}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if answer in done:
                return answer.result()
            response.cancel()
            # The replica counts the request as cancelled; nobody reads this answer.
            raise HttpError(CLIENT_CLOSED, "cancelled", "the client went away", counted=True)
        except asyncio.CancelledError:
            response.cancel()  # Serve cancelled the ingress's request: pass it on
            raise
        finally:
            gone.cancel()
            if not answer.done():
                answer.cancel()
            # An abandoned answer's error (the cancellation) has no reader: retrieve it so asyncio does not log it.
            answer.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def readiness(self) -> HttpError | None:
        try:
            asked = cast("Awaitable[tuple[int, str, str] | None]", self.handle.readiness.remote())
            refusal = await asyncio.wait_for(asked, timeout=5)
        except Exception as err:  # no replica yet, or none answering
            logger.warning("readiness: no replica answered", extra={"error": type(err).__name__})
            return HttpError(503, "not_ready", "no model replica is ready")
        return None if refusal is None else HttpError(*refusal)

    async def model_id(self) -> str:
        if self._model_id is None:
            self._model_id = str((await self.info())["model"])
        return self._model_id

    async def info(self) -> dict[str, Any]:
        return await cast("Awaitable[dict[str, Any]]", self.handle.info.remote())
