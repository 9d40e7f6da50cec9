"""Backend faults while `dicomflow serve` (a real process on PostgreSQL + SeaweedFS S3) is under STOW-RS load
from concurrent clients: PostgreSQL restarted; S3 answering 500/503, too slow, or full (507
XMinioStorageFull, 403 QuotaExceeded) through a fault-injecting proxy.

Each time: the affected requests get 503 with Retry-After and FailureReason 0xA700 (PS3.4 B.2.3 Refused: Out
of Resources) for their instances; every instance sent is either referenced or failed; nothing is
half-stored (the index holds exactly the referenced instances, each with its blob, byte-exact; fsck finds
nothing to repair); and the service resumes by itself once the backend is back, without a restart.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from pydicom.uid import generate_uid

from tests.conftest import free_port, make_settings
from tests.factory import make_dataset, multipart, to_bytes
from tests.harness.postgres import PgCluster, create_database, drop_database, upgrade_schema
from tests.harness.processes import ROOT, ServerProcess, write_config
from tests.harness.s3proxy import Fault, S3FaultProxy
from tests.harness.seaweed import SeaweedS3

pytestmark = pytest.mark.integration

CLIENTS, PER_REQUEST = 4, 3
OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3
MULTIPART = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass
class Load:
    """STOW-RS clients posting new studies of PER_REQUEST instances until stopped; every outcome kept."""

    url: str
    sent: dict[str, dict[str, bytes]] = field(default_factory=dict)  # study -> sop -> bytes
    stored: set[str] = field(default_factory=set)
    failed: dict[str, int] = field(default_factory=dict)  # sop -> FailureReason
    answers: list[tuple[float, int, str | None]] = field(default_factory=list)  # (time, status, Retry-After)
    errors: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def client(self, session: aiohttp.ClientSession) -> None:
        while not self.stop.is_set():
            study, series = generate_uid(), generate_uid()
            data = {}
            for i in range(PER_REQUEST):
                ds = make_dataset(study_uid=study, series_uid=series, instance_number=i + 1)
                data[str(ds.SOPInstanceUID)] = to_bytes(ds)
            self.sent[study] = data
            body, content_type = multipart(list(data.values()))
            try:
                async with session.post(f"{self.url}/studies", data=body,
                                        headers={"Content-Type": content_type}) as response:
                    answer = await response.json(content_type=None) if await response.read() else {}
                    self.answers.append((time.monotonic(), response.status, response.headers.get("Retry-After")))
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            self.stored.update(i["00081155"]["Value"][0] for i in answer.get("00081199", {}).get("Value", []))
            self.failed.update({i["00081155"]["Value"][0]: i["00081197"]["Value"][0]
                                for i in answer.get("00081198", {}).get("Value", [])})
            await asyncio.sleep(0.01)

    async def run(self) -> list[asyncio.Task[None]]:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        tasks = [asyncio.create_task(self.client(session)) for _ in range(CLIENTS)]

        async def close_when_done() -> None:
            await asyncio.gather(*tasks, return_exceptions=True)
            await session.close()

        return [*tasks, asyncio.create_task(close_when_done())]

    def all_sops(self) -> set[str]:
        return {sop for data in self.sent.values() for sop in data}


async def _index_rows(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url)
    try:
        return {r["sop_uid"]: r["blob_key"] for r in await conn.fetch("SELECT sop_uid, blob_key FROM instances")}
    finally:
        await conn.close()


def _s3_keys(seaweed: SeaweedS3, bucket: str, prefix: str) -> set[str]:
    keys: set[str] = set()
    for page in seaweed.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.update(obj["Key"][len(prefix):] for obj in page.get("Contents", []))
    return keys


def _fsck(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomflow", "fsck", "--config", str(config), "--grace", "0", *args],
                          capture_output=True, text=True, timeout=120, cwd=config.parent,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


async def _assert_outcome(load: Load, server: ServerProcess, index_url: str, seaweed: SeaweedS3, bucket: str,
                          prefix: str, config: Path, fault_started: float, fault_ended: float) -> None:
    assert not load.errors, load.errors[:5]  # the server always answered
    sent = load.all_sops()
    assert load.stored | set(load.failed) == sent, "every instance is either stored or reported failed"
    assert not load.stored & set(load.failed)
    assert set(load.failed.values()) <= {OUT_OF_RESOURCES}, set(load.failed.values())
    statuses = {status for _, status, _ in load.answers}
    assert statuses <= {200, 202, 503}, statuses
    refused = [(at, retry) for at, status, retry in load.answers if status == 503]
    assert refused, "the fault was seen by the clients"
    assert all(retry for _, retry in refused), "503 comes with Retry-After"
    assert all(at >= fault_started for at, _ in refused)
    after = [status for at, status, _ in load.answers if at > fault_ended + 3.0]
    assert len(after) >= CLIENTS and set(after) == {200}, f"resumed by itself: {after}"

    # nothing half-stored: exactly the referenced instances are indexed, each with its blob
    rows = await _index_rows(index_url)
    assert set(rows) == load.stored
    blobs = await asyncio.to_thread(_s3_keys, seaweed, bucket, prefix)
    assert set(rows.values()) <= blobs, "an index row without its blob"
    if blobs - set(rows.values()):  # an upload that finished after we gave up on it: fsck's to sweep
        repaired = await asyncio.to_thread(_fsck, config, "--repair")
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    checked = await asyncio.to_thread(_fsck, config)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert set(await _index_rows(index_url)) == load.stored

    async with aiohttp.ClientSession() as session:
        for study, data in load.sent.items():
            wanted = {sop for sop in data if sop in load.stored}
            if not wanted:
                continue
            async with session.get(f"{server.dicomweb}/studies/{study}", headers={"Accept": MULTIPART}) as resp:
                assert resp.status == 200
                boundary = ("--" + resp.headers["Content-Type"].split("boundary=")[1].strip('"')).encode()
                parts = (await resp.read()).split(boundary)[1:-1]
            assert {p.split(b"\r\n\r\n", 1)[1][:-2] for p in parts} == {data[sop] for sop in wanted}


@pytest.fixture
def private_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster.start()  # this test stops it: not the session's
    try:
        yield cluster
    finally:
        cluster.stop()


async def _database(admin_url: str) -> str:
    url = await asyncio.to_thread(create_database, admin_url)
    await upgrade_schema(url)
    return url


def _config(tmp_path: Path, index_url: str, endpoint: str, seaweed: SeaweedS3, bucket: str, prefix: str,
            **s3: Any) -> Path:
    settings = make_settings(tmp_path, index=index_url, storage=f"s3://{bucket}/{prefix}", s3={
        "endpoint_url": endpoint, "access_key_id": seaweed.access_key, "secret_access_key": seaweed.secret_key,
        "path_style": True, "max_attempts": 2, "connect_timeout": 1.0, "read_timeout": 5.0, **s3})
    return write_config(settings, tmp_path / "settings.yaml", routing={"enabled": False})


@pytest.fixture
async def started() -> AsyncIterator[list[ServerProcess]]:
    servers: list[ServerProcess] = []
    yield servers
    for server in servers:
        await asyncio.to_thread(server.stop)


async def _under_load(config: Path, tmp_path: Path, started: list[ServerProcess],
                      fault: Callable[[ServerProcess], Awaitable[None]]) -> tuple[ServerProcess, Load, float, float]:
    """A server process on ``config`` under STOW-RS load: 1.5 s of load, then ``fault`` (the fault window),
    then 5 s to recover. Returns the server, the load's outcome and the start and end of the window."""
    server = ServerProcess(config, free_port(), tmp_path / "server.log")
    started.append(server)
    await asyncio.to_thread(server.start)
    load = Load(server.dicomweb)
    tasks = await load.run()
    await asyncio.sleep(1.5)
    fault_started = time.monotonic()
    await fault(server)
    fault_ended = time.monotonic()
    await asyncio.sleep(5.0)
    load.stop.set()
    await asyncio.gather(*tasks)
    return server, load, fault_started, fault_ended


