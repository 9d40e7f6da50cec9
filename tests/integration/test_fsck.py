"""dicomflow fsck: each inconsistency created for real, detected, and repaired where safe.

Runs on the embedded default (SQLite + folder) and on scale-out backends (PostgreSQL + SeaweedFS S3).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
import yaml
from aiohttp.test_utils import TestClient

from dicomflow.app import create_app
from dicomflow.appkeys import BLOBS, INDEX, OFFLOADER
from dicomflow.fsck import fsck
from dicomflow.index import schema as t
from dicomflow.index.sql import SqlIndexStore
from dicomflow.settings import Settings
from dicomflow.storage.base import BlobStore, new_blob_key
from dicomflow.storage.factory import spool_dir
from dicomflow.storage.s3 import S3BlobStore
from tests.conftest import make_settings
from tests.factory import make_dataset, multipart, to_bytes


async def stow(client: TestClient, datasets: list[Any]) -> None:  # type: ignore[type-arg]
    body, content_type = multipart([to_bytes(ds) for ds in datasets])
    response = await client.post("/dicomweb/studies", data=body, headers={"Content-Type": content_type})
    assert response.status == 200, await response.text()


def spool_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / f"{uuid.uuid4().hex}.src"
    path.write_bytes(data)
    return path


async def test_fsck_finds_and_repairs(aiohttp_client: Any, tmp_path: Path, backend_overrides: dict[str, Any],
                                      request: pytest.FixtureRequest) -> None:
    # no routing worker: the outbox stays as a crashed worker left it
    settings = make_settings(tmp_path, routing={"enabled": False}, **backend_overrides)
    client = await aiohttp_client(create_app(settings))
    app = client.server.app
    index: SqlIndexStore = app[INDEX]
    blobs: BlobStore = app[BLOBS]
    study = make_dataset().StudyInstanceUID
    datasets = [make_dataset(study_uid=study, instance_number=n) for n in range(1, 5)]
    await stow(client, datasets)

    report = await fsck(index, blobs, spool_dir(settings), grace=0, offloader=app[OFFLOADER])
    assert report.clean and not report.problems() and report.instances_checked == 4 and report.blobs_checked == 4
    assert report.young_unreferenced_blobs == 0

    records = await index.list_instances("default", study)
    # 1. a row whose blob vanished, 2. a row whose blob has other bytes
    await blobs.delete(records[0].blob_key)
    await blobs.put_file(records[1].blob_key, spool_file(tmp_path, b"truncated"))
    # 3. a blob written by a store that crashed before its commit (and one still being committed)
    orphan = new_blob_key("default")
    await blobs.put_file(orphan, spool_file(tmp_path, b"orphan"))
    # 4. a spool file left by a crash during receive, and one being received right now
    spool = spool_dir(settings)
    stale, fresh = spool / "stale.dcm", spool / "fresh.dcm"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"receiving")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    os.utime(fresh, (time.time() + 600, time.time() + 600))  # still written to at the checks' "now" below
    # 5. (S3) a multipart upload a crash left unfinished
    stale_uploads: list[str] = []
    if isinstance(blobs, S3BlobStore):
        stale_uploads.append(new_blob_key("default"))
        bucket, obj = blobs.locate(stale_uploads[0])
        request.getfixturevalue("seaweed").client().create_multipart_upload(Bucket=bucket, Key=obj)
    # 6. an outbox event claimed by a worker that died
    async with index.transaction() as conn:
        first = (await conn.execute(sa.select(sa.func.min(t.outbox.c.id)))).scalar()
        await conn.execute(sa.update(t.outbox).where(t.outbox.c.id == first).values(
            claimed_by="worker-that-died", claimed_until=time.time() - 60))

    report = await fsck(index, blobs, spool, grace=60, now=time.time() + 120)
    assert [r.sop_uid for r in report.rows_without_blobs] == [records[0].sop_uid]
    assert [(r.sop_uid, r.actual_size, r.expected_size) for r in report.size_mismatches] == [
        (records[1].sop_uid, len(b"truncated"), records[1].size)]
    assert report.orphan_blobs == [orphan]
    assert report.stale_spool_files == [str(stale)], "a file younger than the grace period is in use"
    assert report.expired_outbox_claims == [first]
    assert report.stale_uploads == stale_uploads
    assert not report.clean

    # within the grace period an unreferenced blob may be a store still committing: left alone
    young = await fsck(index, blobs, spool, grace=3600)
    assert young.orphan_blobs == [] and young.young_unreferenced_blobs == 1

    repaired = await fsck(index, blobs, spool, repair=True, grace=60, now=time.time() + 120)
    assert repaired.repaired == {"orphan_blobs": 1, "stale_spool_files": 1, "expired_outbox_claims": 1,
                                 **({"stale_uploads": 1} if stale_uploads else {})}
    assert not repaired.clean, "rows whose blob is gone are kept unless asked"
    assert any("--drop-missing-rows" in note for note in repaired.notes)
    assert not await blobs.exists(orphan)
    assert not stale.exists() and fresh.exists()
    async with index.engine.connect() as conn:
        claim = (await conn.execute(sa.select(t.outbox.c.claimed_by, t.outbox.c.claimed_until, t.outbox.c.done_at)
                                    .where(t.outbox.c.id == first))).one()
    assert tuple(claim) == (None, None, None), "released for the next worker, not marked done"

    dropped = await fsck(index, blobs, spool, repair=True, drop_missing_rows=True, grace=60)
    assert dropped.repaired == {"rows_without_blobs": 1, "size_mismatches": 1}
    assert dropped.clean
    left = await index.list_instances("default", study)
    assert sorted(r.sop_uid for r in left) == sorted(r.sop_uid for r in records[2:])
    async with index.engine.connect() as conn:
        events = (await conn.execute(sa.select(t.outbox.c.event, t.outbox.c.payload_json)
                                     .where(t.outbox.c.event == "instance.deleted"))).all()
    assert len(events) == 2
    assert all(json.loads(e.payload_json)["source"]["protocol"] == "maintenance" for e in events)

    final = await fsck(index, blobs, spool, grace=0)
    assert final.clean and not final.problems() and final.instances_checked == 2 and final.blobs_checked == 2
    # the instances that were never damaged are still retrievable
    response = await client.get(f"/dicomweb/studies/{study}", headers={"Accept": "multipart/related; "
                                                                         "type=\"application/dicom\""})
    assert response.status == 200
    boundary = response.content_type and response.headers["Content-Type"].split("boundary=")[1].strip('"')
    parts = (await response.read()).split(f"--{boundary}".encode())[1:-1]
    got = {str(pydicom.dcmread(io.BytesIO(part.split(b"\r\n\r\n", 1)[1][:-2])).SOPInstanceUID)
           for part in parts}
    assert got == {r.sop_uid for r in records[2:]}


async def test_fsck_keeps_blobs_when_the_index_is_empty(tmp_path: Path) -> None:
    """Pointing fsck at the wrong (empty) index must not delete every blob as unreferenced."""
    settings = make_settings(tmp_path)
    settings.data_dir.mkdir(parents=True)
    index = await SqlIndexStore.open(settings.index_url)
    from dicomflow.offload import Offloader
    from dicomflow.storage.factory import open_blob_store

    off = Offloader(2)
    blobs = await open_blob_store(settings, off)
    try:
        key = new_blob_key("default")
        await blobs.put_file(key, spool_file(tmp_path, b"precious"))
        report = await fsck(index, blobs, spool_dir(settings), repair=True, grace=0, offloader=off)
        assert report.orphan_blobs == [key] and not report.repaired
        assert await blobs.exists(key)
        assert any("holds no instances" in note for note in report.notes)
    finally:
        await blobs.close()
        await index.close()
        off.shutdown()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomflow", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})


async def test_fsck_command_line(aiohttp_client: Any, tmp_path: Path) -> None:
    settings: Settings = make_settings(tmp_path)
    client = await aiohttp_client(create_app(settings))
    await stow(client, [make_dataset()])
    blobs: BlobStore = client.server.app[BLOBS]
    orphan = new_blob_key("default")
    await blobs.put_file(orphan, spool_file(tmp_path, b"orphan"))
    old = time.time() - 7200
    os.utime(Path(settings.storage_url.removeprefix("file://")) / orphan, (old, old))
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(settings.data_dir)}))

    found = _cli("fsck", "--config", str(config), cwd=tmp_path)
    assert found.returncode == 1, found.stderr
    assert f"blob without row: {orphan}" in found.stdout and "fsck: problems: orphan_blobs=1" in found.stdout

    fixed = _cli("fsck", "--repair", "--json", "--config", str(config), cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    report = json.loads(fixed.stdout)
    assert report["clean"] and report["repaired"] == {"orphan_blobs": 1} and report["instances_checked"] == 1

    again = _cli("fsck", "--config", str(config), cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.strip().endswith("fsck: clean")
