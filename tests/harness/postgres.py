"""A throwaway PostgreSQL cluster for tests (Debian's server binaries, data in a temp dir).

``DICOMFLOW_TEST_PG_URL=postgresql://user@host:port/db`` points the tests at an existing server
instead; each test then gets a database of its own on it, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from dicomflow.index import migrate
from dicomflow.index.sql import make_engine

T = TypeVar("T")
ENV_URL = "DICOMFLOW_TEST_PG_URL"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def upgrade_schema(url: str) -> None:
    """Create the index schema in the database at ``url`` (or bring it to this version), as ``dicomflow db
    upgrade`` does."""
    engine = make_engine(url)
    try:
        await migrate.upgrade(engine)
    finally:
        await engine.dispose()


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even while a test's event loop is running."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def find_bindir() -> Path:
    """Where initdb and pg_ctl live; scripts/install-sysdeps.sh installs them on a fresh machine."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not candidates:
        raise RuntimeError("PostgreSQL server binaries not found: run `make sysdeps` (apt package postgresql) "
                           f"or set {ENV_URL}")
    return candidates[-1].parent


@dataclass
class PgCluster:
    """A private cluster: ``initdb`` + ``pg_ctl start`` on a free loopback port, fsync off."""

    bindir: Path
    base: Path
    port: int
    process_user: str | None  # run the server binaries as this user (initdb refuses root)

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        return ["runuser", "-u", self.process_user, "--", *cmd] if self.process_user else cmd

    @classmethod
    def start(cls) -> PgCluster:
        bindir = find_bindir()
        base = Path(tempfile.mkdtemp(prefix="dicomflow-pg-"))
        user = "postgres" if os.geteuid() == 0 else None
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(base, entry.pw_uid, entry.pw_gid)
        cluster = cls(bindir, base, free_port(), user)
        env = {**os.environ, "LC_ALL": "C.UTF-8"}
        locale = "en_US.UTF-8" if _has_locale("en_US.utf8") else "C.UTF-8"  # a production-like collation
        subprocess.run(cluster._cmd("initdb", "-D", str(cluster.datadir), "-U", "postgres", "-A", "trust",
                                    "-E", "UTF8", f"--locale={locale}", "--no-sync"),
                       check=True, capture_output=True, env=env, timeout=120)
        cluster.resume()
        return cluster

    def resume(self) -> None:
        """Start the server (again) on the same port and data."""
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        subprocess.run(self._cmd("pg_ctl", "-D", str(self.datadir), "-l", str(self.base / "server.log"),
                                 "-o", options, "-w", "-t", "60", "start"),
                       check=True, capture_output=True, env={**os.environ, "LC_ALL": "C.UTF-8"}, timeout=90)

    def pause(self) -> None:
        """Stop the server as an operator restarting it would (connections are terminated)."""
        subprocess.run(self._cmd("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop"),
                       check=True, capture_output=True, timeout=60)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(self._cmd("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop"),
                           check=False, capture_output=True, timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)


def _has_locale(name: str) -> bool:
    try:
        out = subprocess.run(["locale", "-a"], check=True, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return name in out.split()


async def _admin(admin_url: str, statement: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=30)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def _with_db(admin_url: str, name: str) -> str:
    head, _, _ = admin_url.rpartition("/")
    return f"{head}/{name}"


def create_database(admin_url: str) -> str:
    """A fresh, empty database on the server behind ``admin_url``; returns its URL."""
    name = f"dicomflow_t_{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + 30
    while True:
        try:
            run_async(_admin(admin_url, f'CREATE DATABASE "{name}" TEMPLATE template0'))
            break
        except asyncpg.exceptions.ObjectInUseError:  # template busy with a concurrent CREATE DATABASE
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    return _with_db(admin_url, name)


def drop_database(admin_url: str, url: str) -> None:
    name = url.rpartition("/")[2]
    run_async(_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
