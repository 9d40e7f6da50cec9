"""The store transaction and SQLite group commit: concurrent instances, refusals inside a group, durability."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from dicomflow.errors import DatasetMismatchError, DuplicateInstanceError
from dicomflow.index.sql import SqlIndexStore
from dicomflow.ingest.parse import configure_pydicom, parse_part10
from dicomflow.model import ParsedInstance, Protocol, Source, StoreResult
from dicomflow.settings import DuplicatePolicy
from tests.factory import make_instance

SOURCE = Source(Protocol.DICOMWEB, address="127.0.0.1")


def parsed(tmp_path: Path, **kwargs: object) -> ParsedInstance:
    configure_pydicom()
    path = tmp_path / f"{len(list(tmp_path.iterdir()))}.dcm"
    path.write_bytes(make_instance(**kwargs))
    return parse_part10(path, 1024)


async def store(index: SqlIndexStore, p: ParsedInstance, key: str, sha: str,
                policy: DuplicatePolicy = DuplicatePolicy.REJECT) -> object:
    try:
        return await index.store_instance("default", p, blob_key=key, size=1, sha256=sha, source=SOURCE,
                                          policy=policy)
    except (DuplicateInstanceError, DatasetMismatchError) as exc:
        return exc


def rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    """Read with a separate connection: what it sees is committed."""
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture
async def index(tmp_path: Path) -> SqlIndexStore:
    store = await SqlIndexStore.open(f"sqlite:///{tmp_path / 'index.sqlite'}")
    yield store  # type: ignore[misc]
    await store.close()


async def test_concurrent_stores_are_all_committed_with_right_counts(tmp_path: Path, index: SqlIndexStore) -> None:
    data = tmp_path / "in"
    data.mkdir()
    items = [parsed(data, study_uid="1.2.3", series_uid=f"1.2.3.{i % 3}", sop_uid=f"1.2.3.9.{i}",
                    modality="CT" if i % 3 else "MR") for i in range(40)]
    results = await asyncio.gather(*(store(index, p, f"k{i}", f"s{i}") for i, p in enumerate(items)))
    assert all(getattr(r, "result", None) is StoreResult.STORED for r in results)
    db = tmp_path / "index.sqlite"
    assert rows(db, "SELECT count(*) FROM instances") == [(40,)]
    assert rows(db, "SELECT count(*) FROM outbox WHERE event = 'instance.stored'") == [(40,)]
    assert rows(db, "SELECT num_series, num_instances, modalities_in_study FROM studies") == [(3, 40, "CT\\MR")]
    assert sorted(rows(db, "SELECT series_uid, num_instances FROM series")) == [
        ("1.2.3.0", 14), ("1.2.3.1", 13), ("1.2.3.2", 13)]


async def test_refused_instances_in_a_group_leave_no_rows_and_spare_the_others(
        tmp_path: Path, index: SqlIndexStore) -> None:
    data = tmp_path / "in"
    data.mkdir()
    first = parsed(data, study_uid="1.2.4", series_uid="1.2.4.1", sop_uid="1.2.4.1.1")
    assert getattr(await store(index, first, "k-first", "sha-a"), "result", None) is StoreResult.STORED
    same_uid_other_bytes = parsed(data, study_uid="1.2.4", series_uid="1.2.4.1", sop_uid="1.2.4.1.1")
    series_elsewhere = parsed(data, study_uid="1.2.5", series_uid="1.2.4.1", sop_uid="1.2.5.1.1")
    good = [parsed(data, study_uid="1.2.4", series_uid="1.2.4.1", sop_uid=f"1.2.4.1.{i}") for i in range(2, 12)]
    # all submitted together: they share transactions with the refused ones
    results = await asyncio.gather(
        store(index, same_uid_other_bytes, "k-dup", "sha-b"),
        *(store(index, p, f"k{i}", f"sha{i}") for i, p in enumerate(good[:5])),
        store(index, series_elsewhere, "k-mismatch", "sha-c"),
        *(store(index, p, f"k{i + 5}", f"sha{i + 5}") for i, p in enumerate(good[5:])),
        store(index, first, "k-again", "sha-a"),
    )
    assert isinstance(results[0], DuplicateInstanceError)
    assert isinstance(results[6], DatasetMismatchError)
    again = results[-1]
    assert getattr(again, "result", None) is StoreResult.DUPLICATE
    assert getattr(again, "obsolete_blob_key", None) == "k-again"  # the new copy is the one to delete
    stored = [r for r in results if getattr(r, "result", None) is StoreResult.STORED]
    assert len(stored) == 10
    db = tmp_path / "index.sqlite"
    assert rows(db, "SELECT count(*) FROM instances") == [(11,)]
    assert rows(db, "SELECT sha256 FROM instances WHERE sop_uid = '1.2.4.1.1'") == [("sha-a",)]
    assert rows(db, "SELECT count(*) FROM studies WHERE study_uid = '1.2.5'") == [(0,)]
    assert rows(db, "SELECT count(*) FROM outbox") == [(11,)]
    assert rows(db, "SELECT num_instances FROM series") == [(11,)]


async def test_overwrite_replaces_and_reports_the_old_blob(tmp_path: Path, index: SqlIndexStore) -> None:
    data = tmp_path / "in"
    data.mkdir()
    p = parsed(data, study_uid="1.2.6", series_uid="1.2.6.1", sop_uid="1.2.6.1.1")
    await store(index, p, "k-old", "sha-old", DuplicatePolicy.OVERWRITE)
    record = await store(index, p, "k-new", "sha-new", DuplicatePolicy.OVERWRITE)
    assert getattr(record, "result", None) is StoreResult.REPLACED
    assert getattr(record, "obsolete_blob_key", None) == "k-old"
    db = tmp_path / "index.sqlite"
    assert rows(db, "SELECT blob_key FROM instances") == [("k-new",)]
    assert rows(db, "SELECT num_instances FROM series") == [(1,)]
    assert rows(db, "SELECT num_instances FROM studies") == [(1,)]


async def test_every_index_connection_is_wal_full_sync_with_foreign_keys(tmp_path: Path) -> None:
    """The engine's pool and the group writer's own connection get the same settings (store_tx.sqlite_pragmas)."""
    from dicomflow.index.sql import make_engine
    from dicomflow.index.store_tx import SqliteGroupWriter

    pragmas = "journal_mode", "synchronous", "busy_timeout", "foreign_keys"
    expected = [("wal",), (2,), (30000,), (1,)]  # synchronous 2 = FULL
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        async with engine.connect() as conn:
            assert [tuple((await conn.exec_driver_sql(f"PRAGMA {p}")).one()) for p in pragmas] == expected
    finally:
        await engine.dispose()
    writer = SqliteGroupWriter(str(tmp_path / "index.db"), asyncio.Lock())
    with writer._engine.connect() as sync_conn:
        assert [tuple(sync_conn.exec_driver_sql(f"PRAGMA {p}").one()) for p in pragmas] == expected
        assert sync_conn.connection.dbapi_connection is not None
        assert sync_conn.connection.dbapi_connection.isolation_level is None  # BEGIN IMMEDIATE is ours
    await writer.close()
