"""``dicomflow serve`` as real OS processes (for crash and multi-process tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
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
        self.process = _spawn(["serve", "--config", str(self.config), "--http-port", str(self.port),
                               *(["--dimse-port", str(self.dimse_port)] if self.dimse_port else [])],
                              self.config, self.log)

        def ready() -> bool:
            try:
                return requests.get(f"{self.url}/readyz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        if _wait_ready(self.process, self.log, ready, timeout, "server"):
            return self
        self.kill()
        raise AssertionError("server did not start: " + self.log.read_text()[-3000:])

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        terminate(self.process)


@dataclass
class WorkerProcess:
    """``dicomflow worker``: the routing engine alone."""

    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        self.process = _spawn(["worker", "--config", str(self.config)], self.config, self.log)
        if _wait_ready(self.process, self.log, lambda: "routing worker" in self.log.read_text(errors="replace"),
                       timeout, "worker"):
            return self
        self.stop()
        raise AssertionError("worker did not start: " + self.log.read_text()[-3000:])

    def stop(self) -> None:
        terminate(self.process)


def _spawn(args: list[str], config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``python -m dicomflow *args`` in the config's folder, output appended to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "dicomflow", *args], stdout=out, stderr=out, cwd=config.parent,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})


def _wait_ready(process: subprocess.Popen[bytes], log: Path, ready: Callable[[], bool], timeout: float,
                what: str) -> bool:
    """Whether ``ready()`` held within ``timeout`` seconds; AssertionError (with the log) if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited: " + log.read_text()[-3000:])
        if ready():
            return True
        time.sleep(0.1)
    return False


def terminate(process: subprocess.Popen[Any] | None, grace: float = 30.0, after_kill: float = 10.0) -> None:
    """Stop a child process: SIGTERM, then SIGKILL if it is still running after ``grace`` seconds."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(after_kill)
