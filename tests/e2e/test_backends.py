"""The whole server on each pair of backends (SQLite + folder; PostgreSQL + SeaweedFS S3), driven by
dicomweb-client and raw HTTP: STOW -> QIDO -> WADO (instance byte-exact, frames, metadata) -> DELETE.
"""

from __future__ import annotations

import io
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from aiohttp.test_utils import TestClient
from dicomweb_client.api import DICOMwebClient

from dicomflow.app import create_app
from dicomflow.appkeys import INDEX
from tests.conftest import free_port, make_settings
from tests.factory import make_dataset, multipart, to_bytes
from tests.harness.seaweed import SeaweedS3

pytestmark = pytest.mark.e2e


def _blob_count(server: Any, seaweed_or_none: SeaweedS3 | None) -> int:
    location = urllib.parse.urlparse(server.settings.storage_url)
    if location.scheme == "file":
        return sum(1 for p in Path(location.path).rglob("*") if p.is_file() and ".spool" not in p.parts)
    assert seaweed_or_none is not None
    pages = seaweed_or_none.client().get_paginator("list_objects_v2").paginate(
        Bucket=location.netloc, Prefix=location.path.strip("/") + "/")
    return sum(len(page.get("Contents", [])) for page in pages)


def test_stow_qido_wado_delete(backend_overrides: dict[str, Any], live_server_factory: Any,
                               request: pytest.FixtureRequest) -> None:
    # backend_overrides first: its database outlives the server (fixtures tear down in reverse)
    server = live_server_factory(**backend_overrides)
    seaweed = request.getfixturevalue("seaweed") if backend_overrides else None
    client = DICOMwebClient(server.dicomweb)
    study = make_dataset().StudyInstanceUID
    small = [make_dataset(study_uid=study, patient_id="PID-BACKENDS", instance_number=n) for n in (1, 2, 3)]
    # 2 x 2,600 frames of 64 x 64 x 16 bit: a 21 MiB instance, stored in several multipart parts on S3
    big = make_dataset(study_uid=study, patient_id="PID-BACKENDS", rows=64, columns=64, frames=2600,
                       instance_number=4, modality="MR")
    body, content_type = multipart([to_bytes(ds) for ds in [*small, big]])
    stored = requests.post(f"{server.dicomweb}/studies", data=body, headers={"Content-Type": content_type},
                           timeout=120)
    assert stored.status_code == 200, stored.text

    studies = client.search_for_studies(search_filters={"PatientID": "PID-BACKENDS"})
    assert [s["0020000D"]["Value"][0] for s in studies] == [study]
    assert studies[0]["00201208"]["Value"] == [4]
    series = client.search_for_series(study)
    assert sorted(s["00080060"]["Value"][0] for s in series) == ["CT", "CT", "CT", "MR"]

    for ds in [*small, big]:
        response = requests.get(
            f"{server.dicomweb}/studies/{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}, timeout=60)
        assert response.status_code == 200
        assert to_bytes(ds) in response.content, "byte-exact retrieve"

    frames = client.retrieve_instance_frames(study, big.SeriesInstanceUID, big.SOPInstanceUID,
                                             frame_numbers=[1, 1300, 2600])
    frame_len = 64 * 64 * 2
    assert frames == [big.PixelData[(n - 1) * frame_len:n * frame_len] for n in (1, 1300, 2600)]

    metadata = client.retrieve_study_metadata(study)
    assert sorted(m["00080018"]["Value"][0] for m in metadata) == sorted(ds.SOPInstanceUID for ds in [*small, big])
    instance = client.retrieve_instance(study, small[0].SeriesInstanceUID, small[0].SOPInstanceUID)
    assert instance.PixelData == small[0].PixelData
    assert _blob_count(server, seaweed) == 4

    deleted = requests.delete(f"{server.dicomweb}/studies/{study}", timeout=60)
    assert deleted.status_code in (200, 202, 204)
    assert client.search_for_studies(search_filters={"PatientID": "PID-BACKENDS"}) == []
    deadline = time.monotonic() + 10
    while _blob_count(server, seaweed) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _blob_count(server, seaweed) == 0


@pytest.mark.integration
async def test_stow_while_s3_is_down_is_503_and_stores_nothing(aiohttp_client: Any, tmp_path: Path,
                                                               seaweed: SeaweedS3) -> None:
    settings = make_settings(tmp_path, storage="s3://nowhere/blobs", s3={
        "endpoint_url": f"http://127.0.0.1:{free_port()}", "access_key_id": "x", "secret_access_key": "y",
        "path_style": True, "max_attempts": 2, "connect_timeout": 0.5})
    client: TestClient = await aiohttp_client(create_app(settings))  # type: ignore[type-arg]
    ds = make_dataset()
    body, content_type = multipart([to_bytes(ds)])
    response = await client.post("/dicomweb/studies", data=body, headers={"Content-Type": content_type})
    assert response.status == 503
    assert response.headers.get("Retry-After")
    answer = await response.json()
    failed = answer["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0xA700]  # PS3.4 B.2.3 Refused: Out of Resources
    assert await client.server.app[INDEX].find_existing("default", ds.SOPInstanceUID) is None
    assert [p for p in (settings.data_dir / "spool").glob("*")] == [], "the spool file was removed"
    ready = await client.get("/readyz")
    assert ready.status == 503


def test_retrieve_reads_pydicom_through_ranged_gets(backend_overrides: dict[str, Any],
                                                    live_server_factory: Any) -> None:
    """Transcoding on retrieve parses the stored blob with pydicom in a worker thread (open_sync)."""
    server = live_server_factory(**backend_overrides)
    ds = make_dataset(rows=32, columns=32)
    client = DICOMwebClient(server.dicomweb)
    client.store_instances([ds])
    response = requests.get(
        f"{server.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
        f"{ds.SOPInstanceUID}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2'},
        timeout=60)
    assert response.status_code == 200
    boundary = response.headers["Content-Type"].split("boundary=")[1].strip('"')
    part = response.content.split(f"--{boundary}".encode())[1].split(b"\r\n\r\n", 1)[1][:-2]
    got = pydicom.dcmread(io.BytesIO(part))
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert got.PixelData == ds.PixelData
