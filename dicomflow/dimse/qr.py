"""Query/Retrieve SCP handlers: C-FIND, C-MOVE and C-GET (PS3.4 Annex C), Patient Root and Study Root.

C-FIND
    The request identifier becomes a :class:`~dicomflow.index.query.Query` through the matcher QIDO-RS
    uses (``index/query.py``), so both protocols match identically. Search is hierarchical (PS3.4
    C.4.1.2.1 / C.4.1.3.1.1): each level above the Query/Retrieve Level must carry its unique key with a
    single value, otherwise 0xA900 with the Offending Element. Matches stream from the index as they are
    found: a producer task on the server's loop fills a small queue and this pynetdicom thread sends a
    pending response (0xFF00) per match, so a result set is never held in memory. C-CANCEL stops the
    search and answers 0xFE00. ``settings.limits.dimse_find_max_results`` bounds the matches of one
    request: when reached the search stops and the final status is still Success (PS3.4 has no status
    for a truncated answer; Orthanc's LimitFindResults behaves the same), and a warning is logged.

    Character sets: the index holds decoded text. A response is encoded in the character set the
    entity was stored in when every value can be written in it, otherwise in ISO_IR 192 (UTF-8)
    (PS3.5 6.1.2.3 / PS3.4 C.4.1.1.3.2: Specific Character Set is returned when the values need it).

C-MOVE / C-GET
    The identifier's unique keys (lists of UIDs allowed at the retrieve level, PS3.4 C.4.2.2.1) select
    instances through the same matcher. Unlike C-FIND, the unique keys of the levels above may be left
    out (the retrieve level's UIDs identify the instances; many SCUs send only those), but one that is
    present needs a single value.

    Both are answered before any sub-operation when they cannot be served (PS3.4 C.4.2.1.5 Table C.4-2,
    C.4.3.1.4 Table C.4-3): 0xA801 for a C-MOVE destination that is not one of the tenant's
    ``remote_nodes``; 0xA900 with the Offending Element and an Error Comment for an identifier we cannot
    serve (Query/Retrieve Level missing or not a level of the model, the retrieve level's unique key
    missing or with wild cards, a higher unique key with several values, a unique key with a value below
    the retrieve level; other attributes are ignored); 0xA701 when the index does not
    answer; 0xC000 for an undecodable identifier or more than 65535 instances (the counters are US).
    pynetdicom 3.0.4's C-MOVE/C-GET loops cannot send a failure before the sub-operations (they would
    answer 0xC514 / 0xC413), so :meth:`QueryRetrieve.gate_retrieves` takes these requests off the
    association's dispatcher first.

    C-MOVE runs here entirely: the sub-operations go through :class:`~dicomflow.dimse.scu.StoreScu` on
    an association (more when over 128 presentation contexts are needed) that calls the destination
    with the AE title the requestor called (the tenant's, which
    is what a destination allow-lists), name the requestor as Move Originator (PS3.7 9.1.1.1), propose per
    SOP Class one context per stored transfer syntax plus the uncompressed fallbacks, and send each
    instance as stored when accepted, else converted. A pending response follows each sub-operation with
    the remaining/completed/failed/warning counts; the final one is Success, 0xB000 when some failed or
    warned, 0xA702 when all failed, 0xFE00 after C-CANCEL, with the Failed SOP Instance UID List. A
    destination that refuses the association fails every sub-operation (PS3.4 C.4.2.3.1: no presentation
    context could be negotiated), hence 0xA702 with the counts, as dcmqrscp answers; 0xA801 is only for an
    unknown destination. A destination with ``tls`` is verified against ``dimse.tls.ca_file`` and the
    system's CA certificates, and our certificate is presented.

    C-GET sends on the requesting association through pynetdicom's sub-operation loop, with the contexts
    (and SCP/SCU role selection, PS3.7 D.3.3.4) the requestor negotiated; it counts sub-operations and
    answers 0xB000 / 0xA702 / 0xFE00 as above.

    C-GET and compressed instances: pynetdicom's acceptor takes, in each proposed context, the first
    syntax of *our* list that the requestor proposed, and the storage list starts with Explicit VR LE
    (safer for ingest). A C-GET requestor that proposes a compressed syntax together with the
    uncompressed ones in one context therefore receives decoded data; one that proposes the stored
    syntax in a context of its own receives the instance as stored.

Tenancy: every request sees only the tenant that owns the called AE title.

Audit (audit/dimse.py): each request is described here (level, keys, studies) and recorded with the
final status sent: a Query record for C-FIND, DICOM Instances Transferred for C-MOVE/C-GET.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from io import BytesIO
from typing import Any, Generic, TypeVar

from pydicom.charset import convert_encodings, decode_bytes, encode_string
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import decode, encode
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext

from dicomflow.audit.dimse import DimseAudit
from dicomflow.audit.record import AuditAction
from dicomflow.dimse import tls
from dicomflow.dimse.bridge import DimseContext, EventHandler, called_ae_of, calling_ae_of
from dicomflow.dimse.scu import (
    StoreScu,
    SubOperationOutcome,
    accepted_syntaxes,
    load_for_peer,
    route_stored_instances,
)
from dicomflow.dimse.sop_classes import QR_GET_SOP_CLASSES, QR_MOVE_SOP_CLASSES
from dicomflow.errors import DicomServiceError, InvalidQueryError, NotAcceptableError, OutOfResourcesError
from dicomflow.index.base import InstanceRecord
from dicomflow.index.query import (
    PATIENT_ID,
    QUERY_RETRIEVE_LEVEL,
    RETRIEVE_AE_TITLE,
    SERIES_UID,
    SOP_UID,
    SPECIFIC_CHARACTER_SET,
    STUDY_UID,
    UNIQUE_KEY,
    SearchResults,
    query_from_identifier,
    with_scope,
)
from dicomflow.model import Level
from dicomflow.settings import RemoteNode

logger = logging.getLogger(__name__)

T = TypeVar("T")

# PS3.4 C.4.1.1.4 Table C.4-1 (C-FIND), C.4.2.1.5 Table C.4-2 (C-MOVE), C.4.3.1.4 Table C.4-3 (C-GET)
SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00  # Sub-operations terminated due to Cancel Indication
OUT_OF_RESOURCES = 0xA700  # C-FIND Refused: Out of Resources
UNABLE_TO_CALCULATE_MATCHES = 0xA701  # C-MOVE/C-GET Refused: Out of Resources - Unable to calculate matches
UNABLE_TO_PERFORM_SUB_OPERATIONS = 0xA702  # C-MOVE/C-GET Refused: Out of Resources - Unable to perform sub-ops
MOVE_DESTINATION_UNKNOWN = 0xA801  # C-MOVE Refused: Move Destination unknown
IDENTIFIER_DOES_NOT_MATCH = 0xA900  # Identifier does not match SOP Class
SUB_OPERATIONS_WARNING = 0xB000  # Sub-operations Complete - One or more Failures or Warnings
UNABLE_TO_PROCESS = 0xC000  # Unable to process (0xC000-0xCFFF)
#: PS3.7 9.3.3.2 / 9.3.4.2: the Number of ... Sub-operations fields are US
MAX_SUB_OPERATIONS = 0xFFFF

#: PS3.4 C.6.1 Patient Root and C.6.2 Study Root information models, per DIMSE service.
PATIENT_ROOT = frozenset({"1.2.840.10008.5.1.4.1.2.1.1",  # FIND
                          "1.2.840.10008.5.1.4.1.2.1.2",  # MOVE
                          "1.2.840.10008.5.1.4.1.2.1.3"})  # GET
STUDY_ROOT = frozenset({"1.2.840.10008.5.1.4.1.2.2.1",  # FIND
                        "1.2.840.10008.5.1.4.1.2.2.2",  # MOVE
                        "1.2.840.10008.5.1.4.1.2.2.3"})  # GET
_ORDER = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
_PREFETCH = 64
#: PS3.5 6.1.2.5.3: ISO 2022 escapes are reset at these delimiters
_PN_DELIMITERS = {ord("^"), ord("=")}
_TEXT_DELIMITERS = {0x5C, 0x0D, 0x0A, 0x09, 0x0C}


# -- streaming an async iterator of the server's loop into a pynetdicom thread ---------------------------

_END = object()


class LoopStream(Generic[T]):
    """Iterate, from a pynetdicom thread, an async iterator that lives on the server's event loop.

    A producer task on the loop fills a bounded queue (``prefetch`` items) while this thread consumes it
    in batches, one loop hop per batch: the producer stays ahead of the peer without the whole result set
    ever being buffered. :meth:`close` cancels the producer and closes the source (C-CANCEL, errors).
    """

    def __init__(self, ctx: DimseContext, source: Callable[[], AsyncIterator[T]], prefetch: int = _PREFETCH,
                 stall_timeout: float | None = None):
        self._ctx = ctx
        self._stall_timeout = stall_timeout if stall_timeout is not None else ctx.settings.dimse.dimse_timeout
        self._source_factory = source
        self._prefetch = prefetch
        self._queue: asyncio.Queue[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._source: AsyncIterator[T] | None = None
        self._consumer: int | None = None
        self._stopping = False

    async def _start(self) -> None:
        self._queue = asyncio.Queue(self._prefetch)
        self._source = self._source_factory()
        self._task = asyncio.get_running_loop().create_task(self._produce())

    async def _produce(self) -> None:
        assert self._queue is not None and self._source is not None
        source, put = self._source, self._put
        try:
            async for item in source:
                if self._stopping:
                    break
                await put(item)
                if self._stopping:
                    break
            else:
                await put(_END)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            # the consumer stopped taking (a peer that does not read its responses): let go of the
            # database cursor now; the consumer's own wait times out if it ever comes back
            logger.warning("C-FIND results not taken for %.0f s: search closed", self._stall_timeout)
        except BaseException as exc:  # handed to the consuming thread, raised there
            with contextlib.suppress(TimeoutError):
                await put(exc)
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _put(self, item: Any) -> None:
        assert self._queue is not None
        await asyncio.wait_for(self._queue.put(item), self._stall_timeout)

    async def _take(self) -> list[Any]:
        assert self._queue is not None
        items = [await self._queue.get()]
        while len(items) < self._prefetch and not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items

    async def _stop(self, task: asyncio.Task[None] | None, queue: asyncio.Queue[Any] | None,
                    source: AsyncIterator[Any] | None) -> None:
        """Let the producer finish its current step and close the source itself (``_stopping`` is set).

        The producer is not cancelled while a database read is in flight: it stops between two matches
        (a full queue is drained so that a waiting ``put`` returns). Only one that does not stop within
        the stall timeout is cancelled.
        """
        while queue is not None and not queue.empty():
            queue.get_nowait()
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), self._stall_timeout)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()

    async def _start_and_take(self) -> list[Any]:
        await self._start()
        return await self._take()

    def __iter__(self) -> Iterator[T]:
        self._consumer = threading.get_ident()
        take = self._start_and_take  # the first hop also starts the producer: one loop hop saved
        try:
            while True:
                batch, take = self._ctx.run(take()), self._take
                for item in batch:
                    if item is _END:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the producer and close the source; waits for it only on the consuming thread.

        From any other thread (a generator finalised by the garbage collector, which may run on the
        loop's thread or on a database driver's thread that the cleanup itself needs) the cleanup is
        scheduled on the loop instead of awaited, so it can never deadlock.
        """
        if self._source is None and self._task is None:
            return
        task, queue, source = self._task, self._queue, self._source
        self._source, self._task = None, None
        self._stopping = True
        if threading.get_ident() == self._consumer:
            self._ctx.run(self._stop(task, queue, source), self._stall_timeout + 5)
            return

        def schedule() -> None:
            cleanup = self._ctx.loop.create_task(self._stop(task, queue, source))
            _CLEANUPS.add(cleanup)  # the loop keeps only a weak reference to tasks
            cleanup.add_done_callback(_CLEANUPS.discard)

        if _running_loop() is self._ctx.loop:
            schedule()
        else:
            self._ctx.loop.call_soon_threadsafe(schedule)


