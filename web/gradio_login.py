"""With RERANKER_UI_AUTH set, every Gradio API route needs a Gradio login: anonymous calls get 401.

Gradio's own `auth` already guards the UI's config, `info`, `call`, `queue` and file routes, but leaves
some `/gradio_api/` routes open (`heartbeat`, `cancel`, `reset`, `startup-events`, `user`, `token`,
`app_id`, `runs`...). This middleware closes them all, with the answer Gradio gives for the others. The
Gradio-style `/api/predict` needs the login too unless RERANKER_API_KEY guards it (web.middleware).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any

from fastapi.responses import JSONResponse
from gradio.route_utils import API_PREFIX
from gradio.routes import App as GradioApp
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketClose

from web.errors import HttpError
from web.middleware import App, OnRefuse, Receive, Scope, Send, rerank_route, route_path

PREDICT = "/api/predict"
LOGIN = "/login"  # Gradio's login form posts here
LOGIN_WINDOW_S = 60.0
LOGIN_CLIENTS = 10_000  # client addresses remembered at most: the oldest is forgotten first

logger = logging.getLogger("reranker.login")

# What the login page itself asks before anyone has logged in; Gradio answers it (401 until logged in).
OPEN_PATHS = frozenset({f"{API_PREFIX}/login_check"})


def _guarded(path: str) -> bool:
    path = path.rstrip("/")
    return (path == API_PREFIX or path.startswith(API_PREFIX + "/")) and path not in OPEN_PATHS


class GradioLogin:
    """Refuse `/gradio_api/...` (and `/api/predict` when `guard_predict`) to connections without a valid
    Gradio login cookie."""

    def __init__(self, app: App, gradio: GradioApp, guard_predict: bool, on_refuse: OnRefuse) -> None:
        self.app = app
        self.gradio = gradio
        self.guard_predict = guard_predict
        self.on_refuse = on_refuse

    def _user(self, scope: Scope) -> Any:
        # The cookie names and the token table are the ones Gradio's own login check reads.
        cookies = HTTPConnection(scope).cookies
        token = (cookies.get(f"access-token-{self.gradio.cookie_id}")
                 or cookies.get(f"access-token-unsecure-{self.gradio.cookie_id}"))
        return self.gradio.tokens.get(token) if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        predict = self.guard_predict and rerank_route(scope) == PREDICT
        if not (predict or _guarded(path)) or self._user(scope):
            await self.app(scope, receive, send)
        elif predict:
            error = HttpError(401, "unauthorized", "log in to the UI first (RERANKER_UI_AUTH) and send its cookie")
            self.on_refuse(PREDICT, error)
            await JSONResponse(error.body(), status_code=401)(scope, receive, send)
        elif scope["type"] == "websocket":
            await WebSocketClose(code=1008)(scope, receive, send)  # policy violation: not logged in
        else:
            body = {"detail": {"error": "Not authenticated", "auth_message": None}}
            await JSONResponse(body, status_code=401)(scope, receive, send)


def find_gradio_app(app: Any) -> GradioApp:
    """The Gradio app that `gr.mount_gradio_app` mounted inside `app`."""
    for route in app.routes:
        if isinstance(getattr(route, "app", None), GradioApp):
            return route.app
    raise LookupError("no Gradio app is mounted")


class LoginThrottle:
    """With RERANKER_UI_AUTH: a failed UI login is logged (WARNING: the client's address, never what was typed), and
    an address with `attempts` (RERANKER_UI_LOGIN_ATTEMPTS) failures in the last minute gets 429 with Retry-After
    for its next tries, until the oldest of them is a minute old. Gradio's own login had neither: 200 guesses took
    1.3 s, and nothing said they happened."""

    def __init__(self, app: App, attempts: int) -> None:
        self.app = app
        self.attempts = attempts
        self.failures: dict[str, deque[float]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.attempts <= 0 or scope["type"] != "http" or scope.get("method") != "POST"
                or route_path(scope) != LOGIN):
            await self.app(scope, receive, send)
            return
        client = str((scope.get("client") or ("unknown",))[0])
        now = time.monotonic()
        recent = self._recent(client, now)
        if len(recent) >= self.attempts:
            wait = max(1, math.ceil(recent[0] + LOGIN_WINDOW_S - now))
            logger.warning("ui login throttled", extra={"client": client, "retry_after_s": wait})
            error = HttpError(429, "login_throttled", f"{len(recent)} failed logins from this address in the last "
                              f"minute; retry in {wait} s", headers={"Retry-After": str(wait)})
            await error.response(LOGIN)(scope, receive, send)
            return
        answered: dict[str, int] = {}

        async def watch(message: Any) -> None:
            if message["type"] == "http.response.start":
                answered["status"] = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if answered.get("status") == 400:  # Gradio's "Incorrect credentials"
            recent.append(time.monotonic())
            self.failures.pop(client, None)  # re-inserted last: the dict's order is the forgetting order
            self.failures[client] = recent
            while len(self.failures) > LOGIN_CLIENTS:
                del self.failures[next(iter(self.failures))]
            logger.warning("ui login refused", extra={"client": client, "failures_last_minute": len(recent)})
        elif answered.get("status") == 200:
            self.failures.pop(client, None)

    def _recent(self, client: str, now: float) -> deque[float]:
        """The client's failures within the last minute (older ones dropped)."""
        recent = self.failures.get(client, deque())
        while recent and recent[0] <= now - LOGIN_WINDOW_S:
            recent.popleft()
        return recent