async def test_postgresql_restarted_under_stow_load(private_cluster: PgCluster, seaweed: SeaweedS3,
                                                    s3_shared_bucket: str, tmp_path: Path,
                                                    started: list[ServerProcess]) -> None:
    index_url = await _database(private_cluster.admin_url)
    prefix = f"t-{uuid.uuid4().hex[:12]}/"
    config = _config(tmp_path, index_url, seaweed.endpoint, seaweed, s3_shared_bucket, prefix)

    async def restart_postgresql(server: ServerProcess) -> None:
        await asyncio.to_thread(private_cluster.pause)  # pg_ctl stop -m fast: sessions terminated
        async with aiohttp.ClientSession() as session, session.get(f"{server.url}/readyz") as ready:
            assert ready.status == 503
        await asyncio.sleep(3.0)
        await asyncio.to_thread(private_cluster.resume)

    server, load, fault_started, fault_ended = await _under_load(config, tmp_path, started, restart_postgresql)
    assert server.process is not None and server.process.poll() is None, "the server kept running"
    await _assert_outcome(load, server, index_url, seaweed, s3_shared_bucket, prefix, config, fault_started,
                          fault_ended)


FAULTS = {
    "503 SlowDown": Fault(status=503, code="SlowDown"),
    "500 InternalError": Fault(status=500, code="InternalError"),
    "slow": Fault(delay=3.0),  # beyond read_timeout=1 s: every attempt times out
    "507 XMinioStorageFull": Fault(status=507, code="XMinioStorageFull"),  # a full disk behind the store
    "403 QuotaExceeded": Fault(status=403, code="QuotaExceeded"),  # a bucket quota reached
}


@pytest.mark.parametrize("kind", list(FAULTS))
async def test_s3_faults_under_stow_load(kind: str, pg_admin_url: str, seaweed: SeaweedS3, s3_shared_bucket: str,
                                         tmp_path: Path, started: list[ServerProcess]) -> None:
    proxy = S3FaultProxy(seaweed.endpoint)
    await proxy.start()
    window = {"on": False}

    def uploads_fail(request: web.Request) -> Fault | None:  # writes only: cleanups and reads pass
        return FAULTS[kind] if window["on"] and request.method in ("PUT", "POST") else None

    proxy.faults.append(uploads_fail)
    index_url = ""
    try:
        index_url = await _database(pg_admin_url)
        prefix = f"t-{uuid.uuid4().hex[:12]}/"
        config = _config(tmp_path, index_url, proxy.endpoint, seaweed, s3_shared_bucket, prefix, read_timeout=1.0)

        async def uploads_failing(_server: ServerProcess) -> None:
            window["on"] = True
            await asyncio.sleep(3.0)
            window["on"] = False

        server, load, fault_started, fault_ended = await _under_load(config, tmp_path, started, uploads_failing)
        await _assert_outcome(load, server, index_url, seaweed, s3_shared_bucket, prefix, config, fault_started,
                              fault_ended)
    finally:
        await proxy.stop()
        if index_url:
            await asyncio.to_thread(drop_database, pg_admin_url, index_url)
