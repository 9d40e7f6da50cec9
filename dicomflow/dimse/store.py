"""C-STORE SCP (PS3.4 Annex B): the received data set goes through the same ingest path as STOW-RS.

pynetdicom writes the data set, exactly as received, behind a File Meta Information header into a
temporary Part 10 file (``_config.STORE_RECV_CHUNKED_DATASET``, set by server.py), so memory stays
flat whatever the instance size. The handler copies it into an ingest :class:`Spool` on the
association's own thread, checks that it matches the request, then waits on the server's event loop
for :meth:`IngestService.store`. The status is returned only after the instance is durable.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO, cast

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from dicomflow.audit.dimse import DimseAudit
from dicomflow.dimse.bridge import DimseContext, calling_ae_of
from dicomflow.dimse.status import (
    SUCCESS,
    error_status,
    log_error,
    status_dataset,
)
from dicomflow.errors import DatasetMismatchError, DicomServiceError, OutOfResourcesError, UnreadableInstanceError
from dicomflow.ingest.service import Spool
from dicomflow.model import Protocol, Source

logger = logging.getLogger(__name__)

_SOP_CLASS = Tag(0x00080016)
_SOP_INSTANCE = Tag(0x00080018)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip("\0 ")


def dataset_offset(fh: BinaryIO) -> int:
    """Where the data set starts in a Part 10 file: after the preamble, 'DICM' and group 0002 (PS3.10 7.1)."""
    fh.seek(0)
    head = fh.read(144)
    # (0002,0000) File Meta Information Group Length, explicit VR little endian, UL
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        raise UnreadableInstanceError("File Meta Information without a group length")
    group_length: int = struct.unpack("<I", head[140:144])[0]
    return 144 + group_length


def check_received(fh: BinaryIO, transfer_syntax: str, affected_class: str, affected_instance: str) -> None:
    """Reject a data set that is truncated or does not match the C-STORE request.

    ``fh`` is the received Part 10 file. PS3.4 B.2.3: 0xC000 (cannot understand) for a data set that
    does not parse to its end (a value or a sequence cut short, a partial element at the end);
    0xA900 when its SOP Class / SOP Instance UID differ from the request's Affected SOP Class /
    Instance UID (PS3.7 9.1.1.1) or are missing. Values are skipped, not read: memory stays flat.
    """
    ts = UID(transfer_syntax)
    start = dataset_offset(fh)
    fh.seek(0, os.SEEK_END)
    size = fh.tell() - start
    fh.seek(start)
    stream: BinaryIO = fh
    if ts == DeflatedExplicitVRLittleEndian:  # PS3.5 A.5: the whole data set is deflated
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            stream = io.BytesIO(inflater.decompress(fh.read()) + inflater.flush())
        except zlib.error as exc:
            raise UnreadableInstanceError("deflated data set cannot be inflated") from exc
        if not inflater.eof:
            raise UnreadableInstanceError("deflated data set is truncated")
        size = len(stream.getbuffer())
    base = stream.tell()
    delimiter = (b"\xfe\xff\xdd\xe0" if ts.is_little_endian else b"\xff\xfe\xe0\xdd") + b"\0\0\0\0"
    uids: dict[int, str] = {}
    end = 0
    try:
        for elem in data_element_generator(stream, ts.is_implicit_VR, ts.is_little_endian, defer_size=256):
            if elem.tag in (_SOP_CLASS, _SOP_INSTANCE):
                uids[int(elem.tag)] = _text(elem.value)
            # undefined length (a sequence, encapsulated pixel data): must end with a Sequence Delimitation Item
            if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:
                end = stream.tell() - base
                stream.seek(base + end - 8)
                if end > size or stream.read(8) != delimiter:
                    raise UnreadableInstanceError("data set is truncated")
            else:
                end = int(elem.value_tell) - base + int(elem.length)
                if end > size:
                    raise UnreadableInstanceError("data set is truncated")
            stream.seek(base + end)
    except DicomServiceError:
        raise
    except Exception as exc:
        raise UnreadableInstanceError("data set could not be parsed to its end") from exc
    if end != size:
        raise UnreadableInstanceError("data set is truncated")
    if uids.get(int(_SOP_CLASS), "") != affected_class:
        raise DatasetMismatchError("SOP Class UID differs from the Affected SOP Class UID")
    if uids.get(int(_SOP_INSTANCE), "") != affected_instance:
        raise DatasetMismatchError("SOP Instance UID differs from the Affected SOP Instance UID")


def _fill_spool(event: Event, spool: Spool) -> None:
    req = event.request
    path = getattr(req, "_dataset_path", None)
    if isinstance(path, Path):
        spool.adopt_sync(path)
    else:  # STORE_RECV_CHUNKED_DATASET off: the data set is in memory
        spool.write_sync(event.encoded_dataset(include_meta=True))


def handle_store(event: Event, ctx: DimseContext, audit: DimseAudit | None = None) -> Dataset:
    """EVT_C_STORE: store one instance for the association's tenant and answer with its status.

    ``audit`` only counts the instance in the association's summary (no I/O here, see audit/dimse.py).
    """
    assoc = event.assoc
    tenant = ctx.tenant_of(assoc)
    req = cast(C_STORE, event.request)
    affected_class = str(req.AffectedSOPClassUID or "")
    affected_instance = str(req.AffectedSOPInstanceUID or "")
    source = Source(Protocol.DIMSE, calling_ae=calling_ae_of(assoc), address=assoc.requestor.address)
    spool = ctx.ingest.spool()
    try:
        try:
            _fill_spool(event, spool)
        except OSError as exc:
            raise OutOfResourcesError("spool disk full or unavailable") from exc
        with open(spool.path, "rb") as fh:
            check_received(fh, str(event.context.transfer_syntax), affected_class, affected_instance)
        # Durable spool and parse here, on the association's own thread: only the commit goes to the loop.
        prepared = ctx.ingest.prepare(spool)
        outcome = ctx.run(ctx.ingest.store(tenant, spool, source=source, prepared=prepared))
    except DicomServiceError as exc:
        exc.sop_instance_uid = exc.sop_instance_uid or affected_instance
        log_error(exc, "C-STORE", tenant, assoc.name)
        if audit is not None:
            audit.stored(assoc, tenant, None, ok=False)
        return error_status(exc)
    except Exception as exc:  # a bug of ours: processing failure, logged with the traceback
        logger.error("C-STORE failed tenant=%s assoc=%s sop=%s", tenant, assoc.name, affected_instance,
                     exc_info=exc)
        if audit is not None:
            audit.stored(assoc, tenant, None, ok=False)
        return status_dataset(0x0110, "processing failure")
    finally:
        spool.discard()
    if audit is not None:
        audit.stored(assoc, tenant, outcome.key.study_instance_uid, ok=True)
    if outcome.warning is not None:
        # PS3.4 B.2.3 warnings (0xB000 coercion, 0xB006 elements discarded): stored, with a note.
        return status_dataset(outcome.warning, outcome.warning_detail)
    logger.debug("C-STORE tenant=%s assoc=%s sop=%s result=%s", tenant, assoc.name, affected_instance,
                 outcome.result)
    return status_dataset(SUCCESS)
