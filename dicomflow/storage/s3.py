"""Blob store on an S3-compatible object store (AWS S3, SeaweedFS, MinIO) through aiobotocore.

Keys from :func:`~dicomflow.storage.base.new_blob_key` (``tenant/xx/yy/id``) map to
``{prefix}{key}`` in the tenant's bucket (``tenant_buckets``) or the default bucket. Retries with
exponential back-off on throttling, 5xx and connection errors are botocore's "standard" retry mode;
when they are exhausted the store raises :class:`~dicomflow.errors.OutOfResourcesError`
(HTTP 503, DIMSE 0xA700), which peers retry later.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, cast

import aiohttp
import botocore.session
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from dicomflow.errors import DicomServiceError, NotFoundError, OutOfResourcesError
from dicomflow.offload import Offloader
from dicomflow.storage.base import BlobInfo

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client as SyncS3Client
    from types_aiobotocore_s3.client import S3Client

logger = logging.getLogger(__name__)

#: S3 multipart uploads need parts of at least 5 MiB (except the last) and at most 10,000 parts.
MIN_PART_SIZE = 5 * 1024**2
MAX_PARTS = 10_000

#: Error codes that mean "try again later" rather than "you asked for something wrong".
_TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "XMinioStorageFull", "XMinioServerNotInitialized", "QuotaExceeded",
})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


@dataclass(frozen=True, slots=True)
class S3Options:
    """Everything needed to reach the bucket(s); built from settings by the storage factory."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    #: server-side encryption: None, "AES256" (SSE-S3) or "aws:kms" (SSE-KMS, optional key id)
    sse: Literal["AES256", "aws:kms"] | None = None
    sse_kms_key_id: str | None = None
    tenant_buckets: Mapping[str, str] = field(default_factory=dict)
    part_size: int = 8 * 1024**2
    part_concurrency: int = 4
    max_attempts: int = 5
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_pool_connections: int = 32
    #: bytes fetched per ranged GET by :meth:`S3BlobStore.open_sync` readers
    read_ahead: int = 1024**2

    def __post_init__(self) -> None:
        if not self.bucket:
            raise ValueError("S3 storage needs a bucket: s3://bucket/prefix")
        if self.prefix and not self.prefix.endswith("/"):
            raise ValueError("S3 prefix must be empty or end with '/'")
        if self.part_size < MIN_PART_SIZE:
            raise ValueError(f"S3 part size must be at least {MIN_PART_SIZE} bytes")
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise ValueError("sse_kms_key_id needs sse: aws:kms")

    def client_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"region_name": self.region}
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        if self.access_key_id:
            kwargs["aws_access_key_id"] = self.access_key_id
            kwargs["aws_secret_access_key"] = self.secret_access_key
            if self.session_token:
                kwargs["aws_session_token"] = self.session_token
        return kwargs

    def config_kwargs(self) -> dict[str, Any]:
        return {
            "s3": {"addressing_style": self.addressing_style},
            "retries": {"total_max_attempts": self.max_attempts, "mode": "standard"},
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "max_pool_connections": self.max_pool_connections,
            # integrity is ours (SHA-256 in the index); S3-compatible stores vary in checksum support
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }

    def sse_args(self) -> dict[str, str]:
        if self.sse is None:
            return {}
        args: dict[str, str] = {"ServerSideEncryption": self.sse}
        if self.sse_kms_key_id:
            args["SSEKMSKeyId"] = self.sse_kms_key_id
        return args


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def translate(exc: Exception, what: str) -> DicomServiceError:
    """Map a client error onto our hierarchy: missing -> 404, transient -> 503/0xA700, else 500."""
    if isinstance(exc, DicomServiceError):
        return exc
    if isinstance(exc, ClientError):
        code, status = _error_code(exc), _http_status(exc)
        if code in _NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket"):
            return NotFoundError("no such blob")
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return OutOfResourcesError(f"blob store unavailable ({what}: {code or status})")
        return DicomServiceError(f"blob store refused {what}: {code or status}")
    # connection refused/reset, timeouts, broken streams: the store is unreachable
    return OutOfResourcesError(f"blob store unavailable ({what}: {type(exc).__name__})")


