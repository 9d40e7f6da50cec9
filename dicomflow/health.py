"""Liveness and readiness probes."""

from __future__ import annotations

from aiohttp import web

from dicomflow.appkeys import BLOBS, INDEX, SETTINGS
from dicomflow.audit.http import AUDIT


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, str] = {}
    ok = True
    try:
        await request.app[INDEX].find_existing("-", "0")
        checks["index"] = "ok"
    except Exception as exc:
        ok, checks["index"] = False, f"unavailable: {type(exc).__name__}"
    try:
        await request.app[BLOBS].exists("-/readyz")
        checks["storage"] = "ok"
    except Exception as exc:
        ok, checks["storage"] = False, f"unavailable: {type(exc).__name__}"
    trail = request.app.get(AUDIT)
    if trail is not None:
        checks["audit"] = "ok" if trail.dropped == 0 else f"FULL: {trail.dropped} record(s) could not be queued"
    # loud on purpose: an operator must see that the server trusts every request
    checks["authentication"] = "on" if request.app[SETTINGS].auth.enabled else "OFF (loopback only)"
    return web.json_response({"status": "ready" if ok else "not ready", "checks": checks},
                             status=200 if ok else 503)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
