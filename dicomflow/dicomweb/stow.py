"""STOW-RS (PS3.18 10.5): multipart/related; type="application/dicom", streamed part by part."""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import BodyPartReader, web

from dicomflow.appkeys import INGEST
from dicomflow.dicomweb.common import (
    DICOM_JSON,
    RouteAdder,
    dicomweb_root,
    instance_url,
    optional_path_uid,
    study_url,
    tenant_of,
)
from dicomflow.dicomweb.media import parse_media_type
from dicomflow.errors import DicomServiceError, InvalidRequestError, UnsupportedMediaTypeError
from dicomflow.model import Protocol, Source, StoreOutcome

logger = logging.getLogger(__name__)

PART_CHUNK = 256 * 1024

# PS3.18 Table 10.5.3-2 / PS3.4 B.2.3 FailureReason values used here
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_PROCESSING = 0x0110


def stow_status(stored: int, warned: int, failed: int) -> int:
    """PS3.18 Table 10.5.3-1: 200 all stored, 202 some failed or warnings, 409 none stored."""
    if failed and not stored:
        return 409
    return 202 if (failed or warned) else 200


def _us(value: int) -> dict[str, Any]:
    return {"vr": "US", "Value": [value]}


def _ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]}


def _check_request_type(request: web.Request) -> None:
    header = request.headers.get("Content-Type")
    if not header:
        raise UnsupportedMediaTypeError("Content-Type is required: multipart/related; type=\"application/dicom\"")
    media = parse_media_type(header)
    if media.type != "multipart/related":
        raise UnsupportedMediaTypeError(f"unsupported Content-Type {media.type!r}: "
                                        "use multipart/related; type=\"application/dicom\"")
    part_type = media.params.get("type", "application/dicom").lower()
    if part_type != "application/dicom":
        raise UnsupportedMediaTypeError(f"unsupported multipart type {part_type!r}: only application/dicom "
                                        "instances are accepted (PS3.18 10.5.1.1)")
    if not media.params.get("boundary"):
        raise InvalidRequestError("multipart/related Content-Type has no boundary")


async def stow(request: web.Request) -> web.Response:
    tenant = tenant_of(request)
    study = optional_path_uid(request, "study")
    _check_request_type(request)
    ingest = request.app[INGEST]
    root = dicomweb_root(request)
    source = Source(Protocol.DICOMWEB, address=request.remote)
    stored: list[StoreOutcome] = []
    failed: list[tuple[str | None, str | None, int, str]] = []  # class, instance, reason, detail
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise InvalidRequestError("malformed multipart body") from exc

    parts = 0
    while True:
        try:
            part = await reader.next()
        except (ValueError, AssertionError) as exc:
            if not parts:
                raise InvalidRequestError("malformed multipart body") from exc
            failed.append((None, None, FAILURE_CANNOT_UNDERSTAND, "malformed multipart body after this point"))
            break
        if part is None:
            break
        parts += 1
        if not isinstance(part, BodyPartReader):
            failed.append((None, None, FAILURE_CANNOT_UNDERSTAND, "nested multipart is not supported"))
            continue
        part_type = parse_media_type(part.headers.get("Content-Type", "application/dicom")).type
        if part_type != "application/dicom":
            await part.release()
            failed.append((None, None, 0xC122, f"part media type {part_type!r} is not application/dicom"))
            continue
        try:
            async with ingest.spool() as spool:
                try:
                    while chunk := await part.read_chunk(PART_CHUNK):
                        await spool.write(chunk)
                except (ValueError, AssertionError) as exc:
                    raise InvalidRequestError("malformed multipart part") from exc
                outcome = await ingest.store(tenant, spool, source=source, expected_study_uid=study)
            stored.append(outcome)
        except DicomServiceError as exc:
            # each failed instance becomes one FailedSOPSequence item (PS3.18 10.5.3)
            logger.warning("STOW tenant=%s part=%d failed %04X: %s", tenant, parts, exc.dimse_status,
                           exc.detail)
            failed.append((None, exc.sop_instance_uid, exc.dimse_status, exc.detail))
            if exc.http_status == 413:
                await part.release()
    if parts == 0:
        raise InvalidRequestError("multipart body contains no parts")

    body: dict[str, Any] = {}
    studies = {o.key.study_instance_uid for o in stored} | ({study} if study else set())
    if len(studies) == 1:
        body["00081190"] = {"vr": "UR", "Value": [study_url(root, next(iter(studies)))]}
    if failed:
        items = []
        for sop_class, sop_uid, reason, _detail in failed:
            item: dict[str, Any] = {"00081197": _us(reason)}
            if sop_class:
                item["00081150"] = _ui(sop_class)
            if sop_uid:
                item["00081155"] = _ui(sop_uid)
            items.append(item)
        body["00081198"] = {"vr": "SQ", "Value": items}
    if stored:
        refs = []
        for o in stored:
            k = o.key
            ref: dict[str, Any] = {
                "00081150": _ui(o.sop_class_uid),
                "00081155": _ui(k.sop_instance_uid),
                "00081190": {"vr": "UR", "Value": [instance_url(root, k.study_instance_uid,
                                                                k.series_instance_uid, k.sop_instance_uid)]},
            }
            if o.warning is not None:
                ref["00081196"] = _us(o.warning)
            refs.append(ref)
        body["00081199"] = {"vr": "SQ", "Value": refs}
    warned = sum(1 for o in stored if o.warning is not None)
    status = stow_status(len(stored), warned, len(failed))
    headers = {}
    if failed:
        details = "; ".join(sorted({d for *_x, d in failed}))[:500]
        headers["Warning"] = f'299 dicomflow "{len(failed)} instance(s) failed: {details}"'
    return web.Response(status=status, text=json.dumps(body), content_type=DICOM_JSON, headers=headers)


def add_routes(add: RouteAdder) -> None:
    add("POST", "/studies", stow)
    add("POST", "/studies/{study}", stow)
