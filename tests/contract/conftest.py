"""Implementations under contract: every IndexStore and BlobStore test runs against each of them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomflow.index.sql import SqlIndexStore
from dicomflow.offload import Offloader
from dicomflow.storage.base import BlobStore
from dicomflow.storage.filesystem import FilesystemBlobStore
from dicomflow.storage.s3 import S3BlobStore, S3Options

INDEX_BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]
BLOB_BACKENDS = ["filesystem", pytest.param("s3", marks=pytest.mark.integration)]


@pytest.fixture(params=INDEX_BACKENDS)
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def index(index_url: str) -> AsyncIterator[SqlIndexStore]:
    store = await SqlIndexStore.open(index_url, create_schema=True)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def offloader() -> Iterator[Offloader]:
    off = Offloader(4, name="contract")
    yield off
    off.shutdown()


@pytest.fixture(params=BLOB_BACKENDS)
def blob_backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Any]:
    """("filesystem", root) or ("s3", S3Options for a fresh bucket)."""
    if request.param == "filesystem":
        return "filesystem", tmp_path / "blobs"
    return "s3", request.getfixturevalue("s3_options")


def make_blob_store(backend: tuple[str, Any], offloader: Offloader) -> BlobStore:
    kind, where = backend
    if kind == "filesystem":
        return FilesystemBlobStore(where, offloader)
    assert isinstance(where, S3Options)
    return S3BlobStore(where, offloader)


@pytest.fixture
async def blobs(blob_backend: tuple[str, Any], offloader: Offloader) -> AsyncIterator[BlobStore]:
    store = make_blob_store(blob_backend, offloader)
    try:
        yield store
    finally:
        await store.close()