_CLEANUPS: set[asyncio.Task[None]] = set()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# -- identifier handling ----------------------------------------------------------------------------------


class _Refused(Exception):
    """A C-FIND answered with a failure status (and the Offending Element when there is one)."""

    def __init__(self, status: int, comment: str, offending: str | None = None) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment
        self.offending = offending

    def status_dataset(self) -> Dataset:
        ds = Dataset()
        ds.Status = self.status
        ds.ErrorComment = self.comment[:64]  # LO (PS3.7 C.4: never patient data)
        if self.offending is not None:
            ds.OffendingElement = [Tag(int(self.offending, 16))]
        return ds


def model_levels(sop_class_uid: str) -> tuple[Level, ...]:
    """The levels of the information model behind a Q/R SOP Class (PS3.4 C.6.1.1 / C.6.2.1)."""
    if sop_class_uid in PATIENT_ROOT:
        return _ORDER
    if sop_class_uid in STUDY_ROOT:
        return _ORDER[1:]
    raise _Refused(UNABLE_TO_PROCESS, "unsupported Query/Retrieve SOP Class")


def _decode_identifier(get: Callable[[], Dataset]) -> dict[str, Any]:
    try:
        return dict(get().to_json_dict(bulk_data_threshold=1 << 30))
    except Exception as exc:
        raise _Refused(UNABLE_TO_PROCESS, "identifier cannot be decoded") from exc


