"""One store, two protocols: what arrives over DIMSE is served over DICOMweb and the other way round.

Real clients on both sides: dcmtk (storescu, findscu, movescu -> storescp) and dicomweb-client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import RLELossless, generate_uid

from dicomflow.settings import RemoteNode, TenantSettings
from tests.factory import make_dataset, split_multipart
from tests.integration.dcmtk import (
    dataset_bytes,
    dimse_server,
    findscu,
    run,
    stored,
    storescp,
    storescu,
    write_instances,
)

pytestmark = pytest.mark.integration


def test_cstore_found_by_qido_and_retrieved_by_wado_identically(live_server_factory: Any, tmp_path: Path) -> None:
    study = generate_uid()
    native = make_dataset(study_uid=study, instance_number=1, patient_id="XP-1", patient_name="Qcross^Qproto")
    rle = make_dataset(study_uid=study, instance_number=2, patient_id="XP-1", patient_name="Qcross^Qproto")
    rle.compress(RLELossless, generate_instance_uid=False)
    server = dimse_server(live_server_factory, tmp_path)
    files = write_instances(tmp_path / "in", [native, rle])
    storescu(server, files)

    client = DICOMwebClient(url=server.dicomweb)
    studies = client.search_for_studies(search_filters={"PatientID": "XP-1"})
    assert [s["0020000D"]["Value"][0] for s in studies] == [study]
    assert studies[0]["00201208"]["Value"][0] == 2  # NumberOfStudyRelatedInstances
    instances = client.search_for_instances(study_instance_uid=study)
    assert {i["00080018"]["Value"][0] for i in instances} == {native.SOPInstanceUID, rle.SOPInstanceUID}

    for ds, path in zip((native, rle), files, strict=True):
        got = client.retrieve_instance(study, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                       media_types=(("application/dicom", "*"),))
        assert got.SOPInstanceUID == ds.SOPInstanceUID
        assert got.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        # PS3.18 8.7.3.5.2: transfer-syntax=* returns the instance as stored; compare the bytes
        url = f"{server.dicomweb}/studies/{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        response = requests.get(url, headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}, timeout=30)
        assert response.status_code == 200
        [part] = split_multipart(response.content, response.headers["Content-Type"])
        assert dataset_bytes(part) == dataset_bytes(path)


def test_stow_found_by_cfind_and_moved_by_cmove_identically(live_server_factory: Any, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    datasets = [make_dataset(study_uid=study, series_uid=series, instance_number=n, patient_id="XP-2",
                             patient_name="Qstow^Qmove") for n in (1, 2)]
    datasets[1].compress(RLELossless, generate_instance_uid=False)
    with storescp(tmp_path / "recv", "DEST", "+xa") as dest:
        node = RemoteNode(ae_title="DEST", host="127.0.0.1", port=dest.port)
        tenants = {"default": TenantSettings(ae_titles=["DICOMFLOW"], remote_nodes={"dest": node})}
        server = dimse_server(live_server_factory, tmp_path, tenants=tenants)
        client = DICOMwebClient(url=server.dicomweb)
        client.store_instances(datasets)

        found = findscu(server, tmp_path / "find", ["QueryRetrieveLevel=STUDY", "PatientID=XP-2",
                                                     "StudyInstanceUID", "NumberOfStudyRelatedInstances"])
        assert [r.StudyInstanceUID for r in found.responses] == [study]
        assert int(found.responses[0].NumberOfStudyRelatedInstances) == 2
        images = findscu(server, tmp_path / "img", ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}",
                                                     f"SeriesInstanceUID={datasets[0].SeriesInstanceUID}",
                                                     "SOPInstanceUID"])
        assert {r.SOPInstanceUID for r in images.responses} == {ds.SOPInstanceUID for ds in datasets}

        proc = run(["movescu", "-v", "-S", "-aec", "DICOMFLOW", "-aet", "MOVESCU", "-aem", "DEST",
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                    "127.0.0.1", str(server.settings.dimse.port)])
        assert "Received Final Move Response (Success)" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        files = dest.wait_files(2)
    received = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
    assert set(received) == {ds.SOPInstanceUID for ds in datasets}
    originals = stored(server)
    for ds in datasets:
        # what STOW stored is what C-MOVE delivers, and both are the data set dicomweb-client sent
        assert dataset_bytes(received[ds.SOPInstanceUID]) == dataset_bytes(originals[ds.SOPInstanceUID])
        assert dataset_bytes(received[ds.SOPInstanceUID]) == dataset_bytes(_part10(ds))
        assert pydicom.dcmread(received[ds.SOPInstanceUID]).file_meta.TransferSyntaxUID == \
            ds.file_meta.TransferSyntaxUID


def _part10(ds: pydicom.Dataset) -> bytes:
    from tests.factory import to_bytes

    return to_bytes(ds)


def test_same_instance_over_stow_then_cstore_is_an_idempotent_success(live_server_factory: Any,
                                                                        tmp_path: Path) -> None:
    """storescu rewrites the file meta header; the data set is identical, so this is no 0x0111 conflict."""
    ds = make_dataset(patient_id="XP-3", patient_name="Qidem^Potent")
    server = dimse_server(live_server_factory, tmp_path)
    DICOMwebClient(url=server.dicomweb).store_instances([ds])
    before = stored(server)[ds.SOPInstanceUID]
    [path] = write_instances(tmp_path / "again", [ds])
    proc = run(["storescu", "-v", "-aec", "DICOMFLOW", "-aet", "STORESCU", "127.0.0.1",
                str(server.settings.dimse.port), str(path)])
    assert proc.returncode == 0, proc.stderr
    assert "Received Store Response (Success)" in proc.stdout + proc.stderr
    after = stored(server)
    assert after[ds.SOPInstanceUID] == before  # nothing replaced, one instance
    assert list(after) == [ds.SOPInstanceUID]
