"""The BlobStore port."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol


def new_blob_key(tenant: str) -> str:
    """An opaque key: tenant prefix plus a random id, never built from peer-supplied UIDs."""
    hexid = uuid.uuid4().hex
    return f"{tenant}/{hexid[:2]}/{hexid[2:4]}/{hexid}"


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One stored blob as listed by :meth:`BlobStore.iter_blobs`."""

    key: str
    size: int
    #: last modification, seconds since the epoch
    modified: float


class BlobStore(Protocol):
    """Durable storage of instance bytes.

    Keys come from :func:`new_blob_key`. Every method may raise
    :class:`dicomflow.errors.OutOfResourcesError` when the backend is full or unavailable.
    """

    async def put_file(self, key: str, src: Path) -> None:
        """Make the fully written, fsynced local file ``src`` durable under ``key``.

        ``src`` is consumed (moved or deleted). Returns only when the blob is durable.
        """
        ...

    async def delete(self, key: str) -> None:
        """Remove a blob; a missing blob is not an error."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def size(self, key: str) -> int: ...

    def stream(self, key: str, start: int = 0, end: int | None = None,
               chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """Yield the bytes ``[start, end)`` of a blob in chunks."""
        ...

    def open_sync(self, key: str) -> BinaryIO:
        """A seekable binary file object, for blocking code run through the offloader."""
        ...

    def iter_keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Every key under a prefix (for consistency checks)."""
        ...

    def iter_blobs(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        """Every blob under a prefix with its size and age (fsck tells crash leftovers from uploads)."""
        ...

    async def close(self) -> None: ...
