"""Helpers for DIMSE tests: a live server with DIMSE enabled, dcmtk runs, Part 10 byte slicing."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from dicomflow.settings import Settings
from tests.conftest import LiveServer, free_port, make_settings
from tests.factory import store_state

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # COMPONENTS.md: dcmtk without Nagle
PUSH_MODEL = "1.2.840.10008.1.20.1"  # PS3.4 J.3: Storage Commitment Push Model SOP Class
PUSH_INSTANCE = "1.2.840.10008.1.20.1.1"  # and its well-known SOP Instance


def dimse_settings(tmp_path: Path, **overrides: Any) -> Settings:
    dimse = {"port": free_port(), "enabled": True, "acse_timeout": 5.0, "dimse_timeout": 30.0,
             "network_timeout": 30.0, **overrides.pop("dimse", {})}
    return make_settings(tmp_path, dimse=dimse, **overrides)


def start(live_server_factory: Any, tmp_path: Path, **overrides: Any) -> LiveServer:
    server: LiveServer = live_server_factory(dimse_settings(tmp_path, **overrides))
    return server


def dimse_port(server: LiveServer) -> int:
    return server.settings.dimse.port


def dcmtk(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    if shutil.which(args[0]) is None:
        pytest.fail(f"{args[0]} not installed: run scripts/install-sysdeps.sh (Debian package dcmtk)")
    return subprocess.run(list(args), capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout)


def commitment_request(transaction: str, refs: list[tuple[str, str]]) -> Dataset:
    """An N-ACTION Storage Commitment Request (PS3.4 J.3.2) for (SOP Class UID, SOP Instance UID) pairs."""
    ds = Dataset()
    ds.TransactionUID = transaction
    items = []
    for sop_class, sop in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def request_commitment(assoc: Any, transaction: str, refs: list[tuple[str, str]], action_type: int = 1) -> int:
    """Send that request as an N-ACTION on a pynetdicom association; returns the response's Status."""
    status, _ = assoc.send_n_action(commitment_request(transaction, refs), action_type, PUSH_MODEL, PUSH_INSTANCE)
    return int(status.Status)


def dataset_part(part10: bytes) -> bytes:
    """The data set of a Part 10 file: what follows the preamble, 'DICM' and the group 0002 elements."""
    assert part10[128:132] == b"DICM"
    assert part10[132:138] == b"\x02\x00\x00\x00UL"
    (group_length,) = struct.unpack("<I", part10[140:144])
    return part10[144 + group_length:]


def stored_blobs(settings: Settings) -> dict[tuple[str, str], bytes]:
    """(tenant, SOP Instance UID) -> stored Part 10 bytes, read from the blob folder."""
    from urllib.parse import urlparse

    root = Path(urlparse(settings.storage_url).path)
    state = store_state(settings)
    return {(tenant, sop): (root / key).read_bytes() for tenant, _, _, sop, key in state.instances}
