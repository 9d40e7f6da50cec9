"""The IndexStore contract (dicomflow/index/base.py) on SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid

from dicomflow.errors import DatasetMismatchError, DuplicateInstanceError, NotFoundError
from dicomflow.index import schema as t
from dicomflow.index.query import parse_qido
from dicomflow.index.sql import SqlIndexStore
from dicomflow.ingest.parse import parse_part10
from dicomflow.model import Level, ParsedInstance, Protocol, Source, StoreResult
from dicomflow.settings import DuplicatePolicy
from dicomflow.storage.base import new_blob_key
from tests.factory import make_instance

SOURCE = Source(Protocol.DICOMWEB, subject="contract-test")


@dataclass
class Inst:
    parsed: ParsedInstance
    size: int
    sha256: str

    @property
    def sop(self) -> str:
        return self.parsed.sop_instance_uid


@pytest.fixture
def inst(tmp_path: Path) -> Any:
    def build(**kwargs: Any) -> Inst:
        data = make_instance(**kwargs)
        path = tmp_path / f"{uuid.uuid4().hex}.dcm"
        path.write_bytes(data)
        return Inst(parse_part10(path, 1024), len(data), hashlib.sha256(data).hexdigest())

    return build


async def store(index: SqlIndexStore, tenant: str, i: Inst, *, policy: DuplicatePolicy = DuplicatePolicy.REJECT,
                blob_key: str | None = None, extra_tags: frozenset[str] = frozenset()) -> tuple[Any, str]:
    key = blob_key or new_blob_key(tenant)
    record = await index.store_instance(tenant, i.parsed, blob_key=key, size=i.size, sha256=i.sha256,
                                        source=SOURCE, policy=policy, extra_tags=extra_tags)
    return record, key


async def outbox(index: SqlIndexStore, tenant: str) -> list[dict[str, Any]]:
    async with index.engine.connect() as conn:
        rows = (await conn.execute(sa.select(t.outbox).where(t.outbox.c.tenant == tenant)
                                   .order_by(t.outbox.c.id))).all()
    return [{**r._mapping, "payload": json.loads(r.payload_json)} for r in rows]


async def counts(index: SqlIndexStore, tenant: str, study: str) -> tuple[int, int, dict[str, int]]:
    async with index.engine.connect() as conn:
        row = (await conn.execute(sa.select(t.studies.c.num_series, t.studies.c.num_instances).where(
            t.studies.c.tenant == tenant, t.studies.c.study_uid == study))).first()
        series = (await conn.execute(sa.select(t.series.c.series_uid, t.series.c.num_instances).where(
            t.series.c.tenant == tenant, t.series.c.study_uid == study))).all()
    if row is None:
        return 0, 0, {}
    return row.num_series, row.num_instances, {s.series_uid: s.num_instances for s in series}


async def test_store_find_list_metadata_and_event(index: SqlIndexStore, inst: Any) -> None:
    i = inst(patient_name="Doe^Jane", modality="MR", instance_number=7)
    record, key = await store(index, "acme", i)
    assert record.result is StoreResult.STORED and record.obsolete_blob_key is None

    found = await index.find_existing("acme", i.sop)
    assert found is not None
    assert (found.tenant, found.study_uid, found.series_uid, found.sop_uid) == (
        "acme", i.parsed.study_instance_uid, i.parsed.series_instance_uid, i.sop)
    assert (found.blob_key, found.size, found.sha256, found.instance_number) == (key, i.size, i.sha256, 7)
    assert found.sop_class_uid == i.parsed.sop_class_uid
    assert found.transfer_syntax_uid == i.parsed.transfer_syntax_uid
    assert found.pixel_data_offset == i.parsed.pixel_data_offset and found.pixel_data_offset

    assert await index.list_instances("acme", i.parsed.study_instance_uid) == [found]
    [meta] = await index.instance_metadata("acme", i.parsed.study_instance_uid)
    model = json.loads(meta)
    assert model["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane"}]
    assert model["00080060"]["Value"] == ["MR"]

    [event] = await outbox(index, "acme")
    assert event["event"] == "instance.stored" and event["done_at"] is None and event["claimed_by"] is None
    assert (event["study_uid"], event["series_uid"], event["sop_uid"]) == (
        i.parsed.study_instance_uid, i.parsed.series_instance_uid, i.sop)
    assert event["payload"]["source"] == {"protocol": "dicomweb", "subject": "contract-test"}
    assert event["payload"]["replaced"] is False
    assert await counts(index, "acme", i.parsed.study_instance_uid) == (
        1, 1, {i.parsed.series_instance_uid: 1})


async def test_identical_duplicate_changes_nothing(index: SqlIndexStore, inst: Any) -> None:
    i = inst()
    _, first_key = await store(index, "acme", i)
    record, second_key = await store(index, "acme", i)
    assert record.result is StoreResult.DUPLICATE
    assert record.obsolete_blob_key == second_key, "the second blob is the one to delete"
    found = await index.find_existing("acme", i.sop)
    assert found is not None and found.blob_key == first_key
    assert len(await outbox(index, "acme")) == 1
    assert (await counts(index, "acme", i.parsed.study_instance_uid))[1] == 1


async def test_different_bytes_rejected(index: SqlIndexStore, inst: Any) -> None:
    sop = generate_uid()
    a = inst(sop_uid=sop, patient_name="A^A")
    b = inst(sop_uid=sop, patient_name="B^B", study_uid=a.parsed.study_instance_uid,
             series_uid=a.parsed.series_instance_uid)
    _, key = await store(index, "acme", a)
    with pytest.raises(DuplicateInstanceError) as err:
        await store(index, "acme", b)
    assert (err.value.http_status, err.value.dimse_status) == (409, 0x0111)
    found = await index.find_existing("acme", sop)
    assert found is not None and (found.blob_key, found.sha256) == (key, a.sha256)
    assert len(await outbox(index, "acme")) == 1


async def test_overwrite_replaces_and_can_move_the_instance(index: SqlIndexStore, inst: Any) -> None:
    sop = generate_uid()
    a = inst(sop_uid=sop, instance_number=1)
    keep = inst(study_uid=a.parsed.study_instance_uid, series_uid=a.parsed.series_instance_uid, instance_number=2)
    _, old_key = await store(index, "globex", a)
    await store(index, "globex", keep)
    b = inst(sop_uid=sop, instance_number=1, study_uid=a.parsed.study_instance_uid,
             series_uid=a.parsed.series_instance_uid, patient_name="New^Name")
    record, new_key = await store(index, "globex", b, policy=DuplicatePolicy.OVERWRITE)
    assert record.result is StoreResult.REPLACED and record.obsolete_blob_key == old_key
    found = await index.find_existing("globex", sop)
    assert found is not None and (found.blob_key, found.sha256) == (new_key, b.sha256)
    assert await counts(index, "globex", a.parsed.study_instance_uid) == (
        1, 2, {a.parsed.series_instance_uid: 2})

    # overwritten with a copy that belongs to another study: the old study keeps only `keep`
    c = inst(sop_uid=sop, instance_number=1)
    record, _ = await store(index, "globex", c, policy=DuplicatePolicy.OVERWRITE)
    assert record.result is StoreResult.REPLACED and record.obsolete_blob_key == new_key
    assert await counts(index, "globex", a.parsed.study_instance_uid) == (
        1, 1, {a.parsed.series_instance_uid: 1})
    assert await counts(index, "globex", c.parsed.study_instance_uid) == (
        1, 1, {c.parsed.series_instance_uid: 1})
    events = [e["payload"].get("replaced") for e in await outbox(index, "globex")]
    assert events == [False, False, True, True]


async def test_series_in_another_study_is_rejected(index: SqlIndexStore, inst: Any) -> None:
    a = inst()
    await store(index, "acme", a)
    b = inst(series_uid=a.parsed.series_instance_uid)  # new study, same series
    with pytest.raises(DatasetMismatchError) as err:
        await store(index, "acme", b)
    assert (err.value.http_status, err.value.dimse_status) == (400, 0xA900)
    assert await index.find_existing("acme", b.sop) is None
    assert await index.list_instances("acme", b.parsed.study_instance_uid) == []
    assert len(await outbox(index, "acme")) == 1


async def test_list_and_metadata_order(index: SqlIndexStore, inst: Any) -> None:
    """Series by UID (byte order, whatever the database collation), then instance number as a number."""
    study = generate_uid()
    series = ["1.2.34", "1.23.4", "1.2.9", "1.2.10"]
    for s in series:
        for n in (10, 2, 1):
            await store(index, "acme", inst(study_uid=study, series_uid=s, instance_number=n))
    listed = await index.list_instances("acme", study)
    assert [(r.series_uid, r.instance_number) for r in listed] == [
        (s, n) for s in sorted(series) for n in (1, 2, 10)]
    metadata = [json.loads(m) for m in await index.instance_metadata("acme", study)]
    assert [(m["0020000E"]["Value"][0], m["00200013"]["Value"][0]) for m in metadata] == [
        (s, n) for s in sorted(series) for n in (1, 2, 10)]
    only = await index.list_instances("acme", study, "1.2.9")
    assert [r.instance_number for r in only] == [1, 2, 10]
    one = await index.instance_metadata("acme", study, "1.2.9", only[1].sop_uid)
    assert len(one) == 1 and json.loads(one[0])["00080018"]["Value"] == [only[1].sop_uid]


async def test_delete_levels_counts_and_events(index: SqlIndexStore, inst: Any) -> None:
    study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    a = [inst(study_uid=study, series_uid=s1, instance_number=n) for n in (1, 2, 3)]
    b = [inst(study_uid=study, series_uid=s2, instance_number=n, modality="MR") for n in (1, 2)]
    keys = {}
    for i in a + b:
        keys[i.sop] = (await store(index, "acme", i))[1]
    assert await counts(index, "acme", study) == (2, 5, {s1: 3, s2: 2})

    assert await index.delete("acme", study, s1, a[0].sop, source=SOURCE) == [keys[a[0].sop]]
    assert await counts(index, "acme", study) == (2, 4, {s1: 2, s2: 2})
    assert sorted(await index.delete("acme", study, s2, source=SOURCE)) == sorted(keys[i.sop] for i in b)
    assert await counts(index, "acme", study) == (1, 2, {s1: 2})
    async with index.engine.connect() as conn:
        modalities = (await conn.execute(sa.select(t.studies.c.modalities_in_study).where(
            t.studies.c.study_uid == study))).scalar()
    assert modalities == "CT"
    assert sorted(await index.delete("acme", study, source=SOURCE)) == sorted(keys[i.sop] for i in a[1:])
    assert await counts(index, "acme", study) == (0, 0, {})
    with pytest.raises(NotFoundError):
        await index.delete("acme", study, source=SOURCE)
    assert await index.list_instances("acme", study) == []

    deleted = [(e["event"], e["payload"]["instances"]) for e in await outbox(index, "acme")
               if e["event"].endswith(".deleted")]
    assert deleted == [("instance.deleted", 1), ("series.deleted", 2), ("study.deleted", 2)]


async def test_tenants_are_isolated(index: SqlIndexStore, inst: Any) -> None:
    i = inst()
    _, acme_key = await store(index, "acme", i)
    record, globex_key = await store(index, "globex", i)
    assert record.result is StoreResult.STORED, "the same instance in another tenant is a new instance"
    assert (await index.list_instances("acme", i.parsed.study_instance_uid))[0].blob_key == acme_key
    assert (await index.list_instances("globex", i.parsed.study_instance_uid))[0].blob_key == globex_key
    assert await index.list_instances("initech", i.parsed.study_instance_uid) == []
    assert await index.find_existing("initech", i.sop) is None
    assert await index.stored_sop_instances("initech", [i.sop]) == {}
    with pytest.raises(NotFoundError):
        await index.delete("initech", i.parsed.study_instance_uid, source=SOURCE)

    await index.delete("acme", i.parsed.study_instance_uid, source=SOURCE)
    assert await index.find_existing("acme", i.sop) is None
    assert await index.find_existing("globex", i.sop) is not None
    assert [e["event"] for e in await outbox(index, "globex")] == ["instance.stored"]
    # a series UID used in one tenant does not constrain another
    other = inst(series_uid=i.parsed.series_instance_uid)
    assert (await store(index, "initech", other))[0].result is StoreResult.STORED


async def test_stored_sop_instances_in_batches(index: SqlIndexStore, inst: Any) -> None:
    stored = [inst(pixels=False) for _ in range(3)]
    for i in stored:
        await store(index, "acme", i)
    asked = [generate_uid() for _ in range(1200)] + [i.sop for i in stored]
    assert await index.stored_sop_instances("acme", asked) == {i.sop: i.parsed.sop_class_uid for i in stored}


async def test_extra_indexed_attributes(index: SqlIndexStore, inst: Any) -> None:
    i = inst(BodyPartExamined="CHEST", ProtocolName="Thorax")
    await store(index, "acme", i, extra_tags=frozenset({"00181030", "00080070"}))  # ProtocolName, Manufacturer
    async with index.engine.connect() as conn:
        rows = (await conn.execute(sa.select(t.extra_attributes.c.tag, t.extra_attributes.c.value).where(
            t.extra_attributes.c.tenant == "acme", t.extra_attributes.c.sop_uid == i.sop))).all()
    assert [tuple(r) for r in rows] == [("00181030", "Thorax")]
    await index.delete("acme", i.parsed.study_instance_uid, source=SOURCE)
    async with index.engine.connect() as conn:
        left = (await conn.execute(sa.select(sa.func.count()).select_from(t.extra_attributes))).scalar()
    assert left == 0


async def test_concurrent_stores_of_one_new_instance(index: SqlIndexStore, inst: Any) -> None:
    """Several servers receiving the same instance at once: one stores it, the others see a duplicate."""
    i = inst()
    results = await asyncio.gather(*(store(index, "acme", i) for _ in range(6)))
    outcomes = sorted(r.result.value for r, _ in results)
    assert outcomes == ["duplicate"] * 5 + ["stored"]
    [(_, key)] = [(r, k) for r, k in results if r.result is StoreResult.STORED]
    found = await index.find_existing("acme", i.sop)
    assert found is not None and found.blob_key == key
    assert len(await outbox(index, "acme")) == 1


async def test_concurrent_stores_into_one_new_study(index: SqlIndexStore, inst: Any) -> None:
    study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    batch = [inst(study_uid=study, series_uid=s1 if n % 2 else s2, instance_number=n, pixels=False)
             for n in range(12)]
    results = await asyncio.gather(*(store(index, "acme", i) for i in batch))
    assert all(r.result is StoreResult.STORED for r, _ in results)
    assert await counts(index, "acme", study) == (2, 12, {s1: 6, s2: 6})
    assert len(await outbox(index, "acme")) == 12


async def test_concurrent_new_series_in_two_studies(index: SqlIndexStore, inst: Any) -> None:
    """Two servers receive the first instance of one series UID, each with another study: one wins,
    the other is rejected (0xA900), and the hierarchy stays consistent."""
    for _ in range(5):
        series = generate_uid()
        a, b = inst(series_uid=series, pixels=False), inst(series_uid=series, pixels=False)
        results = await asyncio.gather(store(index, "acme", a), store(index, "acme", b), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1 and isinstance(errors[0], DatasetMismatchError), results
        winner = a if not isinstance(results[0], BaseException) else b
        async with index.engine.connect() as conn:
            owner = (await conn.execute(sa.select(t.series.c.study_uid, t.series.c.num_instances).where(
                t.series.c.tenant == "acme", t.series.c.series_uid == series))).one()
        assert tuple(owner) == (winner.parsed.study_instance_uid, 1)
        assert [r.sop_uid for r in await index.list_instances("acme", winner.parsed.study_instance_uid)] == [
            winner.sop]


async def _search(index: SqlIndexStore, tenant: str, level: Level, **params: str) -> list[dict[str, Any]]:
    query, _ = parse_qido(level, list(params.items()))
    results = index.search(tenant, query)
    return [match async for match in results]


async def test_search_is_per_tenant_and_follows_deletes(index: SqlIndexStore, inst: Any) -> None:
    """The QIDO/C-FIND entry point of the IndexStore (its full matching suite: tests/unit/test_query_sql.py)."""
    study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    acme = [inst(study_uid=study, series_uid=s, patient_id="PID-SEARCH", instance_number=n, pixels=False)
            for s in (s1, s2) for n in (1, 2)]
    for i in acme:
        await store(index, "acme", i)
    await store(index, "globex", inst(patient_id="PID-SEARCH", pixels=False))

    [found] = await _search(index, "acme", Level.STUDY, PatientID="PID-SEARCH")
    assert found["0020000D"]["Value"] == [study]
    assert found["00201206"]["Value"] == [2] and found["00201208"]["Value"] == [4]
    assert len(await _search(index, "globex", Level.STUDY, PatientID="PID-SEARCH")) == 1
    assert await _search(index, "initech", Level.STUDY, PatientID="PID-SEARCH") == []
    assert len(await _search(index, "acme", Level.IMAGE, PatientID="PID-SEARCH")) == 4

    await index.delete("acme", study, s1, source=SOURCE)
    [found] = await _search(index, "acme", Level.STUDY, PatientID="PID-SEARCH")
    assert found["00201206"]["Value"] == [1] and found["00201208"]["Value"] == [2]
    series = await _search(index, "acme", Level.SERIES, StudyInstanceUID=study)
    assert [s["0020000E"]["Value"][0] for s in series] == [s2]
