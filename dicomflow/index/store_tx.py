"""The store transaction as one synchronous unit, and a group-committing SQLite writer that runs it.

Profiling STOW showed ~10 ms per instance in :meth:`SqlIndexStore.store_instance`: each of its ~10
statements was built anew (SQLAlchemy cache-key and coercion work) and crossed to the aiosqlite
thread and back several times. Here the statements are built once with bind parameters and the
whole transaction runs on a synchronous connection: on SQLite in one dedicated writer thread (one
hop per group of instances), on PostgreSQL through ``AsyncConnection.run_sync``.

Group commit (SQLite): instances that arrive while a transaction is running are stored together in
the next one, each inside its own SAVEPOINT so that one refused instance never affects the others.
Every caller is answered only after the COMMIT that made its rows durable returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from dicomflow.errors import DatasetMismatchError, DuplicateInstanceError, OutOfResourcesError
from dicomflow.index import schema as t
from dicomflow.index.base import StoreRecord
from dicomflow.index.levels import split_levels
from dicomflow.model import ParsedInstance, Source, StoreResult
from dicomflow.settings import DuplicatePolicy

#: most instances committed by one transaction (bounds the time a failed COMMIT can cost)
MAX_GROUP = 64


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


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
    element = metadata.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    if not values:
        return None
    try:
        return int(values[0]) if values[0] is not None else None
    except (TypeError, ValueError):
        return None


def _upper(value: str | None) -> str | None:
    return value.upper() if value is not None else None


_SERIES_COLUMNS = ("study_uid", "modality", "series_number", "series_description", "series_date", "series_time",
                   "performed_procedure_step_start_date", "performed_procedure_step_start_time",
                   "body_part_examined", "attrs_json", "updated_at")
_STUDY_COLUMNS = ("patient_id", "issuer_of_patient_id", "patient_name", "patient_name_ci", "patient_birth_date",
                  "patient_sex", "study_date", "study_time", "accession_number", "study_id", "study_description",
                  "referring_physician_name", "referring_physician_name_ci", "attrs_json", "updated_at")


@dataclass(frozen=True)
class _Statements:
    """Statements built once per dialect; executed with parameters only (SQLAlchemy caches them)."""

    existing: sa.Select[Any]
    owner: sa.Select[Any]
    series_rows: sa.Select[Any]
    upsert_series: Any
    upsert_study: Any
    update_study: sa.Update
    delete_study: sa.Delete

    @classmethod
    def build(cls, dialect: str) -> _Statements:
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        b = sa.bindparam
        series_ins = insert(t.series)
        study_ins = insert(t.studies)
        study_key = (t.studies.c.tenant == b("k_tenant"), t.studies.c.study_uid == b("k_study"))
        return cls(
            existing=sa.select(t.instances.c.sha256, t.instances.c.blob_key, t.instances.c.series_uid,
                               t.instances.c.study_uid)
            .where(t.instances.c.tenant == b("k_tenant"), t.instances.c.sop_uid == b("k_sop")),
            owner=sa.select(t.series.c.study_uid)
            .where(t.series.c.tenant == b("k_tenant"), t.series.c.series_uid == b("k_series")),
            series_rows=sa.select(t.series.c.modality, t.series.c.num_instances)
            .where(t.series.c.tenant == b("k_tenant"), t.series.c.study_uid == b("k_study")),
            # the WHERE: a series created meanwhile by a concurrent store in another study is not taken over
            upsert_series=series_ins.on_conflict_do_update(
                index_elements=[t.series.c.tenant, t.series.c.series_uid],
                set_={**{c: series_ins.excluded[c] for c in _SERIES_COLUMNS},
                      "num_instances": t.series.c.num_instances + 1},
                where=t.series.c.study_uid == series_ins.excluded.study_uid),
            upsert_study=study_ins.on_conflict_do_update(
                index_elements=[t.studies.c.tenant, t.studies.c.study_uid],
                set_={c: study_ins.excluded[c] for c in _STUDY_COLUMNS}),
            update_study=sa.update(t.studies).where(*study_key).values(
                num_series=b("v_num_series"), num_instances=b("v_num_instances"),
                modalities_in_study=b("v_modalities"), updated_at=b("v_updated_at")),
            delete_study=sa.delete(t.studies).where(*study_key),
        )


_STATEMENTS: dict[str, _Statements] = {}


def statements(dialect: str) -> _Statements:
    if dialect not in _STATEMENTS:
        _STATEMENTS[dialect] = _Statements.build(dialect)
    return _STATEMENTS[dialect]


_NAMED_SQLITE = sqlite.dialect(paramstyle="named")
#: name -> (SQL text, values of the statement's own literal parameters such as ``num_instances + 1``)
_SQLITE_SQL: dict[str, tuple[str, dict[str, Any]]] = {}


class _Exec:
    """Runs the hot statements of the store transaction by name.

    SQLAlchemy Core on every dialect; on SQLite the same statements are compiled once to SQL text and run
    on the driver connection inside the same transaction, because SQLAlchemy's per-execute work (cache
    keys, parameter and result processing) was ~60 % of the writer thread's time (py-spy).
    """

    def __init__(self, conn: sa.Connection, dialect: str) -> None:
        self.conn = conn
        self._raw: Any = conn.connection.driver_connection if dialect == "sqlite" else None

    def _raw_execute(self, name: str, stmt: Any, params: dict[str, Any]) -> Any:
        cached = _SQLITE_SQL.get(name)
        if cached is None:
            keys = list(params) if isinstance(stmt, sa.Insert) else None
            compiled = stmt.compile(dialect=_NAMED_SQLITE, column_keys=keys)
            own = {k: v for k, v in compiled.params.items() if k not in params}
            cached = _SQLITE_SQL[name] = (str(compiled), own)
        sql, own = cached
        return self._raw.execute(sql, {**own, **params} if own else params)

    def rows(self, name: str, stmt: Any, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        if self._raw is not None:
            return list(self._raw_execute(name, stmt, params).fetchall())
        return [tuple(r) for r in self.conn.execute(stmt, params)]

    def run(self, name: str, stmt: Any, params: dict[str, Any]) -> int:
        """Execute a write; the number of rows it changed."""
        if self._raw is not None:
            return int(self._raw_execute(name, stmt, params).rowcount)
        return int(self.conn.execute(stmt, params).rowcount)


def refresh_study(ex: _Exec, st: _Statements, tenant: str, study_uid: str, now: float) -> None:
    """Recompute the study's computed attributes from its series rows (PS3.18 Table 10.6.3-3)."""
    key = {"k_tenant": tenant, "k_study": study_uid}
    rows = ex.rows("series_rows", st.series_rows, key)
    if not rows:
        ex.run("delete_study", st.delete_study, key)
        return
    modalities = sorted({modality for modality, _n in rows if modality})
    ex.run("update_study", st.update_study, {**key, "v_num_series": len(rows),
                                             "v_num_instances": sum(n for _m, n in rows),
                                             "v_modalities": "\\".join(modalities) or None, "v_updated_at": now})


