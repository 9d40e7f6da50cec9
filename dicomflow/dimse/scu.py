"""C-STORE SCU: send stored instances to a DICOM peer (C-MOVE/C-GET sub-operations, DICOM forward routes).

Negotiation (PS3.8 7.1.1.13, PS3.5 10.1): for each SOP Class of a batch we propose one presentation
context per stored transfer syntax, each with that single syntax, plus one context with the
uncompressed fallbacks Explicit VR Little Endian and Implicit VR Little Endian (every Storage SCP
supports the latter). One syntax per context matters: an acceptor picks one syntax out of a list, and
would otherwise be free to take Explicit VR LE for an instance we could have sent as stored.

Each instance then goes as stored when its syntax was accepted (its data set bytes unchanged), and
is converted with :mod:`dicomflow.imaging.transcode` only when the peer accepts nothing better.

Everything here blocks: call it from a pynetdicom thread (C-MOVE, C-GET) or through the Offloader.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from dicomflow.errors import NotAcceptableError
from dicomflow.imaging.transcode import PixelInfo, choose_target, transcode
from dicomflow.index.base import InstanceRecord
from dicomflow.offload import Offloader
from dicomflow.settings import DimseSettings, RemoteNode
from dicomflow.storage.base import BlobStore

logger = logging.getLogger(__name__)

#: PS3.5 10.1 / A.1: Implicit VR Little Endian is the default every SCP supports; Explicit VR LE first.
FALLBACK_SYNTAXES: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: PS3.8 9.3.2.2: presentation context IDs are the odd integers 1-255.
MAX_CONTEXTS = 128


class SubOperationOutcome(StrEnum):
    """How one C-STORE sub-operation ended (PS3.4 C.4.2.1.5 / C.4.3.1.5 counters)."""

    COMPLETED = "completed"
    WARNING = "warning"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SubOperation:
    """The result of sending one instance."""

    sop_instance_uid: str
    outcome: SubOperationOutcome
    #: the peer's C-STORE status, None when the request was never answered
    status: int | None = None
    #: the transfer syntax the data set was sent in, None when it was not sent
    transfer_syntax: str | None = None
    #: why it failed; never contains patient data
    detail: str = ""


def _context_keys(records: Iterable[InstanceRecord]) -> dict[tuple[str, tuple[str, ...]], None]:
    keys: dict[tuple[str, tuple[str, ...]], None] = {}
    for rec in records:
        keys[(rec.sop_class_uid, (rec.transfer_syntax_uid,))] = None
        keys[(rec.sop_class_uid, FALLBACK_SYNTAXES)] = None
    return keys


def propose_contexts(records: Iterable[InstanceRecord]) -> list[PresentationContext]:
    """The presentation contexts to request for sending ``records`` (at most :data:`MAX_CONTEXTS`).

    Raises ``ValueError`` when more are needed: split with :func:`batches` first.
    """
    keys = _context_keys(records)
    if len(keys) > MAX_CONTEXTS:
        raise ValueError(f"{len(keys)} presentation contexts needed, at most {MAX_CONTEXTS} fit in one association")
    return [build_context(sop, list(syntaxes)) for sop, syntaxes in keys]


def batches(records: Sequence[InstanceRecord], max_contexts: int = MAX_CONTEXTS) -> Iterator[list[InstanceRecord]]:
    """Split ``records`` (keeping their order) into runs that each fit in one association's contexts."""
    batch: list[InstanceRecord] = []
    keys: dict[tuple[str, tuple[str, ...]], None] = {}
    for rec in records:
        new = {k: None for k in _context_keys([rec]) if k not in keys}
        if batch and len(keys) + len(new) > max_contexts:
            yield batch
            batch, keys = [], {}
            new = _context_keys([rec])
        batch.append(rec)
        keys.update(new)
    if batch:
        yield batch


