"""STOW-RS (PS3.18 10.5): multipart/related; type="application/dicom", streamed part by part."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, ClientConnectionError, ClientPayloadError, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from dicomflow.appkeys import AUDIT_STUDIES, INGEST
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
from dicomflow.errors import (
    DicomServiceError,
    InvalidRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from dicomflow.ingest.service import IngestService, Spool
from dicomflow.model import Protocol, Source, StoreOutcome

logger = logging.getLogger(__name__)

PART_CHUNK = 256 * 1024

# PS3.18 Table 10.5.3-2 / PS3.4 B.2.3 FailureReason values used here
FAILURE_CANNOT_UNDERSTAND = 0xC000  # PS3.4 B.2.3 Error: Cannot Understand
FAILURE_PROCESSING = 0x0110  # PS3.7 C.5 Processing Failure


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


class MultipartSyntaxError(InvalidRequestError):
    """A body part that is not valid multipart (RFC 2046 5.1): bad syntax, not a bad instance."""


@dataclass(frozen=True, slots=True)
class _Failure:
    reason: int
    detail: str
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    #: the HTTP status this failure alone would get (400 for a multipart syntax error)
    http_status: int = 409
    retryable: bool = False


def _failure_item(f: _Failure) -> dict[str, Any]:
    # PS3.18 Table I.1-1: SOP Instance Reference Macro + Failure Reason; the UIDs are given when known
    item: dict[str, Any] = {}
    if f.sop_class_uid:
        item["00081150"] = _ui(f.sop_class_uid)
    if f.sop_instance_uid:
        item["00081155"] = _ui(f.sop_instance_uid)
    item["00081197"] = _us(f.reason)
    return item


def _reference_item(root: str, o: StoreOutcome) -> dict[str, Any]:
    k = o.key
    ref: dict[str, Any] = {
        "00081150": _ui(o.sop_class_uid),
        "00081155": _ui(k.sop_instance_uid),
        "00081190": {"vr": "UR", "Value": [instance_url(root, k.study_instance_uid, k.series_instance_uid,
                                                        k.sop_instance_uid)]},
    }
    if o.warning is not None:
        ref["00081196"] = _us(o.warning)  # PS3.18 I.2.1 Warning Reason
    return ref


def response_body(root: str, stored: list[StoreOutcome], failed: list[_Failure]) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Annex I, Table I.1-1)."""
    # Retrieve URL is Type 2: the study's URL when every stored instance is in one study, else empty.
    studies = {o.key.study_instance_uid for o in stored}
    body: dict[str, Any] = {"00081190": {"vr": "UR", "Value": [study_url(root, studies.pop())]}
                            if len(studies) == 1 else {"vr": "UR"}}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [_failure_item(f) for f in failed]}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [_reference_item(root, o) for o in stored]}
    return body


_BODY_CUT = (ConnectionError, ClientConnectionError, ClientPayloadError, asyncio.IncompleteReadError)
_INCOMPLETE = "request body incomplete: connection closed before the closing boundary"

#: PS3.10 7.1: 128-byte preamble and "DICM" prefix
PART10_PREFIX = b"\0" * 128 + b"DICM"


def _missing_prefix(head: bytes) -> bool:
    """True for a part that starts with the File Meta group itself, without preamble and prefix.

    pydicom's ``dcmwrite(fp, ds)`` writes that form for a data set made in memory, and
    dicomweb-client sends exactly those bytes; the prefix is added back so the stored object is a
    PS3.10 file (the rest of the bytes are kept as received).
    """
    return head[128:132] != b"DICM" and head[:2] == b"\x02\x00" and head[4:6] in (b"UL", b"OB", b"UI")


