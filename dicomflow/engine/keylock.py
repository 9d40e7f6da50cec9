"""One holder per key across every routing worker that shares the index (``serve`` and ``dicomflow worker``).

The FHIR connector takes it around each conditional update (FHIR R4 3.1.0.4.3). The standard does not
require a server to make the search and the create of one conditional update atomic, and common servers
do not: HAPI FHIR creates duplicates under concurrent conditional create/update (hapifhir/hapi-fhir#3141,
#4597), as do Azure's (microsoft/fhir-server#1382) and LinuxForHealth's (LinuxForHealth/FHIR#2051).
Medplum's PostgreSQL repository runs it in a SERIALIZABLE transaction (retried on 40001); its in-memory
one has no isolation at all. Two deliveries for one new patient on two workers would both find nothing
and both create it.

Two levels: an :class:`asyncio.Lock` per key slot inside the process, so a process holds at most one
database connection (or file lock) per key however many of its deliveries wait; then a lock shared by
the processes:

- PostgreSQL: ``pg_advisory_xact_lock(namespace, slot)`` in a transaction on a connection of the index
  engine, held for the body and released when that transaction ends, whatever ends it (commit, rollback
  when the connection goes back to the pool, the session dying with a crashed process). The transaction
  sits idle during the FHIR call: an ``idle_in_transaction_session_timeout`` shorter than a destination's
  ``timeout`` would end the session, and the lock, early.
- SQLite: a POSIX byte-range lock (``fcntl``) at offset ``slot`` of a file beside the database. It takes
  no database write (SQLite has one writer, shared with ingest), and the kernel drops it when the process
  dies; it works wherever SQLite's own locking (also fcntl) does. ``:memory:`` has one process: the
  asyncio lock is all there is.

Keys are hashed to 31-bit slots; two keys sharing a slot only wait for each other.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import sqlalchemy as sa

from dicomflow.errors import OutOfResourcesError
from dicomflow.index.sql import SqlIndexStore

#: first key of the two-int ``pg_advisory_xact_lock``: "dfkl"; the one-bigint key space (index/migrate.py)
#: does not overlap it (PostgreSQL manual, Advisory Lock Functions)
PG_NAMESPACE = 0x64666B6C
#: back-off while another process holds a file lock (SQLite)
_POLL_FIRST, _POLL_MAX = 0.005, 0.1


def slot(key: str) -> int:
    """A stable (not per-process like ``hash()``) 31-bit number for ``key``."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big") & 0x7FFFFFFF


class KeyLocks:
    """Mutual exclusion per key for every process on one index database."""

    def __init__(self, index: SqlIndexStore) -> None:
        self.index = index
        self._local: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()
        self._fd: int | None = None
        database = index.engine.url.database
        if index.dialect == "sqlite" and database and database != ":memory:":
            # one descriptor for the process's lifetime: closing any descriptor of a file drops every
            # POSIX lock the process holds on it
            self._fd = os.open(f"{database}.keylocks", os.O_RDWR | os.O_CREAT, 0o600)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Hold ``key`` for the body: wait while another delivery, in any process, holds it."""
        n = slot(key)
        local = self._local.get(n)
        if local is None:
            local = self._local[n] = asyncio.Lock()
        async with local:
            if self.index.dialect == "postgresql":
                async with self.index.engine.begin() as conn:
                    try:
                        await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(PG_NAMESPACE, n)))
                    except OutOfResourcesError:
                        # cancelled while waiting (the delivery's deadline, shutdown): the driver drops the
                        # connection, which surfaces as "database unavailable"; stopping is what happened
                        task = asyncio.current_task()
                        if task is not None and task.cancelling():
                            raise asyncio.CancelledError() from None
                        raise
                    yield
            elif self._fd is not None:
                async with self._file_lock(self._fd, n):
                    yield
            else:
                yield

    @staticmethod
    @asynccontextmanager
    async def _file_lock(fd: int, offset: int) -> AsyncIterator[None]:
        delay = _POLL_FIRST
        while True:  # non-blocking attempts: a waiting delivery stays cancellable and holds no thread
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
                break
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)
        try:
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)
