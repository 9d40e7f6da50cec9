"""CORS for browser viewers (OHIF and others call DICOMweb cross-origin, with Authorization headers)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Middleware

from dicomflow.dicomweb.common import Handler

ALLOW_METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS"
EXPOSE_HEADERS = "Content-Type, Content-Length, Content-Location, Warning, Retry-After, Location"


def cors_middleware(allowed: list[str]) -> Middleware:
    any_origin = "*" in allowed
    allowed_set = set(allowed)

    def allow_origin(origin: str | None) -> str | None:
        if origin is None:
            return None
        return origin if any_origin or origin in allowed_set else None

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = allow_origin(request.headers.get("Origin"))
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
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
        response = await handler(request)
        if origin is not None and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
            response.headers.add("Vary", "Origin")
        return response

    return cors
