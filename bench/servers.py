"""Start dicomflow and Orthanc side by side on free ports, each with its own temporary data dir."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ORTHANC_START = Path("/work/shared/tools/orthanc/start-orthanc")
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    root: str  # DICOMweb root URL, no trailing slash
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        """Resident set size of the server process and its children (bytes)."""
        p = psutil.Process(self.proc.pid)
        total = p.memory_info().rss
        for child in p.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total

    def cpu_seconds(self) -> float:
        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def count_instances(self) -> int:
        """Instances the server really holds (independent of what its STOW responses said)."""
        if self.name.startswith("orthanc"):
            base = self.root.rsplit("/dicom-web", 1)[0]
            with urllib.request.urlopen(f"{base}/statistics", timeout=30) as resp:
                return int(json.load(resp)["CountInstances"])
        db = self.data_dir / "index.sqlite"
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
            return int(conn.execute("SELECT count(*) FROM instances").fetchone()[0])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout}s; see {log}")


def start_dicomflow(workdir: Path, extra_env: dict[str, str] | None = None) -> Server:
    data = workdir / "dicomflow"
    data.mkdir(parents=True, exist_ok=True)
    http, dimse = free_port(), free_port()
    log = workdir / "dicomflow.log"
    env = {**os.environ, "DICOMFLOW_DIMSE__ENABLED": "false", "DICOMFLOW_LOG_LEVEL": "WARNING", **(extra_env or {})}
    exe = Path(sys.executable).parent / "dicomflow"
    cmd = [str(exe), "serve", "--http-port", str(http), "--dimse-port", str(dimse), "--data-dir", str(data)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    _wait_ready(f"http://127.0.0.1:{http}/readyz", proc, log)
    return Server("dicomflow", f"http://127.0.0.1:{http}/dicomweb", data, proc, log)


def start_orthanc(workdir: Path, postgres: str | None = None) -> Server:
    """Orthanc with its SQLite index, or with the PostgreSQL index plugin in a fresh database.

    ``postgres`` is ``host:port:user`` of a running PostgreSQL that accepts that user without a password.
    """
    name = "orthanc-pg" if postgres else "orthanc"
    data = workdir / name
    data.mkdir(parents=True, exist_ok=True)
    http, dicom = free_port(), free_port()
    log = workdir / f"{name}.log"
    cmd = ["bash", str(ORTHANC_START), "--http-port", str(http), "--dicom-port", str(dicom), "--dir", str(data)]
    if postgres:
        host, port, user = postgres.split(":")
        db = f"orthanc_bench_{os.getpid()}_{http}"
        subprocess.run(["createdb", "-h", host, "-p", port, "-U", user, db], check=True)
        (data / "pgdb").write_text(f"{host}:{port}:{user}:{db}")
        cmd += ["--postgres", f"{host}:{port}:{db}:{user}"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    _wait_ready(f"http://127.0.0.1:{http}/system", proc, log)
    # Orthanc gzips responses unless told not to; compressing would only measure zlib.
    return Server(name, f"http://127.0.0.1:{http}/dicom-web", data, proc, log,
                  headers={"Accept-Encoding": "identity"})


def drop_orthanc_database(server: Server) -> None:
    marker = server.data_dir / "pgdb"
    if marker.is_file():
        host, port, user, db = marker.read_text().split(":")
        subprocess.run(["dropdb", "--if-exists", "-h", host, "-p", port, "-U", user, db], check=False)


def cleanup(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
