"""QIDO-RS (PS3.18 10.6): search for studies, series and instances; matching lives in index.query."""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from dicomflow.appkeys import INDEX, SETTINGS
from dicomflow.dicomweb.common import (
    DICOM_JSON,
    RouteAdder,
    dicomweb_root,
    instance_url,
    optional_path_uid,
    series_url,
    study_url,
    tenant_of,
)
from dicomflow.dicomweb.media import parse_accept
from dicomflow.errors import NotAcceptableError
from dicomflow.index.query import RETRIEVE_URL, SERIES_UID, SOP_UID, STUDY_UID, Query, parse_qido
from dicomflow.ingest.service import extra_tags_for
from dicomflow.model import Level

logger = logging.getLogger(__name__)

#: Media types a QIDO-RS response can take (PS3.18 10.6.3.2: DICOM JSON; XML is not offered).
_ACCEPTABLE = frozenset({DICOM_JSON, "application/json", "application/*", "*/*"})


def _check_accept(request: web.Request) -> None:
    for header in (request.headers.get("Accept"), request.rel_url.query.get("accept")):
        if header is None:
            continue
        types = [m for m in parse_accept(header) if m.q > 0]
        if not any(m.type in _ACCEPTABLE for m in types):
            raise NotAcceptableError("QIDO-RS responses are application/dicom+json (PS3.18 10.6.3.2)")


def _first(match: dict[str, Any], tag: str) -> str | None:
    values = match.get(tag, {}).get("Value")
    return str(values[0]) if values else None


def _retrieve_url(root: str, level: Level, match: dict[str, Any], query: Query) -> str | None:
    study = _first(match, STUDY_UID) or query.study_uid
    series = _first(match, SERIES_UID) or query.series_uid
    if study is None:
        return None
    if level is Level.STUDY:
        return study_url(root, study)
    if series is None:
        return None
    if level is Level.SERIES:
        return series_url(root, study, series)
    sop = _first(match, SOP_UID)
    return instance_url(root, study, series, sop) if sop else None


def _warning(text: str) -> str:
    # RFC 7234 5.5 warn-value: 299 (miscellaneous persistent warning) agent "text"
    return '299 dicomflow "{}"'.format(text.replace("\\", "\\\\").replace('"', '\\"'))


async def _search(request: web.Request, level: Level) -> web.Response:
    tenant = tenant_of(request)
    study = optional_path_uid(request, "study")
    series = optional_path_uid(request, "series")
    _check_accept(request)
    settings = request.app[SETTINGS]
    tenant_settings = settings.tenants[tenant]
    query, warnings = parse_qido(
        level, request.rel_url.query.items(), study_uid=study, series_uid=series,
        pn_case_insensitive=tenant_settings.pn_case_insensitive, extra_tags=extra_tags_for(tenant_settings),
        default_limit=settings.limits.qido_default_limit, max_limit=settings.limits.qido_max_limit)
    charset = request.rel_url.query.get("charset")
    if charset is not None and not {c.strip().lower() for c in charset.split(",")} & {"utf-8", "*"}:
        warnings.append("DICOM JSON responses are always UTF-8 (PS3.18 F.2); charset ignored")
    wanted = query.return_tags()
    add_url = wanted is None or RETRIEVE_URL in wanted
    root = dicomweb_root(request)
    # Each match is serialized as it arrives (text is several times smaller than the dicts); the body is
    # sent once complete because the status (204) and the truncation Warning must precede it.
    matches: list[str] = []
    results = request.app[INDEX].search(tenant, query)
    async with results:
        async for match in results:
            if add_url:
                url = _retrieve_url(root, level, match, query)
                if url is not None:
                    match[RETRIEVE_URL] = {"vr": "UR", "Value": [url]}
                    match = dict(sorted(match.items()))
            matches.append(json.dumps(match, ensure_ascii=False, separators=(",", ":")))
    if results.truncated:
        # PS3.18 10.6.3.1 / 8.3.4.4: more results are available than were returned
        warnings.append(f"more results match than limit={query.limit} allows; use offset="
                        f"{query.offset + len(matches)} for the next page")
    headers: CIMultiDict[str] = CIMultiDict()
    for text in warnings:
        headers.add("Warning", _warning(text))
    logger.debug("QIDO tenant=%s level=%s matches=%d truncated=%s", tenant, level.value, len(matches),
                 results.truncated)
    if not matches:
        return web.Response(status=204, headers=headers)  # PS3.18 Table 10.6.3-1: zero results
    headers["Content-Type"] = f"{DICOM_JSON}; charset=utf-8"
    return web.Response(status=200, body=("[" + ",".join(matches) + "]").encode("utf-8"), headers=headers)


async def search_studies(request: web.Request) -> web.Response:
    return await _search(request, Level.STUDY)


async def search_series(request: web.Request) -> web.Response:
    return await _search(request, Level.SERIES)


async def search_instances(request: web.Request) -> web.Response:
    return await _search(request, Level.IMAGE)


def add_routes(add: RouteAdder) -> None:
    add("GET", "/studies", search_studies)
    add("GET", "/series", search_series)
    add("GET", "/instances", search_instances)
    add("GET", "/studies/{study}/series", search_series)
    add("GET", "/studies/{study}/instances", search_instances)
    add("GET", "/studies/{study}/series/{series}/instances", search_instances)
