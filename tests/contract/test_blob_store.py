"""The BlobStore contract (dicomflow/storage/base.py), for the filesystem and S3 stores alike."""

from __future__ import annotations

import io
import os
import time
import uuid
from pathlib import Path

import pydicom
import pytest

from dicomflow.errors import NotFoundError
from dicomflow.offload import Offloader
from dicomflow.storage.base import BlobStore, new_blob_key
from tests.factory import make_instance


def spooled(tmp_path: Path, data: bytes) -> Path:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    path = spool / f"{uuid.uuid4().hex}.dcm"
    path.write_bytes(data)
    return path


async def read_all(blobs: BlobStore, key: str, start: int = 0, end: int | None = None,
                   chunk_size: int = 1 << 20) -> bytes:
    return b"".join([chunk async for chunk in blobs.stream(key, start, end, chunk_size)])


async def test_put_then_read_back_byte_exact(blobs: BlobStore, tmp_path: Path) -> None:
    data = make_instance(rows=64, columns=64)
    src = spooled(tmp_path, data)
    key = new_blob_key("acme")
    await blobs.put_file(key, src)
    assert not src.exists(), "put_file consumes the spool file"
    assert await blobs.exists(key)
    assert await blobs.size(key) == len(data)
    assert await read_all(blobs, key) == data
    assert await read_all(blobs, key, chunk_size=7) == data


async def test_ranged_streams(blobs: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    key = new_blob_key("acme")
    await blobs.put_file(key, spooled(tmp_path, data))
    assert await read_all(blobs, key, 0, 10) == data[:10]
    assert await read_all(blobs, key, 10) == data[10:]
    assert await read_all(blobs, key, 99_990, 100_000) == data[-10:]
    assert await read_all(blobs, key, 5_000, 70_001, chunk_size=4096) == data[5_000:70_001]
    assert await read_all(blobs, key, 99_990, 200_000) == data[-10:], "end past the blob is clipped"
    assert await read_all(blobs, key, 100_000) == b""
    assert await read_all(blobs, key, 50, 50) == b""


async def test_open_sync_is_seekable_and_pydicom_reads_it(blobs: BlobStore, tmp_path: Path,
                                                          offloader: Offloader) -> None:
    data = make_instance(rows=128, columns=128, frames=3)
    key = new_blob_key("acme")
    await blobs.put_file(key, spooled(tmp_path, data))

    def use() -> tuple[bytes, bytes, int, int, str, bytes]:
        with blobs.open_sync(key) as fh:
            assert fh.seekable()
            head = fh.read(132)
            fh.seek(-16, io.SEEK_END)
            tail = fh.read()
            end = fh.tell()
            fh.seek(0)
            ds = pydicom.dcmread(fh)
            fh.seek(1000)
            fh.seek(24, io.SEEK_CUR)
            middle = fh.read(10)
            return head, tail, end, fh.tell(), str(ds.SOPInstanceUID), middle + ds.PixelData[:4]

    head, tail, end, pos, sop, middle = await offloader.run(use)  # worker thread, as WADO calls it
    ref = pydicom.dcmread(io.BytesIO(data))
    assert head == data[:132] and head[128:] == b"DICM"
    assert tail == data[-16:]
    assert end == len(data)
    assert pos == 1034
    assert sop == ref.SOPInstanceUID
    assert middle == data[1024:1034] + ref.PixelData[:4]


async def test_missing_blob(blobs: BlobStore, offloader: Offloader) -> None:
    key = new_blob_key("acme")
    assert not await blobs.exists(key)
    with pytest.raises(NotFoundError) as err:
        await blobs.size(key)
    assert err.value.http_status == 404
    with pytest.raises(NotFoundError):
        await read_all(blobs, key)
    with pytest.raises(NotFoundError):
        await offloader.run(blobs.open_sync, key)
    await blobs.delete(key)  # deleting a missing blob is not an error


async def test_delete(blobs: BlobStore, tmp_path: Path) -> None:
    keep, gone = new_blob_key("acme"), new_blob_key("acme")
    await blobs.put_file(keep, spooled(tmp_path, b"keep"))
    await blobs.put_file(gone, spooled(tmp_path, b"gone"))
    await blobs.delete(gone)
    assert not await blobs.exists(gone)
    assert await read_all(blobs, keep) == b"keep"


async def test_keys_cannot_escape_the_store(blobs: BlobStore) -> None:
    for key in ("../outside", "acme/../../etc/passwd", "/etc/passwd"):
        with pytest.raises(NotFoundError):
            await blobs.size(key)


async def test_listing_with_sizes_and_ages(blobs: BlobStore, tmp_path: Path) -> None:
    before = time.time()
    acme = {new_blob_key("acme"): os.urandom(n) for n in (1, 10, 1000)}
    globex = {new_blob_key("globex"): b"g"}
    for key, data in {**acme, **globex}.items():
        await blobs.put_file(key, spooled(tmp_path, data))
    infos = {info.key: info async for info in blobs.iter_blobs()}
    assert set(infos) == set(acme) | set(globex)
    for key, data in {**acme, **globex}.items():
        assert infos[key].size == len(data)
        assert before - 5 <= infos[key].modified <= time.time() + 5
    assert {k async for k in blobs.iter_keys("acme/")} == set(acme)
    assert {k async for k in blobs.iter_keys("globex")} == set(globex)
    assert [k async for k in blobs.iter_keys("nobody/")] == []


async def test_put_replaces_existing_key(blobs: BlobStore, tmp_path: Path) -> None:
    key = new_blob_key("acme")
    await blobs.put_file(key, spooled(tmp_path, b"first"))
    await blobs.put_file(key, spooled(tmp_path, b"second, longer"))
    assert await read_all(blobs, key) == b"second, longer"


async def test_large_blob_in_parts(blobs: BlobStore, tmp_path: Path) -> None:
    """12 MiB: three multipart parts on S3 (5 MiB parts), a plain rename on the filesystem."""
    data = os.urandom(12 * 1024**2 + 123)
    key = new_blob_key("acme")
    await blobs.put_file(key, spooled(tmp_path, data))
    assert await blobs.size(key) == len(data)
    got = await read_all(blobs, key, chunk_size=256 * 1024)
    assert got == data
    assert await read_all(blobs, key, 5 * 1024**2 - 10, 5 * 1024**2 + 10) == data[5 * 1024**2 - 10:5 * 1024**2 + 10]
