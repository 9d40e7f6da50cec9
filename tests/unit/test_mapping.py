"""Mappings: the closed transform set, load-time checks with file:line, validation with fhir.resources,
the default mapping offline against the golden JSON, and PS3.15 de-identification."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicomflow.connectors.deid import deidentify_part10, derived_uid
from dicomflow.engine.config import load_mappings
from dicomflow.engine.routes import DeidOption
from dicomflow.engine.yamlfile import load_model
from dicomflow.index.levels import split_levels
from dicomflow.ingest.parse import parse_part10
from dicomflow.mapping.evaluate import MappingError, build_resources, prune
from dicomflow.mapping.model import Mapping
from dicomflow.mapping.view import InstanceView, SeriesView, StudyView
from tests.factory import make_dataset, to_bytes
from tests.routing_support import REPO, SHIPPED_MAPPINGS

GOLDEN = REPO / "tests" / "data" / "golden"


def view_of(datasets: list[pydicom.Dataset], tmp_path: Path) -> StudyView:
    """A StudyView built the way the index builds its rows (parse once, split by level)."""
    study: dict[str, Any] = {}
    series: dict[str, SeriesView] = {}
    for i, ds in enumerate(datasets):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(to_bytes(ds))
        parsed = parse_part10(path, 1024)
        study_attrs, series_attrs = split_levels(parsed.metadata)
        study = study_attrs
        sv = series.setdefault(parsed.series_instance_uid, SeriesView(parsed.series_instance_uid, series_attrs))
        sv.instances.append(InstanceView(parsed.sop_instance_uid, parsed.sop_class_uid, int(ds.InstanceNumber)))
    return StudyView("default", str(datasets[0].StudyInstanceUID), study, list(series.values()),
                     {"tenant": "default", "dicomweb_root": "https://pacs.example.org/dicomweb"})


def default_mapping() -> Mapping:
    return load_model(SHIPPED_MAPPINGS / "imagingstudy-default.yaml", Mapping).value


def test_default_mapping_offline_equals_the_golden_json(tmp_path: Path) -> None:
    from tests.e2e.test_routing_fhir import golden_study

    built = {t.id: b for t, b in build_resources(default_mapping(), view_of(golden_study(), tmp_path))}
    assert built["patient"] is not None and built["study"] is not None and built["endpoint"] is not None
    study = built["study"].body
    refs = {"Patient/{patient}": study["subject"]["reference"],
            "Endpoint/{endpoint}": study["endpoint"][0]["reference"]}
    assert study["subject"]["reference"] == "Patient?identifier=urn:oid:1.2.826.0.1.3680043.10.1045.99|PID-GOLD"
    text = json.dumps(study, sort_keys=True)
    for placeholder, ref in refs.items():
        text = text.replace(ref, placeholder)
    assert json.loads(text) == json.loads((GOLDEN / "imagingstudy-default.ImagingStudy.json").read_text())
    assert built["patient"].body == json.loads((GOLDEN / "imagingstudy-default.Patient.json").read_text())
    assert built["endpoint"].body["address"] == "https://pacs.example.org/dicomweb"
    assert built["study"].search_identifier == "urn:dicom:uid|urn:oid:1.2.826.0.1.3680043.10.1045.7.1"


def test_missing_values_disappear(tmp_path: Path) -> None:
    ds = make_dataset(accession="", study_time="")
    del ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName
    built = {t.id: b for t, b in build_resources(default_mapping(), view_of([ds], tmp_path))}
    assert built["patient"] is not None and set(built["patient"].body) == {"resourceType", "identifier", "name"}
    study = built["study"].body  # type: ignore[union-attr]
    assert study["started"] == "2024-01-15"  # no time and no known time zone: the date only
    assert [i for i in study["identifier"] if "type" in i] == []  # no accession number
    assert "referrer" not in study


def test_a_study_without_patient_id_cannot_become_an_imagingstudy(tmp_path: Path) -> None:
    # the Patient is skipped (when: PatientID exists), so ImagingStudy.subject (1..1 in R4) is missing
    with pytest.raises(MappingError, match="invalid ImagingStudy: subject: Field required"):
        build_resources(default_mapping(), view_of([make_dataset(patient_id="")], tmp_path))


def test_a_resource_fhir_resources_rejects_is_a_mapping_error(tmp_path: Path) -> None:
    data = default_mapping().model_dump()
    data["resources"][2]["body"]["started"] = {"$attr": "StudyDescription"}
    mapping = Mapping.model_validate(data)
    with pytest.raises(MappingError, match="invalid ImagingStudy: started"):
        build_resources(mapping, view_of([make_dataset()], tmp_path))


def test_unknown_transforms_and_bad_arguments_are_load_errors(tmp_path: Path) -> None:
    folder = tmp_path / "mappings"
    folder.mkdir()
    (folder / "m.yaml").write_text("""name: bad
resources:
  - id: study
    type: ImagingStudy
    key: {system: urn:dicom:uid, value: {$attr: StudyInstanceUID}}
    body:
      status: {$eval: "__import__('os')"}
""")
    (folder / "n.yaml").write_text("""name: bad-ref
