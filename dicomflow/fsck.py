"""Consistency check of index, blobs, spool and outbox: ``dicomflow fsck [--repair]``.

What it finds, and what ``--repair`` does about it:

- index rows whose blob is missing (or has another size): reported; with ``--drop-missing-rows``
  the rows are deleted through the index, which emits ``instance.deleted`` so routes learn of it.
  The bytes are gone either way; keeping the row lets an operator restore the blob from a backup.
- blobs no row references (a crash between blob write and commit, a failed delete): deleted when
  older than ``--grace`` (younger ones may belong to a store still committing).
- spool files older than ``--grace`` (a crash during receive): deleted.
- S3 multipart uploads left unfinished (a crash mid-upload) older than ``--grace``: aborted.
- outbox events and deliveries whose claim expired (a worker died holding them): released, so the
  next worker picks them up (deliveries are at-least-once; connectors are idempotent).

Memory stays flat: rows and blobs are checked in batches. Nothing here logs patient data.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from dicomflow.errors import DicomServiceError, NotFoundError
from dicomflow.index import schema as t
from dicomflow.index.migrate import SchemaVersionError
from dicomflow.index.sql import SqlIndexStore
from dicomflow.model import Protocol, Source
from dicomflow.offload import Offloader
from dicomflow.settings import Settings, load_settings
from dicomflow.storage.base import BlobInfo, BlobStore
from dicomflow.storage.factory import open_blob_store, spool_dir
from dicomflow.storage.s3 import PendingUpload, S3BlobStore

logger = logging.getLogger(__name__)

BATCH = 500
FSCK_SOURCE = Source(Protocol.MAINTENANCE, subject="dicomflow-fsck")


@dataclass(frozen=True, slots=True)
class MissingBlob:
    tenant: str
    study_uid: str
    series_uid: str
    sop_uid: str
    blob_key: str
    #: None: the blob does not exist; else its actual size (differs from the indexed one)
    actual_size: int | None = None
    expected_size: int = 0


@dataclass
class FsckReport:
    """What was found and what was repaired; ``clean`` when nothing is left to do."""

    instances_checked: int = 0
    blobs_checked: int = 0
    rows_without_blobs: list[MissingBlob] = field(default_factory=list)
    size_mismatches: list[MissingBlob] = field(default_factory=list)
    orphan_blobs: list[str] = field(default_factory=list)
    #: unreferenced blobs younger than the grace period: probably a store in progress
    young_unreferenced_blobs: int = 0
    stale_spool_files: list[str] = field(default_factory=list)
    #: unfinished S3 multipart uploads (blob keys)
    stale_uploads: list[str] = field(default_factory=list)
    expired_outbox_claims: list[int] = field(default_factory=list)
    expired_delivery_claims: list[int] = field(default_factory=list)
    repaired: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def problems(self) -> dict[str, int]:
        found = {
            "rows_without_blobs": len(self.rows_without_blobs),
            "size_mismatches": len(self.size_mismatches),
            "orphan_blobs": len(self.orphan_blobs),
            "stale_spool_files": len(self.stale_spool_files),
            "stale_uploads": len(self.stale_uploads),
            "expired_outbox_claims": len(self.expired_outbox_claims),
            "expired_delivery_claims": len(self.expired_delivery_claims),
        }
        return {k: v for k, v in found.items() if v}

    @property
    def clean(self) -> bool:
        """True when every problem found has been repaired (or none was found)."""
        return all(self.repaired.get(kind, 0) >= n for kind, n in self.problems().items())

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["clean"] = self.clean
        return data


async def _instance_pages(index: SqlIndexStore) -> AsyncIterator[list[sa.Row[Any]]]:
    """Every instance row, in keyset pages (no offset scans, no table held in memory)."""
    i = t.instances
    cols = [i.c.tenant, i.c.sop_uid, i.c.study_uid, i.c.series_uid, i.c.blob_key, i.c.size]
    after: tuple[str, str] | None = None
    while True:
        query = sa.select(*cols).order_by(i.c.tenant, i.c.sop_uid).limit(BATCH)
        if after is not None:
            query = query.where(sa.tuple_(i.c.tenant, i.c.sop_uid) > sa.tuple_(*after))
        async with index.engine.connect() as conn:
            rows = list((await conn.execute(query)).all())
        if not rows:
            return
        yield rows
        after = (rows[-1].tenant, rows[-1].sop_uid)


async def _referenced(index: SqlIndexStore, keys: list[str]) -> set[str]:
    async with index.engine.connect() as conn:
        return set((await conn.execute(
            sa.select(t.instances.c.blob_key).where(t.instances.c.blob_key.in_(keys)))).scalars())


async def _still_indexed(index: SqlIndexStore, row: MissingBlob) -> bool:
    async with index.engine.connect() as conn:
        return (await conn.execute(sa.select(t.instances.c.blob_key).where(
            t.instances.c.tenant == row.tenant, t.instances.c.sop_uid == row.sop_uid))).scalar() == row.blob_key


async def _check_rows(index: SqlIndexStore, blobs: BlobStore, report: FsckReport, concurrency: int) -> None:
    slots = asyncio.Semaphore(concurrency)

    async def probe(row: sa.Row[Any]) -> MissingBlob | None:
        async with slots:
            try:
                size = await blobs.size(row.blob_key)
            except NotFoundError:
                size = None
        if size == row.size:
            return None
        return MissingBlob(row.tenant, row.study_uid, row.series_uid, row.sop_uid, row.blob_key, size, row.size)

    async for rows in _instance_pages(index):
        report.instances_checked += len(rows)
        for found in await asyncio.gather(*(probe(r) for r in rows)):
            # deleted (row and blob) while we looked: not a problem
            if found is not None and await _still_indexed(index, found):
                (report.rows_without_blobs if found.actual_size is None else report.size_mismatches).append(found)


async def _batches(items: AsyncIterator[BlobInfo], size: int) -> AsyncIterator[list[BlobInfo]]:
    batch: list[BlobInfo] = []
    async for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


async def _check_blobs(index: SqlIndexStore, blobs: BlobStore, report: FsckReport, cutoff: float) -> None:
    async for batch in _batches(blobs.iter_blobs(), BATCH):
        report.blobs_checked += len(batch)
        referenced = await _referenced(index, [b.key for b in batch])
        for blob in batch:
            if blob.key in referenced:
                continue
            if blob.modified <= cutoff:
                report.orphan_blobs.append(blob.key)
            else:
                report.young_unreferenced_blobs += 1


def _stale_spool(directory: Path, cutoff: float) -> Iterator[str]:
    if not directory.is_dir():
        return
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime <= cutoff:
                    yield entry.path
            except FileNotFoundError:  # finished meanwhile
                continue


async def _expired_claims(index: SqlIndexStore, now: float) -> tuple[list[int], list[int]]:
    ob = t.outbox
    async with index.engine.connect() as conn:
        outbox = list((await conn.execute(sa.select(ob.c.id).where(
            ob.c.done_at.is_(None), ob.c.claimed_until.is_not(None), ob.c.claimed_until < now)
            .order_by(ob.c.id))).scalars())
        deliveries: list[int] = []
        d = getattr(t, "deliveries", None)
        if d is not None:
            deliveries = list((await conn.execute(sa.select(d.c.id).where(
                d.c.status == "pending", d.c.claimed_until.is_not(None), d.c.claimed_until < now)
                .order_by(d.c.id))).scalars())
    return outbox, deliveries


def _chunks(items: list[Any], size: int = BATCH) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


async def _repair(index: SqlIndexStore, blobs: BlobStore, report: FsckReport, *, drop_missing_rows: bool,
                  offloader: Offloader, now: float) -> None:
    repaired = report.repaired
    if report.orphan_blobs:
        async with index.engine.connect() as conn:
            indexed = (await conn.execute(sa.select(sa.func.count()).select_from(t.instances))).scalar()
        if not indexed:
            report.notes.append(f"not deleting {len(report.orphan_blobs)} unreferenced blobs: the index holds no "
                                "instances at all (wrong index or storage configured?)")
        else:
            for keys in _chunks(report.orphan_blobs):
                still = await _referenced(index, keys)  # referenced meanwhile (a restore?): keep
                for key in keys:
                    if key not in still:
                        await blobs.delete(key)
                        repaired["orphan_blobs"] = repaired.get("orphan_blobs", 0) + 1
    if drop_missing_rows:
        for kind, rows in (("rows_without_blobs", report.rows_without_blobs),
                           ("size_mismatches", report.size_mismatches)):
            for row in rows:
                with contextlib.suppress(NotFoundError):  # deleted meanwhile
                    for key in await index.delete(row.tenant, row.study_uid, row.series_uid, row.sop_uid,
                                                  source=FSCK_SOURCE):
                        await blobs.delete(key)  # what is left of a damaged blob
                repaired[kind] = repaired.get(kind, 0) + 1
    elif report.rows_without_blobs or report.size_mismatches:
        report.notes.append("index rows whose blob is missing or damaged were kept: restore the blobs from a "
                            "backup, or run again with --drop-missing-rows to delete the rows")
    for path in report.stale_spool_files:
        await offloader.run(Path(path).unlink, True)
        repaired["stale_spool_files"] = repaired.get("stale_spool_files", 0) + 1
    ob = t.outbox
    async with index.transaction() as conn:
        for ids in _chunks(report.expired_outbox_claims):
            done = await conn.execute(sa.update(ob).where(
                ob.c.id.in_(ids), ob.c.done_at.is_(None), ob.c.claimed_until < now)
                .values(claimed_by=None, claimed_until=None))
            repaired["expired_outbox_claims"] = repaired.get("expired_outbox_claims", 0) + done.rowcount
        d = getattr(t, "deliveries", None)
        if d is not None:
            for ids in _chunks(report.expired_delivery_claims):
                done = await conn.execute(sa.update(d).where(
                    d.c.id.in_(ids), d.c.status == "pending", d.c.claimed_until < now)
                    .values(claimed_by=None, claimed_until=None))
                repaired["expired_delivery_claims"] = repaired.get("expired_delivery_claims", 0) + done.rowcount


async def fsck(index: SqlIndexStore, blobs: BlobStore, spool: Path, *, repair: bool = False,
               drop_missing_rows: bool = False, grace: float = 900.0, now: float | None = None,
               offloader: Offloader | None = None, concurrency: int = 16) -> FsckReport:
    """Check (and with ``repair`` fix what is safe to fix); see the module docstring."""
    now = time.time() if now is None else now
    cutoff = now - grace
    report = FsckReport()
    off = offloader or Offloader(2, name="dicomflow-fsck")
    try:
        await _check_rows(index, blobs, report, concurrency)
        await _check_blobs(index, blobs, report, cutoff)
        report.stale_spool_files = await off.run(lambda: sorted(_stale_spool(spool, cutoff)))
        uploads: list[PendingUpload] = []
        if isinstance(blobs, S3BlobStore):
            uploads = [u async for u in blobs.iter_uploads() if u.initiated <= cutoff]
            report.stale_uploads = [u.key for u in uploads]
        report.expired_outbox_claims, report.expired_delivery_claims = await _expired_claims(index, now)
        if repair:
            await _repair(index, blobs, report, drop_missing_rows=drop_missing_rows, offloader=off, now=now)
            if isinstance(blobs, S3BlobStore):
                for upload in uploads:
                    await blobs.abort_upload(upload)
                    report.repaired["stale_uploads"] = report.repaired.get("stale_uploads", 0) + 1
    finally:
        if offloader is None:
            off.shutdown()
    return report


# -- command line ---------------------------------------------------------------------------------

def _print_report(report: FsckReport, repair: bool) -> None:
    out = sys.stdout
    out.write(f"checked {report.instances_checked} instances and {report.blobs_checked} blobs\n")
    for row in report.rows_without_blobs:
        out.write(f"row without blob: tenant={row.tenant} sop={row.sop_uid} blob={row.blob_key}\n")
    for row in report.size_mismatches:
        out.write(f"blob size differs: tenant={row.tenant} sop={row.sop_uid} blob={row.blob_key} "
                  f"indexed={row.expected_size} stored={row.actual_size}\n")
    for key in report.orphan_blobs:
        out.write(f"blob without row: {key}\n")
    for path in report.stale_spool_files:
        out.write(f"stale spool file: {path}\n")
    for key in report.stale_uploads:
        out.write(f"unfinished multipart upload: {key}\n")
    if report.expired_outbox_claims:
        out.write(f"outbox events with an expired claim: {len(report.expired_outbox_claims)}\n")
    if report.expired_delivery_claims:
        out.write(f"deliveries with an expired claim: {len(report.expired_delivery_claims)}\n")
    if report.young_unreferenced_blobs:
        out.write(f"unreferenced blobs younger than the grace period (left alone): "
                  f"{report.young_unreferenced_blobs}\n")
    for note in report.notes:
        out.write(f"note: {note}\n")
    if repair:
        out.write("repaired: " + (", ".join(f"{k}={v}" for k, v in report.repaired.items()) or "nothing") + "\n")
    problems = report.problems()
    state = "clean" if report.clean else "problems: " + ", ".join(f"{k}={v}" for k, v in problems.items())
    out.write(f"fsck: {state}\n")


async def _run(settings: Settings, args: argparse.Namespace) -> FsckReport:
    offloader = Offloader(4, name="dicomflow-fsck")
    try:
        index = await SqlIndexStore.open(settings.index_url, create_schema=False)
        try:
            blobs = await open_blob_store(settings, offloader)
            try:
                return await fsck(index, blobs, spool_dir(settings), repair=args.repair,
                                  drop_missing_rows=args.drop_missing_rows, grace=args.grace,
                                  offloader=offloader)
            finally:
                await blobs.close()
        finally:
            await index.close()
    finally:
        offloader.shutdown()


def _main(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config, data_dir=args.data_dir)
        report = asyncio.run(_run(settings, args))
    except (SchemaVersionError, DicomServiceError, ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"dicomflow fsck: {exc}\n")
        return 2
    if args.json:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        _print_report(report, args.repair)
    return 0 if report.clean else 1


def register(sub: Any) -> None:
    """``dicomflow fsck``: exit 0 when consistent (or fully repaired), 1 when problems remain, 2 on error."""
    parser = sub.add_parser("fsck", help="check index, blobs, spool and outbox for inconsistencies")
    parser.add_argument("--repair", action="store_true",
                        help="delete unreferenced blobs and stale spool files, release expired claims")
    parser.add_argument("--drop-missing-rows", action="store_true",
                        help="with --repair: also delete index rows whose blob is missing or damaged")
    parser.add_argument("--grace", type=float, default=900.0,
                        help="seconds before an unreferenced blob or spool file counts as left over (900)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--config", type=Path, help="YAML settings file")
    parser.add_argument("--data-dir", type=Path)
    parser.set_defaults(func=_main)
