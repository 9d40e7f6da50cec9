"""The content hash behind duplicate detection covers the data set, not the File Meta Information."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pydicom
import pytest

from dicomflow.ingest.service import Spool
from dicomflow.offload import Offloader
from tests.factory import make_dataset, to_bytes


def _hash(tmp_path: Path, data: bytes, chunk: int) -> str:
    off = Offloader(1)
    spool = Spool(tmp_path / f"s{chunk}.dcm", off, 1 << 30)
    for i in range(0, len(data), chunk):
        spool.write_sync(data[i:i + chunk])
    digest = spool.finish_sync()
    off.shutdown()
    assert (tmp_path / f"s{chunk}.dcm").read_bytes() == data  # the bytes are kept exactly
    return digest


@pytest.mark.parametrize("chunk", [1, 7, 100, 143, 144, 145, 4096])
def test_same_data_set_with_other_file_meta_hashes_the_same(tmp_path: Path, chunk: int) -> None:
    ds = make_dataset(sop_uid="1.2.3.4.5", study_uid="1.2.3", series_uid="1.2.3.4")
    a = to_bytes(ds)
    ds.file_meta.ImplementationVersionName = "OTHER_SCU_1.0"
    ds.file_meta.SourceApplicationEntityTitle = "STORESCU"
    b = to_bytes(ds)
    assert a != b
    assert _hash(tmp_path, a, chunk) == _hash(tmp_path, b, chunk)
    meta_end = 144 + int.from_bytes(a[140:144], "little")
    assert _hash(tmp_path, a, chunk) == hashlib.sha256(a[meta_end:]).hexdigest()
    # pydicom writes no group length for a data set made in memory (dicomweb-client sends that form)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds)
    bare = b"\0" * 128 + b"DICM" + buf.getvalue()
    assert bare[132:136] != b"\x02\x00\x00\x00"
    assert _hash(tmp_path, bare, chunk) == _hash(tmp_path, a, chunk)


@pytest.mark.parametrize("chunk", [1, 50, 4096])
def test_data_set_change_changes_the_hash(tmp_path: Path, chunk: int) -> None:
    ds = make_dataset(sop_uid="1.2.3.4.5")
    a = to_bytes(ds)
    ds.SeriesDescription = "changed"
    assert _hash(tmp_path, a, chunk) != _hash(tmp_path, to_bytes(ds), chunk)


@pytest.mark.parametrize("chunk", [1, 10, 4096])
def test_non_part10_input_is_hashed_whole(tmp_path: Path, chunk: int) -> None:
    for data in (b"not dicom at all " * 20, b"short"):
        assert _hash(tmp_path, data, chunk) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("cross_device", [False, True])
def test_adopted_file_hashes_like_a_written_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                cross_device: bool) -> None:
    """A C-STORE data set pynetdicom already wrote is taken over (renamed, or copied across filesystems)
    with the same bytes, size and hash as one streamed into the spool."""
    import errno
    import os

    data = to_bytes(make_dataset(sop_uid="1.2.3.4.5", rows=64, columns=64))
    received = tmp_path / "received.dcm"
    received.write_bytes(data)
    if cross_device:
        real = os.replace

        def exdev(src: object, dst: object) -> None:
            if str(src) == str(received):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            real(src, dst)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "replace", exdev)
    off = Offloader(1)
    spool = Spool(tmp_path / "adopted.dcm", off, 1 << 30)
    spool.adopt_sync(received)
    digest = spool.finish_sync()
    off.shutdown()
    assert (tmp_path / "adopted.dcm").read_bytes() == data
    assert spool.size == len(data)
    assert digest == _hash(tmp_path, data, 4096)
    assert received.exists() is cross_device  # renamed away, or left for pynetdicom to delete


def test_adopting_an_oversized_file_is_refused(tmp_path: Path) -> None:
    from dicomflow.errors import PayloadTooLargeError

    received = tmp_path / "big.dcm"
    received.write_bytes(to_bytes(make_dataset(rows=64, columns=64)))
    off = Offloader(1)
    spool = Spool(tmp_path / "adopted.dcm", off, 1024)
    with pytest.raises(PayloadTooLargeError):
        spool.adopt_sync(received)
    spool.discard()
    off.shutdown()
    assert not (tmp_path / "adopted.dcm").exists()
