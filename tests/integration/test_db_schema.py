"""Schema versions: `dicomflow db upgrade|check`, and servers refusing another version."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from dicomflow.index import migrate
from dicomflow.index import schema as t
from dicomflow.index.sql import SqlIndexStore, make_engine
from tests.conftest import free_port

ROOT = Path(__file__).parents[2]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomflow", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


async def set_version(url: str, version: int) -> None:
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.update(t.schema_info).values(version=version))
    finally:
        await engine.dispose()


async def test_embedded_default_creates_its_index_on_first_start(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    store = await SqlIndexStore.open(url)
    await store.close()
    engine = make_engine(url)
    try:
        assert await migrate.read_version(engine) == t.SCHEMA_VERSION
    finally:
        await engine.dispose()


@pytest.mark.integration
async def test_postgresql_needs_db_upgrade(pg_url: str, tmp_path: Path) -> None:
    with pytest.raises(migrate.SchemaVersionError, match="run `dicomflow db upgrade` first"):
        await SqlIndexStore.open(pg_url)

    check = cli("db", "check", "--index", pg_url, cwd=tmp_path)
    assert check.returncode == 1 and "no dicomflow schema" in check.stderr

    created = cli("db", "upgrade", "--index", pg_url, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert f"created the index schema (version {t.SCHEMA_VERSION})" in created.stdout
    again = cli("db", "upgrade", "--index", pg_url, cwd=tmp_path)
    assert again.returncode == 0 and "already at version" in again.stdout
    assert cli("db", "check", "--index", pg_url, cwd=tmp_path).returncode == 0

    store = await SqlIndexStore.open(pg_url)
    await store.close()


@pytest.mark.integration
async def test_concurrent_upgrades_create_the_schema_once(pg_url: str) -> None:
    """Several servers' deploy hooks running `db upgrade` at once (advisory lock)."""
    engines = [make_engine(pg_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate.upgrade(e) for e in engines))
    finally:
        for e in engines:
            await e.dispose()
    assert sorted((r.before is None, r.after) for r in results) == [
        (False, t.SCHEMA_VERSION)] * 3 + [(True, t.SCHEMA_VERSION)]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def any_index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite'}"
    url: str = request.getfixturevalue("pg_url")
    return url


async def test_older_schema_is_refused_then_upgraded_step_by_step(any_index_url: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store = await SqlIndexStore.open(any_index_url, create_schema=True)
    await store.close()
    await set_version(any_index_url, t.SCHEMA_VERSION - 1)
    with pytest.raises(migrate.SchemaVersionError, match=r"version 0, this dicomflow needs 1: run `dicomflow db"):
        await SqlIndexStore.open(any_index_url)

    steps: list[int] = []

    def step(conn: sa.Connection) -> None:
        steps.append(conn.execute(sa.select(t.schema_info.c.version)).scalar_one())
        conn.execute(sa.text("CREATE TABLE migrated_marker (id INTEGER)"))

    monkeypatch.setitem(migrate.MIGRATIONS, t.SCHEMA_VERSION - 1, step)
    engine = make_engine(any_index_url)
    try:
        result = await migrate.upgrade(engine)
        assert (result.before, result.after, steps) == (t.SCHEMA_VERSION - 1, t.SCHEMA_VERSION, [0])
        assert await migrate.read_version(engine) == t.SCHEMA_VERSION
        async with engine.connect() as conn:
            assert await conn.run_sync(lambda c: sa.inspect(c).has_table("migrated_marker"))
    finally:
        await engine.dispose()
    store = await SqlIndexStore.open(any_index_url)
    await store.close()


async def test_failed_step_leaves_the_old_version(any_index_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await SqlIndexStore.open(any_index_url, create_schema=True)
    await store.close()
    await set_version(any_index_url, t.SCHEMA_VERSION - 1)

    def broken(conn: sa.Connection) -> None:
        conn.execute(sa.text("CREATE TABLE half_done (id INTEGER)"))
        raise RuntimeError("step failed")

    monkeypatch.setitem(migrate.MIGRATIONS, t.SCHEMA_VERSION - 1, broken)
    engine = make_engine(any_index_url)
    try:
        with pytest.raises(RuntimeError, match="step failed"):
            await migrate.upgrade(engine)
        assert await migrate.read_version(engine) == t.SCHEMA_VERSION - 1
    finally:
        await engine.dispose()


async def test_newer_schema_is_refused(any_index_url: str) -> None:
    store = await SqlIndexStore.open(any_index_url, create_schema=True)
    await store.close()
    await set_version(any_index_url, t.SCHEMA_VERSION + 1)
    with pytest.raises(migrate.SchemaVersionError, match="newer than this dicomflow understands"):
        await SqlIndexStore.open(any_index_url, create_schema=True)
    engine = make_engine(any_index_url)
    try:
        with pytest.raises(migrate.SchemaVersionError, match="newer"):
            await migrate.upgrade(engine)  # never downgrade
    finally:
        await engine.dispose()


async def test_serve_refuses_a_newer_schema(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    url = f"sqlite:///{data / 'index.sqlite'}"
    store = await SqlIndexStore.open(url)
    await store.close()
    await set_version(url, t.SCHEMA_VERSION + 1)
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(data), "dimse": {"enabled": False}}))
    served = cli("serve", "--config", str(config), "--http-port", str(free_port()), cwd=tmp_path)
    assert served.returncode == 2
    assert "newer than this dicomflow understands" in served.stderr
    assert "Traceback" not in served.stderr
