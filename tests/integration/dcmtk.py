"""dcmtk peers for DIMSE tests: a storescp started per test, and helpers to run the SCU tools."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pydicom
from pydicom.dataset import Dataset
from pynetdicom.dsutils import split_dataset

from tests.conftest import LiveServer, make_settings
from tests.factory import store_state
from tests.harness.processes import terminate

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
        terminate(proc, grace=10)


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


def dimse_server(live_server_factory: Any, tmp_path: Path, **overrides: Any) -> LiveServer:
    """A live server (HTTP + DIMSE) with its own data directory and ports."""
    dimse = {"port": free_port(), "enabled": True, "acse_timeout": 5.0, "dimse_timeout": 30.0,
             "network_timeout": 30.0, **overrides.pop("dimse", {})}
    server: LiveServer = live_server_factory(make_settings(tmp_path, dimse=dimse, **overrides))
    return server


#: storescu option proposing a transfer syntax (dcmtk 3.6.7 storescu --help)
PROPOSE = {
    "1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.100": "-xm",
}


def storescu(server: LiveServer, files: list[Path], called: str = "DICOMFLOW") -> None:
    """Store files with dcmtk's storescu, one association per transfer syntax; all must succeed."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(transfer_syntax(f), []).append(f)
    for ts, group in groups.items():
        proc = run(["storescu", "-aec", called, "-aet", "STORESCU", "-R", PROPOSE[ts],
                    "127.0.0.1", str(server.settings.dimse.port), *map(str, group)])
        assert proc.returncode == 0, proc.stderr


def write_instances(folder: Path, datasets: list[Dataset]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"i{i:04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


@dataclass
class FindResult:
    responses: list[Dataset]
    proc: subprocess.CompletedProcess[str]

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr


def findscu(server: LiveServer, out: Path, keys: list[str], *, model: str = "-S", called: str = "DICOMFLOW",
            extra: tuple[str, ...] = ()) -> FindResult:
    """dcmtk findscu with ``-k`` keys; the responses are extracted (-X) and read back with pydicom."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["findscu", "-v", model, "-aec", called, "-aet", "FINDSCU", "-X", "-od", str(out), *extra]
    for key in keys:
        args += ["-k", key]
    proc = run([*args, "127.0.0.1", str(server.settings.dimse.port)])
    files = sorted(out.glob("rsp*.dcm"))
    return FindResult([pydicom.dcmread(f) for f in files], proc)


def stored(server: LiveServer) -> dict[str, bytes]:
    """SOP Instance UID -> the Part 10 bytes the server stored."""
    root = Path(urlparse(server.settings.storage_url).path)
    return {sop: (root / key).read_bytes() for _t, _s, _se, sop, key in store_state(server.settings).instances}


def dimse_status(output: str) -> int:
    """The DIMSE Status of the last response ``movescu -d`` / ``getscu -d`` printed."""
    found = re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", output)
    assert found, output
    return int(found[-1], 16)


def offending_element(output: str) -> str | None:
    """The Offending Element (0000,0901) of the last response that had one, as ``gggg,eeee``."""
    found = re.findall(r"\(0000,0901\) AT \(([0-9a-f]{4},[0-9a-f]{4})\)", output)
    return str(found[-1]) if found else None


#: identifiers a C-MOVE / C-GET SCP cannot serve (PS3.4 C.4.2.2.1 / C.4.3.2.1 unique keys), with the
#: Offending Element (0000,0901) we name; Study Root model
UNSERVABLE = [
    (["QueryRetrieveLevel=STUDY"], "0020,000d"),  # no Study Instance UID
    (["QueryRetrieveLevel=STUDY", "StudyInstanceUID=1.2.*"], "0020,000d"),  # wild card in a unique key
    (["QueryRetrieveLevel=FOO", "StudyInstanceUID=1.2.3"], "0008,0052"),  # no such level
    (["QueryRetrieveLevel=PATIENT", "PatientID=PID-1"], "0008,0052"),  # not a level of the Study Root model
    (["StudyInstanceUID=1.2.3"], "0008,0052"),  # no Query/Retrieve Level
    (["QueryRetrieveLevel=SERIES", "StudyInstanceUID=1.2.3"], "0020,000e"),  # no Series Instance UID
    (["QueryRetrieveLevel=SERIES", "StudyInstanceUID=1.2.3\\1.2.4", "SeriesInstanceUID=1.2.5"],
     "0020,000d"),  # a higher unique key with two values
    (["QueryRetrieveLevel=STUDY", "StudyInstanceUID=1.2.3", "SOPInstanceUID=1.2.4"],
     "0008,0018"),  # a unique key below the level
]