async def _receive_part(request: web.Request, part: BodyPartReader) -> Spool:
    """Read one part into a new spool; the caller owns (and eventually discards) the spool."""
    spool = request.app[INGEST].spool()
    try:
        head = b""
        while len(head) < len(PART10_PREFIX) and (chunk := await part.read_chunk(PART_CHUNK)):
            head += chunk
        if _missing_prefix(head):
            await spool.write(PART10_PREFIX)
        if head:
            await spool.write(head)
        while chunk := await part.read_chunk(PART_CHUNK):
            await spool.write(chunk)
        if not part.at_eof():
            # RFC 2046 5.1.1: a part ends at the next delimiter; the body ended first, so it may be cut
            raise MultipartSyntaxError("multipart body ends without a closing boundary")
    except (ValueError, AssertionError, HttpProcessingError) as exc:
        spool.discard()
        raise MultipartSyntaxError("malformed multipart part") from exc
    except PayloadTooLargeError:
        spool.discard()
        await part.release()
        raise
    except BaseException:
        spool.discard()
        raise
    return spool


async def _commit_part(ingest: IngestService, spool: Spool, tenant: str, study: str | None,
                       source: Source) -> StoreOutcome:
    async with spool:
        return await ingest.store(tenant, spool, source=source, expected_study_uid=study)


def _failure_of(exc: DicomServiceError, tenant: str, part: int) -> _Failure:
    # each failed instance becomes one FailedSOPSequence item (PS3.18 10.5.3, Annex I)
    logger.warning("STOW tenant=%s part=%d failed %04X: %s", tenant, part, exc.dimse_status, exc.detail)
    syntax = isinstance(exc, MultipartSyntaxError)
    return _Failure(exc.dimse_status, exc.detail, exc.sop_class_uid, exc.sop_instance_uid,
                    http_status=400 if syntax else exc.http_status if exc.http_status == 413 else 409,
                    retryable=exc.retryable)


async def _outcome_of(task: asyncio.Task[StoreOutcome], tenant: str, part: int) -> StoreOutcome | _Failure:
    try:
        return await task
    except DicomServiceError as exc:
        return _failure_of(exc, tenant, part)
    except Exception:  # a bug or backend fault: report this instance, keep the others' outcomes
        logger.exception("STOW tenant=%s part=%d failed unexpectedly", tenant, part)
        return _Failure(FAILURE_PROCESSING, "internal error while storing the instance")


#: parts of one request being stored while the next one is read
STOW_PIPELINE = 4


async def _read_parts(request: web.Request, reader: MultipartReader, tenant: str, study: str | None,
                      source: Source, ingest: IngestService,
                      slots: list[StoreOutcome | _Failure | tuple[int, asyncio.Task[StoreOutcome]]],
                      running: set[asyncio.Task[StoreOutcome]]) -> int:
    """Read every part; append one slot per part (a failure, or the task storing it). Returns the part count."""
    parts = 0
    while True:
        if len(running) >= STOW_PIPELINE:
            _done, still = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            running.intersection_update(still)
        try:
            part = await reader.next()
        except (ValueError, AssertionError, HttpProcessingError) as exc:  # bad boundary or part headers
            if not parts:
                raise InvalidRequestError("malformed multipart body") from exc
            slots.append(_Failure(FAILURE_CANNOT_UNDERSTAND, "malformed multipart body after this point",
                                  http_status=400))
            break
        except _BODY_CUT as exc:
            if not parts:
                raise InvalidRequestError(_INCOMPLETE) from exc
            slots.append(_Failure(FAILURE_CANNOT_UNDERSTAND, _INCOMPLETE, http_status=400))
            break
        if part is None:
            break
        parts += 1
        if not isinstance(part, BodyPartReader):
            await part.release()
            slots.append(_Failure(FAILURE_CANNOT_UNDERSTAND, "nested multipart is not supported"))
            continue
        # RFC 2387 3.1: a part without Content-Type has the root type, application/dicom here
        part_type = parse_media_type(part.headers.get("Content-Type", "application/dicom")).type
        if part_type != "application/dicom":
            await part.release()
            slots.append(_Failure(UnsupportedMediaTypeError.dimse_status,
                                  f"part media type {part_type!r} is not application/dicom"))
            continue
        try:
            spool = await _receive_part(request, part)
        except DicomServiceError as exc:
            slots.append(_failure_of(exc, tenant, parts))
            continue
        except _BODY_CUT:
            # the peer closed the connection or sent less than Content-Length: this part is dropped (its
            # spool discarded); instances stored before it are reported, though the peer may be gone
            logger.info("STOW tenant=%s part=%d: request body ended early", tenant, parts)
            slots.append(_Failure(FAILURE_CANNOT_UNDERSTAND, _INCOMPLETE, http_status=400))
            break
        except Exception:  # a bug or backend fault: report this instance, keep the others' outcomes
            logger.exception("STOW tenant=%s part=%d failed unexpectedly", tenant, parts)
            slots.append(_Failure(FAILURE_PROCESSING, "internal error while storing the instance"))
            continue
        task = asyncio.create_task(_commit_part(ingest, spool, tenant, study, source))
        running.add(task)
        slots.append((parts, task))
    return parts


