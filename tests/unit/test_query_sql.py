"""IndexStore.search on SQLite (and PostgreSQL, marked integration): SQL and post-filter paths, paging,
levels, tenancy, character sets."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset

from dicomflow.index.query import Query, parse_qido, query_from_identifier
from dicomflow.index.sql import SqlIndexStore
from dicomflow.index.sql_search import SqlSearch
from dicomflow.ingest.parse import parse_part10
from dicomflow.model import Level, Protocol, Source
from dicomflow.settings import DuplicatePolicy
from tests.factory import MR_IMAGE, make_dataset, to_bytes

STUDY_A, STUDY_B, STUDY_C = "1.2.826.0.1.1", "1.2.826.0.1.2", "1.2.826.0.1.3"
JAPANESE_STUDY = "1.3.6.1.4.1.5962.1.2.0.1175775771.5702.0"
EXTRA = frozenset({"00181030"})  # ProtocolName as a per-tenant extra indexed attribute


def _write(tmp: Path, ds: Dataset) -> tuple[Path, bytes]:
    """Part 10 bytes of ``ds`` in a file (pydicom's own test files are copied as they are)."""
    data = Path(str(ds.filename)).read_bytes() if isinstance(ds, pydicom.FileDataset) else to_bytes(ds)
    path = tmp / f"{ds.SOPInstanceUID}.dcm"
    path.write_bytes(data)
    return path, data


async def _store(index: SqlIndexStore, tmp: Path, ds: Dataset, tenant: str = "default") -> None:
    path, data = _write(tmp, ds)
    parsed = parse_part10(path, 1024)
    await index.store_instance(tenant, parsed, blob_key=f"k/{ds.SOPInstanceUID}", size=len(data),
                               sha256=hashlib.sha256(data).hexdigest(), source=Source(Protocol.DICOMWEB),
                               policy=DuplicatePolicy.REJECT, extra_tags=EXTRA)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
async def index(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlIndexStore]:
    if request.param == "sqlite":
        store = await SqlIndexStore.open(f"sqlite:///{tmp_path / 'index.sqlite'}")
    else:
        store = await SqlIndexStore.open(request.getfixturevalue("pg_url"), create_schema=True)
    # Study A: CT series (3 instances) + MR series (1), Doe^John
    for i in range(1, 4):
        await _store(store, tmp_path, make_dataset(
            study_uid=STUDY_A, series_uid=f"{STUDY_A}.1", sop_uid=f"{STUDY_A}.1.{i}", instance_number=i,
            patient_name="Doe^John", patient_id="PID-1", study_date="20240115", study_time="101500",
            accession="ACC-1", StudyDescription="Chest CT", ProtocolName="CHEST-LOW" if i == 2 else "CHEST",
            ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER" if i == 1 else "AXIAL"]))
    await _store(store, tmp_path, make_dataset(
        study_uid=STUDY_A, series_uid=f"{STUDY_A}.2", sop_uid=f"{STUDY_A}.2.1", sop_class=MR_IMAGE,
        modality="MR", series_number=2, patient_name="Doe^John", patient_id="PID-1", study_date="20240115",
        study_time="101500", accession="ACC-1", StudyDescription="Chest CT"))
    # Study B: ISO_IR 100, Müller^Hans; the same patient has a second study C (ISO_IR 192)
    await _store(store, tmp_path, make_dataset(
        study_uid=STUDY_B, series_uid=f"{STUDY_B}.1", sop_uid=f"{STUDY_B}.1.1", charset="ISO_IR 100",
        patient_name="Müller^Hans", patient_id="PID-2", study_date="20230601", study_time="235959",
        accession="ACC-2", modality="MR", sop_class=MR_IMAGE))
    await _store(store, tmp_path, make_dataset(
        study_uid=STUDY_C, series_uid=f"{STUDY_C}.1", sop_uid=f"{STUDY_C}.1.1", charset="ISO_IR 192",
        patient_name="Müller^Hans=王^小東", patient_id="PID-2", study_date="20220301", study_time="080000",
        accession="ACC[3]_%"))
    # pydicom's ISO 2022 IR 87 test file: Yamada^Tarou=山田^太郎=やまだ^たろう
    await _store(store, tmp_path, pydicom.dcmread(get_charset_files("chrH31.dcm")[0]))
    # another tenant's study of "the same" patient
    await _store(store, tmp_path, make_dataset(study_uid="1.2.826.0.9.1", sop_uid="1.2.826.0.9.1.1.1",
                                               patient_name="Doe^John", patient_id="PID-1"), tenant="acme")
    yield store
    await store.close()


async def run(index: SqlIndexStore, query: Query, tenant: str = "default") -> tuple[list[dict[str, Any]], bool]:
    results = index.search(tenant, query)
    async with results:
        found = [m async for m in results]
    return found, results.truncated


def q(level: Level, *params: tuple[str, str], **kw: Any) -> Query:
    query, _ = parse_qido(level, list(params), extra_tags=EXTRA, **kw)
    return query


def uids(matches: list[dict[str, Any]], tag: str = "0020000D") -> list[str]:
    return [m[tag]["Value"][0] for m in matches]


def value(match: dict[str, Any], tag: str) -> Any:
    return match[tag]["Value"][0]


async def test_study_level_defaults_and_computed_attributes(index: SqlIndexStore) -> None:
    found, truncated = await run(index, q(Level.STUDY, ("StudyInstanceUID", STUDY_A)))
    assert not truncated and len(found) == 1
    study = found[0]
    assert study["00080061"]["Value"] == ["CT", "MR"]
    assert (value(study, "00201206"), value(study, "00201208")) == (2, 4)
    assert value(study, "00080056") == "ONLINE"
    assert value(study, "00100010") == {"Alphabetic": "Doe^John"}
    assert "00200013" not in study and "00080060" not in study  # no lower-level attributes


async def test_studies_are_ordered_newest_first_and_tenant_scoped(index: SqlIndexStore) -> None:
    found, _ = await run(index, q(Level.STUDY))
    assert uids(found)[:3] == [STUDY_A, STUDY_B, STUDY_C]
    assert len(found) == 4
    acme, _ = await run(index, q(Level.STUDY), tenant="acme")
    assert uids(acme) == ["1.2.826.0.9.1"]
    nobody, _ = await run(index, q(Level.STUDY), tenant="globex")
    assert nobody == []


@pytest.mark.parametrize(("params", "expected"), [
    ((("PatientID", "PID-1"),), [STUDY_A]),
    ((("PatientID", "pid-1"),), []),  # single value matching is case-sensitive outside PN
    ((("AccessionNumber", "ACC-?"),), [STUDY_A, STUDY_B]),
    ((("AccessionNumber", "ACC[3]_%"),), [STUDY_C]),  # GLOB/LIKE metacharacters are literal
    ((("AccessionNumber", "ACC[*"),), [STUDY_C]),
    ((("StudyDate", "20230101-20231231"),), [STUDY_B]),
    ((("StudyDate", "20230101-"),), [STUDY_A, STUDY_B]),
    ((("StudyDate", "-20221231"),), [STUDY_C]),
    ((("StudyDate", "20220301"),), [STUDY_C]),
    ((("StudyTime", "2300-"),), [STUDY_B]),
    ((("ModalitiesInStudy", "MR"),), [STUDY_A, STUDY_B]),
    ((("ModalitiesInStudy", "CT\\US"),), [STUDY_A, STUDY_C]),
    ((("StudyInstanceUID", f"{STUDY_B},{STUDY_C}"),), [STUDY_B, STUDY_C]),
    ((("NumberOfStudyRelatedInstances", "4"),), [STUDY_A]),
    ((("StudyDescription", "Chest*"),), [STUDY_A]),
    ((("StudyDescription", "chest*"),), []),
])
async def test_sql_matching_at_study_level(index: SqlIndexStore, params: tuple[tuple[str, str], ...],
                                           expected: list[str]) -> None:
    found, _ = await run(index, q(Level.STUDY, *params))
    assert uids(found) == expected


@pytest.mark.parametrize(("name", "case_insensitive", "fuzzy", "expected"), [
    ("Doe^John", True, False, [STUDY_A]),
    ("doe^john", True, False, [STUDY_A]),
    ("doe^john", False, False, []),
    ("DOE*", True, False, [STUDY_A]),
    ("müller*", True, False, [STUDY_B, STUDY_C]),
    ("王^小東", True, False, [STUDY_C]),
    ("山田^太郎", True, False, ["1.3.6.1.4.1.5962.1.2.0.1175775771.5702.0"]),
    ("やまだ^たろう", False, False, ["1.3.6.1.4.1.5962.1.2.0.1175775771.5702.0"]),
    ("Yamada^Tarou=山田^太郎", False, False, ["1.3.6.1.4.1.5962.1.2.0.1175775771.5702.0"]),
    ("Yamada^Tarou=山本^太郎", False, False, []),
    ("*hans", True, False, [STUDY_B, STUDY_C]),
    ("hans mül", True, True, [STUDY_B, STUDY_C]),
    ("tar", True, True, ["1.3.6.1.4.1.5962.1.2.0.1175775771.5702.0"]),
    ("john", True, False, []),
    ("Doe^John^^", True, False, [STUDY_A]),
    ("Doe^Jo", True, False, []),
])
async def test_pn_matching_in_sql_and_post_filter(index: SqlIndexStore, name: str, case_insensitive: bool,
                                                  fuzzy: bool, expected: list[str]) -> None:
    params = [("PatientName", name), ("fuzzymatching", "true" if fuzzy else "false")]
    found, _ = await run(index, q(Level.STUDY, *params, pn_case_insensitive=case_insensitive))
    assert uids(found) == expected


async def test_character_sets_come_back_decoded(index: SqlIndexStore) -> None:
    found, _ = await run(index, q(Level.STUDY, ("PatientName", "Yamada*")))
    assert value(found[0], "00100010") == {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎",
                                           "Phonetic": "やまだ^たろう"}
    assert found[0]["00080005"]["Value"] == ["", "ISO 2022 IR 87"]
    latin1, _ = await run(index, q(Level.STUDY, ("StudyInstanceUID", STUDY_B)))
    assert value(latin1[0], "00100010") == {"Alphabetic": "Müller^Hans"}


async def test_sop_classes_in_study_is_computed_and_matchable(index: SqlIndexStore) -> None:
    found, _ = await run(index, q(Level.STUDY, ("SOPClassesInStudy", MR_IMAGE), ("includefield", "SOPClassesInStudy")))
    assert uids(found) == [STUDY_A, STUDY_B]
    assert found[0]["00080062"] == {"vr": "UI", "Value": sorted([MR_IMAGE, "1.2.840.10008.5.1.4.1.1.2"])}
    plain, _ = await run(index, q(Level.STUDY, ("StudyInstanceUID", STUDY_A)))
    assert "00080062" not in plain[0]  # not a default attribute: only computed when asked for


async def test_series_scoped_and_relational(index: SqlIndexStore) -> None:
    scoped, _ = await run(index, q(Level.SERIES, study_uid=STUDY_A))
    assert uids(scoped, "0020000E") == [f"{STUDY_A}.1", f"{STUDY_A}.2"]
    assert [value(s, "00201209") for s in scoped] == [3, 1]
    assert "00100010" not in scoped[0]
    relational, _ = await run(index, q(Level.SERIES, ("Modality", "MR"), ("PatientID", "PID-2")))
    assert uids(relational, "0020000E") == [f"{STUDY_B}.1"]
    assert value(relational[0], "00100020") == "PID-2"  # study attributes in unscoped series results


async def test_instance_level_sql_extra_and_post_filter(index: SqlIndexStore) -> None:
    found, _ = await run(index, q(Level.IMAGE, ("InstanceNumber", "2"), study_uid=STUDY_A))
    assert uids(found, "00080018") == [f"{STUDY_A}.1.2"]
    extra, _ = await run(index, q(Level.IMAGE, ("ProtocolName", "CHEST-*")))  # extra_attributes in SQL
    assert uids(extra, "00080018") == [f"{STUDY_A}.1.2"]
    post, _ = await run(index, q(Level.IMAGE, ("ImageType", "LOCALIZER")))  # no column: JSON post-filter
    assert uids(post, "00080018") == [f"{STUDY_A}.1.1"]
    assert value(post[0], "00280010") == 16 and value(post[0], "0020000E") == f"{STUDY_A}.1"


async def test_extra_attributes_use_sql(index: SqlIndexStore) -> None:
    statement, post = SqlSearch(index.engine).statement("default", q(Level.IMAGE, ("ProtocolName", "CHEST")))
    assert post == [] and "extra_attributes" in str(statement)


@pytest.mark.parametrize("post_filter", [False, True])
async def test_limit_offset_and_truncation(index: SqlIndexStore, post_filter: bool) -> None:
    # Rows has no column: matching it needs the post-filter; all 4 instances have 16 rows
    params = [("Rows", "16")] if post_filter else []
    base = q(Level.IMAGE, *params, study_uid=STUDY_A)
    assert bool(SqlSearch(index.engine).statement("default", base)[1]) is post_filter
    everything, truncated = await run(index, base)
    assert len(everything) == 4 and not truncated
    pages = []
    for offset in (0, 2):
        page, truncated = await run(index, q(Level.IMAGE, *params, ("limit", "2"), ("offset", str(offset)),
                                             study_uid=STUDY_A))
        pages.append((uids(page, "00080018"), truncated))
    assert pages == [(uids(everything, "00080018")[:2], True), (uids(everything, "00080018")[2:], False)]
    beyond, truncated = await run(index, q(Level.IMAGE, *params, ("offset", "10"), study_uid=STUDY_A))
    assert beyond == [] and not truncated


async def test_includefield_all_and_no_bulk_data(index: SqlIndexStore) -> None:
    found, _ = await run(index, q(Level.IMAGE, ("includefield", "all"), ("SOPInstanceUID", f"{STUDY_A}.1.1")))
    assert "00181030" in found[0] and "00080008" in found[0]
    assert "7FE00010" not in found[0]  # pixel data is bulk data: never in QIDO


async def test_patient_level_for_c_find(index: SqlIndexStore) -> None:
    ds = Dataset()
    ds.PatientName = "*"
    ds.PatientID = ""
    ds.NumberOfPatientRelatedStudies = None
    ds.NumberOfPatientRelatedInstances = None
    ds.PatientSex = ""
    found, _ = await run(index, query_from_identifier(ds.to_json_dict(), Level.PATIENT))
    by_id = {value(p, "00100020"): p for p in found}
    assert set(by_id) == {"PID-1", "PID-2", "H31EXAMPLE"}  # one response per patient
    assert value(by_id["PID-2"], "00201200") == 2 and value(by_id["PID-1"], "00201204") == 4
    assert set(by_id["PID-1"]) == {"00100010", "00100020", "00201200", "00201204", "00100040"}


async def test_c_find_study_query_returns_exactly_the_keys(index: SqlIndexStore) -> None:
    ds = Dataset()
    ds.PatientID = "PID-2"
    ds.StudyDate = "20230101-"
    ds.StudyDescription = ""
    ds.IssuerOfPatientID = ""
    found, _ = await run(index, query_from_identifier(ds.to_json_dict(), Level.STUDY))
    assert found == [{
        "00080020": {"vr": "DA", "Value": ["20230601"]},
        "00081030": {"vr": "LO", "Value": ["Synthetic study"]},
        "00100020": {"vr": "LO", "Value": ["PID-2"]},
        "00100021": {"vr": "LO"},
        "0020000D": {"vr": "UI", "Value": [STUDY_B]},
    }]


async def test_early_close_stops_the_stream(index: SqlIndexStore) -> None:
    results = index.search("default", q(Level.IMAGE))
    async with results:
        first = await results.__anext__()
    assert first["00080018"]
    with pytest.raises(StopAsyncIteration):
        await results.__anext__()


async def test_c_find_round_trip_through_pydicom_datasets(index: SqlIndexStore) -> None:
    """The C-FIND path: identifier Dataset -> JSON -> Query -> matches -> Datasets encoded in UTF-8."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.filewriter import write_dataset

    identifier = Dataset()
    identifier.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientName = "=山田*"  # ideographic group only
    identifier.StudyInstanceUID = ""
    identifier.ModalitiesInStudy = ""
    found, _ = await run(index, query_from_identifier(identifier.to_json_dict(), Level.STUDY))
    assert len(found) == 1
    response = Dataset.from_json(found[0])
    response.SpecificCharacterSet = "ISO_IR 192"  # the decoded text is re-encoded by the adapter
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = True, True
    write_dataset(buffer, response)  # implicit VR little endian, as on the wire
    buffer.seek(0)
    decoded = read_dataset(buffer, is_implicit_VR=True, is_little_endian=True)
    decoded.decode()
    assert decoded.PatientName.ideographic == "山田^太郎"
    assert decoded.ModalitiesInStudy == "OT" and decoded.StudyInstanceUID == JAPANESE_STUDY


@pytest.mark.parametrize(("level", "params", "scope", "index_name"), [
    (Level.STUDY, [("PatientID", "PID-1")], {}, "ix_studies_patient_id"),
    (Level.STUDY, [("AccessionNumber", "ACC-1")], {}, "ix_studies_accession"),
    (Level.STUDY, [("StudyDate", "20240101-20240131")], {}, "ix_studies_study_date"),
    (Level.STUDY, [("StudyInstanceUID", STUDY_A)], {}, "sqlite_autoindex_studies_1"),
    (Level.STUDY, [("ModalitiesInStudy", "MR")], {}, "ix_series_modality"),
    (Level.STUDY, [], {}, "ix_studies_study_date"),
    (Level.SERIES, [], {"study_uid": STUDY_A}, "ix_series_study"),
    (Level.IMAGE, [], {"study_uid": STUDY_A, "series_uid": f"{STUDY_A}.1"}, "ix_instances_series"),
    (Level.IMAGE, [("SOPInstanceUID", f"{STUDY_A}.1.1")], {}, "sqlite_autoindex_instances_1"),
    (Level.IMAGE, [("ProtocolName", "CHEST")], {}, "ix_extra_lookup"),
])
async def test_common_searches_use_an_index(tmp_path: Path, level: Level, params: list[tuple[str, str]],
                                            scope: dict[str, str], index_name: str) -> None:
    store = await SqlIndexStore.open(f"sqlite:///{tmp_path / 'plan.sqlite'}")
    try:
        statement, _ = SqlSearch(store.engine).statement("default", q(level, *params, **scope))
        sql = str(statement.compile(dialect=store.engine.dialect, compile_kwargs={"literal_binds": True}))
        async with store.engine.connect() as conn:
            plan = " | ".join(str(r[-1]) for r in (await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)).all())
    finally:
        await store.close()
    assert index_name in plan
    assert "SCAN studies" not in plan and "SCAN instances" not in plan and "SCAN series" not in plan
