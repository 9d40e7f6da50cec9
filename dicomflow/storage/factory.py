"""Pick the blob store from the storage URL: ``file:///path`` (default) or ``s3://bucket/prefix``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from dicomflow.offload import Offloader
from dicomflow.settings import S3Settings, Settings
from dicomflow.storage.base import BlobStore
from dicomflow.storage.filesystem import FilesystemBlobStore
from dicomflow.storage.s3 import S3BlobStore, S3Options


@dataclass(frozen=True, slots=True)
class StorageLocation:
    """A parsed storage URL."""

    scheme: str
    #: the blob folder for ``file``, None for ``s3``
    root: Path | None = None
    bucket: str = ""
    prefix: str = ""


def parse_storage_url(url: str) -> StorageLocation:
    """Parse ``file:///path`` or ``s3://bucket[/prefix]``; raise ``ValueError`` with the accepted forms."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ValueError(f"unsupported storage URL {url!r}: use file:///absolute/path")
        return StorageLocation("file", root=Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"storage URL {url!r} has no bucket: use s3://bucket/prefix")
        prefix = unquote(parsed.path).strip("/")
        return StorageLocation("s3", bucket=parsed.netloc, prefix=f"{prefix}/" if prefix else "")
    raise ValueError(f"unsupported storage URL {url!r}: use file:///path or s3://bucket/prefix")


def s3_options(location: StorageLocation, s3: S3Settings) -> S3Options:
    return S3Options(
        bucket=location.bucket, prefix=location.prefix, endpoint_url=s3.endpoint_url, region=s3.region,
        access_key_id=s3.access_key_id,
        secret_access_key=s3.secret_access_key.get_secret_value() if s3.secret_access_key else None,
        session_token=s3.session_token.get_secret_value() if s3.session_token else None,
        addressing_style="path" if s3.path_style else "auto", sse=s3.sse, sse_kms_key_id=s3.sse_kms_key_id,
        tenant_buckets=dict(s3.tenant_buckets), part_size=s3.part_size, part_concurrency=s3.part_concurrency,
        max_attempts=s3.max_attempts, connect_timeout=s3.connect_timeout, read_timeout=s3.read_timeout,
    )


def spool_dir(settings: Settings) -> Path:
    """Where ingest spools incoming instances: beside file blobs (publishing is then a rename)."""
    location = parse_storage_url(settings.storage_url)
    if location.root is not None:
        return location.root / ".spool"
    return settings.data_dir / "spool"


async def open_blob_store(settings: Settings, offloader: Offloader) -> BlobStore:
    """The configured blob store. An S3 store connects lazily, so a server starts while S3 is down."""
    location = parse_storage_url(settings.storage_url)
    if location.root is not None:
        return FilesystemBlobStore(location.root, offloader)
    store = S3BlobStore(s3_options(location, settings.s3), offloader)
    if settings.s3.create_buckets:
        try:
            await store.ensure_buckets()
        except BaseException:
            await store.close()
            raise
    return store
