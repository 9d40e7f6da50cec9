"""The C-STORE SCU (dimse/scu.py) against dcmtk's storescp: as stored when accepted, converted otherwise."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import os
import ssl
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from dicomflow.dimse.scu import (
    FALLBACK_SYNTAXES,
    MAX_CONTEXTS,
    StoreScu,
    SubOperationOutcome,
    batches,
    propose_contexts,
)
from dicomflow.index.base import InstanceRecord
from dicomflow.offload import Offloader
from dicomflow.settings import DimseSettings, RemoteNode
from dicomflow.storage.base import new_blob_key
from dicomflow.storage.filesystem import FilesystemBlobStore
from tests.factory import CT_IMAGE, MR_IMAGE, make_dataset, to_bytes
from tests.integration.dcmtk import dataset_bytes, free_port, storescp, transfer_syntax

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[tuple[FilesystemBlobStore, Offloader]]:
    off = Offloader(2)
    blobs = FilesystemBlobStore(tmp_path / "blobs", off)
    yield blobs, off
    await blobs.close()
    off.shutdown()


async def _put(blobs: FilesystemBlobStore, tmp_path: Path, data: bytes, sop_class: str, ts: str) -> InstanceRecord:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    key = new_blob_key("default")
    src = tmp_path / f"spool-{ds.SOPInstanceUID}"
    src.write_bytes(data)
    await blobs.put_file(key, src)
    return InstanceRecord(
        tenant="default", study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
        sop_uid=ds.SOPInstanceUID, sop_class_uid=sop_class, instance_number=int(ds.InstanceNumber),
        transfer_syntax_uid=ts, number_of_frames=None, pixel_data_offset=None, blob_key=key, size=len(data),
        sha256=hashlib.sha256(data).hexdigest())


def _rle(**kwargs: object) -> bytes:
    ds = make_dataset(**kwargs)  # type: ignore[arg-type]
    ds.compress(RLELossless, generate_instance_uid=False)
    return to_bytes(ds)


def test_contexts_one_syntax_each_plus_fallback() -> None:
    def rec(sop_class: str, ts: str, n: int) -> InstanceRecord:
        return InstanceRecord("t", "1", "2", f"1.2.{n}", sop_class, n, ts, None, None, "k", 1, "x")

    records = [rec(CT_IMAGE, RLELossless, 1), rec(CT_IMAGE, ExplicitVRLittleEndian, 2),
               rec(MR_IMAGE, ImplicitVRLittleEndian, 3), rec(CT_IMAGE, RLELossless, 4)]
    contexts = [(str(c.abstract_syntax), tuple(str(t) for t in c.transfer_syntax))
                for c in propose_contexts(records)]
    assert contexts == [(CT_IMAGE, (RLELossless,)), (CT_IMAGE, FALLBACK_SYNTAXES),
                        (CT_IMAGE, (ExplicitVRLittleEndian,)), (MR_IMAGE, (ImplicitVRLittleEndian,)),
                        (MR_IMAGE, FALLBACK_SYNTAXES)]
    many = [rec(f"1.2.840.10008.5.1.4.1.1.{n}", ExplicitVRLittleEndian, n) for n in range(1, 300)]
    split = list(batches(many))
    per = MAX_CONTEXTS // 2  # two contexts per SOP Class
    assert [len(b) for b in split] == [per, per, per, per, 299 - 4 * per]
    assert [r for b in split for r in b] == many
    with pytest.raises(ValueError):
        propose_contexts(many)


async def test_sends_as_stored_when_accepted(tmp_path: Path, store: tuple[FilesystemBlobStore, Offloader]) -> None:
    blobs, off = store
    study = pydicom.uid.generate_uid()
    native = to_bytes(make_dataset(study_uid=study, instance_number=1))
    rle = _rle(study_uid=study, instance_number=2)
    implicit = to_bytes(make_dataset(study_uid=study, instance_number=3, sop_class=MR_IMAGE, modality="MR",
                                     transfer_syntax=ImplicitVRLittleEndian))
    records = [await _put(blobs, tmp_path, native, CT_IMAGE, ExplicitVRLittleEndian),
               await _put(blobs, tmp_path, rle, CT_IMAGE, RLELossless),
               await _put(blobs, tmp_path, implicit, MR_IMAGE, ImplicitVRLittleEndian)]
    with storescp(tmp_path / "recv", "DEST", "+xa") as scp:
        scu = StoreScu(blobs, "DICOMFLOW", DimseSettings())
        node = RemoteNode(ae_title="DEST", host="127.0.0.1", port=scp.port)
        results = await scu.send_async(off, node, records)
        files = scp.wait_files(3)
    assert [r.outcome for r in results] == [SubOperationOutcome.COMPLETED] * 3
    assert [r.status for r in results] == [0x0000] * 3
    assert [r.transfer_syntax for r in results] == [ExplicitVRLittleEndian, RLELossless, ImplicitVRLittleEndian]
    received = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
    for rec, data in zip(records, (native, rle, implicit), strict=True):
        f = received[rec.sop_uid]
        assert transfer_syntax(f) == rec.transfer_syntax_uid
        assert dataset_bytes(f) == dataset_bytes(data)


async def test_converts_when_peer_accepts_only_uncompressed(
    tmp_path: Path, store: tuple[FilesystemBlobStore, Offloader]
) -> None:
    blobs, off = store
    rle = _rle(instance_number=7)
    rec = await _put(blobs, tmp_path, rle, CT_IMAGE, RLELossless)
    with storescp(tmp_path / "recv", "DEST", "+xi") as scp:  # Implicit VR LE only
        scu = StoreScu(blobs, "DICOMFLOW", DimseSettings())
        node = RemoteNode(ae_title="DEST", host="127.0.0.1", port=scp.port)
        [result] = await scu.send_async(off, node, [rec])
        [file] = scp.wait_files(1)
    assert result.outcome is SubOperationOutcome.COMPLETED
    assert result.transfer_syntax == ImplicitVRLittleEndian
    got = pydicom.dcmread(file)
    assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    original = pydicom.dcmread(io.BytesIO(rle))
    assert np.array_equal(got.pixel_array, original.pixel_array)
    assert got.SOPInstanceUID == original.SOPInstanceUID
    assert got.PatientName == original.PatientName


async def test_unreachable_node_fails_every_instance(
    tmp_path: Path, store: tuple[FilesystemBlobStore, Offloader]
) -> None:
    blobs, off = store
    recs = [await _put(blobs, tmp_path, to_bytes(make_dataset(instance_number=i)), CT_IMAGE, ExplicitVRLittleEndian)
            for i in (1, 2)]
    scu = StoreScu(blobs, "DICOMFLOW", DimseSettings(acse_timeout=5))
    node = RemoteNode(ae_title="NOBODY", host="127.0.0.1", port=free_port())
    results = await scu.send_async(off, node, recs)
    assert [r.outcome for r in results] == [SubOperationOutcome.FAILED] * 2
    assert all(r.status is None and r.detail == "association failed" for r in results)


async def test_unsupported_sop_class_fails_only_that_instance(
    tmp_path: Path, store: tuple[FilesystemBlobStore, Offloader]
) -> None:
    blobs, off = store
    rec = await _put(blobs, tmp_path, to_bytes(make_dataset()), CT_IMAGE, ExplicitVRLittleEndian)
    bogus = dataclasses.replace(rec, sop_class_uid="1.2.3.4.5.6")  # storescp rejects this context
    with storescp(tmp_path / "recv", "DEST", "+xa") as scp:
        scu = StoreScu(blobs, "DICOMFLOW", DimseSettings())
        node = RemoteNode(ae_title="DEST", host="127.0.0.1", port=scp.port)
        results = await scu.send_async(off, node, [bogus, rec])
        scp.wait_files(1)
    assert results[0].outcome is SubOperationOutcome.FAILED
    assert "no presentation context" in results[0].detail
    assert results[1].outcome is SubOperationOutcome.COMPLETED


class _NoLocalFiles:
    """A blob store whose blobs are not local files (as with S3): send_stored must spool them."""

    def __init__(self, inner: FilesystemBlobStore) -> None:
        self.inner = inner

    def open_sync(self, key: str) -> io.BytesIO:
        with self.inner.open_sync(key) as fh:
            return io.BytesIO(fh.read())


async def test_as_stored_from_a_store_without_local_files(
    tmp_path: Path, store: tuple[FilesystemBlobStore, Offloader], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # what the server sets at start-up
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    blobs, off = store
    rle = _rle(instance_number=9)
    rec = await _put(blobs, tmp_path, rle, CT_IMAGE, RLELossless)
    with storescp(tmp_path / "recv", "DEST", "+xa") as scp:
        scu = StoreScu(_NoLocalFiles(blobs), "DICOMFLOW", DimseSettings())  # type: ignore[arg-type]
        node = RemoteNode(ae_title="DEST", host="127.0.0.1", port=scp.port)
        [result] = await scu.send_async(off, node, [rec])
        [file] = scp.wait_files(1)
    assert result.outcome is SubOperationOutcome.COMPLETED and result.transfer_syntax == RLELossless
    assert dataset_bytes(file) == dataset_bytes(rle)
    assert await asyncio.to_thread(os.listdir, spool) == []  # the spooled copy is gone


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return key, cert


async def test_tls_node(tmp_path: Path, store: tuple[FilesystemBlobStore, Offloader]) -> None:
    """RemoteNode.tls: the association runs over TLS and the peer's certificate is verified."""
    blobs, off = store
    key, cert = await asyncio.to_thread(_self_signed, tmp_path)
    data = to_bytes(make_dataset())
    rec = await _put(blobs, tmp_path, data, CT_IMAGE, ExplicitVRLittleEndian)
    with storescp(tmp_path / "recv", "DEST", "+tls", str(key), str(cert), "-pw", "-ic") as scp:
        node = RemoteNode(ae_title="DEST", host="127.0.0.1", port=scp.port, tls=True)
        trusted = ssl.create_default_context(cafile=str(cert))
        [ok] = await StoreScu(blobs, "DICOMFLOW", DimseSettings(), ssl_context=trusted).send_async(off, node, [rec])
        [file] = scp.wait_files(1)
        # without trusting the peer's certificate the handshake fails: nothing is sent in clear text
        [refused] = await StoreScu(blobs, "DICOMFLOW", DimseSettings(acse_timeout=5)).send_async(off, node, [rec])
    assert ok.outcome is SubOperationOutcome.COMPLETED
    assert dataset_bytes(file) == dataset_bytes(data)
    assert refused.outcome is SubOperationOutcome.FAILED and refused.detail == "association failed"
