"""QIDO-RS (PS3.18 10.6) driven by dicomweb-client, a client nobody here wrote."""

from __future__ import annotations

from typing import Any

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset

from tests.conftest import LiveServer
from tests.factory import MR_IMAGE, make_dataset

pytestmark = pytest.mark.e2e

STUDY_A, STUDY_B = "1.2.826.0.2.1", "1.2.826.0.2.2"
JAPANESE_STUDY = "1.3.6.1.4.1.5962.1.2.0.1175775771.5702.0"
UTF8_STUDY = "1.2.826.0.2.3"


def datasets() -> list[Dataset]:
    out = [make_dataset(study_uid=STUDY_A, series_uid=f"{STUDY_A}.1", sop_uid=f"{STUDY_A}.1.{i}", instance_number=i,
                        patient_name="Doe^John", patient_id="PID-1", study_date="20240115", accession="ACC-1")
           for i in range(1, 4)]
    out.append(make_dataset(study_uid=STUDY_A, series_uid=f"{STUDY_A}.2", sop_uid=f"{STUDY_A}.2.1", modality="MR",
                            sop_class=MR_IMAGE, series_number=2, patient_name="Doe^John", patient_id="PID-1",
                            study_date="20240115", accession="ACC-1"))
    out.append(make_dataset(study_uid=STUDY_B, series_uid=f"{STUDY_B}.1", sop_uid=f"{STUDY_B}.1.1",
                            charset="ISO_IR 100", patient_name="Müller^Hans", patient_id="PID-2", modality="MR",
                            sop_class=MR_IMAGE,
                            study_date="20230601", accession="ACC-2"))
    out.append(pydicom.dcmread(get_charset_files("chrH31.dcm")[0]))  # ISO 2022 IR 87
    out.append(make_dataset(study_uid=UTF8_STUDY, charset="ISO_IR 192", patient_name="Wang^XiaoDong=王^小東",
                            patient_id="PID-3", study_date="20100101"))
    return out


@pytest.fixture
def server(live_server_factory: Any) -> LiveServer:
    live: LiveServer = live_server_factory(routing={"enabled": False})  # QIDO needs no routing worker
    return live


@pytest.fixture
def dicomweb(server: LiveServer) -> DICOMwebClient:
    client = DICOMwebClient(server.dicomweb)
    client.store_instances(datasets())
    return client


def uid_list(results: list[dict[str, Any]], tag: str = "0020000D") -> list[str]:
    return [r[tag]["Value"][0] for r in results]


def test_search_for_studies_with_filters(dicomweb: DICOMwebClient) -> None:
    everything = dicomweb.search_for_studies()
    assert uid_list(everything) == [STUDY_A, STUDY_B, UTF8_STUDY, JAPANESE_STUDY]  # newest first, undated last
    a = Dataset.from_json(dicomweb.search_for_studies(search_filters={"PatientID": "PID-1"})[0])
    assert a.StudyInstanceUID == STUDY_A
    assert a.ModalitiesInStudy == ["CT", "MR"]
    assert (a.NumberOfStudyRelatedSeries, a.NumberOfStudyRelatedInstances) == (2, 4)
    assert a.RetrieveURL.endswith(f"/dicomweb/studies/{STUDY_A}")
    assert uid_list(dicomweb.search_for_studies(search_filters={"StudyDate": "20230101-20231231"})) == [STUDY_B]
    assert uid_list(dicomweb.search_for_studies(search_filters={"ModalitiesInStudy": "MR"})) == [STUDY_A, STUDY_B]
    assert dicomweb.search_for_studies(search_filters={"PatientID": "nobody"}) == []  # 204 -> []


