"""Read one bulk data value of a stored instance (blocking: run through the offloader)."""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicomflow.errors import NotFoundError

_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def parse_tag_path(path: str) -> list[int | str]:
    """``"00081111/0/00420011"`` -> [tag, item index, tag] (PS3.18 8.6 bulk data paths we publish)."""
    out: list[int | str] = []
    for i, piece in enumerate(path.split("/")):
        out.append(int(piece, 16) if i % 2 == 0 else piece)
    return out


def read_bulk_value(fh: BinaryIO, path: str) -> bytes:
    """The value bytes at ``path`` in Little Endian byte order (PS3.18 8.7.3.2: application/octet-stream).

    Raises NotFoundError when the path does not address a binary value in this instance.
    """
    steps = parse_tag_path(path)
    top = steps[0]
    assert isinstance(top, int)
    ds: Dataset = pydicom.dcmread(fh, force=True, stop_before_pixels=top < 0x7FE00000)
    little = ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2.1") != "1.2.840.10008.1.2.2"
    current: Dataset = ds
    for i in range(0, len(steps) - 1, 2):
        tag, index = steps[i], steps[i + 1]
        assert isinstance(tag, int) and isinstance(index, str)
        elem = current.get(tag)
        if elem is None or elem.VR != "SQ" or not index.isdigit() or int(index) >= len(elem.value):
            raise NotFoundError("no such bulk data")
        current = elem.value[int(index)]
    last = steps[-1]
    assert isinstance(last, int)
    elem = current.get(last)
    if elem is None or not isinstance(elem.value, bytes | bytearray):
        raise NotFoundError("no such bulk data")
    value = bytes(elem.value)
    width = _SWAP_WIDTH.get(str(elem.VR))
    if not little and width and len(value) % width == 0:
        value = np.frombuffer(value, dtype=f">u{width}").astype(f"<u{width}").tobytes()
    return value
