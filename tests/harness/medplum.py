"""Start a real FHIR R4 engine for tests: Medplum's FhirRouter + MemoryRepository behind node:http.

npm installs @medplum/fhir-router, core and definitions 5.2.13 into a cache folder on first use
(``DICOMFLOW_TEST_CACHE``, default ~/.cache/dicomflow-tests). Medplum does not validate resources:
tests validate what they read back with fhir.resources.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.node import free_port, npm_install, start_node, stop_node

HERE = Path(__file__).parent / "fhir_server"


def install() -> Path:
    """npm install the Medplum packages into a cache folder (once); returns the folder to run from."""
    return npm_install(HERE, "medplum-fhir-router-5.2.13", "@medplum/fhir-router")


@dataclass
class FhirServer:
    """One in-memory FHIR server process on a fixed port (it can be started after it was configured)."""

    port: int
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FhirServer:
        folder = install()
        self.log = folder / f"fhir-{self.port}.log"
        self.process = start_node(folder, ["--experimental-websocket", "server.mjs"], {"FHIR_PORT": str(self.port)},
                                  self.log, f"{self.url}/_requests", 60, "FHIR server")
        return self

    def stop(self) -> None:
        stop_node(self.process)
        self.process = None

    def requests(self) -> list[dict[str, Any]]:
        """Write requests received so far: method, url, status."""
        with urllib.request.urlopen(f"{self.url}/_requests", timeout=5) as resp:
            return list(json.loads(resp.read()))

    def fault(self, status: int) -> None:
        """Answer every FHIR request with ``status`` (299: 200 with an HTML body; 0: back to normal)."""
        req = urllib.request.Request(f"{self.url}/_fault?status={status}", method="POST")
        with urllib.request.urlopen(req, timeout=5):
            pass


@pytest.fixture(scope="session")
def fhir_server() -> Iterator[FhirServer]:
    """One FHIR server for the session; tests use their own UIDs and identifiers."""
    server = FhirServer(free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def fhir_server_factory() -> Iterator[Any]:
    """FhirServer objects on free ports, started when the test says so, stopped at the end."""
    servers: list[FhirServer] = []

    def make() -> FhirServer:
        server = FhirServer(free_port())
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
