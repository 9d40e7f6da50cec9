"""Audit every DICOMweb and admin request, and serve the audit trail to a tenant's admins."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from aiohttp.typedefs import Middleware

from dicomflow.appkeys import AUDIT_STUDIES, SETTINGS
from dicomflow.audit.record import AuditAction, AuditRecord, outcome_for_http
from dicomflow.audit.trail import AuditTrail
from dicomflow.auth.middleware import PRINCIPAL, required_permission, tenant_in_path
from dicomflow.auth.model import Permission
from dicomflow.dicomweb.common import Handler
from dicomflow.errors import InvalidRequestError
from dicomflow.index import schema as t

AUDIT = web.AppKey("audit", AuditTrail)

_UNAUDITED = frozenset({"/healthz", "/readyz", "/metrics"})
_STUDY = re.compile(r"/studies/([0-9.]{1,64})(/|$)")
_ACTIONS = {
    Permission.WRITE: AuditAction.STORE,
    Permission.SEARCH: AuditAction.QUERY,
    Permission.READ: AuditAction.RETRIEVE,
    Permission.DELETE: AuditAction.DELETE,
    Permission.ADMIN: AuditAction.CONFIG,
}


def _action(request: web.Request, status: int) -> AuditAction:
    if status == 401:
        return AuditAction.AUTHENTICATE
    if request.path.rstrip("/").endswith("/admin/audit"):
        return AuditAction.AUDIT_READ
    perm = required_permission(request)
    if perm is Permission.ADMIN and request.method == "GET":
        return AuditAction.AUDIT_READ if "audit" in request.path else AuditAction.QUERY
    return _ACTIONS.get(perm, AuditAction.RETRIEVE)


async def _patients(request: web.Request, tenant: str, studies: list[str]) -> tuple[str, ...]:
    if not studies:
        return ()
    engine = request.app[AUDIT].engine
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(t.studies.c.patient_id).where(
            t.studies.c.tenant == tenant, t.studies.c.study_uid.in_(studies[:100])))).scalars().all()
    return tuple(sorted({r for r in rows if r}))


def audit_middleware() -> Middleware:
    @web.middleware
    async def audit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" or request.path in _UNAUDITED:
            return await handler(request)
        trail = request.app.get(AUDIT)
        settings = request.app[SETTINGS]
        tenant = tenant_in_path(request, settings)
        if tenant not in settings.tenants:
            # a request for a tenant that does not exist is recorded in the default tenant's trail (a peer
            # must not be able to create audit chains by naming tenants)
            tenant = settings.default_tenant
        path_study = _STUDY.search(request.path)
        studies = [path_study.group(1)] if path_study else []
        # a deleted study's patient is gone afterwards: resolve it first
        patients = await _patients(request, tenant, studies) if trail and request.method == "DELETE" else ()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            if trail is not None:
                studies += [s for s in request.get(AUDIT_STUDIES, []) if s not in studies]
                if not patients and studies:
                    try:
                        patients = await _patients(request, tenant, studies)
                    except Exception:  # never fail a request because of audit enrichment
                        patients = ()
                principal = request.get(PRINCIPAL)
                query = f"?{request.query_string}" if request.query_string else ""
                trail.record(AuditRecord(
                    tenant=tenant, action=_action(request, status), outcome=outcome_for_http(status),
                    protocol="dicomweb" if "/dicomweb" in request.path else "http",
                    subject=principal.subject if principal else None,
                    client_id=principal.client_id if principal else None,
                    source_ip=request.remote, study_uids=tuple(studies), patient_ids=patients,
                    description=f"{request.method} {request.path}{query} -> {status}"))

    return audit


def _time(value: str | None, name: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise InvalidRequestError(f"{name}: expected an ISO 8601 date-time or epoch seconds") from None


async def audit_search(request: web.Request) -> web.Response:
    """GET .../admin/audit?since=&until=&action=&study=&_count=&offset= -> FHIR searchset Bundle."""
    tenant = tenant_in_path(request, request.app[SETTINGS])
    if tenant not in request.app[SETTINGS].tenants:
        raise web.HTTPNotFound()
    q = request.query
    try:
        count = min(int(q.get("_count", "100")), 1000)
        offset = int(q.get("offset", "0"))
    except ValueError:
        raise InvalidRequestError("_count and offset must be integers") from None
    events = await request.app[AUDIT].query(
        tenant, since=_time(q.get("since"), "since"), until=_time(q.get("until"), "until"),
        action=q.get("action"), study_uid=q.get("study"), limit=count, offset=offset)
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset",
                              "entry": [{"resource": e} for e in events]}
    return web.json_response(bundle, content_type="application/fhir+json")


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/admin/audit", audit_search)
    app.router.add_get("/tenants/{tenant}/admin/audit", audit_search)
