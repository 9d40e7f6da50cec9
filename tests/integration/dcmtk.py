"""dcmtk peers for DIMSE tests: a storescp started per test, and helpers to run the SCU tools."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom.dsutils import split_dataset

#: PS3.15-free but important: without TCP_NODELAY dcmtk waits on delayed ACKs (COMPONENTS.md).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


@dataclass
class StoreScp:
    ae_title: str
    port: int
    directory: Path
    process: subprocess.Popen[bytes]

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file())

    def wait_files(self, n: int, timeout: float = 20.0) -> list[Path]:
        """storescp writes a file when its C-STORE completes; wait for ``n`` of them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            files = self.files()
            if len(files) >= n:
                return files
            time.sleep(0.05)
        return self.files()


@contextmanager
def storescp(directory: Path, ae_title: str = "DEST", *options: str) -> Iterator[StoreScp]:
    """A dcmtk storescp writing what it receives bit-preserving (+B) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "-aet", ae_title, "-od", str(directory), "+B", "-dhl", *options, str(port)],
        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port)
        yield StoreScp(ae_title, port, directory, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout, check=False)


def dataset_bytes(path: Path | bytes) -> bytes:
    """The data set of a Part 10 file without preamble and File Meta (what travels in a C-STORE)."""
    if isinstance(path, bytes):
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / "instance.dcm"
            file.write_bytes(path)
            return dataset_bytes(file)
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def transfer_syntax(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def read(path: Path) -> Dataset:
    return pydicom.dcmread(path)
