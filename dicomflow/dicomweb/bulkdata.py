"""WADO-RS bulk data (PS3.18 10.4.1.1.5 / 8.6): the values metadata replaced by BulkDataURI.

URLs are ``{instance}/bulkdata/{tag path}``, the path being what ingest put in the placeholder
(``7FE00010``, ``00420011``, ``00081111/0/00420011``). Pixel data is served like frames: native as one
``application/octet-stream`` part in Explicit VR Little Endian byte order, encapsulated as one part per
frame in its compressed media type (or decoded when that is what the Accept asks for).
"""

from __future__ import annotations

import re
from typing import BinaryIO

from aiohttp import web

from dicomflow.appkeys import BLOBS, OFFLOADER
from dicomflow.dicomweb.common import RouteAdder, dicomweb_root, instance_url
from dicomflow.dicomweb.media import MULTIPART, NATIVE_LE, OCTET_STREAM, TS_MEDIA_TYPE, request_accept
from dicomflow.dicomweb.multipart_writer import (
    MultipartStream,
    closing,
    multipart_content_type,
    new_boundary,
    part_header,
)
from dicomflow.dicomweb.wado_frames import (
    StoredInstance,
    document_type,
    has_pixels,
    load_instance,
    negotiate_frames,
    send_frames,
)
from dicomflow.errors import InvalidRequestError, NotAcceptableError, NotFoundError
from dicomflow.imaging.bulk import read_bulk_value
from dicomflow.imaging.frames import pixel_value_range

_PATH = re.compile(r"^([0-9A-Fa-f]{8}/[0-9]+/)*[0-9A-Fa-f]{8}$")
_PIXEL_TAGS = ("7FE00010", "7FE00008", "7FE00009")
_DOCUMENT = "00420011"  # Encapsulated Document
_OCTET_PART = f"{OCTET_STREAM}; transfer-syntax=1.2.840.10008.1.2.1"


def _read(fh: BinaryIO, path: str) -> bytes:
    try:
        return read_bulk_value(fh, path)
    finally:
        fh.close()


def _value_range(fh: BinaryIO, offset: int, ts: str) -> tuple[int, int | None]:
    try:
        return pixel_value_range(fh, offset, ts)
    finally:
        fh.close()


def _location(request: web.Request, inst: StoredInstance, path: str) -> str:
    """The part's Content-Location: the BulkDataURI it answers (PS3.18 8.6.1.2)."""
    r = inst.record
    return f"{instance_url(dicomweb_root(request), r.study_uid, r.series_uid, r.sop_uid)}/bulkdata/{path}"


async def _single_part(request: web.Request, data: bytes, location: str, media_type: str = OCTET_STREAM,
                       part_type: str = _OCTET_PART) -> web.StreamResponse:
    boundary = new_boundary()
    response = web.StreamResponse(status=200)
    response.headers["Content-Type"] = multipart_content_type(media_type, boundary)
    response.content_length = len(part_header(boundary, part_type, len(data), location)) + len(data) + 2 + len(
        closing(boundary))
    await response.prepare(request)
    out = MultipartStream(request, response, boundary, request.app[BLOBS], request.app[OFFLOADER])
    await out.write_part(part_type, data, location)
    await out.close()
    return response


async def _pixel_bulk(request: web.Request, inst: StoredInstance, tag: str) -> web.StreamResponse:
    record = inst.record
    if not has_pixels(inst) or (tag not in inst.metadata and tag != "7FE00010"):
        raise NotFoundError("no such bulk data")
    choice = negotiate_frames(request, inst)
    stored = record.transfer_syntax_uid
    if choice.media_type == OCTET_STREAM and stored in NATIVE_LE and record.pixel_data_offset is not None:
        blobs, off = request.app[BLOBS], request.app[OFFLOADER]
        start, length = await off.run(_value_range, await off.run(blobs.open_sync, record.blob_key),
                                      record.pixel_data_offset, stored)
        if length is None:
            raise NotFoundError("no such bulk data")
        boundary = new_boundary()
        location = _location(request, inst, tag)
        response = web.StreamResponse(status=200)
        response.headers["Content-Type"] = multipart_content_type(OCTET_STREAM, boundary)
        response.content_length = len(part_header(boundary, _OCTET_PART, length, location)) + length + 2 + len(
            closing(boundary))
        await response.prepare(request)
        out = MultipartStream(request, response, boundary, blobs, off)
        await out.write_blob_part(_OCTET_PART, record.blob_key, start, length, location)
        await out.close()
        return response
    if TS_MEDIA_TYPE.get(stored, "").startswith("video/"):
        return await send_frames(request, inst, [1], choice, whole_stream=True)
    # encapsulated (or to be converted): every frame, one part each (PS3.18 8.7.3.3.2)
    return await send_frames(request, inst, list(range(1, inst.number_of_frames + 1)), choice)


async def bulkdata(request: web.Request) -> web.StreamResponse:
    path = request.match_info["path"].strip("/")
    if not _PATH.match(path):
        raise InvalidRequestError("bulk data path must be tag[/item/tag...] as published in BulkDataURI")
    path = path.upper()
    inst = await load_instance(request)
    if path in _PIXEL_TAGS:
        return await _pixel_bulk(request, inst, path)
    accept = request_accept(request.headers.get("Accept"), request.query.get("accept"))
    document = document_type(inst) if path == _DOCUMENT else None
    how: str | None = None  # "octet", "multipart" (document type) or "single" (document type)
    for m in accept:
        if m.q <= 0:
            continue
        part = m.params.get("type", OCTET_STREAM).lower() if m.type in (MULTIPART, "multipart/*") else m.type
        if document and part == document:
            how = "multipart" if m.type.startswith("multipart/") else "single"
            break
        if part in (OCTET_STREAM, "*/*"):
            how = "octet"
            break
    if how is None:
        raise NotAcceptableError("bulk data is available as application/octet-stream (PS3.18 8.7.3.2)"
                                 + (f" or {document}" if document else ""))
    off, blobs = request.app[OFFLOADER], request.app[BLOBS]
    data = await off.run(_read, await off.run(blobs.open_sync, inst.record.blob_key), path)
    location = _location(request, inst, path)
    if how == "single" and document:
        # an encapsulated document in its own media type (PS3.18 8.7.3.2; e.g. a viewer's ?accept=application/pdf)
        return web.Response(body=data, content_type=document, headers={"Content-Location": location})
    if how == "multipart" and document:
        return await _single_part(request, data, location, document, document)
    return await _single_part(request, data, location)


def add_routes(add: RouteAdder) -> None:
    add("GET", "/studies/{study}/series/{series}/instances/{instance}/bulkdata/{path:.+}", bulkdata)
