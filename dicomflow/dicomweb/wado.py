"""WADO-RS (PS3.18 10.4): instance/series/study retrieve and metadata.

Frames, rendered/thumbnail and bulk data live in :mod:`wado_frames`, :mod:`rendered` and :mod:`bulkdata`;
this module mounts them all.
"""

from __future__ import annotations

import json
import logging
from typing import BinaryIO

from aiohttp import web

from dicomflow.appkeys import BLOBS, INDEX, OFFLOADER
from dicomflow.dicomweb import bulkdata, rendered, wado_frames
from dicomflow.dicomweb.common import (
    DICOM_JSON,
    RouteAdder,
    dicomweb_root,
    instance_url,
    optional_path_uid,
    path_uid,
    tenant_of,
)
from dicomflow.dicomweb.media import DICOM, Choice, negotiate_dicom, request_accept, wants_dicom
from dicomflow.dicomweb.multipart_writer import (
    SMALL_BLOB,
    SMALL_GROUP,
    MultipartStream,
    closing,
    multipart_content_type,
    new_boundary,
    part_header,
)
from dicomflow.dicomweb.wado_frames import record_has_pixels
from dicomflow.errors import NotAcceptableError, NotFoundError
from dicomflow.imaging.transcode import PixelInfo, possible_targets, transcode
from dicomflow.index.base import InstanceRecord
from dicomflow.model import BULK_PLACEHOLDER

logger = logging.getLogger(__name__)

_NOT_FOUND = "no such study, series or instance"
METADATA_INLINE_LIMIT = 2 << 20
_QUOTED_PLACEHOLDER = f'"{BULK_PLACEHOLDER}/'


async def _pixel_infos(request: web.Request, tenant: str, records: list[InstanceRecord]) -> dict[str, PixelInfo]:
    """Pixel attributes (from the index, never the blobs) of the instances that need transcoding."""
    first = records[0]
    series = first.series_uid if all(r.series_uid == first.series_uid for r in records) else None
    sop = first.sop_uid if len(records) == 1 else None
    wanted = {r.sop_uid for r in records}
    rows = await request.app[INDEX].instance_metadata_keyed(tenant, first.study_uid, series, sop)

    def parse() -> dict[str, PixelInfo]:  # JSON parsing is CPU work: off the loop
        infos: dict[str, PixelInfo] = {}
        for _series, sop_uid, text in rows:
            if sop_uid in wanted:
                info = PixelInfo.from_metadata(json.loads(text))
                if info is not None:
                    infos[sop_uid] = info
        return infos

    return await request.app[OFFLOADER].run(parse)


async def negotiate_records(request: web.Request, tenant: str,
                            records: list[InstanceRecord]) -> list[Choice | None]:
    """PS3.18 8.7: an acceptable (media type, transfer syntax) per instance, None where there is none.

    406 when no instance at all can be provided.
    """
    accept = request_accept(request.headers.get("Accept"), request.query.get("accept"))
    if not wants_dicom(accept):
        raise NotAcceptableError("Accept must allow multipart/related; type=\"application/dicom\" (PS3.18 8.7.4)")
    choices: list[Choice | None] = [
        negotiate_dicom(accept, r.transfer_syntax_uid, frozenset({r.transfer_syntax_uid})) for r in records]
    pending = [r for r, c in zip(records, choices, strict=True) if c is None]
    if pending:
        infos = await _pixel_infos(request, tenant, pending)
        for i, r in enumerate(records):
            if choices[i] is None:
                has_pixels = record_has_pixels(r)
                possible = possible_targets(r.transfer_syntax_uid, infos.get(r.sop_uid), has_pixels=has_pixels)
                choices[i] = negotiate_dicom(accept, r.transfer_syntax_uid, possible)
    if all(c is None for c in choices):
        raise NotAcceptableError("no instance can be provided in any accepted transfer syntax")
    return choices


