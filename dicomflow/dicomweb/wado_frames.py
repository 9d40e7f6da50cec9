"""WADO-RS frames (PS3.18 10.4.1.1.4): ``.../instances/{instance}/frames/{frames}``.

As stored, a frame is sent straight from the blob (native: one byte range; encapsulated: its fragments),
located with the pixel data offset kept in the index, so other frames are never read. Otherwise the
requested frames are decoded (and re-encoded) one instance at a time off the loop.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

from aiohttp import web
from pydicom.dataset import Dataset

from dicomflow.appkeys import BLOBS, INDEX, OFFLOADER
from dicomflow.dicomweb.common import RouteAdder, path_uid, tenant_of
from dicomflow.dicomweb.media import (
    NATIVE_LE,
    OCTET_STREAM,
    TS_MEDIA_TYPE,
    Choice,
    negotiate_pixels,
    request_accept,
)
from dicomflow.dicomweb.multipart_writer import (
    MultipartStream,
    closing,
    multipart_content_type,
    new_boundary,
    part_header,
)
from dicomflow.errors import InvalidRequestError, NotAcceptableError, NotFoundError
from dicomflow.imaging.frames import FramePlan, PixelLayout, frames_from_dataset, load_dataset, plan_frames
from dicomflow.imaging.transcode import DEFLATED_EXPLICIT_VR_LE, PixelInfo, possible_targets
from dicomflow.index.base import InstanceRecord

_FRAME_LIST = re.compile(r"^[0-9]+(,[0-9]+)*$")
_MIME = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")
MAX_FRAMES_PER_REQUEST = 10000


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """One instance addressed by a WADO-RS URL: its index record and stored metadata (never the blob)."""

    tenant: str
    record: InstanceRecord
    metadata: dict[str, Any]

    @property
    def layout(self) -> PixelLayout:
        return PixelLayout.from_metadata(self.metadata)

    @property
    def number_of_frames(self) -> int:
        return self.record.number_of_frames or self.layout.number_of_frames


def record_has_pixels(record: InstanceRecord) -> bool:
    """Pixel data located at ingest; deflated files cannot be located by offset and are assumed to have it."""
    return record.pixel_data_offset is not None or record.transfer_syntax_uid == DEFLATED_EXPLICIT_VR_LE


def has_pixels(inst: StoredInstance) -> bool:
    if inst.record.transfer_syntax_uid == DEFLATED_EXPLICIT_VR_LE:
        return "00280010" in inst.metadata  # Rows: an image, whose Pixel Data ingest could not locate
    return inst.record.pixel_data_offset is not None and "7FE00010" in inst.metadata


def document_type(inst: StoredInstance) -> str | None:
    """MIME Type of Encapsulated Document (0042,0012), PS3.3 C.24.2."""
    try:
        value = inst.metadata["00420012"]["Value"][0]
    except (KeyError, IndexError, TypeError):
        return None
    text = str(value).strip().lower()
    return text if _MIME.match(text) else None


async def load_instance(request: web.Request) -> StoredInstance:
    """The instance in the URL (400 for malformed UIDs, 404 when unknown in this tenant)."""
    tenant = tenant_of(request)
    study = path_uid(request, "study")
    series = path_uid(request, "series")
    sop = path_uid(request, "instance")
    index = request.app[INDEX]
    records = await index.list_instances(tenant, study, series, sop)
    if not records:
        raise NotFoundError("no such instance")
    rows = await index.instance_metadata_keyed(tenant, study, series, sop)
    if not rows:
        raise NotFoundError("no such instance")
    metadata = await request.app[OFFLOADER].run(json.loads, rows[0][2])  # may be large (enhanced multi-frame)
    return StoredInstance(tenant, records[0], metadata)


def parse_frame_list(text: str, available: int) -> list[int]:
    """PS3.18 8.3.? frame list: comma-separated 1-based frame numbers. Malformed: 400; beyond the last: 404."""
    text = text.strip().replace("%2C", ",").replace("%2c", ",")
    if not _FRAME_LIST.match(text):
        raise InvalidRequestError("frame list must be comma-separated positive integers (PS3.18 10.4.1.1.4)")
    numbers = [int(n) for n in text.split(",")]
    if len(numbers) > MAX_FRAMES_PER_REQUEST:
        raise InvalidRequestError(f"at most {MAX_FRAMES_PER_REQUEST} frames per request")
    if any(n < 1 for n in numbers):
        raise InvalidRequestError("frame numbers start at 1")
    if any(n > available for n in numbers):
        raise NotFoundError(f"the instance has {available} frame(s)")
    return numbers


def negotiate_frames(request: web.Request, inst: StoredInstance) -> Choice:
    stored = inst.record.transfer_syntax_uid
    possible = possible_targets(stored, PixelInfo.from_metadata(inst.metadata))
    accept = request_accept(request.headers.get("Accept"), request.query.get("accept"))
    choice = negotiate_pixels(accept, stored, possible)
    if choice is None:
        raise NotAcceptableError("no acceptable media type for these frames (PS3.18 8.7.3.3, Table 8.7.3-4)")
    return choice


def as_stored(choice: Choice, stored_ts: str) -> bool:
    return choice.transfer_syntax == stored_ts or (choice.media_type == OCTET_STREAM and stored_ts in NATIVE_LE)


def _plan(fh: BinaryIO, inst: StoredInstance, numbers: list[int], layout: PixelLayout) -> FramePlan | None:
    try:
        return plan_frames(fh, pixel_data_offset=inst.record.pixel_data_offset or 0,
                           transfer_syntax=inst.record.transfer_syntax_uid, layout=layout, numbers=numbers,
                           file_size=inst.record.size)
    finally:
        fh.close()


def _load(fh: BinaryIO) -> Dataset:
    try:
        return load_dataset(fh)
    finally:
        fh.close()


FRAME_BATCH = 8  # frames decoded/encoded per offloaded call: bounds memory for long multi-frame instances


async def send_frames(request: web.Request, inst: StoredInstance, numbers: list[int],
                      choice: Choice, *, whole_stream: bool = False) -> web.StreamResponse:
    """Stream ``numbers`` as one part each (PS3.18 8.7.3.3.2); status and headers are fixed before the body.

    ``whole_stream``: one part with every fragment (a video stream, PS3.5 8.2.5), sent as stored.
    """
    blobs, off = request.app[BLOBS], request.app[OFFLOADER]
    key = inst.record.blob_key
    boundary = new_boundary()
    part_type = choice.content_type()
    response = web.StreamResponse(status=200)
    response.headers["Content-Type"] = multipart_content_type(choice.media_type, boundary)
    plan: FramePlan | None = None
    if as_stored(choice, inst.record.transfer_syntax_uid):
        layout = replace(inst.layout, number_of_frames=1) if whole_stream else inst.layout
        plan = await off.run(_plan, await off.run(blobs.open_sync, key), inst, [1] if whole_stream else numbers,
                             layout)
        if plan is None and whole_stream:
            raise NotAcceptableError("the stored stream cannot be sent")
    if plan is not None:
        sizes = [sum(n for _o, n in ranges) for ranges in plan.ranges]
        response.content_length = sum(len(part_header(boundary, part_type, n)) + n + 2 for n in sizes) + len(
            closing(boundary))
        await response.prepare(request)
        out = MultipartStream(request, response, boundary, blobs, off)
        for ranges in plan.ranges:
            await out.write_ranges_part(part_type, key, ranges)
        await out.close()
        return response
    # decode (and re-encode) a batch at a time; the first batch before the status line, so that a
    # decoder failure is still a clean error response
    target = None if as_stored(choice, inst.record.transfer_syntax_uid) else choice.transfer_syntax
    ds = await off.run(_load, await off.run(blobs.open_sync, key))
    batches = [numbers[i:i + FRAME_BATCH] for i in range(0, len(numbers), FRAME_BATCH)]
    frames = await off.run(frames_from_dataset, ds, batches[0], target)
    if len(batches) == 1:
        response.content_length = sum(
            len(part_header(boundary, part_type, len(f))) + len(f) + 2 for f in frames) + len(closing(boundary))
    await response.prepare(request)
    out = MultipartStream(request, response, boundary, blobs, off)
    for i, batch in enumerate(batches):
        if i:
            frames = await off.run(frames_from_dataset, ds, batch, target)
        for frame in frames:
            await out.write_part(part_type, frame)
    await out.close()
    return response


async def frames(request: web.Request) -> web.StreamResponse:
    inst = await load_instance(request)
    if not has_pixels(inst):
        raise NotFoundError("the instance has no frames (no Pixel Data)")
    numbers = parse_frame_list(request.match_info["frames"], inst.number_of_frames)
    if TS_MEDIA_TYPE.get(inst.record.transfer_syntax_uid, "").startswith("video/"):
        raise InvalidRequestError("frames of a video cannot be retrieved one by one (PS3.18 8.7.3.3.2); "
                                  "retrieve the instance or its pixel data bulk data")
    choice = negotiate_frames(request, inst)
    return await send_frames(request, inst, numbers, choice)


def add_routes(add: RouteAdder) -> None:
    add("GET", "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}", frames)
