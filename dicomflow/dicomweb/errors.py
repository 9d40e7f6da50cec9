"""Translate DicomServiceError into HTTP responses; the only place DICOMweb errors are logged."""

from __future__ import annotations

import json
import logging

from aiohttp import web

from dicomflow.dicomweb.common import Handler
from dicomflow.errors import DicomServiceError, OutOfResourcesError

logger = logging.getLogger(__name__)


def log_service_error(exc: DicomServiceError, request: web.Request) -> None:
    if exc.http_status >= 500:
        logger.error("%s %s -> %d: %s", request.method, request.path, exc.http_status, exc.detail,
                     exc_info=exc)
    else:
        logger.warning("%s %s -> %d: %s", request.method, request.path, exc.http_status, exc.detail)


def problem_response(exc: DicomServiceError) -> web.Response:
    body = {"status": exc.http_status, "title": type(exc).__name__.removesuffix("Error"), "detail": exc.detail}
    headers = {"Retry-After": "5"} if isinstance(exc, OutOfResourcesError) else None
    return web.Response(status=exc.http_status, text=json.dumps(body),
                        content_type="application/problem+json", headers=headers)


@web.middleware
async def dicom_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except DicomServiceError as exc:  # only our hierarchy; anything else stays a 500
        log_service_error(exc, request)
        return problem_response(exc)