def _level_of(identifier: Mapping[str, Any], levels: tuple[Level, ...]) -> Level:
    values = (identifier.get(QUERY_RETRIEVE_LEVEL) or {}).get("Value") or []
    text = str(values[0]).strip().upper() if values else ""
    for level in levels:
        if level.value == text:
            return level
    # PS3.4 C.4.1.1.3.1: Query/Retrieve Level is required and names a level of the model
    raise _Refused(IDENTIFIER_DOES_NOT_MATCH, "missing or invalid Query/Retrieve Level", QUERY_RETRIEVE_LEVEL)


def _single_value(identifier: Mapping[str, Any], tag: str) -> str | None:
    """The single value of a key, or None when absent, empty, a list or a wild card."""
    values = (identifier.get(tag) or {}).get("Value") or []
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    value = values[0].strip()
    if not value or "*" in value or "?" in value or "\\" in value:
        return None
    return value


def _higher_unique_keys(identifier: Mapping[str, Any], level: Level, levels: tuple[Level, ...], *,
                        required: bool = True) -> dict[Level, str]:
    """PS3.4 C.4.1.2.1 / C.4.2.2.1: above the Q/R level, each level's unique key with one value.

    A retrieve (``required=False``) may leave them out: the retrieve level's UIDs identify the instances
    on their own, and many SCUs send only those; a key that is present still needs a single value.
    """
    keys: dict[Level, str] = {}
    for upper in levels[: levels.index(level)]:
        tag = UNIQUE_KEY[upper]
        value = _single_value(identifier, tag)
        if value is None:
            if not required and not (identifier.get(tag) or {}).get("Value"):
                continue
            raise _Refused(IDENTIFIER_DOES_NOT_MATCH,
                           f"unique key {tag} of the {upper.value} level needs a single value", tag)
        keys[upper] = value
    return keys