#: What a call to S3 can raise besides our own errors.
_CLIENT_ERRORS: tuple[type[Exception], ...] = (
    BotoCoreError, ClientError, aiohttp.ClientError, asyncio.TimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class PendingUpload:
    """A multipart upload that was started and neither completed nor aborted (a crash mid-upload)."""

    bucket: str
    key: str
    upload_id: str
    initiated: float


class S3BlobStore:
    """Blobs as objects in one or more buckets; see the module docstring for the layout."""

    def __init__(self, options: S3Options, offloader: Offloader) -> None:
        self.options = options
        self._off = offloader
        self._stack = AsyncExitStack()
        self._client: S3Client | None = None
        self._client_lock = asyncio.Lock()
        self._sync_client: SyncS3Client | None = None
        self._sync_lock = threading.Lock()

    # -- clients ----------------------------------------------------------------------------------

    async def _s3(self) -> S3Client:
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    session = get_session()
                    client = session.create_client(
                        "s3", config=AioConfig(**self.options.config_kwargs()), **self.options.client_kwargs())
                    self._client = await self._stack.enter_async_context(client)
        return self._client

    def _s3_sync(self) -> SyncS3Client:
        """A blocking botocore client for readers running in worker threads (never on the loop)."""
        with self._sync_lock:
            if self._sync_client is None:
                self._sync_client = cast("SyncS3Client", botocore.session.get_session().create_client(
                    "s3", config=Config(**self.options.config_kwargs()), **self.options.client_kwargs()))
            return self._sync_client

    def locate(self, key: str) -> tuple[str, str]:
        """(bucket, object key) of a blob key."""
        tenant, sep, rest = key.partition("/")
        if not tenant or not sep or not rest or key.startswith("/") or ".." in key.split("/"):
            raise NotFoundError("no such blob")
        bucket = self.options.tenant_buckets.get(tenant, self.options.bucket)
        return bucket, self.options.prefix + key

    def buckets(self) -> list[str]:
        return sorted({self.options.bucket, *self.options.tenant_buckets.values()})

    async def ensure_buckets(self) -> None:
        """Create the configured buckets that do not exist yet (deployment convenience, tests)."""
        s3 = await self._s3()
        for bucket in self.buckets():
            try:
                await s3.head_bucket(Bucket=bucket)
            except ClientError as exc:
                if _http_status(exc) != 404 and _error_code(exc) not in ("404", "NoSuchBucket"):
                    raise translate(exc, "head bucket") from exc
                try:
                    await s3.create_bucket(Bucket=bucket)
                except ClientError as exc2:
                    if _error_code(exc2) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise translate(exc2, "create bucket") from exc2
            except _CLIENT_ERRORS as exc:
                raise translate(exc, "head bucket") from exc

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None
        with self._sync_lock:
            if self._sync_client is not None:
                self._sync_client.close()
                self._sync_client = None

    # -- writes -----------------------------------------------------------------------------------

    async def put_file(self, key: str, src: Path) -> None:
        bucket, obj = self.locate(key)
        try:
            size = (await self._off.run(src.stat)).st_size
        except OSError as exc:
            raise OutOfResourcesError("spool file unreadable") from exc
        s3 = await self._s3()
        common = {"Bucket": bucket, "Key": obj, "ContentType": "application/dicom", **self.options.sse_args()}
        try:
            if size <= self.options.part_size:
                body = await self._off.run(_read_range, src, 0, size)
                await s3.put_object(Body=body, **common)  # type: ignore[arg-type]
            else:
                await self._put_multipart(s3, src, size, common)
        except _CLIENT_ERRORS as exc:
            raise translate(exc, "put") from exc
        # S3 answers 200 only once the object is durable (PUT and CompleteMultipartUpload).
        await self._off.run(src.unlink, True)

    async def _put_multipart(self, s3: S3Client, src: Path, size: int, common: dict[str, Any]) -> None:
        part_size = max(self.options.part_size, -(-size // MAX_PARTS))
        upload = await s3.create_multipart_upload(**common)
        upload_id = upload["UploadId"]
        target = {"Bucket": common["Bucket"], "Key": common["Key"], "UploadId": upload_id}
        # at most part_concurrency parts are in memory at once: never the whole instance
        slots = asyncio.Semaphore(self.options.part_concurrency)
        etags: dict[int, str] = {}

        async def one_part(number: int, offset: int) -> None:
            try:
                data = await self._off.run(_read_range, src, offset, min(part_size, size - offset))
                done = await s3.upload_part(PartNumber=number, Body=data, **target)
                etags[number] = done["ETag"]
            finally:
                slots.release()

        try:
            async with asyncio.TaskGroup() as group:
                for number, offset in enumerate(range(0, size, part_size), start=1):
                    await slots.acquire()
                    group.create_task(one_part(number, offset))
            await s3.complete_multipart_upload(
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]},
                **target)
        except BaseException as exc:
            try:
                await s3.abort_multipart_upload(**target)
            except _CLIENT_ERRORS:
                logger.warning("could not abort multipart upload of %s", common["Key"], exc_info=True)
            if isinstance(exc, BaseExceptionGroup):
                first = exc.exceptions[0]
                if isinstance(first, Exception):
                    raise first from exc
            raise

    async def delete(self, key: str) -> None:
        bucket, obj = self.locate(key)
        s3 = await self._s3()
        try:
            await s3.delete_object(Bucket=bucket, Key=obj)
        except _CLIENT_ERRORS as exc:
            err = translate(exc, "delete")
            if not isinstance(err, NotFoundError):
                raise err from exc

    # -- reads ------------------------------------------------------------------------------------

    async def _head(self, key: str) -> int:
        bucket, obj = self.locate(key)
        s3 = await self._s3()
        try:
            head = await s3.head_object(Bucket=bucket, Key=obj)
        except _CLIENT_ERRORS as exc:
            raise translate(exc, "head") from exc
        return int(head["ContentLength"])

    async def exists(self, key: str) -> bool:
        try:
            await self._head(key)
        except NotFoundError:
            return False
        return True

    async def size(self, key: str) -> int:
        return await self._head(key)

    async def stream(self, key: str, start: int = 0, end: int | None = None,
                     chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """Ranged GETs; a connection lost mid-body resumes from the last byte delivered."""
        bucket, obj = self.locate(key)
        s3 = await self._s3()
        pos, failures = start, 0
        while end is None or pos < end:
            byte_range = f"bytes={pos}-" if end is None else f"bytes={pos}-{end - 1}"
            try:
                response = await s3.get_object(Bucket=bucket, Key=obj, Range=byte_range)
            except ClientError as exc:
                if _error_code(exc) == "InvalidRange":  # start at or past the end of the blob
                    return
                raise translate(exc, "get") from exc
            except _CLIENT_ERRORS as exc:
                raise translate(exc, "get") from exc
            body = response["Body"]
            try:
                while True:
                    try:
                        chunk = await body.read(chunk_size)
                    except _CLIENT_ERRORS as exc:
                        failures += 1
                        if failures >= self.options.max_attempts:
                            raise translate(exc, "get") from exc
                        logger.warning("blob read of %s interrupted at byte %d; resuming", key, pos)
                        await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                        break
                    if not chunk:
                        return
                    pos += len(chunk)
                    yield chunk
            finally:
                body.close()

    def open_sync(self, key: str) -> BinaryIO:
        """A buffered, seekable reader doing ranged GETs; call it from a worker thread only."""
        bucket, obj = self.locate(key)
        client = self._s3_sync()
        try:
            size = int(client.head_object(Bucket=bucket, Key=obj)["ContentLength"])
        except _CLIENT_ERRORS as exc:
            raise translate(exc, "head") from exc
        return cast(BinaryIO, _RangeReader(client, bucket, obj, size, self.options.read_ahead))

    async def iter_keys(self, prefix: str = "") -> AsyncIterator[str]:
        async for info in self.iter_blobs(prefix):
            yield info.key

    async def iter_blobs(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        s3 = await self._s3()
        strip = len(self.options.prefix)
        for bucket in self.buckets():
            paginator = s3.get_paginator("list_objects_v2")
            try:
                async for page in paginator.paginate(Bucket=bucket, Prefix=self.options.prefix + prefix):
                    for item in page.get("Contents", []):
                        key = item["Key"][strip:]
                        try:
                            if self.locate(key) != (bucket, item["Key"]):
                                continue  # belongs to another bucket's mapping: not ours to report
                        except NotFoundError:
                            continue
                        yield BlobInfo(key, int(item["Size"]), item["LastModified"].timestamp())
            except _CLIENT_ERRORS as exc:
                raise translate(exc, "list") from exc


    async def iter_uploads(self) -> AsyncIterator[PendingUpload]:
        """Unfinished multipart uploads under our prefix (their parts use space until aborted)."""
        s3 = await self._s3()
        strip = len(self.options.prefix)
        for bucket in self.buckets():
            paginator = s3.get_paginator("list_multipart_uploads")
            try:
                async for page in paginator.paginate(Bucket=bucket, Prefix=self.options.prefix):
                    for item in page.get("Uploads", []):
                        yield PendingUpload(bucket, item["Key"][strip:], item["UploadId"],
                                            item["Initiated"].timestamp())
            except _CLIENT_ERRORS as exc:
                raise translate(exc, "list uploads") from exc

    async def abort_upload(self, upload: PendingUpload) -> None:
        s3 = await self._s3()
        try:
            await s3.abort_multipart_upload(Bucket=upload.bucket, Key=self.options.prefix + upload.key,
                                            UploadId=upload.upload_id)
        except _CLIENT_ERRORS as exc:
            err = translate(exc, "abort upload")
            if not isinstance(err, NotFoundError):
                raise err from exc


def _read_range(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(length)


class _RangeReader(io.RawIOBase):
    """Seekable, read-ahead view of one object: reads become ranged GETs of at least ``block`` bytes.

    Not an ``io.BufferedReader``: pydicom would take that for a local file and reopen it by name.
    ``read(n)`` returns ``n`` bytes unless the object ends first, like a local file.
    """

    def __init__(self, client: SyncS3Client, bucket: str, key: str, size: int, block: int) -> None:
        self._client, self._bucket, self._key, self._size, self._block = client, bucket, key, size, block
        self._pos = 0
        self._cache = b""
        self._cache_start = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def _get(self, start: int, length: int) -> bytes:
        byte_range = f"bytes={start}-{start + length - 1}"
        try:
            response = self._client.get_object(Bucket=self._bucket, Key=self._key, Range=byte_range)
            return response["Body"].read()
        except _CLIENT_ERRORS as exc:
            raise translate(exc, "get") from exc

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self._size - self._pos))
        done = 0
        while done < want:
            offset = self._pos - self._cache_start
            if 0 <= offset < len(self._cache):
                n = min(want - done, len(self._cache) - offset)
                view[done:done + n] = self._cache[offset:offset + n]
            elif want - done >= self._block:  # a large read goes straight into the caller's buffer
                data = self._get(self._pos, want - done)
                n = len(data)
                view[done:done + n] = data
            else:
                self._cache_start = self._pos
                self._cache = self._get(self._pos, min(self._block, self._size - self._pos))
                if not self._cache:
                    break
                continue
            if n == 0:
                break
            done += n
            self._pos += n
        return done

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self._size - self._pos)
        buffer = bytearray(min(size, max(0, self._size - self._pos)))
        n = self.readinto(buffer)
        return bytes(buffer[:n])