async def stow(request: web.Request) -> web.Response:
    tenant = tenant_of(request)
    study = optional_path_uid(request, "study")
    _check_request_type(request)
    root = dicomweb_root(request)
    source = Source(Protocol.DICOMWEB, address=request.remote)
    stored: list[StoreOutcome] = []
    failed: list[_Failure] = []
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, HttpProcessingError) as exc:
        raise InvalidRequestError("malformed multipart body") from exc

    # Parts are read one after the other (the body is one stream), but each read part is stored by a task
    # while the next one is read: up to STOW_PIPELINE per request, so that one instance's fsyncs and
    # commit overlap the next one's upload and parse. Outcomes are kept in part order.
    ingest = request.app[INGEST]
    slots: list[StoreOutcome | _Failure | tuple[int, asyncio.Task[StoreOutcome]]] = []
    running: set[asyncio.Task[StoreOutcome]] = set()
    try:
        parts = await _read_parts(request, reader, tenant, study, source, ingest, slots, running)
    finally:
        # every store task is waited for, even when reading ends by an exception (asyncio.wait: never
        # cancels them), and its exception is retrieved; outcomes are taken from the tasks below
        tasks = [slot[1] for slot in slots if isinstance(slot, tuple)]
        if tasks:
            await asyncio.wait(tasks)
            for task in tasks:
                if task.done() and not task.cancelled():
                    task.exception()
    for slot in slots:
        outcome = await _outcome_of(slot[1], tenant, slot[0]) if isinstance(slot, tuple) else slot
        if isinstance(outcome, _Failure):
            failed.append(outcome)
        else:
            stored.append(outcome)
    if parts == 0:
        # PS3.18 Table 10.5.3-1: 400, nothing could be stored because of bad syntax
        raise InvalidRequestError("multipart body contains no parts")

    body = response_body(root, stored, failed)
    request[AUDIT_STUDIES] = sorted({o.key.study_instance_uid for o in stored})
    warned = sum(1 for o in stored if o.warning is not None)
    status = stow_status(len(stored), warned, len(failed))
    headers: dict[str, str] = {}
    if failed and not stored:
        if all(f.retryable for f in failed):
            # PS3.18 8.5: every instance was refused for lack of resources: 503 tells the client to retry
            status = 503
            headers["Retry-After"] = "5"
        elif all(f.http_status == 400 for f in failed):
            status = 400  # PS3.18 Table 10.5.3-1: nothing stored because of bad (multipart) syntax
        elif all(f.http_status == 413 for f in failed):
            status = 413  # RFC 9110 15.5.14: every instance is larger than this server accepts
    if failed:
        details = "; ".join(sorted({f.detail for f in failed}))[:500]
        headers["Warning"] = f'299 dicomflow "{len(failed)} instance(s) failed: {details}"'
    # no charset parameter: JSON is UTF-8 (RFC 8259), and dicomweb-client compares the media type verbatim
    headers["Content-Type"] = DICOM_JSON
    return web.Response(status=status, body=json.dumps(body, ensure_ascii=False).encode(), headers=headers)


def add_routes(add: RouteAdder) -> None:
    add("POST", "/studies", stow)
    add("POST", "/studies/{study}", stow)
