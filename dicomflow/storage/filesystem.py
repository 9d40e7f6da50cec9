"""Blob store on a local folder: the embedded default."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from dicomflow.errors import NotFoundError, OutOfResourcesError
from dicomflow.offload import Offloader
from dicomflow.storage.base import BlobInfo


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rel(directory: str, root: Path) -> str:
    return str(Path(directory).relative_to(root)) + "/"


class FilesystemBlobStore:
    """Blobs as files under ``root``; ``put_file`` renames a fsynced spool file into place."""

    def __init__(self, root: Path, offloader: Offloader) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_prefix = str(self.root) + os.sep
        self._off = offloader
        #: folders known to exist with their entries durable: no mkdir or parent fsync for them again
        self._made: set[str] = set()

    def _path(self, key: str) -> Path:
        # Lexical, not resolve(): keys are ours (new_blob_key) and nothing here creates symlinks; this
        # still refuses a key that climbs out of the root, without a stat per path component.
        path = os.path.normpath(os.path.join(self.root, key))
        if not path.startswith(self._root_prefix):
            raise NotFoundError("no such blob")
        return Path(path)

    def _make_dirs(self, directory: Path) -> None:
        """Create ``directory`` and its missing parents, fsyncing each parent that got a new entry, so
        that the blob's path survives a crash and not only its file (rename(2) + fsync of one folder
        does not make a folder created just before durable)."""
        if str(directory) in self._made:
            return
        # Every folder this process has not made durable itself gets its parent fsynced once, even when it
        # exists: another thread may have just created it and not be done with that fsync yet.
        chain: list[Path] = []
        d = directory
        while str(d) not in self._made and d != self.root:
            chain.append(d)
            d = d.parent
        for d in reversed(chain):
            with contextlib.suppress(FileExistsError):
                d.mkdir()
            _fsync_dir(d.parent)
            self._made.add(str(d))

    def _put(self, key: str, src: Path) -> None:
        dst = self._path(key)
        try:
            self._make_dirs(dst.parent)
            try:
                try:
                    os.replace(src, dst)
                except FileNotFoundError:
                    if not src.exists():
                        raise
                    self._made.clear()  # folders went away under us (an operator?): make them again
                    self._make_dirs(dst.parent)
                    os.replace(src, dst)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # spool on another filesystem: copy, fsync, then publish atomically
                tmp = dst.with_suffix(".part")
                with open(src, "rb") as fin, open(tmp, "wb") as fout:
                    while chunk := fin.read(1 << 20):
                        fout.write(chunk)
                    fout.flush()
                    os.fsync(fout.fileno())
                os.replace(tmp, dst)
                src.unlink(missing_ok=True)
            _fsync_dir(dst.parent)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS):
                raise OutOfResourcesError("blob storage unavailable or full") from exc
            raise

    async def put_file(self, key: str, src: Path) -> None:
        await self._off.run(self._put, key, src)

    async def delete(self, key: str) -> None:
        await self._off.run(self._path(key).unlink, True)

    async def exists(self, key: str) -> bool:
        return await self._off.run(self._path(key).is_file)

    async def size(self, key: str) -> int:
        try:
            return (await self._off.run(self._path(key).stat)).st_size
        except FileNotFoundError:
            raise NotFoundError("no such blob") from None

    def open_sync(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFoundError("no such blob") from None

    async def stream(self, key: str, start: int = 0, end: int | None = None,
                     chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        fh = await self._off.run(self.open_sync, key)
        try:
            await self._off.run(fh.seek, start)
            remaining = None if end is None else end - start
            while remaining is None or remaining > 0:
                size = chunk_size if remaining is None else min(chunk_size, remaining)
                chunk = await self._off.run(fh.read, size)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
        finally:
            await self._off.run(fh.close)

    async def iter_keys(self, prefix: str = "") -> AsyncIterator[str]:
        async for info in self.iter_blobs(prefix):
            yield info.key

    async def iter_blobs(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        def walk_dir(directory: str) -> tuple[list[str], list[BlobInfo]]:
            subdirs: list[str] = []
            found: list[BlobInfo] = []
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.startswith("."):  # .spool and other private folders: not blobs
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.path)
                    elif entry.is_file(follow_symlinks=False) and not entry.name.endswith(".part"):
                        st = entry.stat()
                        key = str(Path(entry.path).relative_to(self.root))
                        if key.startswith(prefix):
                            found.append(BlobInfo(key, st.st_size, st.st_mtime))
            return subdirs, found

        # one directory per offloaded call: memory stays bounded by the widest folder, not the store
        pending = [str(self.root)]
        while pending:
            directory = pending.pop()
            try:
                subdirs, found = await self._off.run(walk_dir, directory)
            except FileNotFoundError:
                continue
            pending.extend(d for d in subdirs
                           if prefix.startswith(_rel(d, self.root)) or _rel(d, self.root).startswith(prefix))
            for info in found:
                yield info
            await asyncio.sleep(0)

    async def close(self) -> None:
        return None
