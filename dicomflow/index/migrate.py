"""Index schema versions: create, upgrade step by step, and refuse to serve any other version.

``schema_info.version`` records the version a database is at. :data:`MIGRATIONS` maps a version
``n`` to the step that takes a database from ``n`` to ``n + 1`` (ALTERs, data moves); tables that are
new in a version are created by ``create_all`` after the steps. ``dicomflow db upgrade`` applies
them; servers only check, except that the embedded default (SQLite) creates an empty index itself.
Several processes may upgrade at once: on PostgreSQL an advisory lock serializes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from dicomflow.index import schema as t

#: version n -> step from n to n + 1, run inside the upgrade transaction
MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {}

#: pg_advisory_xact_lock key ("dicomflow" in ASCII, truncated to 63 bits)
_LOCK_KEY = 0x6469636F6D666C6F


class SchemaVersionError(RuntimeError):
    """The database holds no index, or one of another version than this code serves."""


@dataclass(frozen=True, slots=True)
class UpgradeResult:
    #: the version found (None: the database held no index)
    before: int | None
    after: int


def _read_version(conn: sa.Connection) -> int | None:
    if not sa.inspect(conn).has_table(t.schema_info.name):
        return None
    versions = conn.execute(sa.select(t.schema_info.c.version)).scalars().all()
    if len(versions) != 1:
        raise SchemaVersionError(f"schema_info holds {len(versions)} rows instead of one: not a dicomflow index")
    return int(versions[0])


async def read_version(engine: AsyncEngine) -> int | None:
    """The schema version of the database, or None when it holds no dicomflow index."""
    async with engine.connect() as conn:
        return await conn.run_sync(_read_version)


def describe(found: int | None, expected: int = t.SCHEMA_VERSION) -> str | None:
    """Why a server must not run against this database, or None when it may."""
    if found is None:
        return "the index database has no dicomflow schema: run `dicomflow db upgrade` first"
    if found < expected:
        return (f"the index schema is version {found}, this dicomflow needs {expected}: "
                "run `dicomflow db upgrade` (back up the database first)")
    if found > expected:
        return (f"the index schema is version {found}, newer than this dicomflow understands ({expected}): "
                "run a dicomflow release that matches the database")
    return None


async def check(engine: AsyncEngine) -> int:
    """Raise :class:`SchemaVersionError` unless the database is at :data:`~schema.SCHEMA_VERSION`."""
    found = await read_version(engine)
    problem = describe(found)
    if problem is not None:
        raise SchemaVersionError(problem)
    assert found is not None
    return found


async def upgrade(engine: AsyncEngine, target: int = t.SCHEMA_VERSION) -> UpgradeResult:
    """Create the schema in an empty database or bring an older one to ``target``, atomically."""

    def run(conn: sa.Connection) -> UpgradeResult:
        found = _read_version(conn)
        if found is None:
            t.metadata.create_all(conn)
            conn.execute(t.schema_info.insert().values(version=target))
            return UpgradeResult(None, target)
        if found > target:
            raise SchemaVersionError(describe(found, target))
        for version in range(found, target):
            step = MIGRATIONS.get(version)
            if step is None:
                raise SchemaVersionError(f"no migration from schema version {version} to {version + 1}")
            step(conn)
        t.metadata.create_all(conn)  # tables new in this version (checkfirst)
        conn.execute(sa.update(t.schema_info).values(version=target))
        return UpgradeResult(found, target)

    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        return await conn.run_sync(run)


async def prepare(engine: AsyncEngine, *, create_if_empty: bool) -> None:
    """At start: create an empty index when allowed (embedded default), then insist on our version.

    When allowed to create, tables missing from a database at the current version are added too
    (``create_all`` is idempotent); other servers never run DDL at start.
    """
    if create_if_empty:
        found = await read_version(engine)
        if found is None or found == t.SCHEMA_VERSION:
            await upgrade(engine)
    await check(engine)