def test_names_in_four_character_sets_and_fuzzy_matching(dicomweb: DICOMwebClient) -> None:
    latin1 = dicomweb.search_for_studies(search_filters={"PatientName": "müller*"})
    assert Dataset.from_json(latin1[0]).PatientName == "Müller^Hans"
    japanese = dicomweb.search_for_studies(search_filters={"PatientName": "山田^太郎"})
    name = Dataset.from_json(japanese[0]).PatientName
    assert (name.alphabetic, name.ideographic, name.phonetic) == ("Yamada^Tarou", "山田^太郎", "やまだ^たろう")
    assert uid_list(dicomweb.search_for_studies(search_filters={"PatientName": "やまだ*"})) == [JAPANESE_STUDY]
    utf8 = dicomweb.search_for_studies(search_filters={"PatientName": "王^小東"})
    assert Dataset.from_json(utf8[0]).PatientName.ideographic == "王^小東"
    assert uid_list(utf8) == [UTF8_STUDY]
    fuzzy = dicomweb.search_for_studies(fuzzymatching=True, search_filters={"PatientName": "john d"})
    assert uid_list(fuzzy) == [STUDY_A]
    assert dicomweb.search_for_studies(fuzzymatching=False, search_filters={"PatientName": "john d"}) == []


def test_series_and_instances_scoped_and_unscoped(dicomweb: DICOMwebClient) -> None:
    series = dicomweb.search_for_series(study_instance_uid=STUDY_A)
    assert uid_list(series, "0020000E") == [f"{STUDY_A}.1", f"{STUDY_A}.2"]
    assert series[0]["00201209"]["Value"] == [3]
    mr = dicomweb.search_for_series(search_filters={"Modality": "MR", "PatientID": "PID-1"})
    assert uid_list(mr, "0020000E") == [f"{STUDY_A}.2"]
    assert mr[0]["00100020"]["Value"] == ["PID-1"]  # study attributes in unscoped series results
    instances = dicomweb.search_for_instances(study_instance_uid=STUDY_A, series_instance_uid=f"{STUDY_A}.1",
                                             fields=["ImageType", "00280010"])
    assert uid_list(instances, "00080018") == [f"{STUDY_A}.1.{i}" for i in range(1, 4)]
    assert instances[0]["00280010"]["Value"] == [16]
    assert instances[0]["00081190"]["Value"][0].endswith(
        f"/studies/{STUDY_A}/series/{STUDY_A}.1/instances/{STUDY_A}.1.1")
    everywhere = dicomweb.search_for_instances(search_filters={"SOPClassUID": MR_IMAGE})
    assert uid_list(everywhere, "00080018") == [f"{STUDY_A}.2.1", f"{STUDY_B}.1.1"]


def test_limit_offset_and_get_remaining(dicomweb: DICOMwebClient) -> None:
    first = dicomweb.search_for_instances(study_instance_uid=STUDY_A, limit=2)
    second = dicomweb.search_for_instances(study_instance_uid=STUDY_A, limit=2, offset=2)
    all_of_them = dicomweb.search_for_instances(study_instance_uid=STUDY_A)
    assert uid_list(first + second, "00080018") == uid_list(all_of_them, "00080018")
    assert len(all_of_them) == 4
    paged = dicomweb.search_for_instances(study_instance_uid=STUDY_A, limit=1, get_remaining=True)
    assert uid_list(paged, "00080018") == uid_list(all_of_them, "00080018")


def test_other_tenants_data_never_appears(server: LiveServer, dicomweb: DICOMwebClient) -> None:
    acme = DICOMwebClient(server.tenant_dicomweb("acme"))
    assert acme.search_for_studies() == []
    acme.store_instances([make_dataset(study_uid="1.2.826.0.2.9", patient_id="PID-1")])
    assert uid_list(acme.search_for_studies(search_filters={"PatientID": "PID-1"})) == ["1.2.826.0.2.9"]
    assert uid_list(dicomweb.search_for_studies(search_filters={"PatientID": "PID-1"})) == [STUDY_A]
    assert acme.search_for_series(study_instance_uid=STUDY_A) == []