resources:
  - id: study
    type: ImagingStudy
    key: {system: urn:dicom:uid, value: {$attr: NotAKeyword}}
    body:
      subject: {reference: {$ref: patient}}
""")
    found, problems = load_mappings(folder)
    assert found == {}
    text = "\n".join(str(p) for p in problems)
    assert "m.yaml:1: resources.0 (study).body: status: unknown transform '$eval'" in text
    assert "n.yaml:1: resources.0 (study).key: value: 'NotAKeyword' is neither a DICOM keyword" in text


def test_transforms_on_a_hand_built_study() -> None:
    attrs = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Smith^Ann"}]},
             "00100040": {"vr": "CS", "Value": ["X"]}, "00100021": {"vr": "LO", "Value": ["Hospital A"]},
             "00100020": {"vr": "LO", "Value": ["P1"]}, "0020000D": {"vr": "UI", "Value": ["1.2"]}}
    ct, sr = {"00080060": {"vr": "CS", "Value": ["CT"]}}, {"00080060": {"vr": "CS", "Value": ["SR"]}}
    series = [SeriesView("1.2.1", ct, [InstanceView("1.2.1.1", "1.2.3", 1)]), SeriesView("1.2.2", ct, []),
              SeriesView("1.2.3", sr, [InstanceView("1.2.3.1", "1.2.4", None)])]
    mapping = Mapping.model_validate({"name": "t", "resources": [{
        "id": "p", "type": "Patient",
        "key": {"system": {"$issuer": "IssuerOfPatientID"}, "value": {"$attr": "PatientID"}},
        "body": {"gender": {"$gender": "PatientSex"}, "name": [{"$name": "PatientName"}],
                 "identifier": [{"system": {"$issuer": "IssuerOfPatientID"}, "value": {"$attr": "PatientID"}}],
                 "extension": [{"url": "urn:x", "valueInteger": {"$count": "instances"}},
                               {"url": "urn:y", "valueString": {"$concat": ["a", {"$attr": "StudyID"}]}}]},
    }]})
    view = StudyView("t", "1.2", attrs, series, {"tenant": "t"})
    body = build_resources(mapping, view)[0][1].body  # type: ignore[union-attr]
    assert body["gender"] == "unknown" and body["name"] == [{"family": "Smith", "given": ["Ann"], "text": "Ann Smith"}]
    assert body["identifier"][0]["system"] == "urn:dicomflow:issuer:Hospital-A"
    assert body["extension"] == [{"url": "urn:x", "valueInteger": 2}, {"url": "urn:y"}]  # $concat: part missing


def test_prune_removes_empty_elements() -> None:
    assert prune({"a": None, "b": "", "c": [], "d": {}, "e": [None, {"f": ""}], "g": " x ", "h": 0}) == \
        {"g": "x", "h": 0}


def test_deidentification_basic_profile_is_deterministic_and_records_the_method() -> None:
    ds = make_dataset(patient_name="Zecret^Hiddenname", patient_id="MRN-12345", InstitutionName="ACME North",
                      DeviceSerialNumber="SN-9", OtherPatientIDs="OLD-1")
    ds.add_new(0x00091010, "LO", "private stuff")
    original = to_bytes(ds)
    first = deidentify_part10(io.BytesIO(original), [DeidOption.RETAIN_DEVICE_IDENTITY], salt="project-x")
    again = deidentify_part10(io.BytesIO(original), [DeidOption.RETAIN_DEVICE_IDENTITY], salt="project-x")
    assert first == again  # a retried delivery sends the very same instance
    out = pydicom.dcmread(io.BytesIO(first))
    assert "Zecret" not in str(out.get("PatientName", "")) and "MRN-12345" not in str(out.get("PatientID", ""))
    assert "OtherPatientIDs" not in out and (0x0009, 0x1010) not in out  # X: removed; private tags removed
    assert out.PatientBirthDate != "19700101" and out.StudyDate != "20240115"
    assert out.StudyInstanceUID == derived_uid("project-x", str(ds.StudyInstanceUID))
    assert out.SOPInstanceUID == out.file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID
    assert out.DeviceSerialNumber == "SN-9"  # Retain Device Identity Option
    assert out.InstitutionName != "ACME North"
    assert out.PatientIdentityRemoved == "YES"
    codes = [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113109"]  # PS3.16 CID 7050
    other = deidentify_part10(io.BytesIO(original), [DeidOption.RETAIN_UIDS, DeidOption.RETAIN_LONGITUDINAL_FULL_DATES])
    kept = pydicom.dcmread(io.BytesIO(other))
    assert kept.StudyInstanceUID == ds.StudyInstanceUID and kept.StudyDate == "20240115"


def test_search_identifiers_are_escaped() -> None:
    from dicomflow.mapping.evaluate import BuiltResource, escape_search

    assert escape_search("a,b|c$d\\e") == "a\\,b\\|c\\$d\\\\e"
    built = BuiltResource("p", "Patient", "urn:x|y", "MRN,1", {})
    assert built.search_identifier == "urn:x\\|y|MRN\\,1"
