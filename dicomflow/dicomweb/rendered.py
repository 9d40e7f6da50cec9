"""WADO-RS rendered and thumbnail resources (PS3.18 10.4.1.1.3, 8.3.5; thumbnails 8.3.5.2).

Instance and frame resources answer one consumer image: frame 1 of a multi-frame instance unless frames
are named, or every frame as an animated GIF when image/gif is asked for. Several frames, and rendered
study/series, answer multipart/related with one image per frame or image instance, rendered one at a
time (a client that accepts only a single image gets the first). Thumbnails answer one image: the middle
image of the (first) series, the middle frame of a multi-frame instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from aiohttp import web

from dicomflow.appkeys import BLOBS, INDEX, OFFLOADER
from dicomflow.dicomweb.common import RouteAdder, optional_path_uid, path_uid, tenant_of
from dicomflow.dicomweb.media import MULTIPART, request_accept
from dicomflow.dicomweb.multipart_writer import MultipartStream, multipart_content_type, new_boundary
from dicomflow.dicomweb.wado_frames import document_type, has_pixels, load_instance, parse_frame_list, record_has_pixels
from dicomflow.errors import NotAcceptableError, NotFoundError
from dicomflow.imaging.bulk import read_bulk_value
from dicomflow.imaging.render import (
    RENDERED_TYPES,
    RenderOptions,
    parse_render_options,
    render_animation,
    render_frame,
)
from dicomflow.index.base import InstanceRecord


@dataclass(frozen=True, slots=True)
class RenderedChoice:
    media_type: str
    #: True: the client asked for multipart/related; False: for a single image; None: either (``*/*``)
    multipart: bool | None


def negotiate_rendered(request: web.Request) -> RenderedChoice:
    """PS3.18 8.7.4 rendered media types: image/jpeg (default), image/png, image/gif, single or multipart."""
    for m in request_accept(request.headers.get("Accept"), request.query.get("accept")):
        if m.q <= 0:
            continue
        multipart: bool | None = m.type in (MULTIPART, "multipart/*")
        mtype = m.params.get("type", "image/jpeg").lower() if multipart else m.type
        if m.type == "*/*":
            multipart = None
        if mtype in ("*/*", "image/*", "*"):
            return RenderedChoice("image/jpeg", multipart)
        if mtype in RENDERED_TYPES:
            return RenderedChoice(mtype, multipart)
    raise NotAcceptableError("rendered resources are available as image/jpeg, image/png or image/gif")


def _accepts(request: web.Request, media_type: str) -> bool:
    return any(m.q > 0 and m.type in (media_type, "*/*")
               for m in request_accept(request.headers.get("Accept"), request.query.get("accept")))


def _read_document(fh: BinaryIO) -> bytes:
    try:
        return read_bulk_value(fh, "00420011")
    finally:
        fh.close()


def _animate(fh: BinaryIO, opts: RenderOptions) -> bytes:
    try:
        return render_animation(fh, opts)
    finally:
        fh.close()


def _render(fh: BinaryIO, frame: int, opts: RenderOptions, thumbnail: bool) -> bytes:
    try:
        return render_frame(fh, frame, opts, thumbnail=thumbnail)
    finally:
        fh.close()


async def _render_record(request: web.Request, record: InstanceRecord, frame: int, opts: RenderOptions,
                         thumbnail: bool = False) -> bytes:
    off, blobs = request.app[OFFLOADER], request.app[BLOBS]
    return await off.run(_render, await off.run(blobs.open_sync, record.blob_key), frame, opts, thumbnail)


def _image(body: bytes, media_type: str) -> web.Response:
    return web.Response(body=body, content_type=media_type)


async def _multipart_images(request: web.Request, media: str, jobs: list[tuple[InstanceRecord, int]],
                            opts: RenderOptions) -> web.StreamResponse:
    boundary = new_boundary()
    response = web.StreamResponse(status=200)
    response.headers["Content-Type"] = multipart_content_type(media, boundary)
    first = await _render_record(request, jobs[0][0], jobs[0][1], opts)  # fail before the status line
    await response.prepare(request)
    out = MultipartStream(request, response, boundary, request.app[BLOBS], request.app[OFFLOADER])
    await out.write_part(media, first)
    for record, frame in jobs[1:]:
        await out.write_part(media, await _render_record(request, record, frame, opts))
    await out.close()
    return response


async def rendered_instance(request: web.Request) -> web.StreamResponse:
    """Rendered instance (frame 1) or frames: one image, or multipart/related for several frames."""
    inst = await load_instance(request)
    if not has_pixels(inst):
        document = document_type(inst)
        if document and "frames" not in request.match_info and _accepts(request, document):
            # an encapsulated document (PDF, CDA...) rendered as itself (PS3.18 8.7.4 rendered media types)
            off, blobs = request.app[OFFLOADER], request.app[BLOBS]
            body = await off.run(_read_document, await off.run(blobs.open_sync, inst.record.blob_key))
            return web.Response(body=body, content_type=document)
        raise NotAcceptableError("this instance has no image to render")
    choice = negotiate_rendered(request)
    opts = parse_render_options(request.query, choice.media_type)
    numbers = [1]
    if "frames" in request.match_info:
        numbers = parse_frame_list(request.match_info["frames"], inst.number_of_frames)
    elif inst.number_of_frames > 1 and choice.media_type == "image/gif" and not choice.multipart:
        # a multi-frame instance in a multi-frame rendered media type: every frame (PS3.18 8.7.4)
        off, blobs = request.app[OFFLOADER], request.app[BLOBS]
        body = await off.run(_animate, await off.run(blobs.open_sync, inst.record.blob_key), opts)
        return _image(body, choice.media_type)
    if len(numbers) == 1 and not choice.multipart:
        return _image(await _render_record(request, inst.record, numbers[0], opts), choice.media_type)
    if choice.multipart is False:
        raise NotAcceptableError("several frames need multipart/related; type=\"image/...\"")
    return await _multipart_images(request, choice.media_type, [(inst.record, n) for n in numbers], opts)


async def _image_records(request: web.Request) -> list[InstanceRecord]:
    tenant = tenant_of(request)
    study = path_uid(request, "study")
    series = optional_path_uid(request, "series")
    records = await request.app[INDEX].list_instances(tenant, study, series)
    if not records:
        raise NotFoundError("no such study or series")
    images = [r for r in records if record_has_pixels(r)]
    if not images:
        raise NotAcceptableError("no instance here has an image to render")
    return images


async def rendered_collection(request: web.Request) -> web.StreamResponse:
    """Rendered study/series: multipart/related with one image per image instance (frame 1), in series and
    instance order; a client that accepts only a single image gets the first one."""
    choice = negotiate_rendered(request)
    opts = parse_render_options(request.query, choice.media_type)
    images = await _image_records(request)
    if choice.multipart is False:
        return _image(await _render_record(request, images[0], 1, opts), choice.media_type)
    return await _multipart_images(request, choice.media_type, [(r, 1) for r in images], opts)


async def thumbnail(request: web.Request) -> web.StreamResponse:
    """PS3.18 8.3.5.2 / 10.4.1.1.3: a small representative image; ``viewport`` sets its size."""
    media = negotiate_rendered(request).media_type
    opts = parse_render_options(request.query, media, thumbnail=True)
    if "instance" in request.match_info:
        inst = await load_instance(request)
        if not has_pixels(inst):
            raise NotAcceptableError("this instance has no image to render")
        if "frames" in request.match_info:
            frame = parse_frame_list(request.match_info["frames"], inst.number_of_frames)[0]
        else:
            frame = (inst.number_of_frames + 1) // 2
        return _image(await _render_record(request, inst.record, frame, opts, thumbnail=True), media)
    images = await _image_records(request)
    first_series = [r for r in images if r.series_uid == images[0].series_uid]
    record = first_series[(len(first_series) - 1) // 2]
    frame = ((record.number_of_frames or 1) + 1) // 2
    return _image(await _render_record(request, record, frame, opts, thumbnail=True), media)


def add_routes(add: RouteAdder) -> None:
    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    frames = instance + "/frames/{frames}"
    add("GET", study + "/rendered", rendered_collection)
    add("GET", series + "/rendered", rendered_collection)
    add("GET", instance + "/rendered", rendered_instance)
    add("GET", frames + "/rendered", rendered_instance)
    for path in (study, series, instance, frames):
        add("GET", path + "/thumbnail", thumbnail)
