"""Failures injected at every step of the store path leave nothing half-stored (ARCHITECTURE: data flow).

After each failure the SQLite file and the blob folder are read directly: no index row without its
blob and outbox event, no blob without its row, no spool file left behind.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp.test_utils import TestClient

from dicomflow.appkeys import INGEST
from dicomflow.errors import OutOfResourcesError
from dicomflow.ingest import service
from dicomflow.settings import Settings
from tests.conftest import LiveServer
from tests.factory import StoreState, make_instance, multipart, store_state

#: routing off: these tests are about ingest, and the outbox must stay as ingest wrote it
pytestmark = [pytest.mark.e2e, pytest.mark.routing_off]


async def stow(client: TestClient, parts: list[bytes]) -> tuple[int, dict[str, Any], dict[str, str]]:  # type: ignore[type-arg]
    body, ctype = multipart(parts)
    resp = await client.post("/dicomweb/studies", data=body, headers={"Content-Type": ctype})
    return resp.status, await resp.json(content_type=None), dict(resp.headers)


def reasons(body: dict[str, Any]) -> list[int]:
    return [item["00081197"]["Value"][0] for item in body.get("00081198", {}).get("Value", [])]


def assert_consistent(state: StoreState, expected_sops: set[str]) -> None:
    """Exactly ``expected_sops`` stored, each with one blob and one instance.stored event; nothing else."""
    assert {i[3] for i in state.instances} == expected_sops
    assert sorted(i[4] for i in state.instances) == state.blobs
    assert sorted(e[2] or "" for e in state.events("instance.stored")) == sorted(expected_sops)
    assert state.spool == []


def ingest_of(client: TestClient) -> service.IngestService:  # type: ignore[type-arg]
    return client.server.app[INGEST]


async def test_blob_store_full_refuses_with_a700_and_503(client: TestClient, settings: Settings,  # type: ignore[type-arg]
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    async def full(key: str, src: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ingest_of(client).blobs, "put_file", full)
    status, body, headers = await stow(client, [make_instance(), make_instance()])
    assert status == 503 and headers["Retry-After"] == "5"
    assert reasons(body) == [0xA700, 0xA700]  # PS3.4 B.2.3: the client may retry
    assert_consistent(store_state(settings), set())


async def test_blob_written_then_failure_removes_the_blob(client: TestClient, settings: Settings,  # type: ignore[type-arg]
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = ingest_of(client).blobs
    original = blobs.put_file

    async def durable_then_fail(key: str, src: Path) -> None:
        await original(key, src)
        raise OSError(errno.EIO, "fsync of the directory failed")

    monkeypatch.setattr(blobs, "put_file", durable_then_fail)
    status, body, _ = await stow(client, [make_instance()])
    assert status == 503 and reasons(body) == [0xA700]
    assert_consistent(store_state(settings), set())


@pytest.mark.parametrize(("error", "http", "reason"), [
    (RuntimeError("constraint violated"), 409, 0x0110),  # an unexpected fault: Processing Failure
    (OutOfResourcesError("index unavailable"), 503, 0xA700),
], ids=["fault", "unavailable"])
async def test_index_failure_removes_the_blob(client: TestClient, settings: Settings,  # type: ignore[type-arg]
                                              monkeypatch: pytest.MonkeyPatch, error: Exception, http: int,
                                              reason: int) -> None:
    index = ingest_of(client).index

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(index, "store_instance", broken)
    status, body, _ = await stow(client, [make_instance()])
    assert status == http and reasons(body) == [reason]
    assert_consistent(store_state(settings), set())


async def test_one_failure_in_a_batch_keeps_the_others(client: TestClient, settings: Settings,  # type: ignore[type-arg]
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = ingest_of(client).blobs
    original = blobs.put_file

    async def every_second_fails(key: str, src: Path) -> None:
        # chosen by content, not call order: parts of one request are stored concurrently (STOW_PIPELINE)
        data = await asyncio.to_thread(src.read_bytes)
        if b"1.2.3.2\0" in data or b"1.2.3.4\0" in data:
            raise OSError(errno.ENOSPC, "No space left on device")
        await original(key, src)

    monkeypatch.setattr(blobs, "put_file", every_second_fails)
    parts = [make_instance(sop_uid=f"1.2.3.{i}") for i in range(1, 5)]
    status, body, _ = await stow(client, parts)
    assert status == 202 and reasons(body) == [0xA700, 0xA700]
    failed = {item["00081155"]["Value"][0] for item in body["00081198"]["Value"]}
    stored = {item["00081155"]["Value"][0] for item in body["00081199"]["Value"]}
    assert failed == {"1.2.3.2", "1.2.3.4"} and stored == {"1.2.3.1", "1.2.3.3"}
    assert_consistent(store_state(settings), stored)


async def test_parser_crash_is_a_processing_failure(client: TestClient, settings: Settings,  # type: ignore[type-arg]
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(path: Path, threshold: int) -> Any:
        raise MemoryError("simulated")

    monkeypatch.setattr(service, "parse_part10", crash)
    status, body, _ = await stow(client, [make_instance()])
    assert status == 409 and reasons(body) == [0x0110]
    assert_consistent(store_state(settings), set())


async def test_client_gone_during_commit_still_stores_completely(
        client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[type-arg]
    """Once the bytes are in, the store completes (shielded) even if the client stops waiting."""
    blobs = ingest_of(client).blobs
    original = blobs.put_file
    started = asyncio.Event()

    async def slow(key: str, src: Path) -> None:
        started.set()
        await asyncio.sleep(0.3)
        await original(key, src)

    monkeypatch.setattr(blobs, "put_file", slow)
    body, ctype = multipart([make_instance(sop_uid="1.2.3.77")])
    request = asyncio.ensure_future(client.post("/dicomweb/studies", data=body, headers={"Content-Type": ctype}))
    await asyncio.wait_for(started.wait(), 10)
    request.cancel()
    for _ in range(100):
        if store_state(settings).instances:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)
    assert_consistent(store_state(settings), {"1.2.3.77"})


def _wait_settled(live: LiveServer, timeout: float = 10.0) -> StoreState:
    deadline = time.monotonic() + timeout
    while True:
        state = store_state(live.settings)
        if not state.spool or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


@pytest.mark.parametrize("close", ["reset", "half-close"])
@pytest.mark.parametrize("cut", ["first-part", "second-part", "headers"])
def test_client_disconnect_mid_upload(live_server: LiveServer, cut: str, close: str) -> None:
    first, second = make_instance(sop_uid="1.2.3.1"), make_instance(sop_uid="1.2.3.2")
    body, ctype = multipart([first, second])
    split = {"first-part": len(first) // 2, "second-part": len(body) - len(second) // 2, "headers": 0}[cut]
    head = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1:{live_server.http_port}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", live_server.http_port), timeout=10) as sock:
        if cut == "second-part":
            # aiohttp's part reader looks one read ahead for the boundary: send the rest in a second
            # segment, then let the server store the first instance before the connection goes
            sock.sendall(head + body[:len(body) - len(second) - 60])
            time.sleep(0.2)
            sock.sendall(body[len(body) - len(second) - 60:split])
            for _ in range(200):
                if store_state(live_server.settings).instances:
                    break
                time.sleep(0.05)
        else:
            sock.sendall(head + body[:split])
        if close == "half-close":  # FIN: the server reads what was sent, then meets the early end
            sock.shutdown(socket.SHUT_WR)
            sock.recv(65536)  # aiohttp closes the connection at EOF: no response can be sent
        else:
            time.sleep(0.3)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    time.sleep(0.3)
    state = _wait_settled(live_server)
    # the first instance is complete when it was whole before the connection went; never half-stored
    assert_consistent(state, {"1.2.3.1"} if cut == "second-part" else set())
    good = make_instance()
    gbody, gctype = multipart([good])
    resp = requests.post(f"{live_server.dicomweb}/studies", data=gbody, headers={"Content-Type": gctype}, timeout=30)
    assert resp.status_code == 200


async def test_each_instance_is_parsed_once_off_the_event_loop(
        client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[type-arg]
    import threading

    calls: list[str] = []
    original = service.parse_part10

    def recording(path: Path, threshold: int) -> Any:
        calls.append(threading.current_thread().name)
        return original(path, threshold)

    monkeypatch.setattr(service, "parse_part10", recording)
    loop_thread = threading.current_thread().name
    status, _body, _ = await stow(client, [make_instance() for _ in range(3)])
    assert status == 200
    assert len(calls) == 3 and loop_thread not in calls
    assert all(name.startswith("dicomflow-work") for name in calls)  # the app's Offloader pool


async def test_blob_is_durable_before_the_index_commit(
        client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[type-arg]
    """ARCHITECTURE: the row and its outbox event are committed only once the blob is in place."""
    ingest = ingest_of(client)
    original = ingest.index.store_instance
    seen: list[tuple[str, bool]] = []

    async def checking(tenant: str, parsed: Any, **kwargs: Any) -> Any:
        seen.append((kwargs["blob_key"], await ingest.blobs.exists(kwargs["blob_key"])))
        assert store_state(settings).instances == []  # nothing committed yet
        return await original(tenant, parsed, **kwargs)

    monkeypatch.setattr(ingest.index, "store_instance", checking)
    status, _body, _ = await stow(client, [make_instance()])
    assert status == 200
    assert len(seen) == 1 and seen[0][1] is True
    assert_consistent(store_state(settings), {i[3] for i in store_state(settings).instances})
