"""Node.js helper servers for tests (the FHIR engine, the OIDC provider): ``npm install`` once into a cache
folder (``DICOMFLOW_TEST_CACHE``, default ~/.cache/dicomflow-tests), run ``node server.mjs`` there, wait
until it answers, stop it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

CACHE = Path(os.environ.get("DICOMFLOW_TEST_CACHE", Path.home() / ".cache" / "dicomflow-tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def npm_install(source: Path, name: str, package: str) -> Path:
    """npm install ``source``/package.json into ``CACHE/name`` unless ``package`` is there already; copies
    ``source``/server.mjs next to it and returns the folder to run from."""
    target = CACHE / name
    if not (target / "node_modules" / package).is_dir():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "package.json", target / "package.json")
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=target, check=True,
                       timeout=300)
    shutil.copy(source / "server.mjs", target / "server.mjs")
    return target


def start_node(folder: Path, args: list[str], env: dict[str, str], log: Path, ready_url: str, timeout: float,
               what: str) -> subprocess.Popen[bytes]:
    """``node *args`` in ``folder`` (``env`` added to ours, output to ``log``), once ``ready_url`` answers."""
    with open(log, "wb") as out:
        process = subprocess.Popen(["node", *args], cwd=folder, env={**os.environ, **env}, stdout=out,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(ready_url, timeout=1):
                return process
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited: {log.read_text()[-2000:]}") from None
            time.sleep(0.1)
    stop_node(process)
    raise RuntimeError(f"{what} did not start")


def stop_node(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None:
        process.terminate()
        process.wait(10)
