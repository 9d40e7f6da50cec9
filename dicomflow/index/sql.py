"""IndexStore on SQLAlchemy Core: SQLite (WAL, synchronous FULL) by default, PostgreSQL at scale."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from dicomflow.errors import DatasetMismatchError, DuplicateInstanceError, NotFoundError, OutOfResourcesError
from dicomflow.index import migrate
from dicomflow.index import schema as t
from dicomflow.index.base import InstanceRecord, StoreRecord
from dicomflow.index.levels import split_levels
from dicomflow.index.query import Query, SearchResults
from dicomflow.index.sql_search import SqlSearch
from dicomflow.model import ParsedInstance, Source, StoreResult
from dicomflow.settings import DuplicatePolicy


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def first_value(metadata: dict[str, Any], tag: str) -> Any:
    """The first value of an attribute in a PS3.18 JSON model, or None."""
    element = metadata.get(tag)
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    if not values:
        return None
    return values[0]


def string_value(metadata: dict[str, Any], tag: str) -> str | None:
    """All values of a string attribute joined with backslash (PN as its DICOM string form)."""
    element = metadata.get(tag)
    if not isinstance(element, dict) or not element.get("Value"):
        return None
    parts: list[str] = []
    for v in element["Value"]:
        if isinstance(v, dict):  # PN: {"Alphabetic": ..., "Ideographic": ..., "Phonetic": ...}
            groups = [v.get("Alphabetic", ""), v.get("Ideographic", ""), v.get("Phonetic", "")]
            while groups and not groups[-1]:
                groups.pop()
            parts.append("=".join(groups))
        else:
            parts.append(str(v))
    return "\\".join(parts)


def int_value(metadata: dict[str, Any], tag: str) -> int | None:
    value = first_value(metadata, tag)
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _upper(value: str | None) -> str | None:
    return value.upper() if value is not None else None


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

        @sa.event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # the index is the record: durable commits
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    elif url.startswith(("postgresql://", "postgres://")):
        # pre-ping: connections broken by a PostgreSQL restart are replaced, not handed out
        engine = create_async_engine("postgresql+asyncpg://" + url.split("://", 1)[1],
                                     pool_size=10, max_overflow=10, pool_pre_ping=True)
    else:
        raise ValueError(f"unsupported index URL {url!r}: use sqlite:///path or postgresql://...")
    return engine


class SqlIndexStore:
    """The index on any SQLAlchemy async engine; dialect-specific only for upserts and pragmas."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        # SQLite allows one writer: serialize writes in-process instead of spinning on SQLITE_BUSY.
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if self.dialect == "sqlite" else None

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
        md = parsed.metadata
        study_attrs, series_attrs = split_levels(md)
        now = time.time()
        async with self._write() as conn:
            existing = (await conn.execute(
                sa.select(t.instances.c.sha256, t.instances.c.blob_key, t.instances.c.series_uid,
                          t.instances.c.study_uid)
                .where(t.instances.c.tenant == tenant, t.instances.c.sop_uid == parsed.sop_instance_uid)
            )).first()
            result = StoreResult.STORED
            obsolete: str | None = None
            if existing is not None:
                if existing.sha256 == sha256:
                    return StoreRecord(StoreResult.DUPLICATE, blob_key)
                if policy is not DuplicatePolicy.OVERWRITE:
                    raise DuplicateInstanceError(
                        "SOP Instance UID already stored with different content",
                        sop_instance_uid=parsed.sop_instance_uid)
                result, obsolete = StoreResult.REPLACED, existing.blob_key
                await self._delete_instances(conn, tenant, [parsed.sop_instance_uid])
                await self._decrement_series(conn, tenant, existing.series_uid, 1)
                if existing.study_uid != parsed.study_instance_uid:
                    await self._refresh_study(conn, tenant, existing.study_uid, now)

            owner = (await conn.execute(
                sa.select(t.series.c.study_uid)
                .where(t.series.c.tenant == tenant, t.series.c.series_uid == parsed.series_instance_uid)
            )).scalar()
            if owner is not None and owner != parsed.study_instance_uid:
                raise DatasetMismatchError("Series Instance UID already belongs to another study",
                                           sop_instance_uid=parsed.sop_instance_uid)

            await conn.execute(t.instances.insert().values(
                tenant=tenant, sop_uid=parsed.sop_instance_uid, study_uid=parsed.study_instance_uid,
                series_uid=parsed.series_instance_uid, sop_class_uid=parsed.sop_class_uid,
                instance_number=int_value(md, "00200013"), transfer_syntax_uid=parsed.transfer_syntax_uid,
                number_of_frames=parsed.number_of_frames, pixel_data_offset=parsed.pixel_data_offset,
                blob_key=blob_key, size=size, sha256=sha256, metadata_json=_dumps(md), created_at=now,
            ))
            if extra_tags:
                rows = [{"tenant": tenant, "sop_uid": parsed.sop_instance_uid, "tag": tag,
                         "value": string_value(md, tag)} for tag in sorted(extra_tags) if tag in md]
                if rows:
                    await conn.execute(t.extra_attributes.insert(), rows)

            series_values = {
                "study_uid": parsed.study_instance_uid,
                "modality": string_value(md, "00080060"),
                "series_number": int_value(md, "00200011"),
                "series_description": string_value(md, "0008103E"),
                "series_date": string_value(md, "00080021"),
                "series_time": string_value(md, "00080031"),
                "performed_procedure_step_start_date": string_value(md, "00400244"),
                "performed_procedure_step_start_time": string_value(md, "00400245"),
                "body_part_examined": string_value(md, "00180015"),
                "attrs_json": _dumps(series_attrs),
                "updated_at": now,
            }
            ins = self._insert(t.series).values(tenant=tenant, series_uid=parsed.series_instance_uid,
                                                num_instances=1, **series_values)
            await conn.execute(ins.on_conflict_do_update(
                index_elements=[t.series.c.tenant, t.series.c.series_uid],
                set_={**series_values, "num_instances": t.series.c.num_instances + 1},
            ))

            patient_name = string_value(md, "00100010")
            referring = string_value(md, "00080090")
            study_values = {
                "patient_id": string_value(md, "00100020"),
                "issuer_of_patient_id": string_value(md, "00100021"),
                "patient_name": patient_name,
                "patient_name_ci": _upper(patient_name),
                "patient_birth_date": string_value(md, "00100030"),
                "patient_sex": string_value(md, "00100040"),
                "study_date": string_value(md, "00080020"),
                "study_time": string_value(md, "00080030"),
                "accession_number": string_value(md, "00080050"),
                "study_id": string_value(md, "00200010"),
                "study_description": string_value(md, "00081030"),
                "referring_physician_name": referring,
                "referring_physician_name_ci": _upper(referring),
                "attrs_json": _dumps(study_attrs),
                "updated_at": now,
            }
            ins = self._insert(t.studies).values(tenant=tenant, study_uid=parsed.study_instance_uid,
                                                 **study_values)
            await conn.execute(ins.on_conflict_do_update(
                index_elements=[t.studies.c.tenant, t.studies.c.study_uid], set_=study_values))
            await self._refresh_study(conn, tenant, parsed.study_instance_uid, now)

            await self._emit(conn, tenant, "instance.stored", source, now,
                             study_uid=parsed.study_instance_uid, series_uid=parsed.series_instance_uid,
                             sop_uid=parsed.sop_instance_uid,
                             extra={"sop_class_uid": parsed.sop_class_uid,
                                    "transfer_syntax_uid": parsed.transfer_syntax_uid,
                                    "replaced": result is StoreResult.REPLACED})
        return StoreRecord(result, obsolete)

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
