"""Start a real FHIR R4 engine for tests: Medplum's FhirRouter + MemoryRepository behind node:http.

npm installs @medplum/fhir-router, core and definitions 5.2.13 into a cache folder on first use
(``DICOMFLOW_TEST_CACHE``, default ~/.cache/dicomflow-tests). Medplum does not validate resources:
tests validate what they read back with fhir.resources.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent / "fhir_server"
CACHE = Path(os.environ.get("DICOMFLOW_TEST_CACHE", Path.home() / ".cache" / "dicomflow-tests"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def install() -> Path:
    """npm install the Medplum packages into a cache folder (once); returns the folder to run from."""
    target = CACHE / "medplum-fhir-router-5.2.13"
    if not (target / "node_modules" / "@medplum" / "fhir-router").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(HERE / "package.json", target / "package.json")
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=target, check=True,
                       timeout=300)
    shutil.copy(HERE / "server.mjs", target / "server.mjs")
    return target


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
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(["node", "--experimental-websocket", "server.mjs"], cwd=folder,
                                            env={**os.environ, "FHIR_PORT": str(self.port)}, stdout=out,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/_requests", timeout=1):
                    return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"FHIR server exited: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        raise RuntimeError("FHIR server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
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
    server = FhirServer(_free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def fhir_server_factory() -> Iterator[Any]:
    """FhirServer objects on free ports, started when the test says so, stopped at the end."""
    servers: list[FhirServer] = []

    def make() -> FhirServer:
        server = FhirServer(_free_port())
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
