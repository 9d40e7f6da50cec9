"""kill -9 of a server during ingest: every acknowledged instance survives, and fsck finds no row
without its blob (only, at most, blobs and spool files of the stores that were cut short)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from dicomflow.fsck import fsck
from dicomflow.index.sql import SqlIndexStore
from dicomflow.offload import Offloader
from dicomflow.settings import Settings
from dicomflow.storage.factory import open_blob_store, spool_dir
from tests.conftest import free_port, make_settings
from tests.factory import make_dataset, multipart, to_bytes

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.integration


def _config(settings: Settings, path: Path) -> Path:
    data = settings.model_dump(mode="json", exclude={"tenants", "auth", "routing", "audit"},
                               exclude_none=True)
    if settings.s3.secret_access_key is not None:
        data["s3"]["secret_access_key"] = settings.s3.secret_access_key.get_secret_value()
    data["dimse"] = {"enabled": False}
    path.write_text(yaml.safe_dump(data))
    return path


def _serve(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "dicomflow", "serve", "--config", str(config),
                                    "--http-port", str(port)], stdout=out, stderr=out, cwd=config.parent,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except requests.RequestException:
            pass
        time.sleep(0.1)
    process.kill()
    raise AssertionError("server did not start: " + log.read_text()[-3000:])


def test_kill_9_during_ingest(backend_overrides: dict[str, Any], tmp_path: Path) -> None:
    settings = make_settings(tmp_path, **backend_overrides)
    config = _config(settings, tmp_path / "settings.yaml")
    port = free_port()
    server = _serve(config, port, tmp_path / "server.log")
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
    server.send_signal(signal.SIGKILL)  # mid-stream: requests are being received and committed
    server.wait(10)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert len(acked) >= 40

    server = _serve(config, port, tmp_path / "server.log")
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
        server.terminate()
        server.wait(30)

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
