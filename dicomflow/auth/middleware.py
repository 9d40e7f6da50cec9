"""The access-control middleware: who is calling (bearer token) and may they do this here.

RFC 6750 3: 401 with ``WWW-Authenticate: Bearer`` when credentials are missing or invalid, 400
``invalid_request`` for a malformed Authorization header, 403 ``insufficient_scope`` for a member of
the organization lacking the permission. A request for an organization the caller does not belong to
answers exactly as if the tenant did not exist (404), so tenants cannot even be enumerated.
"""

from __future__ import annotations

import json
import logging
import re

from aiohttp import web
from aiohttp.typedefs import Middleware

from dicomflow.auth.model import Permission, Principal
from dicomflow.auth.oidc import Authenticator, InvalidTokenError, IssuerUnavailableError
from dicomflow.dicomweb.common import Handler
from dicomflow.settings import Settings

logger = logging.getLogger(__name__)

#: request key: the caller, or None when authentication is off
PRINCIPAL: web.RequestKey[Principal | None] = web.RequestKey("principal")
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)

#: Paths that never need a token: probes and CORS preflight.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
_SEARCH_PATH = re.compile(r"/(studies|series|instances)/?$")
_TENANT_PATH = re.compile(r"^/tenants/([^/]+)/")
_BEARER = re.compile(r"^Bearer +([A-Za-z0-9\-._~+/]+=*) *$", re.IGNORECASE)  # RFC 6750 2.1 b64token


def required_permission(request: web.Request) -> Permission:
    """The permission a request needs, from its method and path."""
    path = request.path
    if "/admin/" in path or path.endswith("/admin") or path.startswith("/admin"):
        return Permission.ADMIN
    if path == "/metrics":  # its labels name every tenant, route and destination: operators only
        return Permission.ADMIN
    if request.method in ("POST", "PUT"):
        return Permission.WRITE
    if request.method == "DELETE":
        return Permission.DELETE
    if _SEARCH_PATH.search(path):
        return Permission.SEARCH
    return Permission.READ


def tenant_in_path(request: web.Request, settings: Settings) -> str:
    match = _TENANT_PATH.match(request.path)
    return match.group(1) if match else settings.default_tenant


def _challenge(status: int, error: str | None, description: str) -> web.Response:
    params = ['realm="dicomflow"']
    if error is not None:
        params.append(f'error="{error}"')
        params.append(f'error_description="{description}"')
    body = {"status": status, "title": error or "unauthorized", "detail": description}
    return web.Response(status=status, text=json.dumps(body), content_type="application/problem+json",
                        headers={"WWW-Authenticate": "Bearer " + ", ".join(params)})


def _not_found() -> web.Response:
    body = {"status": 404, "title": "UnknownTenant", "detail": "unknown tenant"}
    return web.Response(status=404, text=json.dumps(body), content_type="application/problem+json")


def auth_middleware(settings: Settings) -> Middleware:
    table = settings.auth.role_permissions

    @web.middleware
    async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" or request.path in PUBLIC_PATHS or not settings.auth.enabled:
            request[PRINCIPAL] = None
            return await handler(request)
        header = request.headers.get("Authorization")
        if header is None:
            return _challenge(401, None, "bearer token required")
        if not header[:7].lower().startswith("bearer"):
            return _challenge(401, None, "bearer token required")  # RFC 6750 3: other schemes
        match = _BEARER.match(header)
        if match is None:
            return _challenge(400, "invalid_request", "malformed Authorization header")
        try:
            principal: Principal = await request.app[AUTHENTICATOR].authenticate(match.group(1))
        except InvalidTokenError as exc:
            logger.warning("authentication failed %s %s: %s", request.method, request.path, exc.detail)
            return _challenge(401, "invalid_token", exc.detail)
        except IssuerUnavailableError as exc:
            logger.error("authentication unavailable: %s", exc.detail)
            return web.Response(status=503, text=json.dumps({"status": 503, "detail": "issuer unavailable"}),
                                content_type="application/problem+json", headers={"Retry-After": "5"})
        tenant = tenant_in_path(request, settings)
        if not principal.is_member(tenant):
            return _not_found()
        needed = required_permission(request)
        if needed not in principal.permissions(tenant, table):
            logger.warning("forbidden: subject=%s tenant=%s needs %s", principal.subject, tenant, needed)
            return _challenge(403, "insufficient_scope", f"the {needed.value} permission is required")
        request[PRINCIPAL] = principal
        return await handler(request)

    return authorize
