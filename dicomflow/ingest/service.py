"""The ingest service: spool -> parse once -> validate -> durable blob -> index rows + outbox event.

STOW-RS, C-STORE and import all call :meth:`IngestService.store`. An instance is acknowledged only
after its blob is durable and its index row and outbox event are committed in one transaction; on
any failure nothing is left behind (a blob written before a failed commit is deleted; one left by a
crash is found by ``fsck`` because no row references it).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import uuid
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, NamedTuple

from pydicom.datadict import tag_for_keyword

from dicomflow.errors import (
    DatasetMismatchError,
    DicomServiceError,
    OutOfResourcesError,
    PayloadTooLargeError,
    UnreadableInstanceError,
)
from dicomflow.index.base import IndexStore
from dicomflow.ingest.parse import parse_part10
from dicomflow.model import InstanceKey, ParsedInstance, Source, StoreOutcome, StoreResult
from dicomflow.offload import Offloader
from dicomflow.settings import Settings, TenantSettings
from dicomflow.storage.base import BlobStore, new_blob_key

logger = logging.getLogger(__name__)

#: fdatasync where the platform has it (Linux): durable contents without an inode timestamp write
_datasync = getattr(os, "fdatasync", os.fsync)

#: PS3.4 B.2.3 Warning: Elements Discarded (used when some attributes could not be indexed)
WARNING_ELEMENTS_DISCARDED = 0xB006


def extra_tags_for(tenant: TenantSettings) -> frozenset[str]:
    """Resolve a tenant's extra indexed attributes (keywords or 8-hex tags) to tag strings."""
    tags: set[str] = set()
    for item in tenant.extra_indexed_attributes:
        if len(item) == 8 and all(c in "0123456789abcdefABCDEF" for c in item):
            tags.add(item.upper())
            continue
        tag = tag_for_keyword(item)
        if tag is None:
            raise ValueError(f"unknown DICOM keyword in extra_indexed_attributes: {item!r}")
        tags.add(f"{tag:08X}")
    return frozenset(tags)


#: preamble (128) + "DICM" (PS3.10 7.1)
_PREFIX_LEN = 132
#: give up looking for the end of the File Meta Information after this many bytes
_META_LIMIT = 1 << 16
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


