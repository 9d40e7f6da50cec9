"""PostgreSQL stopped and restarted while the index is in use: 503/0xA700 meanwhile, then it resumes."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from dicomflow.errors import OutOfResourcesError
from dicomflow.index.sql import SqlIndexStore, make_engine
from dicomflow.ingest.parse import parse_part10
from dicomflow.model import Protocol, Source, StoreResult
from dicomflow.settings import DuplicatePolicy
from dicomflow.storage.base import new_blob_key
from tests.factory import make_dataset, to_bytes
from tests.harness.postgres import PgCluster, run_async, upgrade_schema

pytestmark = pytest.mark.integration


@pytest.fixture
def private_cluster() -> Iterator[PgCluster]:
    """A cluster of this test's own: it gets stopped, which the shared one must not be."""
    cluster = PgCluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def index(private_cluster: PgCluster) -> AsyncIterator[SqlIndexStore]:
    run_async(upgrade_schema(private_cluster.admin_url))
    store = await SqlIndexStore.open(private_cluster.admin_url)
    yield store
    await store.close()


async def store_one(index: SqlIndexStore, tmp_path: Path, study: str) -> tuple[str, StoreResult]:
    data = to_bytes(make_dataset(study_uid=study))
    path = tmp_path / f"{uuid.uuid4().hex}.dcm"
    path.write_bytes(data)
    parsed = parse_part10(path, 1024)
    record = await index.store_instance(
        "default", parsed, blob_key=new_blob_key("default"), size=len(data),
        sha256=hashlib.sha256(data).hexdigest(), source=Source(Protocol.DICOMWEB), policy=DuplicatePolicy.REJECT)
    return parsed.sop_instance_uid, record.result


async def test_index_survives_a_postgresql_restart(index: SqlIndexStore, private_cluster: PgCluster,
                                                   tmp_path: Path) -> None:
    study = make_dataset().StudyInstanceUID
    first, result = await store_one(index, tmp_path, study)
    assert result is StoreResult.STORED

    private_cluster.pause()
    for attempt in (store_one(index, tmp_path, study), index.find_existing("default", first),
                    index.list_instances("default", study)):
        with pytest.raises(OutOfResourcesError) as err:
            await attempt
        assert (err.value.http_status, err.value.dimse_status) == (503, 0xA700)

    private_cluster.resume()
    # pooled connections died with the old server: pre-ping replaces them, no request fails
    second, result = await store_one(index, tmp_path, study)
    assert result is StoreResult.STORED
    assert sorted(r.sop_uid for r in await index.list_instances("default", study)) == sorted([first, second])


async def test_pool_settings_from_the_url(pg_url: str, tmp_path: Path) -> None:
    """Each process sizes its own pool (servers x pool <= max_connections); other parameters reach asyncpg."""
    await upgrade_schema(pg_url)
    index = await SqlIndexStore.open(pg_url + "?pool_size=2&max_overflow=0&pool_timeout=20"
                                              "&application_name=dicomflow-pool-test")
    try:
        pool = index.engine.sync_engine.pool
        assert (pool.size(), pool._max_overflow) == (2, 0)  # type: ignore[attr-defined]
        study = make_dataset().StudyInstanceUID
        await asyncio.gather(*(store_one(index, tmp_path, study) for _ in range(8)))  # queue for 2 connections
        assert len(await index.list_instances("default", study)) == 8
        async with index.engine.connect() as conn:
            name = (await conn.execute(sa.text("SELECT current_setting('application_name')"))).scalar()
        assert name == "dicomflow-pool-test"
    finally:
        await index.close()
    with pytest.raises(ValueError, match="pool_size"):
        make_engine(pg_url + "?pool_size=many")
