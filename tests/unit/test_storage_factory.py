"""Backend choice by configuration: storage URLs, S3 settings and options, error translation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from dicomflow.errors import DicomServiceError, NotFoundError, OutOfResourcesError
from dicomflow.offload import Offloader
from dicomflow.settings import Settings
from dicomflow.storage.factory import open_blob_store, parse_storage_url, s3_options, spool_dir
from dicomflow.storage.filesystem import FilesystemBlobStore
from dicomflow.storage.s3 import S3BlobStore, S3Options, translate


@pytest.mark.parametrize(("url", "scheme", "root", "bucket", "prefix"), [
    ("file:///var/lib/dicomflow/blobs", "file", Path("/var/lib/dicomflow/blobs"), "", ""),
    ("file://localhost/srv/blobs", "file", Path("/srv/blobs"), "", ""),
    ("file:///srv/with%20space", "file", Path("/srv/with space"), "", ""),
    ("s3://pacs", "s3", None, "pacs", ""),
    ("s3://pacs/", "s3", None, "pacs", ""),
    ("s3://pacs/prod/blobs/", "s3", None, "pacs", "prod/blobs/"),
    ("s3://pacs/prod", "s3", None, "pacs", "prod/"),
])
def test_storage_urls(url: str, scheme: str, root: Path | None, bucket: str, prefix: str) -> None:
    location = parse_storage_url(url)
    assert (location.scheme, location.root, location.bucket, location.prefix) == (scheme, root, bucket, prefix)


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix", "http://example/blobs", "file://nas/share",
                                 "file:relative", "/plain/path", "gs://bucket"])
def test_bad_storage_urls(url: str) -> None:
    with pytest.raises(ValueError, match="storage URL"):
        parse_storage_url(url)


def test_s3_settings_from_yaml_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMFLOW_S3__SECRET_ACCESS_KEY", "from-env")
    monkeypatch.setenv("DICOMFLOW_S3__PATH_STYLE", "true")
    settings = Settings(data_dir=tmp_path, storage="s3://images/site-a", s3={
        "endpoint_url": "http://127.0.0.1:8333", "access_key_id": "AK", "sse": "aws:kms",
        "sse_kms_key_id": "alias/pacs", "tenant_buckets": {"acme": "acme-images"}, "part_size": 16 * 1024**2})
    assert "from-env" not in repr(settings)
    options = s3_options(parse_storage_url(settings.storage_url), settings.s3)
    assert options == S3Options(
        bucket="images", prefix="site-a/", endpoint_url="http://127.0.0.1:8333", access_key_id="AK",
        secret_access_key="from-env", addressing_style="path", sse="aws:kms", sse_kms_key_id="alias/pacs",
        tenant_buckets={"acme": "acme-images"}, part_size=16 * 1024**2)
    assert options.sse_args() == {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/pacs"}
    assert options.client_kwargs()["aws_secret_access_key"] == "from-env"
    assert spool_dir(settings) == tmp_path / "spool"


def test_s3_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="part_size"):
        Settings(data_dir=tmp_path, s3={"part_size": 1024})
    with pytest.raises(ValueError, match="sse"):
        Settings(data_dir=tmp_path, s3={"sse": "rot13"})
    with pytest.raises(ValueError, match="sse_kms_key_id needs"):
        S3Options(bucket="b", sse="AES256", sse_kms_key_id="k")
    with pytest.raises(ValueError, match="prefix"):
        S3Options(bucket="b", prefix="no-slash")


async def test_factory_picks_the_store(tmp_path: Path) -> None:
    off = Offloader(1)
    try:
        file_settings = Settings(data_dir=tmp_path)
        store = await open_blob_store(file_settings, off)
        assert isinstance(store, FilesystemBlobStore) and store.root == (tmp_path / "blobs").resolve()
        assert spool_dir(file_settings) == (tmp_path / "blobs").resolve() / ".spool"
        await store.close()
        # S3 connects lazily: a server starts while the store is still unreachable
        s3 = await open_blob_store(Settings(data_dir=tmp_path, storage="s3://b/p",
                                            s3={"endpoint_url": "http://127.0.0.1:9"}), off)
        assert isinstance(s3, S3BlobStore) and s3.options.prefix == "p/"
        await s3.close()
    finally:
        off.shutdown()


def test_keys_map_to_tenant_buckets() -> None:
    off = Offloader(1)
    store = S3BlobStore(S3Options(bucket="shared", prefix="dicom/", tenant_buckets={"acme": "acme-own"}), off)
    off.shutdown()
    assert store.locate("acme/ab/cd/abcd") == ("acme-own", "dicom/acme/ab/cd/abcd")
    assert store.locate("default/ab/cd/abcd") == ("shared", "dicom/default/ab/cd/abcd")
    assert store.buckets() == ["acme-own", "shared"]
    for bad in ("", "acme", "/acme/x", "acme/../x", "acme/"):
        with pytest.raises(NotFoundError):
            store.locate(bad)


def _client_error(code: str, status: int) -> ClientError:
    response: Any = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")


@pytest.mark.parametrize(("exc", "expected", "http", "dimse"), [
    (_client_error("NoSuchKey", 404), NotFoundError, 404, 0x0000),
    (_client_error("404", 404), NotFoundError, 404, 0x0000),
    (_client_error("SlowDown", 503), OutOfResourcesError, 503, 0xA700),
    (_client_error("InternalError", 500), OutOfResourcesError, 503, 0xA700),
    (_client_error("XMinioStorageFull", 507), OutOfResourcesError, 503, 0xA700),
    (_client_error("AccessDenied", 403), DicomServiceError, 500, 0x0110),
    (_client_error("NoSuchBucket", 404), DicomServiceError, 500, 0x0110),
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), OutOfResourcesError, 503, 0xA700),
    (ReadTimeoutError(endpoint_url="http://127.0.0.1:9"), OutOfResourcesError, 503, 0xA700),
    (ConnectionResetError(), OutOfResourcesError, 503, 0xA700),
])
def test_error_translation(exc: Exception, expected: type[DicomServiceError], http: int, dimse: int) -> None:
    err = translate(exc, "get")
    assert type(err) is expected
    assert (err.http_status, err.dimse_status) == (http, dimse)
