"""C-FIND SCP (PS3.4 C.4.1) driven by dcmtk's findscu: levels, matching and return keys, charsets, cancel."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from dicomflow.index.query import SearchResults
from tests.conftest import LiveServer
from tests.factory import MR_IMAGE, make_dataset
from tests.integration.dcmtk import dimse_server, findscu, storescu, write_instances

pytestmark = pytest.mark.integration

STUDY_A, STUDY_B, STUDY_C = generate_uid(), generate_uid(), generate_uid()
SERIES_A1, SERIES_A2 = generate_uid(), generate_uid()


def _corpus() -> list[Any]:
    """Two patients, three studies; study A has a CT series of 3 and an MR series of 1."""
    a = {"study_uid": STUDY_A, "patient_name": "Doe^John", "patient_id": "PID-1", "study_date": "20240115",
         "accession": "ACC-A"}
    return [
        make_dataset(**a, series_uid=SERIES_A1, instance_number=1),
        make_dataset(**a, series_uid=SERIES_A1, instance_number=2),
        make_dataset(**a, series_uid=SERIES_A1, instance_number=3),
        make_dataset(**a, series_uid=SERIES_A2, sop_class=MR_IMAGE, modality="MR", series_number=2),
        make_dataset(study_uid=STUDY_B, patient_name="Doe^John", patient_id="PID-1", study_date="20240301",
                     accession="ACC-B"),
        make_dataset(study_uid=STUDY_C, patient_name="Smith^Anna", patient_id="PID-2", study_date="20231224",
                     accession="ACC-C", modality="MR", sop_class=MR_IMAGE),
    ]


@pytest.fixture
def server(live_server_factory: Any, tmp_path: Path) -> LiveServer:
    srv = dimse_server(live_server_factory, tmp_path)
    storescu(srv, write_instances(tmp_path / "in", _corpus()))
    return srv


def _refused(result: Any) -> bool:
    """findscu -v names the final status: 0xA900 is 'DataSetDoesNotMatchSOPClass'."""
    return "Received Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in result.output


def test_study_level_wildcard_and_return_keys(server: LiveServer, tmp_path: Path) -> None:
    result = findscu(server, tmp_path / "out", [
        "QueryRetrieveLevel=STUDY", "PatientName=doe*", "StudyInstanceUID", "StudyDate", "AccessionNumber",
        "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries", "RetrieveAETitle"])
    assert result.proc.returncode == 0, result.output
    by_uid = {r.StudyInstanceUID: r for r in result.responses}
    assert set(by_uid) == {STUDY_A, STUDY_B}
    a = by_uid[STUDY_A]
    assert a.PatientName == "Doe^John"
    assert a.StudyDate == "20240115"
    assert a.AccessionNumber == "ACC-A"
    assert set(a.ModalitiesInStudy) == {"CT", "MR"}
    assert int(a.NumberOfStudyRelatedInstances) == 4
    assert int(a.NumberOfStudyRelatedSeries) == 2
    assert a.QueryRetrieveLevel == "STUDY"
    assert a.RetrieveAETitle == "DICOMFLOW"
    # PS3.4 C.4.1.1.3.2: exactly the requested keys (plus level and charset), nothing else
    keywords = {e.keyword for e in a}
    assert keywords <= {"PatientName", "StudyInstanceUID", "StudyDate", "AccessionNumber", "ModalitiesInStudy",
                        "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries", "RetrieveAETitle",
                        "QueryRetrieveLevel", "SpecificCharacterSet"}
    assert "PatientID" not in a and "PatientBirthDate" not in a


def test_date_range_and_empty_return_key(server: LiveServer, tmp_path: Path) -> None:
    result = findscu(server, tmp_path / "out", [
        "QueryRetrieveLevel=STUDY", "StudyDate=20240101-20240229", "StudyInstanceUID", "StudyDescription",
        "InstitutionName"])
    assert result.proc.returncode == 0, result.output
    assert [r.StudyInstanceUID for r in result.responses] == [STUDY_A]
    assert result.responses[0].StudyDescription == "Synthetic study"
    none = findscu(server, tmp_path / "none", ["QueryRetrieveLevel=STUDY", "StudyDate=-20230101",
                                                 "StudyInstanceUID"])
    assert none.proc.returncode == 0 and none.responses == []
    open_range = findscu(server, tmp_path / "open", ["QueryRetrieveLevel=STUDY", "StudyDate=20240201-",
                                                       "StudyInstanceUID"])
    assert [r.StudyInstanceUID for r in open_range.responses] == [STUDY_B]


def test_patient_root_patient_and_study_levels(server: LiveServer, tmp_path: Path) -> None:
    patients = findscu(server, tmp_path / "p", [
        "QueryRetrieveLevel=PATIENT", "PatientID", "PatientName", "NumberOfPatientRelatedStudies"], model="-P")
    assert patients.proc.returncode == 0, patients.output
    by_id = {r.PatientID: r for r in patients.responses}
    assert set(by_id) == {"PID-1", "PID-2"}
    assert by_id["PID-1"].PatientName == "Doe^John"
    assert int(by_id["PID-1"].NumberOfPatientRelatedStudies) == 2
    studies = findscu(server, tmp_path / "s", [
        "QueryRetrieveLevel=STUDY", "PatientID=PID-1", "StudyInstanceUID", "AccessionNumber"], model="-P")
    assert sorted(r.AccessionNumber for r in studies.responses) == ["ACC-A", "ACC-B"]
    assert all(r.PatientID == "PID-1" for r in studies.responses)


def test_hierarchical_unique_keys_required(server: LiveServer, tmp_path: Path) -> None:
    # Patient Root STUDY level without Patient ID, Study Root SERIES level with a wild card Study UID
    no_patient = findscu(server, tmp_path / "a", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"], model="-P")
    assert no_patient.responses == []
    assert _refused(no_patient)
    wild = findscu(server, tmp_path / "b", ["QueryRetrieveLevel=SERIES", "StudyInstanceUID=",
                                              "SeriesInstanceUID"])
    assert wild.responses == [] and _refused(wild)
    bad_level = findscu(server, tmp_path / "c", ["QueryRetrieveLevel=PATIENT", "PatientID"])  # Study Root
    assert bad_level.responses == [] and _refused(bad_level)
    below = findscu(server, tmp_path / "d", ["QueryRetrieveLevel=STUDY", "Modality=CT"])
    assert below.responses == [] and _refused(below)


def test_series_and_image_levels(server: LiveServer, tmp_path: Path) -> None:
    series = findscu(server, tmp_path / "s", [
        "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={STUDY_A}", "SeriesInstanceUID", "Modality",
        "SeriesNumber", "NumberOfSeriesRelatedInstances"])
    by_uid = {r.SeriesInstanceUID: r for r in series.responses}
    assert set(by_uid) == {SERIES_A1, SERIES_A2}
    assert by_uid[SERIES_A1].Modality == "CT" and int(by_uid[SERIES_A1].NumberOfSeriesRelatedInstances) == 3
    assert by_uid[SERIES_A2].Modality == "MR" and int(by_uid[SERIES_A2].SeriesNumber) == 2
    assert all(r.StudyInstanceUID == STUDY_A for r in series.responses)
    mr = findscu(server, tmp_path / "mr", ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={STUDY_A}",
                                            "Modality=MR", "SeriesInstanceUID"])
    assert [r.SeriesInstanceUID for r in mr.responses] == [SERIES_A2]
    images = findscu(server, tmp_path / "i", [
        "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={STUDY_A}", f"SeriesInstanceUID={SERIES_A1}",
        "SOPInstanceUID", "SOPClassUID", "InstanceNumber"], model="-S")
    assert sorted(int(r.InstanceNumber) for r in images.responses) == [1, 2, 3]
    assert all(r.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" for r in images.responses)
    one = findscu(server, tmp_path / "one", [
        "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={STUDY_A}", f"SeriesInstanceUID={SERIES_A1}",
        "InstanceNumber=2", "SOPInstanceUID"])
    assert len(one.responses) == 1
    patient_root_image = findscu(server, tmp_path / "pi", [
        "QueryRetrieveLevel=IMAGE", "PatientID=PID-1", f"StudyInstanceUID={STUDY_A}",
        f"SeriesInstanceUID={SERIES_A2}", "SOPInstanceUID"], model="-P")
    assert len(patient_root_image.responses) == 1


def test_cancel_stops_the_search(live_server_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A long search: each match takes 20 ms to come out of the index, so findscu's C-CANCEL (sent after 5
    # responses) arrives while matches are still being produced. Without the delay all 120 small responses
    # fit in the socket buffers before the cancel is even sent, and the outcome depends on timing.
    slow_next = SearchResults.__anext__

    async def slow(self: SearchResults) -> dict[str, Any]:
        await asyncio.sleep(0.02)
        return await slow_next(self)

    monkeypatch.setattr(SearchResults, "__anext__", slow)
    srv = dimse_server(live_server_factory, tmp_path)
    study, series = generate_uid(), generate_uid()
    many = [make_dataset(study_uid=study, series_uid=series, instance_number=n, pixels=False) for n in range(120)]
    storescu(srv, write_instances(tmp_path / "in", many))
    result = findscu(srv, tmp_path / "out", ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}",
                                              f"SeriesInstanceUID={series}", "SOPInstanceUID"],
                     extra=("--cancel", "5"))
    assert result.proc.returncode == 0, result.output
    assert "Received Final Find Response (Cancel: MatchingTerminatedDueToCancelRequest)" in result.output
    assert 5 <= len(result.responses) < 120


def test_result_limit(live_server_factory: Any, tmp_path: Path) -> None:
    srv = dimse_server(live_server_factory, tmp_path, limits={"dimse_find_max_results": 2})
    storescu(srv, write_instances(tmp_path / "in", _corpus()))
    result = findscu(srv, tmp_path / "out", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"])
    assert result.proc.returncode == 0, result.output
    assert len(result.responses) == 2


def test_tenant_sees_only_its_own_studies(live_server_factory: Any, tmp_path: Path) -> None:
    srv = dimse_server(live_server_factory, tmp_path)
    storescu(srv, write_instances(tmp_path / "acme", [make_dataset(patient_id="ACME-1")]), called="ACME")
    storescu(srv, write_instances(tmp_path / "dflt", [make_dataset(patient_id="DFLT-1")]))
    keys = ["QueryRetrieveLevel=STUDY", "PatientID", "StudyInstanceUID"]
    assert [r.PatientID for r in findscu(srv, tmp_path / "a", keys, called="ACME").responses] == ["ACME-1"]
    assert [r.PatientID for r in findscu(srv, tmp_path / "d", keys).responses] == ["DFLT-1"]
    assert findscu(srv, tmp_path / "g", keys, called="GLOBEX").responses == []


JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"


def test_charsets_japanese_and_utf8(live_server_factory: Any, tmp_path: Path) -> None:
    srv = dimse_server(live_server_factory, tmp_path)
    jp = make_dataset(patient_id="JP-1", patient_name=JAPANESE, charset="\\ISO 2022 IR 87")
    jp.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    utf8 = make_dataset(patient_id="U8-1", patient_name="Müller^Zoë=王^小明", charset="ISO_IR 192")
    latin = make_dataset(patient_id="L1-1", patient_name="Gómez^José", charset="ISO_IR 100")
    storescu(srv, write_instances(tmp_path / "in", [jp, utf8, latin]))
    result = findscu(srv, tmp_path / "out", ["QueryRetrieveLevel=STUDY", "PatientID", "PatientName",
                                              "SpecificCharacterSet", "StudyInstanceUID"])
    assert result.proc.returncode == 0, result.output
    by_id = {r.PatientID: r for r in result.responses}
    assert str(by_id["JP-1"].PatientName) == JAPANESE
    assert list(by_id["JP-1"].SpecificCharacterSet) == ["", "ISO 2022 IR 87"]  # answered as stored
    assert str(by_id["U8-1"].PatientName) == "Müller^Zoë=王^小明"
    assert by_id["U8-1"].SpecificCharacterSet == "ISO_IR 192"
    assert str(by_id["L1-1"].PatientName) == "Gómez^José"
    assert by_id["L1-1"].SpecificCharacterSet == "ISO_IR 100"
    # matching on the ideographic group of a name (PS3.4 C.2.2.2.1: PN component groups)
    ideographic = findscu(srv, tmp_path / "jp", ["QueryRetrieveLevel=STUDY", "SpecificCharacterSet=ISO_IR 192",
                                                  "PatientName=山田*", "PatientID"])
    assert [r.PatientID for r in ideographic.responses] == ["JP-1"]


def test_sequence_matching_and_sequence_return_keys(live_server_factory: Any, tmp_path: Path) -> None:
    """PS3.4 C.2.2.2.6: a sequence key with one item matches on its item keys and returns those keys."""
    from pydicom.dataset import Dataset

    def with_request(sps: str, rp: str, **kwargs: Any) -> Any:
        ds = make_dataset(**kwargs)
        item = Dataset()
        item.ScheduledProcedureStepID = sps
        item.RequestedProcedureID = rp
        ds.RequestAttributesSequence = [item]
        return ds

    srv = dimse_server(live_server_factory, tmp_path)
    study = generate_uid()
    one = with_request("SPS-1", "RP-1", study_uid=study, instance_number=1)
    two = with_request("SPS-2", "RP-2", study_uid=study, instance_number=2)
    storescu(srv, write_instances(tmp_path / "in", [one, two]))
    result = findscu(srv, tmp_path / "out", [
        "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}", "SeriesInstanceUID",
        "(0040,0275)[0].(0040,0009)=SPS-2", "(0040,0275)[0].(0040,1001)"])
    assert result.proc.returncode == 0, result.output
    assert [r.SeriesInstanceUID for r in result.responses] == [two.SeriesInstanceUID]
    [item] = result.responses[0].RequestAttributesSequence
    assert item.ScheduledProcedureStepID == "SPS-2" and item.RequestedProcedureID == "RP-2"
