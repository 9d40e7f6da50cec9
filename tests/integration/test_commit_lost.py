"""The connection to PostgreSQL breaks while COMMIT is on its way: the server commits, the client never
hears back. Ingest used to delete the blob of the committed row (a row without its blob, and 503 for an
instance that was in fact stored); it now asks the index, keeps the blob and acknowledges the instance."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from dicomflow.app import create_app
from tests.conftest import make_settings
from tests.factory import make_dataset, multipart, to_bytes
from tests.harness.seaweed import SeaweedS3
from tests.integration.test_scaleout_faults import _s3_keys

pytestmark = pytest.mark.integration


class CommitCutter:
    """A TCP proxy to PostgreSQL that, when armed, forwards the next client chunk holding COMMIT and then
    closes both sides without relaying the server's answer."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.armed = False
        self.cut = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        done, muted = asyncio.Event(), asyncio.Event()

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                cutting = self.armed and b"COMMIT" in data
                if cutting:
                    self.armed = False
                    self.cut += 1
                    muted.set()  # nothing more reaches the client from here on
                up_writer.write(data)
                await up_writer.drain()
                if cutting:
                    await asyncio.sleep(0.3)  # the server has the COMMIT and answers it into the void
                    break
            done.set()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                if muted.is_set():
                    return
                writer.write(data)
                await writer.drain()
            done.set()  # the server closed: close the client side too

        tasks = [asyncio.create_task(client_to_server()), asyncio.create_task(server_to_client())]
        await done.wait()
        for task in tasks:
            task.cancel()
        for w in (writer, up_writer):
            w.transport.abort()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_commit_answer_lost_never_leaves_a_row_without_its_blob(
        aiohttp_client: Any, scaleout_backend: dict[str, Any], seaweed: SeaweedS3, tmp_path: Path) -> None:
    direct = str(scaleout_backend["index"])
    port = int(direct.split("@127.0.0.1:")[1].split("/")[0])
    cutter = CommitCutter(port)
    await cutter.start()
    try:
        via = direct.replace(f"127.0.0.1:{port}", f"127.0.0.1:{cutter.port}")
        settings = make_settings(tmp_path, **{**scaleout_backend, "index": via}, routing={"enabled": False},
                                 audit={"enabled": False})
        client = await aiohttp_client(create_app(settings))
        ds = make_dataset()
        body, content_type = multipart([to_bytes(ds)])
        cutter.armed = True
        response = await client.post("/dicomweb/studies", data=body, headers={"Content-Type": content_type})
        answer = await response.json(content_type=None)
        assert cutter.cut == 1
        conn = await asyncpg.connect(direct)
        try:
            row = await conn.fetchrow("SELECT blob_key FROM instances WHERE sop_uid = $1", str(ds.SOPInstanceUID))
        finally:
            await conn.close()
        assert row is not None, "the COMMIT reached the server before the connection broke"
        # committed: the instance is stored, so it is acknowledged, and its blob is kept
        assert response.status == 200, answer
        assert [i["00081155"]["Value"][0] for i in answer["00081199"]["Value"]] == [str(ds.SOPInstanceUID)]
        if row is not None:
            bucket, _, prefix = str(scaleout_backend["storage"]).removeprefix("s3://").partition("/")
            prefix = prefix.rstrip("/") + "/"
            keys = await asyncio.to_thread(_s3_keys, seaweed, bucket, prefix)
            assert row["blob_key"] in keys, "an index row whose blob was deleted"
            wado = await client.get(f"/dicomweb/studies/{ds.StudyInstanceUID}", headers={
                "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
            assert wado.status == 200
            assert to_bytes(ds) in await wado.read()
    finally:
        await cutter.stop()