def _text_values(element: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    vr = element.get("vr")
    for value in element.get("Value") or ():
        if vr == "SQ" and isinstance(value, Mapping):
            for item_element in value.values():
                if isinstance(item_element, Mapping):
                    yield from _text_values(item_element)
        elif vr == "PN" and isinstance(value, Mapping):
            for group in ("Alphabetic", "Ideographic", "Phonetic"):
                if value.get(group):
                    yield "PN", str(value[group])
        elif vr in _TEXT_VRS and isinstance(value, str):
            yield str(vr), value


def choose_charset(match: Mapping[str, Any], stored: list[str] | None) -> list[str] | None:
    """The Specific Character Set to answer with: None when all text is ASCII, else the stored one when
    every value round-trips through it, else ISO_IR 192 (PS3.5 6.1.2.3)."""
    texts = [(vr, v) for element in match.values() if isinstance(element, Mapping) for vr, v in _text_values(element)
             if not v.isascii()]
    if not texts:
        return None
    if stored and stored != ["ISO_IR 192"]:
        try:
            encodings = convert_encodings(stored)
            for vr, text in texts:
                delimiters = _PN_DELIMITERS if vr == "PN" else _TEXT_DELIMITERS
                if decode_bytes(encode_string(text, encodings), encodings, delimiters) != text:
                    break
            else:
                return list(stored)
        except Exception:  # not encodable (or an unknown term): fall back to UTF-8
            pass
    return ["ISO_IR 192"]


def to_response(match: dict[str, Any], level: Level, retrieve_ae: str | None,
                wanted_charset: bool) -> Dataset:
    """A C-FIND pending response identifier from one match (PS3.4 C.4.1.1.3.2)."""
    stored_cs = match.pop(SPECIFIC_CHARACTER_SET, None)
    stored_terms = [str(v or "") for v in (stored_cs or {}).get("Value") or []] or None
    charset = choose_charset(match, stored_terms)
    match[QUERY_RETRIEVE_LEVEL] = {"vr": "CS", "Value": [level.value]}
    if retrieve_ae is not None:
        match[RETRIEVE_AE_TITLE] = {"vr": "AE", "Value": [retrieve_ae]}
    ds = Dataset.from_json(match)
    if charset is not None:
        ds.SpecificCharacterSet = charset if len(charset) > 1 else charset[0]
    elif wanted_charset:
        ds.add_new(0x00080005, "CS", None)
    return ds


# -- handlers ---------------------------------------------------------------------------------------------


class QueryRetrieve:
    """The C-FIND / C-MOVE / C-GET handlers of one SCP."""

    def __init__(self, ctx: DimseContext, audit: DimseAudit | None = None) -> None:
        self.ctx = ctx
        self.audit = audit
        #: id(C-GET request) -> what gate_retrieves selected for it, taken by on_get
        self._gets: dict[int, _Selection] = {}

    def _tenant(self, assoc: Association) -> str:
        return self.ctx.tenant_of(assoc)

    def _find_limit(self) -> int | None:
        limit = self.ctx.settings.limits.dimse_find_max_results
        return limit or None

    # C-FIND ----------------------------------------------------------------------------------------

    def on_find(self, event: Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """EVT_C_FIND: yield ``(0xFF00, identifier)`` per match, then pynetdicom sends the final status."""
        assoc = event.assoc
        try:
            tenant = self._tenant(assoc)
            levels = model_levels(str(event.request.AffectedSOPClassUID))
            identifier = _decode_identifier(lambda: event.identifier)
            level = _level_of(identifier, levels)
            above = _higher_unique_keys(identifier, level, levels)
            wanted_charset = SPECIFIC_CHARACTER_SET in identifier
            wants_retrieve_ae = RETRIEVE_AE_TITLE in identifier
            tenant_cfg = self.ctx.settings.tenants[tenant]
            try:
                query = query_from_identifier(identifier, level, pn_case_insensitive=tenant_cfg.pn_case_insensitive,
                                              limit=self._find_limit())
            except InvalidQueryError as exc:
                raise _Refused(IDENTIFIER_DOES_NOT_MATCH, exc.detail) from exc
            query = with_scope(query, above.get(Level.STUDY), above.get(Level.SERIES))
            query = replace(query, returns=query.returns | {SPECIFIC_CHARACTER_SET})
            if self.audit is not None:
                self.audit.request(
                    assoc, int(event.request.MessageID or 0), tenant, AuditAction.QUERY,
                    study_uids=_values(identifier, STUDY_UID), patient_ids=_values(identifier, PATIENT_ID),
                    description=f"C-FIND level={level.value} keys={','.join(_matching_keywords(identifier))}")
        except _Refused as exc:
            logger.warning("C-FIND refused assoc=%s: 0x%04X %s", assoc.name, exc.status, exc.comment)
            yield exc.status_dataset(), None
            return
        except DicomServiceError as exc:
            logger.error("C-FIND failed assoc=%s: %s", assoc.name, exc.detail)
            yield _status(UNABLE_TO_PROCESS, exc.detail), None
            return

        retrieve_ae = called_ae_of(assoc) if wants_retrieve_ae else None
        results: list[SearchResults] = []

        def search() -> AsyncIterator[dict[str, Any]]:
            found = self.ctx.index.search(tenant, query)
            results.append(found)
            return found

        stream = LoopStream(self.ctx, search)
        sent = 0
        final: tuple[int | Dataset, None] = (SUCCESS, None)
        restore = _fast_polling(assoc)
        # pynetdicom never resumes a handler after a final status: clean up before yielding one
        try:
            for match in stream:
                if event.is_cancelled:
                    logger.info("C-FIND cancelled assoc=%s tenant=%s after %d matches", assoc.name, tenant, sent)
                    final = (CANCEL, None)
                    break
                yield PENDING, to_response(match, level, retrieve_ae, wanted_charset)
                sent += 1
        except OutOfResourcesError as exc:
            logger.error("C-FIND assoc=%s tenant=%s: %s", assoc.name, tenant, exc.detail)
            final = (_status(OUT_OF_RESOURCES, exc.detail), None)
        except DicomServiceError as exc:
            logger.error("C-FIND assoc=%s tenant=%s: %s", assoc.name, tenant, exc.detail)
            final = (_status(UNABLE_TO_PROCESS, exc.detail), None)
        finally:
            restore()
            stream.close()
        if final[0] == SUCCESS:
            if event.is_cancelled:
                final = (CANCEL, None)
            elif results and results[0].truncated:
                logger.warning("C-FIND assoc=%s tenant=%s: stopped at the limit of %d matches",
                               assoc.name, tenant, sent)
        logger.info("C-FIND assoc=%s tenant=%s level=%s: %d matches", assoc.name, tenant, level.value, sent)
        yield final

    # C-MOVE / C-GET --------------------------------------------------------------------------------

    def gate_retrieves(self, assoc: Association) -> None:
        """Answer the C-MOVE and C-GET requests of an accepted association here before pynetdicom does.

        pynetdicom 3.0.4's C-MOVE/C-GET SCP (``QueryRetrieveServiceClass._move_scp`` / ``_get_scp``) takes
        the destination, then the number of sub-operations, from the handler and has no way to answer a
        failure before them: a refusal would end as its own 0xC514 / 0xC413. It also opens the C-MOVE
        sub-association itself, with the SCP's one AE title, and answers 0xA801 when that fails. So the
        association's request dispatcher (``Association._serve_request``, which reactor.py calls for each
        request) is wrapped: a C-MOVE is served entirely by :meth:`_serve_move`; a C-GET is checked by
        :meth:`_select_or_refuse` and only a servable one goes on to pynetdicom's sub-operation loop
        (:meth:`on_get`), which sends on the requesting association with its negotiated roles.
        """
        serve = assoc._serve_request

        def serve_request(msg: Any, context_id: int) -> None:
            context = assoc._accepted_cx.get(context_id)
            if (not isinstance(msg, C_MOVE | C_GET) or context is None or assoc._sent_release
                    or not msg.is_valid_request or str(msg.AffectedSOPClassUID) not in _RETRIEVE_CLASSES):
                serve(msg, context_id)  # pynetdicom's own answers (unknown context, invalid request, ...)
                return
            assoc.dimse.cancel_req = {}  # as Association._serve_request: drop C-CANCELs of earlier requests
            if isinstance(msg, C_MOVE):
                # as Association._serve_request around a service class: another thread's send_*() on this
                # association (a storage commitment report) must not wait for the whole C-MOVE
                assoc._is_paused = True
                try:
                    self._serve_move(assoc, msg, context)
                finally:
                    assoc._is_paused = False
                    assoc.dimse.cancel_req = {}
                return
            selection = self._select_or_refuse(assoc, msg, context, "C-GET")
            if selection is None:
                return
            self._gets[id(msg)] = selection
            try:
                serve(msg, context_id)  # pynetdicom's C-GET loop: on_get takes the selection
            finally:
                self._gets.pop(id(msg), None)

        assoc._serve_request = serve_request  # type: ignore[method-assign]

    def _select(self, assoc: Association, req: C_MOVE | C_GET, context: PresentationContext) -> _Selection:
        """The instances a C-MOVE / C-GET identifier selects (PS3.4 C.4.2.2.1 unique keys only)."""
        tenant = self._tenant(assoc)
        levels = model_levels(str(req.AffectedSOPClassUID))
        ts = context.transfer_syntax[0]
        encoded = req.Identifier
        if encoded is None:
            raise _Refused(UNABLE_TO_PROCESS, "no identifier")
        identifier = _decode_identifier(
            lambda: decode(encoded, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated))
        level = _level_of(identifier, levels)
        above = _higher_unique_keys(identifier, level, levels, required=False)
        own_tag = UNIQUE_KEY[level]
        own = [str(v).strip() for v in (identifier.get(own_tag) or {}).get("Value") or [] if str(v).strip()]
        if not own or any("*" in v or "?" in v for v in own):
            raise _Refused(IDENTIFIER_DOES_NOT_MATCH, f"unique key {own_tag} needs one or more values", own_tag)
        for lower in levels[levels.index(level) + 1:]:
            # PS3.4 C.4.2.1.4.1 / C.4.3.1.3.1: unique keys of the levels above and at the retrieve level only;
            # ignoring one below would send more than was asked for (dcmqrscp refuses it the same way)
            if (identifier.get(UNIQUE_KEY[lower]) or {}).get("Value"):
                raise _Refused(IDENTIFIER_DOES_NOT_MATCH, f"unique key {UNIQUE_KEY[lower]} is below the "
                               f"{level.value} level", UNIQUE_KEY[lower])

        def key(lvl: Level, values: list[str]) -> dict[str, Any]:
            return {"vr": "LO" if lvl is Level.PATIENT else "UI", "Value": values}

        keys: dict[str, Any] = {UNIQUE_KEY[lvl]: key(lvl, [v]) for lvl, v in above.items()}
        keys[own_tag] = key(level, own)
        # a PATIENT level retrieve selects that patient's studies (PS3.4 C.6.1.1.2: Patient ID is a study key)
        match_level = Level.STUDY if level is Level.PATIENT else level
        keys.setdefault(STUDY_UID, {"vr": "UI"})  # returned, so that instances can be listed per study
        if match_level in (Level.SERIES, Level.IMAGE):
            keys.setdefault(SERIES_UID, {"vr": "UI"})
        try:
            query = query_from_identifier(keys, match_level, limit=None)
        except InvalidQueryError as exc:
            raise _Refused(IDENTIFIER_DOES_NOT_MATCH, exc.detail) from exc
        records = self.ctx.run(self._collect(tenant, query, match_level))
        if len(records) > MAX_SUB_OPERATIONS:
            # the sub-operation counters are US (PS3.7 9.3.3.2 / 9.3.4.2): no final response could count them
            raise _Refused(UNABLE_TO_PROCESS, f"more than {MAX_SUB_OPERATIONS} instances: retrieve fewer at once")
        return _Selection(tenant, records, _values(identifier, PATIENT_ID))

    def _select_or_refuse(self, assoc: Association, req: C_MOVE | C_GET, context: PresentationContext,
                          service: str) -> _Selection | None:
        """:meth:`_select`, or None once the request has been answered with the failure (PS3.4 C.4.2.1.5,
        C.4.3.1.4): 0xA900 for an identifier we cannot serve, 0xA701 when the index does not answer."""
        try:
            return self._select(assoc, req, context)
        except _Refused as exc:
            logger.warning("%s refused assoc=%s: 0x%04X %s", service, assoc.name, exc.status, exc.comment)
            _respond(assoc, req, context, exc.status_dataset())
        except OutOfResourcesError as exc:
            logger.error("%s failed assoc=%s: %s", service, assoc.name, exc.detail)
            _respond(assoc, req, context, _status(UNABLE_TO_CALCULATE_MATCHES, exc.detail))
        except DicomServiceError as exc:
            logger.error("%s failed assoc=%s: %s", service, assoc.name, exc.detail)
            _respond(assoc, req, context, _status(UNABLE_TO_PROCESS, exc.detail))
        except Exception:  # runs on the association's reactor thread: a fault must not end it
            logger.exception("%s failed assoc=%s", service, assoc.name)
            _respond(assoc, req, context, _status(UNABLE_TO_PROCESS, "internal error"))
        return None

    async def _collect(self, tenant: str, query: Any, level: Level) -> list[InstanceRecord]:
        scopes: dict[tuple[str, str | None], set[str] | None] = {}
        found = self.ctx.index.search(tenant, query)
        async with found:
            async for match in found:
                study = _uid(match, STUDY_UID)
                series = _uid(match, SERIES_UID) if level in (Level.SERIES, Level.IMAGE) else None
                if study is None:
                    continue
                if level is Level.IMAGE:
                    bucket = scopes.setdefault((study, series), set())
                    sop = _uid(match, SOP_UID)
                    if bucket is not None and sop is not None:
                        bucket.add(sop)
                else:
                    scopes[(study, series)] = None
        records: list[InstanceRecord] = []
        for (study, series), sops in scopes.items():
            for rec in await self.ctx.index.list_instances(tenant, study, series):
                if sops is None or rec.sop_uid in sops:
                    records.append(rec)
        return records

    def _serve_move(self, assoc: Association, req: C_MOVE, context: PresentationContext) -> None:
        """A whole C-MOVE (PS3.4 C.4.2.3.1), on the association's reactor thread; never raises."""
        try:
            self._move(assoc, req, context)
        except Exception:
            logger.exception("C-MOVE failed assoc=%s", assoc.name)
            if assoc.is_established:
                with contextlib.suppress(Exception):
                    _respond(assoc, req, context, _status(UNABLE_TO_PROCESS, "internal error"))

    def _move(self, assoc: Association, req: C_MOVE, context: PresentationContext) -> None:
        tenant = self._tenant(assoc)
        destination = str(req.MoveDestination or "").strip()
        node = _remote_node(self.ctx.settings.tenants[tenant].remote_nodes, destination)
        if node is None:
            logger.warning("C-MOVE assoc=%s tenant=%s: unknown destination %r", assoc.name, tenant, destination)
            _respond(assoc, req, context, _status(MOVE_DESTINATION_UNKNOWN, "move destination unknown"))
            return
        selection = self._select_or_refuse(assoc, req, context, "C-MOVE")
        if selection is None:
            return
        records, msg_id = selection.records, int(req.MessageID or 0)
        self._audit_retrieve(assoc, msg_id, selection, f"C-MOVE to {node.ae_title}")
        logger.info("C-MOVE assoc=%s tenant=%s to %s: %d instances", assoc.name, tenant, node.ae_title, len(records))
        counts = _Counts(remaining=len(records))
        failed: list[str] = []
        cancelled = False

        def stop() -> bool:
            nonlocal cancelled
            if assoc.dimse.cancel_req.pop(msg_id, None) is not None:  # C-CANCEL-MOVE-RQ (PS3.7 9.3.4.3)
                cancelled = True
            return cancelled or not assoc.is_established

        # PS3.8 7.1.1.3: the sub-associations call the destination as the AE the requestor called (the
        # tenant's AE title, the one a PACS knows and allow-lists), not as this server's default AE title.
        ssl_context = tls.client_context(self.ctx.settings.dimse.tls) if node.tls else None
        scu = StoreScu(self.ctx.blobs, called_ae_of(assoc), self.ctx.settings.dimse, ssl_context)
        # PS3.7 9.1.1.1: each sub-operation names the C-MOVE's requestor and Message ID as Move Originator
        sends = scu.send(node, records, is_cancelled=stop, move_originator=(calling_ae_of(assoc), msg_id))
        restore = _fast_polling(assoc)
        try:
            for sub in sends:
                counts.remaining -= 1
                if sub.outcome is SubOperationOutcome.COMPLETED:
                    counts.completed += 1
                elif sub.outcome is SubOperationOutcome.WARNING:
                    counts.warning += 1
                else:
                    counts.failed += 1
                    failed.append(sub.sop_instance_uid)
                if not assoc.is_established:
                    break
                _respond(assoc, req, context, PENDING, counts=counts)  # optional Pending (PS3.4 C.4.2.3.1)
        finally:
            sends.close()  # releases the sub-association
            restore()
        if not assoc.is_established:  # PS3.4 C.4.2.3.1 Note 2: no final response is possible
            logger.info("C-MOVE assoc=%s tenant=%s: requestor gone", assoc.name, tenant)
            return
        logger.info("C-MOVE assoc=%s tenant=%s to %s: completed=%d failed=%d warning=%d%s", assoc.name, tenant,
                    node.ae_title, counts.completed, counts.failed, counts.warning, " (cancelled)" if cancelled else "")
        # PS3.4 C.4.2.3.1: Success when all completed, Warning when some failed or warned, Failure when all
        # failed (a destination that refuses the association fails them all): 0xA702, as dcmqrscp answers.
        if cancelled:
            _respond(assoc, req, context, CANCEL, counts=counts, failed=failed)
        elif not counts.failed and not counts.warning:
            _respond(assoc, req, context, SUCCESS, counts=counts)
        elif counts.failed and not counts.completed and not counts.warning:
            _respond(assoc, req, context, UNABLE_TO_PERFORM_SUB_OPERATIONS, counts=counts, failed=failed)
        else:
            _respond(assoc, req, context, SUB_OPERATIONS_WARNING, counts=counts, failed=failed)

    def _prepare(self, assoc: Association | None, rec: InstanceRecord) -> Dataset:
        """The data set to yield for one C-GET sub-operation; one pynetdicom cannot send when it must fail."""
        accepted = accepted_syntaxes(assoc, rec.sop_class_uid) if assoc is not None else set()
        try:
            if accepted:
                return load_for_peer(self.ctx.blobs, rec, accepted)
            detail = "no presentation context accepted for the SOP Class"
        except NotAcceptableError as exc:
            detail = exc.detail
        except Exception as exc:  # one unreadable blob fails its sub-operation, not the whole retrieve
            detail = f"stored instance unreadable: {type(exc).__name__}"
            logger.exception("sub-operation: instance %s unreadable", rec.sop_uid)
        logger.warning("sub-operation for %s fails: %s", rec.sop_uid, detail)
        # pynetdicom counts a data set it cannot send as a failed sub-operation and lists its SOP Instance
        # UID in the Failed SOP Instance UID List (PS3.4 C.4.3.1.3.2); no accepted context has this syntax.
        failing = Dataset()
        failing.SOPClassUID = rec.sop_class_uid
        failing.SOPInstanceUID = rec.sop_uid
        failing.file_meta = Dataset()  # type: ignore[assignment]
        failing.file_meta.TransferSyntaxUID = UID(_UNSENDABLE_SYNTAX)
        return failing

    def on_get(self, event: Event) -> Iterator[Any]:
        """EVT_C_GET: yield the number of sub-operations, then ``(0xFF00, dataset)`` per instance.

        Only requests :meth:`gate_retrieves` found servable get here, with the instances it selected.
        """
        assoc = event.assoc
        selection = self._gets.pop(id(event.request), None)
        if selection is None:  # not through gate_retrieves: pynetdicom answers 0xC411
            raise RuntimeError("C-GET request that was not selected by gate_retrieves")
        self._audit_retrieve(assoc, int(event.request.MessageID or 0), selection, "C-GET")
        # the sub-operations run on this association: let its DUL thread poll faster while they do
        # (see scu.set_nodelay); restored when the C-GET ends
        restore = _fast_polling(assoc)
        undo = route_stored_instances(assoc)
        try:
            yield from self._get_sub_operations(event, selection)
        finally:
            undo()
            restore()

    def _get_sub_operations(self, event: Event, selection: _Selection) -> Iterator[Any]:
        assoc = event.assoc
        yield len(selection.records)
        logger.info("C-GET assoc=%s tenant=%s: %d instances", assoc.name, selection.tenant, len(selection.records))
        for rec in selection.records:
            if event.is_cancelled:
                logger.info("C-GET cancelled assoc=%s tenant=%s", assoc.name, selection.tenant)
                yield CANCEL, None
                return
            yield PENDING, self._prepare(assoc, rec)

    def _audit_retrieve(self, assoc: Association, message_id: int, selection: _Selection, what: str) -> None:
        if self.audit is None:
            return
        records = selection.records
        self.audit.request(assoc, message_id, selection.tenant, AuditAction.RETRIEVE,
                           study_uids=sorted({r.study_uid for r in records}), patient_ids=selection.patient_ids,
                           description=f"{what}: {len(records)} instance(s)")


@dataclass(frozen=True, slots=True)
class _Selection:
    """What a servable C-MOVE / C-GET selected."""

    tenant: str
    records: list[InstanceRecord]
    patient_ids: list[str]


@dataclass(slots=True)
class _Counts:
    """Sub-operation counters of a C-MOVE (PS3.4 C.4.2.1.5 related fields (0000,1020)-(0000,1023))."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0


def _respond(assoc: Association, req: C_MOVE | C_GET, context: PresentationContext, status: int | Dataset, *,
             counts: _Counts | None = None, failed: list[str] | None = None) -> None:
    """Send one C-MOVE-RSP / C-GET-RSP (PS3.7 9.3.4.2 / 9.3.3.2) on the requesting association.

    ``status`` is a code or a status Dataset carrying Error Comment / Offending Element. Counters go in
    when given, Remaining only in Pending and Cancel responses (PS3.4 C.4.2.3.1: a final Success,
    Warning or Failure has none left). ``failed`` becomes the Identifier's Failed SOP Instance UID List.
    """
    rsp = C_MOVE() if isinstance(req, C_MOVE) else C_GET()
    rsp.MessageIDBeingRespondedTo = req.MessageID
    rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
    if isinstance(status, Dataset):
        rsp.Status = int(status.Status)
        if "ErrorComment" in status:
            rsp.ErrorComment = status.ErrorComment
        if "OffendingElement" in status:
            rsp.OffendingElement = status.OffendingElement
    else:
        rsp.Status = status
    if counts is not None:
        if rsp.Status in (PENDING, CANCEL):
            rsp.NumberOfRemainingSuboperations = counts.remaining
        rsp.NumberOfCompletedSuboperations = counts.completed
        rsp.NumberOfFailedSuboperations = counts.failed
        rsp.NumberOfWarningSuboperations = counts.warning
    if failed is not None:
        ts = context.transfer_syntax[0]
        identifier = Dataset()
        identifier.FailedSOPInstanceUIDList = failed
        rsp.Identifier = BytesIO(encode(identifier, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated) or b"")
    assoc.dimse.send_msg(rsp, int(context.context_id or 0))


#: PS3.4 C.6.1 / C.6.2 MOVE and GET SOP Classes answered by QueryRetrieve.gate_retrieves
_RETRIEVE_CLASSES = frozenset(map(str, (*QR_MOVE_SOP_CLASSES, *QR_GET_SOP_CLASSES)))


#: A transfer syntax UID no peer accepts, so that pynetdicom fails the sub-operation (see _prepare).
_UNSENDABLE_SYNTAX = "1.2.840.10008.1.2.4.999"


def _fast_polling(assoc: Association) -> Callable[[], None]:
    """Let the association's DUL thread poll faster while a handler streams responses or sub-operations.

    pynetdicom's DUL thread sleeps ``_run_loop_delay`` (1 ms) whenever its queues are empty, which
    costs up to a millisecond per message we send; returns the function restoring the idle delay.
    """
    dul = assoc.dul
    idle = dul._run_loop_delay
    dul._run_loop_delay = min(idle, 0.0002)

    def restore() -> None:
        dul._run_loop_delay = idle

    return restore


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def _uid(match: Mapping[str, Any], tag: str) -> str | None:
    values = (match.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def _remote_node(nodes: Mapping[str, RemoteNode], ae_title: str) -> RemoteNode | None:
    for node in nodes.values():
        if node.ae_title == ae_title:
            return node
    return None


def _values(identifier: Mapping[str, Any], tag: str) -> list[str]:
    """Single-valued non-wildcard values of an identifier attribute (for the audit record)."""
    values = (identifier.get(tag) or {}).get("Value") or []
    return [str(v).strip() for v in values if str(v).strip() and not any(c in str(v) for c in "*?")]


def _matching_keywords(identifier: Mapping[str, Any]) -> list[str]:
    """Keywords of the attributes with a value (matching keys; their values are not repeated here)."""
    out = []
    for tag, element in identifier.items():
        if element.get("Value"):
            try:
                out.append(keyword_for_tag(int(tag, 16)) or tag)
            except ValueError:
                out.append(tag)
    return out


def handlers(qr: QueryRetrieve) -> list[EventHandler]:
    """``(event, handler)`` pairs for EVT_C_FIND / EVT_C_GET (C-MOVE: :meth:`QueryRetrieve.gate_retrieves`)."""
    return [(evt.EVT_C_FIND, qr.on_find), (evt.EVT_C_GET, qr.on_get)]
