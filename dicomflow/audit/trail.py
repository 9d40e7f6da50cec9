"""The audit sink: a bounded queue drained by one background task into a hash-chained table.

Protocol handlers call :meth:`AuditTrail.record`, which never waits. A full queue is counted, logged
at ERROR and shown by ``/readyz``; it is never silently ignored. Each tenant's records form a chain:
``hash = sha256(prev_hash || event_json)``, with the head kept in ``audit_heads`` and advanced in the
same transaction, so that ``dicomflow audit verify`` detects any edited, removed or reordered record.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dicomflow.audit.record import AuditRecord
from dicomflow.index import schema as t
from dicomflow.settings import AuditSettings, SyslogSettings

logger = logging.getLogger(__name__)

GENESIS = "0" * 64


def chain_hash(prev_hash: str, event_json: str) -> str:
    return hashlib.sha256((prev_hash + event_json).encode("utf-8")).hexdigest()


def _canonical(event: dict[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def rfc5424(event_json: str, settings: SyslogSettings, recorded: float, msgid: str) -> bytes:
    """An RFC 5424 syslog message: facility 10 (security/authorization), severity 5 (notice)."""
    pri = 10 * 8 + 5
    ts = datetime.fromtimestamp(recorded, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    host = socket.gethostname()[:255] or "-"
    return f"<{pri}>1 {ts} {host} {settings.app_name} - {msgid} - \ufeff{event_json}".encode()


class _SyslogSender:
    def __init__(self, settings: SyslogSettings) -> None:
        self.settings = settings
        self._udp: asyncio.DatagramTransport | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def send(self, message: bytes) -> None:
        if self.settings.protocol == "udp":
            if self._udp is None:
                loop = asyncio.get_running_loop()
                self._udp, _ = await loop.create_datagram_endpoint(
                    asyncio.DatagramProtocol, remote_addr=(self.settings.host, self.settings.port))
            self._udp.sendto(message)
            return
        if self._writer is None:
            _reader, self._writer = await asyncio.open_connection(self.settings.host, self.settings.port)
        self._writer.write(f"{len(message)} ".encode() + message)  # RFC 6587 octet counting
        await self._writer.drain()

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._writer is not None:
            self._writer.close()


@dataclass(frozen=True, slots=True)
class ChainProblem:
    tenant: str
    seq: int
    problem: str


class AuditTrail:
    """Append-only, hash-chained audit records in the index database."""

    def __init__(self, settings: AuditSettings, engine: AsyncEngine,
                 transaction: Callable[[], AbstractAsyncContextManager[AsyncConnection]]) -> None:
        self.settings = settings
        self.engine = engine
        self._transaction = transaction
        self._queue: asyncio.Queue[AuditRecord] = asyncio.Queue(settings.queue_size)
        self.dropped = 0
        self.written = 0
        self._last_drop_log = 0.0
        self._syslog = _SyslogSender(settings.syslog) if settings.syslog else None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- producers --------------------------------------------------------------------------------

    def record(self, rec: AuditRecord) -> None:
        """Queue a record without waiting (call from the event loop)."""
        if not self.settings.enabled:
            return
        try:
            self._queue.put_nowait(rec)
        except asyncio.QueueFull:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log > 5:
                self._last_drop_log = now
                logger.error("audit sink full: %d record(s) could not be queued so far", self.dropped)

    def record_threadsafe(self, rec: AuditRecord) -> None:
        """Queue a record from a pynetdicom thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.record, rec)

    # -- the writer -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def stop(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._syslog is not None:
            self._syslog.close()

    async def flush(self, wait_seconds: float = 10.0) -> None:
        """Wait until every queued record is written (tests, shutdown)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_seconds):
                await self._queue.join()

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 500:
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            except Exception:
                logger.exception("audit write failed for %d record(s); retrying", len(batch))
                await asyncio.sleep(1)
                for rec in batch:  # keep them: requeue in order (drops are counted by record())
                    self.record(rec)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: list[AuditRecord]) -> None:
        events = [(rec, _canonical(rec.to_fhir())) for rec in batch]
        async with self._transaction() as conn:
            heads: dict[str, tuple[int, str]] = {}
            for rec, _ in events:
                if rec.tenant in heads:
                    continue
                query = sa.select(t.audit_heads.c.seq, t.audit_heads.c.hash).where(
                    t.audit_heads.c.tenant == rec.tenant)
                if self.engine.dialect.name == "postgresql":
                    query = query.with_for_update()
                row = (await conn.execute(query)).first()
                heads[rec.tenant] = (int(row.seq), str(row.hash)) if row else (0, GENESIS)
            rows = []
            start = dict(heads)
            for rec, event_json in events:
                seq, prev = heads[rec.tenant]
                digest = chain_hash(prev, event_json)
                rows.append({"tenant": rec.tenant, "seq": seq + 1, "recorded": rec.recorded,
                             "action": rec.action.value, "outcome": int(rec.outcome),
                             "study_uid": rec.study_uids[0] if rec.study_uids else None,
                             "event_json": event_json, "prev_hash": prev, "hash": digest})
                heads[rec.tenant] = (seq + 1, digest)
            await conn.execute(t.audit_events.insert(), rows)
            for tenant, (seq, digest) in heads.items():
                if start[tenant][0] == 0:
                    await conn.execute(t.audit_heads.insert().values(tenant=tenant, seq=seq, hash=digest))
                else:
                    await conn.execute(sa.update(t.audit_heads).where(t.audit_heads.c.tenant == tenant)
                                       .values(seq=seq, hash=digest))
        self.written += len(batch)
        if self._syslog is not None:
            for rec, event_json in events:
                try:
                    await self._syslog.send(rfc5424(event_json, self._syslog.settings, rec.recorded,
                                                    rec.action.value))
                except OSError:
                    logger.warning("audit syslog forwarding failed", exc_info=True)

    # -- readers ----------------------------------------------------------------------------------

    async def query(self, tenant: str, *, since: float | None = None, until: float | None = None,
                    action: str | None = None, study_uid: str | None = None, limit: int = 100,
                    offset: int = 0) -> list[dict[str, Any]]:
        q = sa.select(t.audit_events.c.seq, t.audit_events.c.event_json, t.audit_events.c.hash).where(
            t.audit_events.c.tenant == tenant)
        if since is not None:
            q = q.where(t.audit_events.c.recorded >= since)
        if until is not None:
            q = q.where(t.audit_events.c.recorded < until)
        if action is not None:
            q = q.where(t.audit_events.c.action == action)
        if study_uid is not None:
            q = q.where(t.audit_events.c.study_uid == study_uid)
        q = q.order_by(t.audit_events.c.seq.desc()).limit(limit).offset(offset)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        out = []
        for row in rows:
            event = json.loads(row.event_json)
            event["id"] = f"{tenant}-{row.seq}"
            out.append(event)
        return out


async def verify_chain(engine: AsyncEngine, tenant: str | None = None) -> tuple[int, list[ChainProblem]]:
    """Recompute every tenant's chain; return (records checked, problems found)."""
    problems: list[ChainProblem] = []
    checked = 0
    async with engine.connect() as conn:
        heads = {r.tenant: (int(r.seq), str(r.hash)) for r in (await conn.execute(sa.select(t.audit_heads))).all()}
        tenants = [tenant] if tenant is not None else sorted(heads)
        for name in tenants:
            prev, expected_seq = GENESIS, 1
            rows: AsyncIterator[Any] = await _stream(conn, name)
            async for row in rows:
                checked += 1
                if row.seq != expected_seq:
                    problems.append(ChainProblem(name, expected_seq, f"record {expected_seq} is missing"))
                    expected_seq = row.seq
                if row.prev_hash != prev:
                    problems.append(ChainProblem(name, row.seq, "does not link to the previous record"))
                if chain_hash(row.prev_hash, row.event_json) != row.hash:
                    problems.append(ChainProblem(name, row.seq, "content does not match its hash"))
                prev, expected_seq = row.hash, row.seq + 1
            head = heads.get(name)
            if head is not None and (head[0] != expected_seq - 1 or head[1] != prev):
                problems.append(ChainProblem(name, head[0], "chain head does not match the last record "
                                                            "(records removed at the end?)"))
    return checked, problems


async def _stream(conn: AsyncConnection, tenant: str) -> AsyncIterator[Any]:
    result = await conn.stream(sa.select(t.audit_events).where(t.audit_events.c.tenant == tenant)
                               .order_by(t.audit_events.c.seq))

    async def rows() -> AsyncIterator[Any]:
        async for row in result:
            yield row

    return rows()

