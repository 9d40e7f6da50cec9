"""S3BlobStore against SeaweedFS: retries, resumed reads, unavailability, per-tenant buckets, SSE, memory."""

from __future__ import annotations

import contextlib
import os
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dicomflow.errors import DicomServiceError, OutOfResourcesError
from dicomflow.offload import Offloader
from dicomflow.storage.base import new_blob_key
from dicomflow.storage.s3 import S3BlobStore, S3Options
from tests.conftest import free_port
from tests.harness.s3proxy import S3FaultProxy
from tests.harness.seaweed import SeaweedS3

pytestmark = pytest.mark.integration


def spooled(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / f"{uuid.uuid4().hex}.dcm"
    path.write_bytes(data)
    return path


async def read_all(store: S3BlobStore, key: str, **kwargs: Any) -> bytes:
    return b"".join([c async for c in store.stream(key, **kwargs)])


@pytest.fixture
def offloader() -> Any:
    off = Offloader(4)
    yield off
    off.shutdown()


@pytest.fixture
async def proxy(seaweed: SeaweedS3) -> AsyncIterator[S3FaultProxy]:
    p = S3FaultProxy(seaweed.endpoint)
    await p.start()
    yield p
    await p.stop()


@pytest.fixture
async def via_proxy(proxy: S3FaultProxy, s3_options: S3Options, offloader: Offloader) -> AsyncIterator[S3BlobStore]:
    store = S3BlobStore(replace(s3_options, endpoint_url=proxy.endpoint), offloader)
    yield store
    await store.close()


async def test_transient_errors_are_retried(via_proxy: S3BlobStore, proxy: S3FaultProxy, tmp_path: Path) -> None:
    key = new_blob_key("acme")
    proxy.fail_next(2, 503, "SlowDown")
    await via_proxy.put_file(key, spooled(tmp_path, b"x" * 1000))
    puts = [s for s in proxy.seen if s.method == "PUT"]
    assert len(puts) == 3, "two 503 answers, then success"
    proxy.fail_next(1, 500, "InternalError")
    assert await read_all(via_proxy, key) == b"x" * 1000


async def test_store_that_stays_down_is_out_of_resources(via_proxy: S3BlobStore, proxy: S3FaultProxy,
                                                         tmp_path: Path) -> None:
    key = new_blob_key("acme")
    src = spooled(tmp_path, b"data")
    proxy.fail_next(100, 503, "ServiceUnavailable")
    with pytest.raises(OutOfResourcesError) as err:
        await via_proxy.put_file(key, src)
    assert (err.value.http_status, err.value.dimse_status, err.value.retryable) == (503, 0xA700, True)
    assert len(proxy.seen) == via_proxy.options.max_attempts
    assert src.exists(), "the spool file stays with the caller when the store failed"


async def test_unreachable_endpoint_is_out_of_resources(s3_options: S3Options, offloader: Offloader,
                                                        tmp_path: Path) -> None:
    store = S3BlobStore(replace(s3_options, endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=2,
                                connect_timeout=0.5), offloader)
    try:
        key = new_blob_key("acme")
        for call in (store.put_file(key, spooled(tmp_path, b"x")), store.size(key), read_all(store, key)):
            with pytest.raises(OutOfResourcesError):
                await call
        with pytest.raises(OutOfResourcesError):
            await offloader.run(store.open_sync, key)
    finally:
        await store.close()


async def test_slow_store(proxy: S3FaultProxy, s3_options: S3Options, offloader: Offloader, tmp_path: Path) -> None:
    """An answer later than read_timeout is a transient error: retried, then 503/0xA700 if it stays slow."""
    store = S3BlobStore(replace(s3_options, endpoint_url=proxy.endpoint, read_timeout=0.5, max_attempts=2), offloader)
    try:
        key = new_blob_key("acme")
        proxy.slow_next(1, 2.0)
        await store.put_file(key, spooled(tmp_path, b"late"))
        assert len([s for s in proxy.seen if s.method == "PUT"]) == 2
        proxy.slow_next(2, 2.0)
        with pytest.raises(OutOfResourcesError):
            await store.size(key)
        assert await read_all(store, key) == b"late"
    finally:
        await store.close()


async def test_read_cut_mid_body_resumes(via_proxy: S3BlobStore, proxy: S3FaultProxy, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024**2)
    key = new_blob_key("acme")
    await via_proxy.put_file(key, spooled(tmp_path, data))
    proxy.seen.clear()
    proxy.cut_next_get(after=1024**2 + 17)
    assert await read_all(via_proxy, key, chunk_size=64 * 1024) == data
    ranges = [s.headers.get("Range") for s in proxy.seen if s.method == "GET"]
    assert ranges[0] == "bytes=0-" and len(ranges) == 2
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 1024**2 + 17


async def test_multipart_upload_and_sse_headers(via_proxy: S3BlobStore, proxy: S3FaultProxy, tmp_path: Path,
                                                offloader: Offloader, s3_options: S3Options) -> None:
    data = os.urandom(11 * 1024**2)
    key = new_blob_key("acme")
    await via_proxy.put_file(key, spooled(tmp_path, data))
    parts = [s for s in proxy.seen if s.method == "PUT" and "partNumber" in s.query]
    assert sorted(int(p.query["partNumber"]) for p in parts) == [1, 2, 3]
    assert any(s.method == "POST" and "uploads" in s.query for s in proxy.seen)
    assert await via_proxy.size(key) == len(data)

    proxy.seen.clear()
    sse = S3BlobStore(replace(via_proxy.options, sse="AES256"), offloader)
    try:
        await sse.put_file(new_blob_key("acme"), spooled(tmp_path, b"small"))
        await sse.put_file(new_blob_key("acme"), spooled(tmp_path, data))
    finally:
        await sse.close()
    creates = [s for s in proxy.seen if (s.method == "PUT" and "partNumber" not in s.query)
               or (s.method == "POST" and "uploads" in s.query)]
    assert len(creates) == 2
    assert all(s.headers.get("x-amz-server-side-encryption") == "AES256" for s in creates)

    proxy.seen.clear()
    kms = S3BlobStore(replace(via_proxy.options, sse="aws:kms", sse_kms_key_id="alias/dicomflow"), offloader)
    try:
        with contextlib.suppress(DicomServiceError):  # SeaweedFS without a KMS may refuse; we check the request
            await kms.put_file(new_blob_key("acme"), spooled(tmp_path, b"small"))
    finally:
        await kms.close()
    put = next(s for s in proxy.seen if s.method == "PUT")
    assert put.headers.get("x-amz-server-side-encryption") == "aws:kms"
    assert put.headers.get("x-amz-server-side-encryption-aws-kms-key-id") == "alias/dicomflow"


async def test_failed_multipart_upload_is_aborted(via_proxy: S3BlobStore, proxy: S3FaultProxy,
                                                  tmp_path: Path) -> None:
    proxy.fail_next(100, 503, "SlowDown", when=lambda r: r.method == "PUT" and r.query.get("partNumber") == "2")
    src = spooled(tmp_path, os.urandom(11 * 1024**2))
    with pytest.raises(OutOfResourcesError):
        await via_proxy.put_file(new_blob_key("acme"), src)
    assert any(s.method == "DELETE" and "uploadId" in s.query for s in proxy.seen), "upload aborted"
    assert src.exists()
    assert [k async for k in via_proxy.iter_keys()] == []


async def test_tenant_buckets(seaweed: SeaweedS3, s3_shared_bucket: str, offloader: Offloader,
                              tmp_path: Path) -> None:
    own = seaweed.create_bucket()
    try:
        prefix = f"t-{uuid.uuid4().hex[:8]}/"
        store = S3BlobStore(seaweed.options(s3_shared_bucket, prefix=prefix, tenant_buckets={"acme": own}),
                            offloader)
        acme, default = new_blob_key("acme"), new_blob_key("default")
        await store.put_file(acme, spooled(tmp_path, b"acme"))
        await store.put_file(default, spooled(tmp_path, b"default"))
        client = seaweed.client()
        assert client.get_object(Bucket=own, Key=prefix + acme)["Body"].read() == b"acme"
        assert client.get_object(Bucket=s3_shared_bucket, Key=prefix + default)["Body"].read() == b"default"
        # an acme-looking object in the shared bucket is not acme's: never listed (so fsck never deletes it)
        client.put_object(Bucket=s3_shared_bucket, Key=prefix + new_blob_key("acme"), Body=b"stray")
        assert {k async for k in store.iter_keys()} == {acme, default}
        assert await read_all(store, acme) == b"acme"
        await store.close()
    finally:
        seaweed.delete_bucket(own)


async def test_multipart_memory_stays_bounded(s3_options: S3Options, offloader: Offloader, tmp_path: Path) -> None:
    """A 48 MiB instance goes up with part_concurrency parts (5 MiB each, about two copies) in memory."""
    store = S3BlobStore(replace(s3_options, part_concurrency=2), offloader)
    src = spooled(tmp_path, os.urandom(48 * 1024**2))
    try:
        await store.exists(new_blob_key("acme"))  # the client and botocore's service model are loaded
        tracemalloc.start()
        await store.put_file(new_blob_key("acme"), src)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await store.close()
    assert peak < 24 * 1024**2, f"peak {peak / 1024**2:.1f} MiB"
