"""kill -9 of a server during ingest: every acknowledged instance survives, and fsck finds no row
without its blob (only, at most, blobs and spool files of the stores that were cut short)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from dicomflow.fsck import fsck
from dicomflow.index.sql import SqlIndexStore
from dicomflow.offload import Offloader
from dicomflow.storage.factory import open_blob_store, spool_dir
from tests.conftest import free_port, make_settings
from tests.factory import make_dataset, multipart, to_bytes
from tests.harness.processes import ServerProcess, write_config

pytestmark = pytest.mark.integration


def test_kill_9_during_ingest(backend_overrides: dict[str, Any], tmp_path: Path) -> None:
    settings = make_settings(tmp_path, **backend_overrides)
    server = ServerProcess(write_config(settings, tmp_path / "settings.yaml"), free_port(),
                           tmp_path / "server.log").start()
    port = server.port
    acked: dict[str, bytes] = {}
    stop = threading.Event()

    def client(n: int) -> None:
        session = requests.Session()
        i = 0
        while not stop.is_set() and i < 400:
            i += 1
            ds = make_dataset(patient_id=f"CRASH-{n}", rows=128, columns=128, instance_number=i)
            data = to_bytes(ds)
            body, content_type = multipart([data])
            try:
                response = session.post(f"http://127.0.0.1:{port}/dicomweb/studies", data=body,
                                        headers={"Content-Type": content_type}, timeout=10)
            except requests.RequestException:
                return
            if response.status_code == 200:
                acked[str(ds.SOPInstanceUID)] = data

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(acked) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()  # SIGKILL mid-stream: requests are being received and committed
    stop.set()
    for thread in threads:
        thread.join(30)
    assert len(acked) >= 40

    server.start()
    try:
        for sop, data in acked.items():
            found = requests.get(f"http://127.0.0.1:{port}/dicomweb/instances?SOPInstanceUID={sop}", timeout=10)
            assert found.status_code == 200, f"acknowledged {sop} lost"
            item = found.json()[0]
            url = (f"http://127.0.0.1:{port}/dicomweb/studies/{item['0020000D']['Value'][0]}/series/"
                   f"{item['0020000E']['Value'][0]}/instances/{sop}")
            got = requests.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; '
                                                       'transfer-syntax=*'}, timeout=10)
            assert got.status_code == 200 and data in got.content, f"acknowledged {sop} not byte-exact"
    finally:
        server.stop()

    async def check() -> None:
        off = Offloader(2)
        index = await SqlIndexStore.open(settings.index_url)
        blobs = await open_blob_store(settings, off)
        try:
            report = await fsck(index, blobs, spool_dir(settings), offloader=off)
            assert report.clean, report.problems()  # default grace: leftovers of the crash are too young
            assert report.instances_checked >= len(acked)
            now = await fsck(index, blobs, spool_dir(settings), grace=0, now=time.time() + 1, offloader=off)
            assert not now.rows_without_blobs and not now.size_mismatches, "a row without its blob"
            repaired = await fsck(index, blobs, spool_dir(settings), grace=0, now=time.time() + 1, repair=True,
                                  offloader=off)
            assert repaired.clean
        finally:
            await blobs.close()
            await index.close()
            off.shutdown()

    asyncio.run(check())