def accepted_syntaxes(assoc: Association, sop_class_uid: str, role: str = "scu") -> set[str]:
    """Transfer syntaxes accepted on ``assoc`` for sending ``sop_class_uid`` in ``role`` (``"scu"``)."""
    out: set[str] = set()
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax != sop_class_uid:
            continue
        if role == "scu" and not cx.as_scu:
            continue
        out.add(str(cx.transfer_syntax[0]))
    return out


def load_for_peer(blobs: BlobStore, record: InstanceRecord, accepted: set[str]) -> Dataset:
    """A stored instance, ready for ``send_c_store`` on a context whose syntax is in ``accepted``.

    As stored when possible: a :class:`StoredInstance` stand-in that :func:`send_stored` sends from the
    blob's file, so the peer receives the stored data set bytes. Otherwise the instance is read and
    converted to the best syntax the peer accepted (one instance in memory at a time). Raises
    :class:`NotAcceptableError` when there is none.
    """
    stored = record.transfer_syntax_uid
    if stored in accepted:
        return StoredInstance(blobs, record)
    # An uncompressed little endian data set goes as it is: pynetdicom re-encodes explicit <-> implicit VR.
    if stored in FALLBACK_SYNTAXES and accepted & set(FALLBACK_SYNTAXES):
        with blobs.open_sync(record.blob_key) as fh:
            return pydicom.dcmread(fh)
    with blobs.open_sync(record.blob_key) as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
        has_pixels = fh.tell() < _size(fh)  # stop_before_pixels stopped at a pixel data element
        fh.seek(0)
        target = choose_target(stored, accepted, _pixel_info(ds) if has_pixels else None, has_pixels=has_pixels)
        if target is None:
            raise NotAcceptableError(f"peer accepts no transfer syntax we can produce from {stored}",
                                     sop_instance_uid=record.sop_uid)
        converted = transcode(fh, target)
    return pydicom.dcmread(io.BytesIO(converted))


class StoredInstance(Dataset):
    """Stands for an instance that goes to the peer exactly as stored (see :func:`send_stored`).

    It is a Dataset carrying only the SOP Class/Instance UIDs and the stored transfer syntax, because
    pynetdicom's C-GET sub-operation loop takes Datasets (and lists the SOP Instance UID of a
    failed one in the Failed SOP Instance UID List); the bytes are read from the blob when sent.
    """

    def __init__(self, blobs: BlobStore, record: InstanceRecord) -> None:
        super().__init__()
        self.SOPClassUID = record.sop_class_uid
        self.SOPInstanceUID = record.sop_uid
        self.file_meta = FileMetaDataset()
        self.file_meta.TransferSyntaxUID = UID(record.transfer_syntax_uid)
        self.blobs = blobs
        self.record = record


@contextlib.contextmanager
def local_file(blobs: BlobStore, key: str) -> Iterator[Path]:
    """A local Part 10 file holding the blob: its own file for a filesystem store, else a spooled copy."""
    with blobs.open_sync(key) as fh:
        name = getattr(fh, "name", None)
        if isinstance(name, str) and os.path.isfile(name):
            yield Path(name)
            return
        with tempfile.NamedTemporaryFile(prefix="dicomflow-send-", suffix=".dcm") as tmp:
            shutil.copyfileobj(fh, tmp, 1 << 20)
            tmp.flush()
            yield Path(tmp.name)


def send_stored(original: Callable[..., Dataset], dataset: Dataset, *args: Any, **kwargs: Any) -> Dataset:
    """``Association.send_c_store`` that sends a :class:`StoredInstance` from its file.

    pynetdicom sends a file given by path as it is (from the end of its File Meta) when the
    process-wide ``_config.STORE_SEND_CHUNKED_DATASET`` is on (set at start-up, see
    :func:`configure_pynetdicom`): no decoding, no re-encoding, flat memory. With it off, pynetdicom reads
    the file and re-encodes its raw elements, which leaves the bytes unchanged too.
    """
    if isinstance(dataset, StoredInstance):
        with local_file(dataset.blobs, dataset.record.blob_key) as path:
            return original(path, *args, **kwargs)
    return original(dataset, *args, **kwargs)


