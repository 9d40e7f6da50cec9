"""Shared fixtures: a real server on a free port with its own data directory."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from dicomflow.app import create_app
from dicomflow.settings import Settings, TenantSettings

#: PostgreSQL and SeaweedFS S3 started on demand (pg_url, s3_bucket, ...): see tests/harness/fixtures.py
pytest_plugins = ["tests.harness.fixtures"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def plain_tenants() -> dict[str, TenantSettings]:
    """Tenants default, acme and globex, all with the default duplicate policy (unlike make_settings's)."""
    return {"default": TenantSettings(ae_titles=["DICOMFLOW"]), "acme": TenantSettings(ae_titles=["ACME"]),
            "globex": TenantSettings(ae_titles=["GLOBEX"])}


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    tenants = overrides.pop("tenants", None) or {
        "default": TenantSettings(ae_titles=["DICOMFLOW"]),
        "acme": TenantSettings(ae_titles=["ACME"]),
        "globex": TenantSettings(ae_titles=["GLOBEX"], duplicate_policy="overwrite"),
    }
    dimse = overrides.pop("dimse", None) or {"port": free_port(), "enabled": False}
    return Settings(data_dir=tmp_path / "data", tenants=tenants, dimse=dimse, **overrides)


def _marked(request: pytest.FixtureRequest) -> dict[str, Any]:
    """``make_settings`` overrides the test's markers ask for (``routing_off``)."""
    return {"routing": {"enabled": False}} if request.node.get_closest_marker("routing_off") else {}


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    return make_settings(tmp_path, **_marked(request))


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> TestClient:  # type: ignore[type-arg]
    """An in-process aiohttp test client for the app."""
    return await aiohttp_client(create_app(settings))


@dataclass
class LiveServer:
    """The full server running in a background thread with its own event loop, on real ports."""

    settings: Settings
    http_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicomweb"

    def tenant_dicomweb(self, tenant: str) -> str:
        return f"{self.url}/tenants/{tenant}/dicomweb"


def _run_server(settings: Settings, port: int, ready: threading.Event, stop: threading.Event) -> None:
    async def main() -> None:
        runner = web.AppRunner(create_app(settings), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        ready.set()
        while not stop.is_set():  # noqa: ASYNC110 - a threading.Event set from the test thread
            await asyncio.sleep(0.05)
        await runner.cleanup()

    asyncio.run(main())


class ServerThread:
    """The full server (HTTP, DIMSE when enabled, routing worker) in a background thread with its own event
    loop, on a free port, until ``stop()``."""

    def __init__(self, settings: Settings) -> None:
        port = free_port()
        self._stop = threading.Event()
        ready = threading.Event()
        self._thread = threading.Thread(target=_run_server, args=(settings, port, ready, self._stop), daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("server did not start")
        self.live = LiveServer(settings, port)

    def stop(self) -> bool:
        """Stop the server; returns whether its thread ended (within 30 s)."""
        self._stop.set()
        self._thread.join(30)
        return not self._thread.is_alive()


@contextmanager
def running_server(settings: Settings) -> Iterator[LiveServer]:
    """A ServerThread for the ``with`` block (module-scoped fixtures: one server for many tests)."""
    server = ServerThread(settings)
    try:
        yield server.live
    finally:
        server.stop()


@pytest.fixture
def live_server_factory(tmp_path: Path) -> Iterator[Any]:
    """Start real servers (HTTP + DIMSE when enabled) for clients that nobody here wrote."""
    servers: list[ServerThread] = []

    def start(settings: Settings | None = None, **overrides: Any) -> LiveServer:
        server = ServerThread(settings or make_settings(tmp_path, **overrides))
        servers.append(server)
        return server.live

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def live_server(request: pytest.FixtureRequest, live_server_factory: Any) -> LiveServer:
    server: LiveServer = live_server_factory(**_marked(request))
    return server


class _InfoLogCollector(logging.Handler):
    """Keeps every log record at INFO or above emitted during the run (server threads included)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:
            text = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            text += " " + str(record.exc_info[1])
        self.lines.append(f"{record.name}: {text}")


_COLLECTOR = _InfoLogCollector()


def pytest_configure(config: pytest.Config) -> None:
    root = logging.getLogger()
    root.addHandler(_COLLECTOR)
    # as in production (dicomflow.__main__): access logs carry query strings, i.e. patient names and IDs
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No patient data in logs at INFO or above: grep every such record of the run for test PHI."""
    from tests.factory import PHI_SEEN

    # whole words only: a test patient called "Client^Test" must not match "ClientConnectorError"
    patterns = [(phi, re.compile(rf"(?<![A-Za-z0-9]){re.escape(phi)}(?![A-Za-z0-9])")) for phi in PHI_SEEN if phi]
    leaks = sorted({(phi, line) for line in _COLLECTOR.lines for phi, pattern in patterns if pattern.search(line)})
    if leaks:
        report = "\n".join(f"  {phi!r} in: {line[:300]}" for phi, line in leaks[:20])
        session.config.get_terminal_writer().line(
            f"\nPHI found in {len(leaks)} log record(s) at INFO or above:\n{report}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
