"""Helpers shared by the DICOMweb handlers: tenant, base URLs, UID path parameters, DICOM JSON."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable

from aiohttp import web

from dicomflow.appkeys import SETTINGS
from dicomflow.errors import UnknownTenantError
from dicomflow.model import Uid, parse_uid

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RouteAdder = Callable[[str, str, Handler], None]

DICOM_JSON = "application/dicom+json"

_FORWARDED_PAIR = re.compile(r'(?i)\b(proto|host)=("?)([^";,]+)\2')


def tenant_of(request: web.Request) -> str:
    """The tenant a request addresses: ``/tenants/{tenant}/dicomweb`` or the default for ``/dicomweb``."""
    settings = request.app[SETTINGS]
    name = request.match_info.get("tenant")
    if name is None:
        return settings.default_tenant
    if name not in settings.tenants:
        raise UnknownTenantError("unknown tenant")
    return name


def origin_of(request: web.Request) -> str:
    """scheme://host as the client sees it, honouring Forwarded (RFC 7239) and X-Forwarded-*."""
    proto: str | None = None
    host: str | None = None
    forwarded = request.headers.get("Forwarded")
    if forwarded:
        first = forwarded.split(",")[0]
        for key, _q, value in _FORWARDED_PAIR.findall(first):
            if key.lower() == "proto":
                proto = value.strip()
            else:
                host = value.strip()
    public = request.app[SETTINGS].http.public_url
    if public and not (proto or host):
        return public.rstrip("/")
    proto = proto or request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip() or request.scheme
    forwarded_host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
    host = host or forwarded_host or _host_with_port(request)
    return f"{proto}://{host}"


def _host_with_port(request: web.Request) -> str:
    """The Host header; when it names an IP literal or localhost without the port we listen on, add it.

    RFC 9110 7.2 requires the port in Host when it is not the scheme's default, but some clients
    (dicomweb-client sends ``Host: 127.0.0.1``) leave it out, and every RetrieveURL/BulkDataURI built
    from it would then point at port 80. Names (a proxy's public host) are trusted as given.
    """
    host = request.host
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not sockname or host.endswith("]") or ":" in host:
        return host
    port = int(sockname[1])
    if port == (443 if request.secure else 80):
        return host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            return host
    return f"{host}:{port}"


def dicomweb_root(request: web.Request) -> str:
    """Absolute URL of the DICOMweb root this request was made under (no trailing slash)."""
    prefix = request.headers.get("X-Forwarded-Prefix", "").rstrip("/")
    name = request.match_info.get("tenant")
    path = f"/tenants/{name}/dicomweb" if name is not None else "/dicomweb"
    return f"{origin_of(request)}{prefix}{path}"


def study_url(root: str, study: str) -> str:
    return f"{root}/studies/{study}"


def series_url(root: str, study: str, series: str) -> str:
    return f"{root}/studies/{study}/series/{series}"


def instance_url(root: str, study: str, series: str, sop: str) -> str:
    return f"{root}/studies/{study}/series/{series}/instances/{sop}"


def path_uid(request: web.Request, name: str) -> Uid:
    """A UID from the URL path, validated (400 when malformed)."""
    what = {"study": "Study Instance UID", "series": "Series Instance UID",
            "instance": "SOP Instance UID"}.get(name, name)
    return parse_uid(request.match_info[name], what)


def optional_path_uid(request: web.Request, name: str) -> Uid | None:
    return path_uid(request, name) if name in request.match_info else None