def route_stored_instances(assoc: Association) -> Callable[[], None]:
    """Make ``assoc.send_c_store`` (called by pynetdicom's C-GET sub-operation loop) understand
    :class:`StoredInstance`; returns the function that undoes it."""
    original = assoc.send_c_store

    def send(dataset: Dataset, *args: Any, **kwargs: Any) -> Dataset:
        return send_stored(original, dataset, *args, **kwargs)

    assoc.send_c_store = send  # type: ignore[method-assign,assignment]

    def undo() -> None:
        assoc.__dict__.pop("send_c_store", None)

    return undo


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom switch for senders, set once at start-up (STYLE 2.7): files sent by path
    stream from disk as they are."""
    _config.STORE_SEND_CHUNKED_DATASET = True


def _size(fh: Any) -> int:
    pos = fh.tell()
    end = int(fh.seek(0, io.SEEK_END))
    fh.seek(pos)
    return end


def _pixel_info(ds: Dataset) -> PixelInfo:
    allocated = int(ds.get("BitsAllocated", 16) or 16)
    return PixelInfo(allocated, int(ds.get("BitsStored", allocated) or allocated),
                     int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("PixelRepresentation", 0) or 0), False)


def outcome_of(status: Dataset | None) -> tuple[SubOperationOutcome, int | None]:
    """Classify a C-STORE response (PS3.4 B.2.3): an empty one means the peer never answered."""
    if status is None or "Status" not in status:
        return SubOperationOutcome.FAILED, None
    code = int(status.Status)
    category = STORAGE_SERVICE_CLASS_STATUS.get(code, ("Failure", ""))[0]
    if category == "Success":
        return SubOperationOutcome.COMPLETED, code
    if category == "Warning":
        return SubOperationOutcome.WARNING, code
    return SubOperationOutcome.FAILED, code


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle, or every small PDU waits for the peer's delayed ACK."""
    # pynetdicom's DUL thread polls its queues, sleeping _run_loop_delay (1 ms) when idle: three polls per
    # C-STORE round trip. A busy sending association polls faster; it only lives for its batch.
    event.assoc.dul._run_loop_delay = 0.0002
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):  # a socket the peer already closed
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def tls_args(node: RemoteNode, context: ssl.SSLContext | None = None) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom ``tls_args`` for a node: server certificate verified against ``context`` or the system CAs."""
    if not node.tls:
        return None
    return (context or ssl.create_default_context(ssl.Purpose.SERVER_AUTH), node.host)


def association_kwargs(node: RemoteNode, contexts: list[PresentationContext], dimse: DimseSettings,
                       ssl_context: ssl.SSLContext | None = None,
                       extra_handlers: Sequence[tuple[Any, Callable[..., Any]]] = ()) -> dict[str, Any]:
    """Keyword arguments for ``AE.associate`` towards ``node`` (also what a C-MOVE handler yields)."""
    return {
        "ae_title": node.ae_title,
        "contexts": contexts,
        "max_pdu": dimse.max_pdu,
        "tls_args": tls_args(node, ssl_context),
        "evt_handlers": [(evt.EVT_CONN_OPEN, set_nodelay), *extra_handlers],
    }


class StoreScu:
    """Sends stored instances to remote nodes, one association per batch (DICOM forward routes).

    ``send`` blocks; the routing engine calls :meth:`send_async`, which runs it on the Offloader.
    """

    def __init__(self, blobs: BlobStore, calling_ae: str, dimse: DimseSettings,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.blobs = blobs
        self.calling_ae = calling_ae
        self.dimse = dimse
        self.ssl_context = ssl_context

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self.dimse.acse_timeout
        ae.dimse_timeout = self.dimse.dimse_timeout
        ae.network_timeout = self.dimse.network_timeout
        ae.connection_timeout = self.dimse.acse_timeout
        ae.maximum_pdu_size = self.dimse.max_pdu
        return ae

    def send(self, node: RemoteNode, records: Sequence[InstanceRecord], *,
             is_cancelled: Callable[[], bool] | None = None,
             move_originator: tuple[str, int] | None = None) -> Generator[SubOperation, None, None]:
        """Send ``records`` to ``node``; yield one :class:`SubOperation` per instance, in order.

        An association that cannot be established fails every instance of its batch (detail says why);
        a cancelled send stops before the next instance.
        """
        for batch in batches(records):
            if is_cancelled is not None and is_cancelled():
                return
            kwargs = association_kwargs(node, propose_contexts(batch), self.dimse, self.ssl_context)
            assoc = self._ae().associate(node.host, node.port, **kwargs)
            if not assoc.is_established:
                why = "association rejected" if assoc.is_rejected else "association failed"
                logger.warning("C-STORE SCU: %s by %s (%s:%d)", why, node.ae_title, node.host, node.port)
                for rec in batch:
                    yield SubOperation(rec.sop_uid, SubOperationOutcome.FAILED, detail=why)
                continue
            try:
                for i, rec in enumerate(batch):
                    if is_cancelled is not None and is_cancelled():
                        return
                    if not assoc.is_established:
                        yield SubOperation(rec.sop_uid, SubOperationOutcome.FAILED, detail="association lost")
                        continue
                    yield send_instance(assoc, self.blobs, rec, msg_id=i + 1, move_originator=move_originator)
            finally:
                if assoc.is_established:
                    assoc.release()

    async def send_async(self, offloader: Offloader, node: RemoteNode,
                         records: Sequence[InstanceRecord]) -> list[SubOperation]:
        """:meth:`send` on the Offloader (never blocks the event loop)."""
        return await offloader.run(lambda: list(self.send(node, records)))


def send_instance(assoc: Association, blobs: BlobStore, rec: InstanceRecord, *, msg_id: int = 1,
                  move_originator: tuple[str, int] | None = None) -> SubOperation:
    """One C-STORE on an established association, choosing the syntax from what it accepted."""
    accepted = accepted_syntaxes(assoc, rec.sop_class_uid)
    if not accepted:
        return SubOperation(rec.sop_uid, SubOperationOutcome.FAILED,
                            detail="peer accepted no presentation context for the SOP Class")
    try:
        ds = load_for_peer(blobs, rec, accepted)
    except NotAcceptableError as exc:
        return SubOperation(rec.sop_uid, SubOperationOutcome.FAILED, detail=exc.detail)
    except Exception as exc:  # a missing or unreadable blob fails its own sub-operation, not the others
        logger.exception("C-STORE SCU: instance %s unreadable", rec.sop_uid)
        return SubOperation(rec.sop_uid, SubOperationOutcome.FAILED, detail=f"unreadable: {type(exc).__name__}")
    sent_as = str(ds.file_meta.TransferSyntaxUID)
    originator_ae, originator_id = move_originator or (None, None)
    try:
        status = send_stored(assoc.send_c_store, ds, msg_id=msg_id % 0x10000 or 1,
                             originator_aet=originator_ae, originator_id=originator_id)
    except (OSError, ValueError, AttributeError, RuntimeError) as exc:
        return SubOperation(rec.sop_uid, SubOperationOutcome.FAILED, detail=f"not sent: {exc}")
    outcome, code = outcome_of(status)
    return SubOperation(rec.sop_uid, outcome, code, _sent_syntax(assoc, rec.sop_class_uid, sent_as))


def _sent_syntax(assoc: Association, sop_class_uid: str, dataset_syntax: str) -> str:
    accepted = accepted_syntaxes(assoc, sop_class_uid)
    if dataset_syntax in accepted:
        return dataset_syntax
    # pynetdicom converted between the uncompressed little endian syntaxes
    return next((ts for ts in FALLBACK_SYNTAXES if ts in accepted), dataset_syntax)