async def retrieve(request: web.Request) -> web.StreamResponse:
    """Study, series or instance retrieve (PS3.18 10.4.1.1.1): multipart/related; type="application/dicom".

    Instances whose stored syntax is acceptable go out byte for byte as stored; others are transcoded
    one at a time off the loop.
    """
    tenant = tenant_of(request)
    study = path_uid(request, "study")
    series = optional_path_uid(request, "series")
    sop = optional_path_uid(request, "instance")
    index, blobs, off = request.app[INDEX], request.app[BLOBS], request.app[OFFLOADER]
    records = await index.list_instances(tenant, study, series, sop)
    if not records:
        raise NotFoundError(_NOT_FOUND)
    negotiated = await negotiate_records(request, tenant, records)
    pairs = [(r, c) for r, c in zip(records, negotiated, strict=True) if c is not None]
    skipped = len(records) - len(pairs)

    boundary = new_boundary()
    # PS3.18 8.7.1.2 / 10.4.3: some instances not convertible to any accepted syntax -> 206 Partial Content
    response = web.StreamResponse(status=206 if skipped else 200)
    response.headers["Content-Type"] = multipart_content_type(DICOM, boundary)
    if skipped:
        response.headers["Warning"] = (f'299 dicomflow "{skipped} instance(s) left out: not available in any '
                                       'accepted transfer syntax"')
        logger.warning("WADO tenant=%s study=%s: %d instance(s) left out (406 for them)", tenant, study, skipped)
    ready: dict[int, bytes] = {}
    if len(pairs) == 1 and pairs[0][1].transfer_syntax != pairs[0][0].transfer_syntax_uid:
        # one instance: convert before the status line, so that a failure is still a clean 406
        ready[0] = await _transcode(request, *pairs[0])
    if all(c.transfer_syntax == r.transfer_syntax_uid or i in ready for i, (r, c) in enumerate(pairs)):
        # the length is known: no chunked coding, and the stored blobs go out with sendfile
        response.content_length = sum(
            len(part_header(boundary, c.content_type(), n)) + n + 2
            for i, (r, c) in enumerate(pairs) for n in [len(ready[i]) if i in ready else r.size]
        ) + len(closing(boundary))
    await response.prepare(request)
    out = MultipartStream(request, response, boundary, blobs, off)
    small: list[tuple[str, str, int]] = []  # consecutive small blobs, sent in groups
    small_bytes = 0
    for i, (record, choice) in enumerate(pairs):
        exact = choice.transfer_syntax == record.transfer_syntax_uid
        if exact and record.size <= SMALL_BLOB:
            small.append((choice.content_type(), record.blob_key, record.size))
            small_bytes += record.size
            if small_bytes >= SMALL_GROUP:
                await out.write_small_blob_parts(small)
                small, small_bytes = [], 0
            continue
        if small:
            await out.write_small_blob_parts(small)
            small, small_bytes = [], 0
        if exact:
            await out.write_blob_part(choice.content_type(), record.blob_key, 0, record.size)
            continue
        try:
            data = ready.pop(i) if i in ready else await _transcode(request, record, choice)
        except NotAcceptableError:
            # negotiation promised this conversion; after the first byte we can only abort (PS3.18 8.7.1.2)
            logger.error("WADO tenant=%s sop=%s: transcoding to %s failed mid-response", tenant, record.sop_uid,
                         choice.transfer_syntax)
            raise ConnectionResetError("transcoding failed") from None
        await out.write_part(choice.content_type(), data)
    if small:
        await out.write_small_blob_parts(small)
    await out.close()
    return response


def _transcode_blob(fh: BinaryIO, target: str) -> bytes:
    try:
        return transcode(fh, target)
    finally:
        fh.close()


async def _transcode(request: web.Request, record: InstanceRecord, choice: Choice) -> bytes:
    off, blobs = request.app[OFFLOADER], request.app[BLOBS]
    return await off.run(_transcode_blob, await off.run(blobs.open_sync, record.blob_key), choice.transfer_syntax)


def _check_json_accept(request: web.Request) -> None:
    accept = request_accept(request.headers.get("Accept"), request.query.get("accept"))
    ok = {"application/dicom+json", "application/json", "*/*", "application/*"}
    if not any(m.q > 0 and m.type in ok for m in accept):
        raise NotAcceptableError("metadata is available as application/dicom+json only (PS3.18 10.4.1.1.2)")


async def metadata(request: web.Request) -> web.Response:
    """Study, series or instance metadata (PS3.18 10.4.1.1.2) straight from the index, never the blobs.

    The stored JSON texts are joined, not re-parsed; BulkDataURI placeholders become absolute URLs of
    the instance's bulk data resource (PS3.18 8.6.1.2) by string replacement.
    """
    tenant = tenant_of(request)
    study = path_uid(request, "study")
    series = optional_path_uid(request, "series")
    sop = optional_path_uid(request, "instance")
    _check_json_accept(request)
    rows = await request.app[INDEX].instance_metadata_keyed(tenant, study, series, sop)
    if not rows:
        raise NotFoundError(_NOT_FOUND)
    root = dicomweb_root(request)

    def build() -> bytes:
        texts = [
            text.replace(_QUOTED_PLACEHOLDER, f'"{instance_url(root, study, series_uid, sop_uid)}/bulkdata/')
            if _QUOTED_PLACEHOLDER in text else text
            for series_uid, sop_uid, text in rows
        ]
        return ("[" + ",".join(texts) + "]").encode("utf-8")

    # a few MB of string work is faster inline than a thread hop; beyond that, keep the loop free
    large = sum(len(text) for _s, _i, text in rows) > METADATA_INLINE_LIMIT
    body = await request.app[OFFLOADER].run(build) if large else build()
    return web.Response(body=body, content_type=DICOM_JSON, charset="utf-8")


def add_routes(add: RouteAdder) -> None:
    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    for path in (study, series, instance):
        add("GET", path, retrieve)
        add("GET", path + "/metadata", metadata)
    wado_frames.add_routes(add)
    rendered.add_routes(add)
    bulkdata.add_routes(add)
