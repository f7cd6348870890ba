"""With RERANKER_UI_AUTH set, every Gradio API route needs a Gradio login: anonymous calls get 401.

Gradio's own `auth` already guards the UI's config, `info`, `call`, `queue` and file routes, but leaves
some `/gradio_api/` routes open (`heartbeat`, `cancel`, `reset`, `startup-events`, `user`, `token`,
`app_id`, `runs`...). This middleware closes them all, with the answer Gradio gives for the others. The
Gradio-style `/api/predict` needs the login too unless RERANKER_API_KEY guards it (web.middleware).
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from gradio.route_utils import API_PREFIX
from gradio.routes import App as GradioApp
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketClose

from web.errors import HttpError
from web.middleware import App, OnRefuse, Receive, Scope, Send, rerank_route, route_path

PREDICT = "/api/predict"

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