def _dataset_offset(head: bytes, complete: bool = False) -> int | None:
    """Where the data set starts in a Part 10 file: after the explicit VR LE group 0002 elements.

    Walks the File Meta elements (their group length is optional in practice: pydicom writes none for
    a data set made in memory). None: more bytes are needed; 0: not the PS3.10 shape, hash everything.
    """
    if len(head) < _PREFIX_LEN:
        return 0 if complete else None
    if head[128:132] != b"DICM":
        return 0
    pos = _PREFIX_LEN
    while True:
        if len(head) < pos + 8:
            return pos if complete and len(head) == pos else (0 if complete or len(head) > _META_LIMIT else None)
        group = int.from_bytes(head[pos:pos + 2], "little")
        if group != 0x0002:
            return pos
        vr = head[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            if len(head) < pos + 12:
                return 0 if complete or len(head) > _META_LIMIT else None
            pos += 12 + int.from_bytes(head[pos + 8:pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(head[pos + 6:pos + 8], "little")


class Spool:
    """A local file that receives one instance's bytes as they stream in, hashing them on the way.

    The file is created lazily by the first flush, off the event loop; small instances are written,
    fsynced and parsed in a single offloaded call (:meth:`IngestService.store`).
    """

    def __init__(self, path: Path, offloader: Offloader, max_size: int) -> None:
        self.path = path
        self._off = offloader
        self._max = max_size
        self._fh: BinaryIO | None = None
        self._hash = hashlib.sha256()
        #: bytes seen so far, the head kept until the File Meta Information length is known, and where the
        #: data set starts (None: not known yet)
        self._pos = 0
        self._head = b""
        self._dataset_start: int | None = None
        self._pending: list[bytes] = []
        self._pending_len = 0
        self.size = 0
        #: set once the file has been handed to the blob store (which moves or deletes it)
        self.consumed = False

    def _digest(self, chunk: bytes) -> None:
        """Hash the data set only, not the File Meta Information (PS3.10 7.1).

        The same instance arriving over STOW-RS and C-STORE has identical data set bytes but a different
        file meta header (implementation UID, source AE title, group length or not), and must count as
        the same content.
        """
        start = self._pos
        self._pos += len(chunk)
        if self._dataset_start is None:
            self._head += chunk
            found = _dataset_offset(self._head)
            if found is None:
                return
            self._dataset_start = found
            head, self._head = self._head, b""
            self._hash.update(memoryview(head)[found:])
            return
        offset = max(0, self._dataset_start - start)
        if offset < len(chunk):
            self._hash.update(memoryview(chunk)[offset:])

    def _flush_sync(self, chunks: list[bytes]) -> None:
        if self._fh is None:
            self._fh = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed in finish_sync()/discard()
        for chunk in chunks:
            self._digest(chunk)
            self._fh.write(chunk)

    def _add(self, size: int) -> None:
        self.size += size
        if self.size > self._max:
            raise PayloadTooLargeError("instance exceeds the configured size limit")

    async def write(self, chunk: bytes) -> None:
        self._add(len(chunk))
        self._pending.append(chunk)
        self._pending_len += len(chunk)
        if self._pending_len >= 1 << 20:
            chunks, self._pending, self._pending_len = self._pending, [], 0
            try:
                await self._off.run(self._flush_sync, chunks)
            except OSError as exc:
                raise OutOfResourcesError("spool disk full or unavailable") from exc

    def write_sync(self, data: bytes) -> None:
        """For callers already off the loop (DIMSE threads)."""
        self._add(len(data))
        self._flush_sync([data])

    def adopt_sync(self, path: Path) -> None:
        """Take over a complete Part 10 file another component wrote (pynetdicom's received data set).

        Renamed into the spool when on the same filesystem, so the bytes are not written a second time;
        read once to hash (and size-check) them either way. Blocking: for callers off the loop.
        """
        if self._fh is not None or self.size:
            raise RuntimeError("adopt_sync() on a spool that already has data")
        try:
            os.replace(path, self.path)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            with open(path, "rb") as src:
                while chunk := src.read(1 << 20):
                    self.write_sync(chunk)
            return
        self._fh = open(self.path, "rb+", buffering=0)  # noqa: SIM115 - closed in finish_sync()/discard()
        while chunk := self._fh.read(1 << 20):
            self._add(len(chunk))
            self._digest(chunk)

    def finish_sync(self) -> str:
        """Write what is pending, fsync and close; return the SHA-256 of the data set (blocking)."""
        chunks, self._pending, self._pending_len = self._pending, [], 0
        try:
            self._flush_sync(chunks)
            if self._dataset_start is None:  # the body ended inside what looked like file meta
                self._dataset_start = _dataset_offset(self._head, complete=True) or 0
                self._hash.update(memoryview(self._head)[self._dataset_start:])
            assert self._fh is not None
            _datasync(self._fh.fileno())  # contents and size durable; the blob's name: put_file
            self._fh.close()
        except OSError as exc:
            raise OutOfResourcesError("spool disk full or unavailable") from exc
        return self._hash.hexdigest()

    async def finish(self) -> str:
        """:meth:`finish_sync` through the offloader."""
        return await self._off.run(self.finish_sync)

    def discard(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.close()
        if not self.consumed:
            self.path.unlink(missing_ok=True)

    async def __aenter__(self) -> Spool:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.discard()


class Prepared(NamedTuple):
    """A spooled instance made durable and parsed: the SHA-256 of its data set and what it holds."""

    sha256: str
    parsed: ParsedInstance


class IngestService:
    """Accept instances for any tenant, from any protocol."""

    def __init__(self, settings: Settings, index: IndexStore, blobs: BlobStore, offloader: Offloader,
                 spool_dir: Path) -> None:
        self.settings = settings
        self.index = index
        self.blobs = blobs
        self._off = offloader
        self.spool_dir = spool_dir
        spool_dir.mkdir(parents=True, exist_ok=True)
        self._extra = {name: extra_tags_for(t) for name, t in settings.tenants.items()}

    def spool(self) -> Spool:
        """A new spool file for one instance (created on first write)."""
        return Spool(self.spool_dir / f"{uuid.uuid4().hex}.dcm", self._off, self.settings.limits.max_instance_size)

    def prepare(self, spool: Spool) -> Prepared:
        """Make the spool durable and parse it (blocking: never on the event loop).

        :meth:`store` runs this through the offloader. A caller already on a thread of its own (a DIMSE
        association) calls it there and passes the result to :meth:`store`: the instance then crosses to
        the event loop once instead of three times, and associations parse in parallel with the loop.
        """
        sha256 = spool.finish_sync()
        if spool.size == 0:
            raise UnreadableInstanceError("empty part: not a DICOM Part 10 file (PS3.10 7.1)")
        return Prepared(sha256, parse_part10(spool.path, self.settings.limits.bulk_data_threshold))

    async def store(self, tenant: str, spool: Spool, *, source: Source,
                    expected_study_uid: str | None = None, prepared: Prepared | None = None) -> StoreOutcome:
        """Store one spooled instance; raises a :class:`DicomServiceError` subclass on failure.

        Returns only after the blob is durable and the index rows and the ``instance.stored`` outbox
        event are committed (ARCHITECTURE: acknowledged means durable). On failure nothing is kept.
        ``prepared``: what :meth:`prepare` returned for this spool, when the caller ran it itself.
        """
        sha256, parsed = prepared if prepared is not None else await self._off.run(self.prepare, spool)
        try:
            # PS3.18 10.5.1: instances posted to /studies/{study} must belong to that study.
            if expected_study_uid is not None and parsed.study_instance_uid != expected_study_uid:
                raise DatasetMismatchError("Study Instance UID does not match the request URL")
            tenant_settings = self.settings.tenants[tenant]
            # No separate look-up for an identical resend: store_instance answers DUPLICATE inside its
            # transaction (and the new blob is deleted); a read here cost ~4 thread hops per instance.
            # From here on the store must complete even if the peer goes away: shield it.
            return await asyncio.shield(self._commit(tenant, tenant_settings, spool, parsed, sha256, source))
        except DicomServiceError as exc:
            exc.sop_instance_uid = exc.sop_instance_uid or parsed.sop_instance_uid
            exc.sop_class_uid = exc.sop_class_uid or parsed.sop_class_uid
            raise

    async def _commit(self, tenant: str, tenant_settings: TenantSettings, spool: Spool,
                      parsed: ParsedInstance, sha256: str, source: Source) -> StoreOutcome:
        key = new_blob_key(tenant)
        spool.consumed = True  # ours now: a caller that goes away must not unlink it under put_file
        try:
            await self.blobs.put_file(key, spool.path)
        except Exception as exc:
            await self._delete_blob(key)
            await self._off.run(spool.path.unlink, True)
            if isinstance(exc, DicomServiceError):
                raise
            raise OutOfResourcesError("blob storage unavailable") from exc
        try:
            record = await self.index.store_instance(
                tenant, parsed, blob_key=key, size=spool.size, sha256=sha256, source=source,
                policy=tenant_settings.duplicate_policy, extra_tags=self._extra[tenant])
        except OutOfResourcesError:
            # The connection may have broken after the COMMIT reached the database: deleting the blob of
            # a committed row would leave a row without its blob. Delete only what is known rolled back.
            if await self._committed_anyway(tenant, parsed.sop_instance_uid, key):
                logger.warning("stored tenant=%s sop=%s although the index answer was lost", tenant,
                               parsed.sop_instance_uid)
                return self._outcome(tenant, parsed, StoreResult.STORED)
            raise
        except BaseException:
            await self._delete_blob(key)
            raise
        if record.obsolete_blob_key is not None:
            await self._delete_blob(record.obsolete_blob_key)
        logger.debug("stored tenant=%s sop=%s result=%s", tenant, parsed.sop_instance_uid, record.result)
        return self._outcome(tenant, parsed, record.result)

    async def _committed_anyway(self, tenant: str, sop_uid: str, key: str) -> bool:
        """After an index failure of unknown outcome: True when the row with ``key`` was committed; else
        the blob is deleted, or left for fsck (unreferenced, it goes after the grace period) when the index
        cannot tell."""
        try:
            existing = await self.index.find_existing(tenant, sop_uid)
        except Exception:
            logger.warning("index unreachable after a failed store; blob %s left for fsck", key)
            return False
        if existing is not None and existing.blob_key == key:
            return True
        await self._delete_blob(key)
        return False

    async def _delete_blob(self, key: str) -> None:
        try:
            await self.blobs.delete(key)
        except Exception:  # left for fsck; never hide the original error
            logger.warning("could not delete blob %s; fsck will remove it", key, exc_info=True)

    def _outcome(self, tenant: str, parsed: ParsedInstance, result: StoreResult) -> StoreOutcome:
        key = InstanceKey(tenant, parsed.study_instance_uid, parsed.series_instance_uid,
                          parsed.sop_instance_uid)
        warning = WARNING_ELEMENTS_DISCARDED if parsed.warnings else None
        return StoreOutcome(key, parsed.sop_class_uid, result, warning,
                            "; ".join(parsed.warnings)[:256] if parsed.warnings else None)
