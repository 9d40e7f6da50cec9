"""Streaming multipart/related responses (RFC 2387, PS3.18 8.7.1.2 / 8.6.1.2) for WADO-RS.

Blobs on a local filesystem go out with ``loop.sendfile`` (zero copy, one await per part); other
stores stream in large chunks read off the loop. Nothing holds more than one part in memory.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from typing import BinaryIO

from aiohttp import web

from dicomflow.offload import Offloader
from dicomflow.storage.base import BlobStore

STREAM_CHUNK = 4 << 20
#: blobs up to this size are read and written in groups (see write_small_blob_parts)
SMALL_BLOB = 256 << 10
SMALL_GROUP = 4 << 20


def new_boundary() -> str:
    return f"dicomflow-{uuid.uuid4().hex}"


def part_header(boundary: str, content_type: str, length: int | None = None,
                location: str | None = None) -> bytes:
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if location is not None:
        lines.append(f"Content-Location: {location}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("ascii")


def multipart_content_type(part_type: str, boundary: str, transfer_syntax: str | None = None) -> str:
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    if transfer_syntax is not None:
        value += f"; transfer-syntax={transfer_syntax}"
    return value


class MultipartStream:
    """Writes the parts of one prepared ``StreamResponse``; call :meth:`close` once at the end."""

    def __init__(self, request: web.Request, response: web.StreamResponse, boundary: str,
                 blobs: BlobStore, offloader: Offloader) -> None:
        self.request = request
        self.response = response
        self.boundary = boundary
        self.blobs = blobs
        self.off = offloader
        self._pending = b""  # the CRLF ending the previous part, sent with the next header (one write)

    async def write_part(self, content_type: str, data: bytes | memoryview, location: str | None = None) -> None:
        await self.response.write(self._pending + part_header(self.boundary, content_type, len(data), location))
        await self.response.write(data)
        self._pending = b"\r\n"

    async def write_blob_part(self, content_type: str, key: str, start: int, count: int,
                              location: str | None = None) -> None:
        """A part whose body is ``count`` bytes of a blob from ``start``."""
        await self.response.write(self._pending + part_header(self.boundary, content_type, count, location))
        await self.send_blob(key, start, count)
        self._pending = b"\r\n"

    async def write_small_blob_parts(self, parts: list[tuple[str, str, int]]) -> None:
        """Several whole small blobs ``(content type, key, size)`` read in one offloaded call and written
        at once: per-part awaits, not bytes, dominate studies of many small instances."""

        def read_all() -> bytes:
            chunks = [self._pending]
            for content_type, key, size in parts:
                chunks.append(part_header(self.boundary, content_type, size))
                with self.blobs.open_sync(key) as fh:
                    data = fh.read(size)
                if len(data) != size:
                    raise ConnectionResetError("blob shorter than indexed")
                chunks.append(data)
                chunks.append(b"\r\n")
            return b"".join(chunks[:-1])

        await self.response.write(await self.off.run(read_all))
        self._pending = b"\r\n"

    async def send_blob(self, key: str, start: int, count: int) -> None:
        await self.send_ranges(key, [(start, count)])

    async def write_ranges_part(self, content_type: str, key: str, ranges: list[tuple[int, int]],
                                location: str | None = None) -> None:
        """A part made of byte ranges of one blob (a frame: its fragments, PS3.5 A.4)."""
        await self.response.write(
            self._pending + part_header(self.boundary, content_type, sum(n for _o, n in ranges), location))
        await self.send_ranges(key, ranges)
        self._pending = b"\r\n"

    async def send_ranges(self, key: str, ranges: list[tuple[int, int]]) -> None:
        """Send byte ranges of a blob: ``sendfile`` when nothing frames the body, else large reads off the loop."""
        fh: BinaryIO = await self.off.run(self.blobs.open_sync, key)
        try:
            transport = self.request.transport
            if transport is None:
                raise ConnectionResetError("connection lost")
            try:
                fh.fileno()
                # zero copy only when nothing frames the body: no chunked coding, no compression, no TLS
                native = (not self.response.compression
                          and "chunked" not in self.response.headers.get("Transfer-Encoding", "")
                          and transport.get_extra_info("sslcontext") is None)
            except (OSError, AttributeError, io.UnsupportedOperation):
                native = False
            loop = asyncio.get_running_loop()
            for start, count in ranges:
                if native:
                    try:
                        await loop.sendfile(transport, fh, start, count)
                        continue
                    except NotImplementedError:
                        native = False
                await self._copy(fh, start, count)
        finally:
            fh.close()

    async def _copy(self, fh: BinaryIO, start: int, count: int) -> None:
        await self.off.run(fh.seek, start)
        remaining = count
        while remaining > 0:
            chunk = await self.off.run(fh.read, min(STREAM_CHUNK, remaining))
            if not chunk:
                raise ConnectionResetError("blob shorter than indexed")
            remaining -= len(chunk)
            await self.response.write(chunk)

    async def close(self) -> None:
        await self.response.write(self._pending + closing(self.boundary))
        await self.response.write_eof()
