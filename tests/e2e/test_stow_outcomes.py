"""STOW-RS outcomes (PS3.18 10.5, Table 10.5.3-1, Annex I) seen by dicomweb-client and on the raw wire.

Every outcome has a test: 200 all stored, 202 some failed or warned, 409 none stored, 400 bad syntax,
503 when every instance was refused for lack of resources. dicomweb-client never reports a 202's
FailedSOPSequence (it only logs), so each case is also checked on the raw response.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.conftest import LiveServer
from tests.factory import CT_IMAGE, make_dataset, make_instance, multipart, store_state, to_bytes

#: routing off: these tests are about ingest, and the outbox must stay as ingest wrote it
pytestmark = [pytest.mark.e2e, pytest.mark.routing_off]

FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
RETRIEVE_URL = "00081190"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
SOP_CLASS = "00081150"
SOP_INSTANCE = "00081155"


def post(url: str, parts: list[bytes], **kwargs: Any) -> requests.Response:
    body, ctype = multipart(parts, **kwargs)
    return requests.post(url, data=body, headers={"Content-Type": ctype, "Accept": "application/dicom+json"},
                         timeout=30)


def values(element: dict[str, Any]) -> list[Any]:
    return list(element.get("Value", []))


def blob_bytes(live: LiveServer, key: str) -> bytes:
    from urllib.parse import urlparse

    return (Path(urlparse(live.settings.storage_url).path) / key).read_bytes()


def test_200_every_instance_stored_via_dicomweb_client(live_server: LiveServer) -> None:
    study, series = generate_uid(), generate_uid()
    datasets = [make_dataset(study_uid=study, series_uid=series, instance_number=i + 1) for i in range(3)]
    client = DICOMwebClient(live_server.dicomweb)
    result: Dataset = client.store_instances(datasets)

    # dicomweb-client sends "Host: 127.0.0.1" without the port (RFC 9110 7.2 wants it); the server adds the
    # port it listens on for IP-literal hosts, so the URLs still resolve.
    root = live_server.dicomweb
    assert result.RetrieveURL == f"{root}/studies/{study}"
    assert "FailedSOPSequence" not in result
    refs = {item.ReferencedSOPInstanceUID: item for item in result.ReferencedSOPSequence}
    assert set(refs) == {ds.SOPInstanceUID for ds in datasets}
    for ds in datasets:
        item = refs[ds.SOPInstanceUID]
        assert item.ReferencedSOPClassUID == CT_IMAGE
        assert item.RetrieveURL == f"{root}/studies/{study}/series/{series}/instances/{ds.SOPInstanceUID}"
        assert "WarningReason" not in item
    state = store_state(live_server.settings)
    assert [i[3] for i in state.instances] == sorted(ds.SOPInstanceUID for ds in datasets)
    assert len(state.blobs) == 3 and state.spool == []
    assert sorted(e[2] or "" for e in state.events("instance.stored")) == sorted(ds.SOPInstanceUID for ds in datasets)
    assert state.studies[("default", study)] == (1, 3, "CT")


def test_200_raw_response_and_bytes_kept_exactly(live_server: LiveServer) -> None:
    study = generate_uid()
    data = [make_instance(study_uid=study, instance_number=i) for i in range(2)]
    resp = post(f"{live_server.dicomweb}/studies/{study}", data)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/dicom+json")
    body = resp.json()
    assert values(body[RETRIEVE_URL]) == [f"{live_server.dicomweb}/studies/{study}"]
    assert FAILED_SOP_SEQUENCE not in body
    assert len(values(body[REFERENCED_SOP_SEQUENCE])) == 2
    state = store_state(live_server.settings)
    stored = {blob_bytes(live_server, i[4]) for i in state.instances}
    assert stored == set(data)


def test_202_some_failed_study_mismatch(live_server: LiveServer) -> None:
    study, other = generate_uid(), generate_uid()
    good = make_dataset(study_uid=study)
    bad = make_dataset(study_uid=other)
    resp = post(f"{live_server.dicomweb}/studies/{study}", [to_bytes(good), to_bytes(bad)])
    assert resp.status_code == 202
    body = resp.json()
    failed = values(body[FAILED_SOP_SEQUENCE])
    assert failed == [{SOP_CLASS: {"vr": "UI", "Value": [CT_IMAGE]},
                       SOP_INSTANCE: {"vr": "UI", "Value": [bad.SOPInstanceUID]},
                       FAILURE_REASON: {"vr": "US", "Value": [0xA900]}}]
    assert [values(r[SOP_INSTANCE]) for r in values(body[REFERENCED_SOP_SEQUENCE])] == [[good.SOPInstanceUID]]
    assert values(body[RETRIEVE_URL]) == [f"{live_server.dicomweb}/studies/{study}"]
    assert "Warning" in resp.headers

    # dicomweb-client accepts the 202 silently; the failure is only visible in the dataset it returns
    other_good, other_bad = make_dataset(study_uid=study), make_dataset(study_uid=other)
    result = DICOMwebClient(live_server.dicomweb).store_instances([other_good, other_bad], study_instance_uid=study)
    assert [i.ReferencedSOPInstanceUID for i in result.FailedSOPSequence] == [other_bad.SOPInstanceUID]
    assert [i.FailureReason for i in result.FailedSOPSequence] == [0xA900]
    state = store_state(live_server.settings)
    assert {i[3] for i in state.instances} == {good.SOPInstanceUID, other_good.SOPInstanceUID}
    assert len(state.events("instance.stored")) == 2 and len(state.blobs) == 2 and state.spool == []


def test_202_stored_with_warning_reason(live_server: LiveServer) -> None:
    ds = make_dataset(series_number=2, instance_number=1)
    data = to_bytes(ds)
    assert data.count(b"IS\x02\x001 ") == 1
    data = data.replace(b"IS\x02\x001 ", b"IS\x02\x001A")  # Instance Number that is not an integer string
    resp = post(f"{live_server.dicomweb}/studies", [data])
    assert resp.status_code == 202
    (ref,) = values(resp.json()[REFERENCED_SOP_SEQUENCE])
    assert ref[WARNING_REASON] == {"vr": "US", "Value": [0xB006]}  # PS3.4 B.2.3 Elements Discarded
    assert FAILED_SOP_SEQUENCE not in resp.json()
    assert [i[3] for i in store_state(live_server.settings).instances] == [ds.SOPInstanceUID]


def test_409_all_failed_duplicate_with_different_bytes(live_server: LiveServer) -> None:
    sop = generate_uid()
    first = make_dataset(sop_uid=sop)
    second = make_dataset(sop_uid=sop, study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID,
                          patient_name="Other^Name")
    assert post(f"{live_server.dicomweb}/studies", [to_bytes(first)]).status_code == 200

    resp = post(f"{live_server.dicomweb}/studies", [to_bytes(second)])
    assert resp.status_code == 409
    body = resp.json()
    assert values(body[FAILED_SOP_SEQUENCE]) == [{SOP_CLASS: {"vr": "UI", "Value": [CT_IMAGE]},
                                                  SOP_INSTANCE: {"vr": "UI", "Value": [sop]},
                                                  FAILURE_REASON: {"vr": "US", "Value": [0x0111]}}]
    assert REFERENCED_SOP_SEQUENCE not in body
    assert body[RETRIEVE_URL] == {"vr": "UR"}  # Type 2: present, empty

    with pytest.raises(requests.HTTPError) as info:
        DICOMwebClient(live_server.dicomweb).store_instances([second])
    assert info.value.response.status_code == 409

    state = store_state(live_server.settings)
    assert [i[3] for i in state.instances] == [sop]
    assert blob_bytes(live_server, state.instances[0][4]) == to_bytes(first)
    assert len(state.blobs) == 1 and len(state.events("instance.stored")) == 1 and state.spool == []


def test_identical_bytes_again_is_idempotent_success(live_server: LiveServer) -> None:
    data = make_instance()
    for _ in range(3):
        resp = post(f"{live_server.dicomweb}/studies", [data])
        assert resp.status_code == 200
        assert len(values(resp.json()[REFERENCED_SOP_SEQUENCE])) == 1
    resp = post(f"{live_server.dicomweb}/studies", [data, data])  # twice in one request
    assert resp.status_code == 200
    state = store_state(live_server.settings)
    assert len(state.instances) == 1 and len(state.blobs) == 1 and len(state.events("instance.stored")) == 1


def test_overwrite_policy_replaces_the_instance(live_server: LiveServer) -> None:
    """Tenant "globex" (tests/conftest.py) overwrites: the new bytes win and the old blob is removed."""
    sop = generate_uid()
    first = make_dataset(sop_uid=sop)
    second = make_dataset(sop_uid=sop, study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID,
                          patient_name="Changed^Name")
    url = live_server.tenant_dicomweb("globex")
    assert post(f"{url}/studies", [to_bytes(first)]).status_code == 200
    resp = post(f"{url}/studies", [to_bytes(second)])
    assert resp.status_code == 200
    (ref,) = values(resp.json()[REFERENCED_SOP_SEQUENCE])
    assert values(ref[RETRIEVE_URL])[0].startswith(f"{url}/studies/{first.StudyInstanceUID}/")
    state = store_state(live_server.settings)
    assert [i[:1] + i[3:4] for i in state.instances] == [("globex", sop)]
    assert len(state.blobs) == 1 and blob_bytes(live_server, state.instances[0][4]) == to_bytes(second)
    assert len(state.events("instance.stored")) == 2
    assert state.studies[("globex", first.StudyInstanceUID)] == (1, 1, "CT")


def test_tenants_are_independent(live_server: LiveServer) -> None:
    sop = generate_uid()
    a = make_dataset(sop_uid=sop)
    b = make_dataset(sop_uid=sop, patient_name="Other^Name")
    assert post(f"{live_server.dicomweb}/studies", [to_bytes(a)]).status_code == 200
    assert post(f"{live_server.tenant_dicomweb('acme')}/studies", [to_bytes(b)]).status_code == 200
    state = store_state(live_server.settings)
    assert sorted((i[0], i[3]) for i in state.instances) == [("acme", sop), ("default", sop)]
    assert sorted(state.blobs)[0].startswith("acme/") and sorted(state.blobs)[1].startswith("default/")


def test_several_studies_leave_the_study_retrieve_url_empty(live_server: LiveServer) -> None:
    a, b = make_dataset(), make_dataset()
    resp = post(f"{live_server.dicomweb}/studies", [to_bytes(a), to_bytes(b)])
    assert resp.status_code == 200
    body = resp.json()
    assert body[RETRIEVE_URL] == {"vr": "UR"}
    urls = sorted(values(r[RETRIEVE_URL])[0] for r in values(body[REFERENCED_SOP_SEQUENCE]))
    assert urls == sorted(f"{live_server.dicomweb}/studies/{d.StudyInstanceUID}/series/{d.SeriesInstanceUID}"
                          f"/instances/{d.SOPInstanceUID}" for d in (a, b))


def test_retrieve_urls_follow_forwarded_headers(live_server: LiveServer) -> None:
    ds = make_dataset()
    body, ctype = multipart([to_bytes(ds)])
    resp = requests.post(f"{live_server.tenant_dicomweb('acme')}/studies", data=body, timeout=30,
                         headers={"Content-Type": ctype, "Forwarded": 'for=10.0.0.1;proto=https;host="pacs.example"',
                                  "X-Forwarded-Prefix": "/imaging"})
    assert resp.status_code == 200
    assert values(resp.json()[RETRIEVE_URL]) == [
        f"https://pacs.example/imaging/tenants/acme/dicomweb/studies/{ds.StudyInstanceUID}"]


def test_part_without_content_type_is_taken_as_application_dicom(live_server: LiveServer) -> None:
    data = make_instance()
    boundary = "b0undary"
    body = f"--{boundary}\r\n\r\n".encode() + data + f"\r\n--{boundary}--\r\n".encode()
    resp = requests.post(f"{live_server.dicomweb}/studies", data=body, timeout=30, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert resp.status_code == 200
    assert blob_bytes(live_server, store_state(live_server.settings).instances[0][4]) == data


def test_part_of_another_media_type_is_reported_failed(live_server: LiveServer) -> None:
    good = make_instance()
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + good
            + f"\r\n--{boundary}\r\nContent-Type: text/plain\r\n\r\nhello\r\n--{boundary}--\r\n".encode())
    resp = requests.post(f"{live_server.dicomweb}/studies", data=body, timeout=30, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert resp.status_code == 202
    assert [values(f[FAILURE_REASON]) for f in values(resp.json()[FAILED_SOP_SEQUENCE])] == [[0xC122]]
    assert len(store_state(live_server.settings).instances) == 1


def test_400_body_without_parts(live_server: LiveServer) -> None:
    boundary = "b0undary"
    resp = requests.post(f"{live_server.dicomweb}/studies", data=f"--{boundary}--\r\n".encode(), timeout=30,
                         headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert resp.status_code == 400
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert "no parts" in resp.json()["detail"]


def test_409_every_part_unreadable(live_server: LiveServer) -> None:
    resp = post(f"{live_server.dicomweb}/studies", [b"not dicom", make_instance()[:-7]])
    assert resp.status_code == 409
    reasons = [values(f[FAILURE_REASON]) for f in values(resp.json()[FAILED_SOP_SEQUENCE])]
    assert reasons == [[0xC000], [0xC000]]
    state = store_state(live_server.settings)
    assert state.instances == [] and state.blobs == [] and state.outbox == [] and state.spool == []