class _Existing(NamedTuple):
    sha256: str
    blob_key: str
    series_uid: str
    study_uid: str


@dataclass(frozen=True)
class StoreJob:
    """One instance's index rows and outbox event: run with :meth:`__call__` inside a transaction."""

    dialect: str
    tenant: str
    parsed: ParsedInstance
    blob_key: str
    size: int
    sha256: str
    source: Source
    policy: DuplicatePolicy
    extra_tags: frozenset[str]

    def __call__(self, conn: sa.Connection) -> StoreRecord:
        st = statements(self.dialect)
        ex = _Exec(conn, self.dialect)
        tenant, parsed, md = self.tenant, self.parsed, self.parsed.metadata
        now = time.time()
        found = ex.rows("existing", st.existing, {"k_tenant": tenant, "k_sop": parsed.sop_instance_uid})
        existing = _Existing(*found[0]) if found else None
        result = StoreResult.STORED
        obsolete: str | None = None
        if existing is not None:
            if existing.sha256 == self.sha256:
                return StoreRecord(StoreResult.DUPLICATE, self.blob_key)
            if self.policy is not DuplicatePolicy.OVERWRITE:
                raise DuplicateInstanceError("SOP Instance UID already stored with different content",
                                             sop_instance_uid=parsed.sop_instance_uid)
            result, obsolete = StoreResult.REPLACED, existing.blob_key
            conn.execute(sa.delete(t.extra_attributes).where(
                t.extra_attributes.c.tenant == tenant, t.extra_attributes.c.sop_uid == parsed.sop_instance_uid))
            conn.execute(sa.delete(t.instances).where(
                t.instances.c.tenant == tenant, t.instances.c.sop_uid == parsed.sop_instance_uid))
            series_key = (t.series.c.tenant == tenant, t.series.c.series_uid == existing.series_uid)
            conn.execute(sa.update(t.series).where(*series_key).values(num_instances=t.series.c.num_instances - 1))
            conn.execute(sa.delete(t.series).where(*series_key, t.series.c.num_instances <= 0))
            if existing.study_uid != parsed.study_instance_uid:
                refresh_study(ex, st, tenant, existing.study_uid, now)

        owners = ex.rows("owner", st.owner, {"k_tenant": tenant, "k_series": parsed.series_instance_uid})
        owner = owners[0][0] if owners else None
        if owner is not None and owner != parsed.study_instance_uid:
            raise DatasetMismatchError("Series Instance UID already belongs to another study",
                                       sop_instance_uid=parsed.sop_instance_uid)

        ex.run("insert_instance", t.instances.insert(), {
            "tenant": tenant, "sop_uid": parsed.sop_instance_uid, "study_uid": parsed.study_instance_uid,
            "series_uid": parsed.series_instance_uid, "sop_class_uid": parsed.sop_class_uid,
            "instance_number": int_value(md, "00200013"), "transfer_syntax_uid": parsed.transfer_syntax_uid,
            "number_of_frames": parsed.number_of_frames, "pixel_data_offset": parsed.pixel_data_offset,
            "blob_key": self.blob_key, "size": self.size, "sha256": self.sha256, "metadata_json": _dumps(md),
            "created_at": now,
        })
        if self.extra_tags:
            rows = [{"tenant": tenant, "sop_uid": parsed.sop_instance_uid, "tag": tag,
                     "value": string_value(md, tag)} for tag in sorted(self.extra_tags) if tag in md]
            if rows:
                conn.execute(t.extra_attributes.insert(), rows)

        study_attrs, series_attrs = split_levels(md)
        upserted = ex.run("upsert_series", st.upsert_series, {
            "tenant": tenant, "series_uid": parsed.series_instance_uid, "num_instances": 1,
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
        })
        if upserted == 0:  # lost the race above: the series belongs to another study after all
            raise DatasetMismatchError("Series Instance UID already belongs to another study",
                                       sop_instance_uid=parsed.sop_instance_uid)
        patient_name = string_value(md, "00100010")
        referring = string_value(md, "00080090")
        ex.run("upsert_study", st.upsert_study, {
            "tenant": tenant, "study_uid": parsed.study_instance_uid,
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
        })
        refresh_study(ex, st, tenant, parsed.study_instance_uid, now)

        payload = {"event": "instance.stored", "tenant": tenant, "source": self.source.as_dict(),
                   "study_uid": parsed.study_instance_uid, "series_uid": parsed.series_instance_uid,
                   "sop_uid": parsed.sop_instance_uid, "sop_class_uid": parsed.sop_class_uid,
                   "transfer_syntax_uid": parsed.transfer_syntax_uid, "replaced": result is StoreResult.REPLACED}
        ex.run("insert_outbox", t.outbox.insert(), {
            "tenant": tenant, "event": "instance.stored", "study_uid": parsed.study_instance_uid,
            "series_uid": parsed.series_instance_uid, "sop_uid": parsed.sop_instance_uid,
            "payload_json": _dumps(payload), "created_at": now})
        return StoreRecord(result, obsolete)


