"""``dicomflow serve`` as real OS processes (for crash and multi-process tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from dicomflow.settings import Settings

ROOT = Path(__file__).parents[2]


def write_config(settings: Settings, path: Path, **extra: Any) -> Path:
    """A YAML settings file for ``settings`` (DIMSE off unless ``extra`` says otherwise; secrets written
    out in clear for the child)."""
    data = settings.model_dump(mode="json", exclude={"tenants", "auth", "routing", "audit"}, exclude_none=True)
    if settings.s3.secret_access_key is not None:
        data["s3"]["secret_access_key"] = settings.s3.secret_access_key.get_secret_value()
    data["dimse"] = {"enabled": False}
    data.update(extra)
    path.write_text(yaml.safe_dump(data))
    return path


@dataclass
class ServerProcess:
    config: Path
    port: int
    log: Path
    dimse_port: int | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicomweb"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dicomflow", "serve", "--config", str(self.config),
                 "--http-port", str(self.port),
                 *(["--dimse-port", str(self.dimse_port)] if self.dimse_port else [])],
                stdout=out, stderr=out, cwd=self.config.parent,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError("server exited: " + self.log.read_text()[-3000:])
            try:
                if requests.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.kill()
        raise AssertionError("server did not start: " + self.log.read_text()[-3000:])

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class WorkerProcess:
    """``dicomflow worker``: the routing engine alone."""

    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "dicomflow", "worker", "--config", str(self.config)],
                                            stdout=out, stderr=out, cwd=self.config.parent,
                                            env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError("worker exited: " + self.log.read_text()[-3000:])
            if "routing worker" in self.log.read_text(errors="replace"):
                return self
            time.sleep(0.1)
        self.stop()
        raise AssertionError("worker did not start: " + self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
