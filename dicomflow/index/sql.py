"""IndexStore on SQLAlchemy Core: SQLite (WAL, synchronous FULL) by default, PostgreSQL at scale."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from dicomflow.errors import NotFoundError, OutOfResourcesError
from dicomflow.index import migrate
from dicomflow.index import schema as t
from dicomflow.index.base import InstanceRecord, StoreRecord
from dicomflow.index.query import Query, SearchResults
from dicomflow.index.sql_search import SqlSearch
from dicomflow.index.store_tx import SqliteGroupWriter, StoreJob, sqlite_pragmas
from dicomflow.model import ParsedInstance, Source
from dicomflow.settings import DuplicatePolicy


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _to_record(row: sa.Row[Any]) -> InstanceRecord:
    m = row._mapping
    return InstanceRecord(
        tenant=m["tenant"], study_uid=m["study_uid"], series_uid=m["series_uid"], sop_uid=m["sop_uid"],
        sop_class_uid=m["sop_class_uid"], instance_number=m["instance_number"],
        transfer_syntax_uid=m["transfer_syntax_uid"], number_of_frames=m["number_of_frames"],
        pixel_data_offset=m["pixel_data_offset"], blob_key=m["blob_key"], size=m["size"], sha256=m["sha256"],
    )


_RECORD_COLUMNS = [
    t.instances.c.tenant, t.instances.c.study_uid, t.instances.c.series_uid, t.instances.c.sop_uid,
    t.instances.c.sop_class_uid, t.instances.c.instance_number, t.instances.c.transfer_syntax_uid,
    t.instances.c.number_of_frames, t.instances.c.pixel_data_offset, t.instances.c.blob_key,
    t.instances.c.size, t.instances.c.sha256,
]


def make_engine(url: str) -> AsyncEngine:
    """An async engine for ``sqlite:///path`` (WAL, synchronous FULL) or ``postgresql://...`` (asyncpg)."""
    if url.startswith("sqlite:///"):
        engine = create_async_engine("sqlite+aiosqlite:///" + url[len("sqlite:///"):],
                                     pool_size=8, max_overflow=8)
        sa.event.listen(engine.sync_engine, "connect", sqlite_pragmas)
    elif url.startswith(("postgresql://", "postgres://")):
        # pool_size / max_overflow / pool_timeout in the URL's query size this process's pool (every server
        # and worker has one: keep their sum under the server's max_connections); the rest goes to asyncpg
        parts = urlsplit("postgresql://" + url.split("://", 1)[1])
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        try:
            pool = {"pool_size": int(query.pop("pool_size", 10)), "max_overflow": int(query.pop("max_overflow", 10)),
                    "pool_timeout": float(query.pop("pool_timeout", 30))}
        except ValueError:
            raise ValueError("index URL: pool_size and max_overflow are integers, pool_timeout seconds") from None
        dsn = urlunsplit(parts._replace(query=urlencode(query)))

        async def connect() -> Any:
            try:
                return await asyncpg.connect(dsn, timeout=10)
            except (OSError, TimeoutError, asyncpg.CannotConnectNowError,
                    asyncpg.TooManyConnectionsError) as exc:
                raise OutOfResourcesError("index database unavailable") from exc

        # pre-ping: connections broken by a PostgreSQL restart are replaced, not handed out
        engine = create_async_engine("postgresql+asyncpg://", async_creator=connect, pool_pre_ping=True, **pool)
    else:
        raise ValueError(f"unsupported index URL {url!r}: use sqlite:///path or postgresql://...")
    sa.event.listen(engine.sync_engine, "handle_error", _unavailable)
    return engine


#: SQLSTATE classes/codes meaning "the database is not there right now" (PostgreSQL Appendix A):
#: 08 connection exception, 53 insufficient resources, 57P01-57P03 shutdown / cannot connect now
_UNAVAILABLE_STATES = ("08", "53", "57P01", "57P02", "57P03")


def _unavailable(context: sa.engine.ExceptionContext) -> None:
    """Every query path, ours or others': a database that is down or full is 503 / 0xA700, not 500."""
    original = context.original_exception
    state = str(getattr(original, "sqlstate", "") or "")
    if context.is_disconnect or isinstance(original, (OSError, TimeoutError)) or (
            state and state.startswith(_UNAVAILABLE_STATES)):
        raise OutOfResourcesError("index database unavailable") from original