#: the database itself failed (disk full, I/O error, locked): from SQLAlchemy or from the driver directly (_Exec)
_DB_FAILURES = (sa.exc.OperationalError, sqlite3.OperationalError)

_Pending = tuple[Callable[[sa.Connection], StoreRecord], "asyncio.Future[StoreRecord]"]


class SqliteGroupWriter:
    """Runs store jobs on one synchronous SQLite connection in its own thread, committing in groups.

    ``lock`` is the index's in-process writer lock: held for each group so that other writers on the
    async engine (delete, audit, routing) never interleave with it.
    """

    def __init__(self, database: str, lock: asyncio.Lock, max_group: int = MAX_GROUP) -> None:
        self._engine = sa.create_engine(f"sqlite:///{database}", poolclass=sa.pool.NullPool)
        sa.event.listen(self._engine, "connect", _sqlite_connect)
        sa.event.listen(self._engine, "begin", _sqlite_begin)
        self._lock = lock
        self._max = max_group
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dicomflow-index-writer")
        self._conn: sa.Connection | None = None
        self._pending: list[_Pending] = []
        self._drainer: asyncio.Task[None] | None = None

    async def run(self, job: Callable[[sa.Connection], StoreRecord]) -> StoreRecord:
        """Run ``job`` in the next group; returns after that group's COMMIT."""
        fut: asyncio.Future[StoreRecord] = asyncio.get_running_loop().create_future()
        self._pending.append((job, fut))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            group = [p for p in self._pending[:self._max] if not p[1].cancelled()]
            del self._pending[:self._max]
            if not group:
                continue
            try:
                async with self._lock:
                    results = await loop.run_in_executor(self._thread, self._run_group, [j for j, _f in group])
            except BaseException as exc:  # the futures carry it to every caller of this group
                results = [exc] * len(group)
            for (_job, fut), res in zip(group, results, strict=True):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    def _connection(self) -> sa.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self._engine.connect()
        return self._conn

    def _run_group(self, jobs: list[Callable[[sa.Connection], StoreRecord]]) -> list[StoreRecord | BaseException]:
        results: list[StoreRecord | BaseException] = []
        try:
            conn = self._connection()
            if len(jobs) == 1:
                try:
                    with conn.begin():  # alone: a refused instance rolls the transaction back
                        results.append(jobs[0](conn))
                except _DB_FAILURES:
                    raise
                except Exception as exc:
                    results.append(exc)
                return results
            with conn.begin():
                for job in jobs:
                    try:
                        with conn.begin_nested():  # SAVEPOINT: a refused instance leaves no rows
                            results.append(job(conn))
                    except _DB_FAILURES:
                        raise  # the database itself failed: the whole group fails
                    except Exception as exc:
                        results.append(exc)
        except _DB_FAILURES as exc:
            self._discard_connection()
            err = OutOfResourcesError("index unavailable")
            err.__cause__ = exc
            return [err] * len(jobs)
        except Exception as exc:
            self._discard_connection()
            return [exc] * len(jobs)
        return results

    def _discard_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                self._conn.close()
            self._conn = None

    def _close_sync(self) -> None:
        self._discard_connection()
        self._engine.dispose()

    async def close(self) -> None:
        if self._drainer is not None:
            await asyncio.gather(self._drainer, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close_sync)
        self._thread.shutdown(wait=True)


def sqlite_pragmas(dbapi_conn: Any, _record: Any = None) -> None:
    """Settings of every SQLite connection to the index (the engine's pool and the group writer's own)."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # the index is the record: durable commits
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # The driver must not open transactions itself, so that BEGIN IMMEDIATE and SAVEPOINT are ours
    # (SQLAlchemy pysqlite docs, "Serializable isolation / Savepoints / Transactional DDL").
    dbapi_conn.isolation_level = None
    sqlite_pragmas(dbapi_conn)


def _sqlite_begin(conn: sa.Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")
