"""C-STORE SCP (PS3.4 Annex B): the received data set goes through the same ingest path as STOW-RS.

pynetdicom writes the data set, exactly as received, behind a File Meta Information header into a
temporary Part 10 file (``_config.STORE_RECV_CHUNKED_DATASET``, set by server.py), so memory stays
flat whatever the instance size. The handler copies it into an ingest :class:`Spool` on the
association's own thread, checks that it matches the request, then waits on the server's event loop
for :meth:`IngestService.store`. The status is returned only after the instance is durable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

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

_COPY_CHUNK = 1 << 20
_SOP_CLASS = Tag(0x00080016)
_SOP_INSTANCE = Tag(0x00080018)


def _uid_of(ds: Dataset, tag: Any) -> str:
    elem = ds.get(tag)
    return str(elem.value).strip("\0 ") if elem is not None and elem.value is not None else ""


def check_received(path: Path, affected_class: str, affected_instance: str) -> None:
    """Reject a data set that is truncated or does not match the C-STORE request.

    PS3.4 B.2.3: 0xC000 (cannot understand) for a data set that cannot be parsed to its end;
    0xA900 when the SOP Class / SOP Instance UID in the data set differ from the Affected SOP
    Class / Instance UID of the request (PS3.7 9.1.1.1).
    """
    size = path.stat().st_size
    try:
        ds = pydicom.dcmread(path, defer_size=256)
        # Top-level values whose declared length runs past the end of what was received.
        for tag in list(ds.keys()):
            raw = ds.get_item(tag, keep_deferred=True)
            tell = getattr(raw, "value_tell", None)
            length = getattr(raw, "length", None)
            if tell is not None and length is not None and length != 0xFFFFFFFF and tell + length > size:
                raise UnreadableInstanceError("data set is truncated")
            if length is not None and length != 0xFFFFFFFF and getattr(raw, "value", b"") is not None \
                    and isinstance(raw.value, bytes) and len(raw.value) < length:
                raise UnreadableInstanceError("data set is truncated")
        sop_class = _uid_of(ds, _SOP_CLASS)
        sop_instance = _uid_of(ds, _SOP_INSTANCE)
    except DicomServiceError:
        raise
    except Exception as exc:
        raise UnreadableInstanceError("data set could not be parsed to its end") from exc
    if sop_class != affected_class:
        raise DatasetMismatchError("SOP Class UID differs from the Affected SOP Class UID",
                                   sop_instance_uid=affected_instance)
    if sop_instance != affected_instance:
        raise DatasetMismatchError("SOP Instance UID differs from the Affected SOP Instance UID",
                                   sop_instance_uid=affected_instance)


def _fill_spool(event: Event, spool: Spool) -> None:
    req = event.request
    path = getattr(req, "_dataset_path", None)
    if isinstance(path, Path):
        with open(path, "rb") as src:
            while chunk := src.read(_COPY_CHUNK):
                spool.write_sync(chunk)
    else:  # STORE_RECV_CHUNKED_DATASET off: the data set is in memory
        spool.write_sync(event.encoded_dataset(include_meta=True))


def handle_store(event: Event, ctx: DimseContext) -> Dataset:
    """EVT_C_STORE: store one instance for the association's tenant and answer with its status."""
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
        check_received(spool.path, affected_class, affected_instance)
        outcome = ctx.run(ctx.ingest.store(tenant, spool, source=source))
    except DicomServiceError as exc:
        exc.sop_instance_uid = exc.sop_instance_uid or affected_instance
        log_error(exc, "C-STORE", tenant, assoc.name)
        return error_status(exc)
    except Exception as exc:  # a bug of ours: processing failure, logged with the traceback
        logger.error("C-STORE failed tenant=%s assoc=%s sop=%s", tenant, assoc.name, affected_instance,
                     exc_info=exc)
        return status_dataset(0x0110, "processing failure")
    finally:
        spool.discard()
    if outcome.warning is not None:
        # PS3.4 B.2.3 warnings (0xB000 coercion, 0xB006 elements discarded): stored, with a note.
        return status_dataset(outcome.warning, outcome.warning_detail)
    logger.debug("C-STORE tenant=%s assoc=%s sop=%s result=%s", tenant, assoc.name, affected_instance,
                 outcome.result)
    return status_dataset(SUCCESS)
