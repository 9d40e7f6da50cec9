"""CORS for browser viewers (OHIF and others call DICOMweb cross-origin, with Authorization headers).

Preflight requests are answered by a middleware; the headers of every other response are added by an
``on_response_prepare`` signal, so that streamed responses (WADO-RS multipart, frames: prepared inside
their handler) and error responses raised as exceptions carry them too. Without them a browser hides
the response from the page (Fetch Standard, CORS check), e.g. OHIF cannot read a single frame.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from dicomflow.dicomweb.common import Handler

ALLOW_METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS"
EXPOSE_HEADERS = "Content-Type, Content-Length, Content-Location, Warning, Retry-After, Location"

ResponsePrepare = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


def _origin_policy(allowed: list[str]) -> Callable[[str | None], str | None]:
    any_origin = "*" in allowed
    allowed_set = set(allowed)

    def allow_origin(origin: str | None) -> str | None:
        if origin is None:
            return None
        return origin if any_origin or origin in allowed_set else None

    return allow_origin


def cors_middleware(allowed: list[str]) -> Middleware:
    """Answers CORS preflight requests (before authentication: a preflight carries no credentials)."""
    allow_origin = _origin_policy(allowed)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            origin = allow_origin(request.headers.get("Origin"))
            if origin is None:
                return web.Response(status=403, text="origin not allowed")
            headers = {
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers",
                                                                    "Authorization, Content-Type, Accept"),
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            }
            return web.Response(status=204, headers=headers)
        return await handler(request)

    return cors


def cors_response_headers(allowed: list[str]) -> ResponsePrepare:
    """``app.on_response_prepare`` handler: CORS headers on every response, streamed or not."""
    allow_origin = _origin_policy(allowed)

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        origin = allow_origin(request.headers.get("Origin"))
        if origin is None or "Access-Control-Allow-Origin" in response.headers:
            return
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        response.headers.add("Vary", "Origin")

    return add_headers
