"""Request bodies parsed as RFC 8259 JSON: Python's parser also takes NaN and Infinity, and reads a number past a
double's range as infinity, none of which a reply can carry (a document object echoed back held null instead)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

# The start of the reason a refusal of ours gives: web.api shows such a reason to the caller, and not the parser's.
REASON_PREFIX = "not JSON:"


class _Refused(ValueError):
    def __init__(self, token: str, reason: str) -> None:
        super().__init__(reason)
        self.token = token


def _constant(token: str) -> Any:
    raise _Refused(token, f"{REASON_PREFIX} {token} is no JSON number (RFC 8259); send null or a string instead")


def _finite(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise _Refused(token, f"{REASON_PREFIX} the number {token[:20]} is out of a double's range; send it as a "
                              "string")
    return value


def loads(body: bytes | str) -> Any:
    """`body` as JSON, refusing NaN, Infinity, -Infinity and numbers no double holds with a JSONDecodeError whose
    message starts with REASON_PREFIX and whose position is the token's (its first occurrence)."""
    try:
        return json.loads(body, parse_constant=_constant, parse_float=_finite)
    except _Refused as refused:
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        raise json.JSONDecodeError(str(refused), text, max(text.find(refused.token), 0)) from None


class StrictJsonRequest(Request):
    """A request whose `json()` is `loads`."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """A route whose JSON body is read by `loads`: FastAPI answers a refusal as it does any JSON it cannot decode
    (a `json_invalid` validation error, which web.api turns into a 400)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))
        return strict