class SqlIndexStore:
    """The index on any SQLAlchemy async engine; dialect-specific only for upserts and pragmas."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        # SQLite allows one writer: serialize writes in-process instead of spinning on SQLITE_BUSY.
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if self.dialect == "sqlite" else None
        database = engine.url.database
        # SQLite: instances are committed in groups by one writer thread (store_tx.SqliteGroupWriter)
        self._writer = (SqliteGroupWriter(database, self._write_lock)
                        if self._write_lock is not None and database and database != ":memory:" else None)

    @classmethod
    async def open(cls, url: str, *, create_schema: bool | None = None) -> SqlIndexStore:
        """Open the index behind ``sqlite:///path`` or ``postgresql://...``.

        The schema must be at this code's version (:mod:`dicomflow.index.migrate`; ``dicomflow db
        upgrade``). An empty database gets the schema when ``create_schema`` is true, which is the
        default for SQLite (the embedded default starts with nothing) but not for PostgreSQL.
        """
        engine = make_engine(url)
        store = cls(engine)
        try:
            await migrate.prepare(engine, create_if_empty=store.dialect == "sqlite"
                                  if create_schema is None else create_schema)
        except BaseException:
            await engine.dispose()
            raise
        return store

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.close()
        await self.engine.dispose()

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        try:
            if self._write_lock is None:
                async with self.engine.begin() as conn:
                    yield conn
            else:
                async with self._write_lock, self.engine.begin() as conn:
                    yield conn
        except sa.exc.OperationalError as exc:
            raise OutOfResourcesError("index unavailable") from exc

    def transaction(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A write transaction for other parts sharing the index database (audit, routing).

        On SQLite it holds the same in-process writer lock as the ingest path.
        """
        return self._write()

    def _insert(self, table: sa.Table) -> Any:
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    # -- writes -----------------------------------------------------------------------------------

    async def store_instance(
        self, tenant: str, parsed: ParsedInstance, *, blob_key: str, size: int, sha256: str,
        source: Source, policy: DuplicatePolicy, extra_tags: frozenset[str] = frozenset(),
    ) -> StoreRecord:
        # one synchronous unit with statements built once (see store_tx for why and the measured gain)
        job = StoreJob(self.dialect, tenant, parsed, blob_key, size, sha256, source, policy, extra_tags)
        if self._writer is not None:
            return await self._writer.run(job)
        for attempt in range(3):
            try:
                async with self._write() as conn:
                    return await conn.run_sync(job)
            except sa.exc.IntegrityError:
                # another process inserted the same SOP Instance UID meanwhile: run again, and see
                # its row (duplicate, 409 or overwrite) exactly as if the two had come one after the other
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _emit(self, conn: AsyncConnection, tenant: str, event: str, source: Source, now: float, *,
                    study_uid: str, series_uid: str | None = None, sop_uid: str | None = None,
                    extra: dict[str, Any] | None = None) -> None:
        payload: dict[str, Any] = {"event": event, "tenant": tenant, "source": source.as_dict(),
                                   "study_uid": study_uid, "series_uid": series_uid, "sop_uid": sop_uid,
                                   **(extra or {})}
        await conn.execute(t.outbox.insert().values(
            tenant=tenant, event=event, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid,
            payload_json=_dumps(payload), created_at=now))

    async def _delete_instances(self, conn: AsyncConnection, tenant: str, sop_uids: Sequence[str]) -> None:
        await conn.execute(sa.delete(t.extra_attributes).where(
            t.extra_attributes.c.tenant == tenant, t.extra_attributes.c.sop_uid.in_(sop_uids)))
        await conn.execute(sa.delete(t.instances).where(
            t.instances.c.tenant == tenant, t.instances.c.sop_uid.in_(sop_uids)))

    async def _decrement_series(self, conn: AsyncConnection, tenant: str, series_uid: str, n: int) -> None:
        key = (t.series.c.tenant == tenant, t.series.c.series_uid == series_uid)
        await conn.execute(sa.update(t.series).where(*key).values(num_instances=t.series.c.num_instances - n))
        await conn.execute(sa.delete(t.series).where(*key, t.series.c.num_instances <= 0))

    async def _refresh_study(self, conn: AsyncConnection, tenant: str, study_uid: str, now: float) -> None:
        """Recompute the study's computed attributes from its series rows (PS3.18 Table 10.6.3-3)."""
        rows = (await conn.execute(
            sa.select(t.series.c.modality, t.series.c.num_instances)
            .where(t.series.c.tenant == tenant, t.series.c.study_uid == study_uid))).all()
        key = (t.studies.c.tenant == tenant, t.studies.c.study_uid == study_uid)
        if not rows:
            await conn.execute(sa.delete(t.studies).where(*key))
            return
        modalities = sorted({r.modality for r in rows if r.modality})
        await conn.execute(sa.update(t.studies).where(*key).values(
            num_series=len(rows), num_instances=sum(r.num_instances for r in rows),
            modalities_in_study="\\".join(modalities) or None, updated_at=now))

    async def delete(
        self, tenant: str, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None,
        *, source: Source,
    ) -> list[str]:
        now = time.time()
        async with self._write() as conn:
            query = sa.select(t.instances.c.sop_uid, t.instances.c.series_uid, t.instances.c.blob_key).where(
                t.instances.c.tenant == tenant, t.instances.c.study_uid == study_uid)
            if series_uid is not None:
                query = query.where(t.instances.c.series_uid == series_uid)
            if sop_uid is not None:
                query = query.where(t.instances.c.sop_uid == sop_uid)
            rows = (await conn.execute(query)).all()
            if not rows:
                raise NotFoundError("no such study, series or instance")
            for start in range(0, len(rows), 500):
                await self._delete_instances(conn, tenant, [r.sop_uid for r in rows[start:start + 500]])
            per_series: dict[str, int] = {}
            for r in rows:
                per_series[r.series_uid] = per_series.get(r.series_uid, 0) + 1
            for s_uid, n in per_series.items():
                await self._decrement_series(conn, tenant, s_uid, n)
            await self._refresh_study(conn, tenant, study_uid, now)
            level = "instance" if sop_uid else "series" if series_uid else "study"
            await self._emit(conn, tenant, f"{level}.deleted", source, now, study_uid=study_uid,
                             series_uid=series_uid, sop_uid=sop_uid, extra={"instances": len(rows)})
        return [r.blob_key for r in rows]

    # -- reads ------------------------------------------------------------------------------------

    async def find_existing(self, tenant: str, sop_uid: str) -> InstanceRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(*_RECORD_COLUMNS).where(
                t.instances.c.tenant == tenant, t.instances.c.sop_uid == sop_uid))).first()
        return _to_record(row) if row is not None else None

    def _instances_query(self, columns: Sequence[Any], tenant: str, study_uid: str, series_uid: str | None,
                         sop_uid: str | None) -> sa.Select[Any]:
        query = sa.select(*columns).where(t.instances.c.tenant == tenant, t.instances.c.study_uid == study_uid)
        if series_uid is not None:
            query = query.where(t.instances.c.series_uid == series_uid)
        if sop_uid is not None:
            query = query.where(t.instances.c.sop_uid == sop_uid)
        return query.order_by(t.instances.c.series_uid, t.instances.c.instance_number, t.instances.c.sop_uid)

    async def list_instances(
        self, tenant: str, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
    ) -> list[InstanceRecord]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(
                self._instances_query(_RECORD_COLUMNS, tenant, study_uid, series_uid, sop_uid))).all()
        return [_to_record(r) for r in rows]

    async def instance_metadata(
        self, tenant: str, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
    ) -> list[str]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(self._instances_query(
                [t.instances.c.metadata_json], tenant, study_uid, series_uid, sop_uid))).scalars().all()
        return list(rows)

    async def instance_metadata_keyed(
        self, tenant: str, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
    ) -> list[tuple[str, str, str]]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(self._instances_query(
                [t.instances.c.series_uid, t.instances.c.sop_uid, t.instances.c.metadata_json],
                tenant, study_uid, series_uid, sop_uid))).all()
        return [(r[0], r[1], r[2]) for r in rows]

    async def stored_sop_instances(self, tenant: str, sop_uids: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        async with self.engine.connect() as conn:
            for start in range(0, len(sop_uids), 500):
                rows = (await conn.execute(sa.select(t.instances.c.sop_uid, t.instances.c.sop_class_uid).where(
                    t.instances.c.tenant == tenant,
                    t.instances.c.sop_uid.in_(sop_uids[start:start + 500])))).all()
                found.update({r.sop_uid: r.sop_class_uid for r in rows})
        return found

    def search(self, tenant: str, query: Query) -> SearchResults:
        """QIDO-RS / C-FIND matches, streamed (:mod:`dicomflow.index.query`, :mod:`.sql_search`)."""
        return SqlSearch(self.engine).search(tenant, query)
