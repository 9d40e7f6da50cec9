"""C-STORE SCP with dcmtk storescu (and pynetdicom for cases storescu cannot produce).

What is checked is what landed in the store: the index rows and the blob bytes, whose data set part
must equal the bytes the peer sent (PS3.4 B.2.3 statuses for everything refused).
"""

from __future__ import annotations

import io
import statistics
import subprocess
import threading
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pydicom
import pytest
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from tests.factory import (
    make_dataset,
    make_mg,
    make_ophthalmic,
    make_rt_dose,
    make_seg,
    make_sr,
    make_us_multiframe,
    make_whole_slide,
    split_multipart,
    store_state,
    to_bytes,
    with_transfer_syntax,
)
from tests.integration.dimse_peer import DCMTK_ENV, dataset_part, dcmtk, dimse_port, start, stored_blobs

pytestmark = pytest.mark.integration


def _write(folder: Path, name: str, ds: Dataset) -> Path:
    path = folder / f"{name}.dcm"
    path.write_bytes(to_bytes(ds))
    return path


def _sent_dataset(path: Path) -> bytes:
    """The data set storescu puts on the wire for a file whose transfer syntax was accepted."""
    return dataset_part(path.read_bytes())


def _inflated(dataset: bytes) -> bytes:
    return zlib.decompress(dataset, -zlib.MAX_WBITS)


def _video(sop_uid: str | None = None, **kwargs: Any) -> Dataset:
    """A Video Photographic instance with opaque encapsulated frames (stored, never decoded)."""
    ds = make_dataset(sop_class=VIDEO_PHOTOGRAPHIC, modality="XC", bits=8, **kwargs)
    ds.PixelData = encapsulate([bytes(range(256)) * 4])
    ds["PixelData"].VR = "OB"
    return ds


VIDEO_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4.1"
#: storescu proposal option for each transfer syntax (dcmtk 3.6.7 storescu --help)
PROPOSE = {
    uid.ExplicitVRLittleEndian: "-xe", uid.ImplicitVRLittleEndian: "-xi", uid.ExplicitVRBigEndian: "-xb",
    uid.DeflatedExplicitVRLittleEndian: "-xd", uid.JPEGBaseline8Bit: "-xy", uid.JPEGLosslessSV1: "-xs",
    uid.JPEG2000Lossless: "-xv", uid.JPEGLSLossless: "-xt", uid.RLELossless: "-xr",
    uid.MPEG2MPML: "-xm", uid.MPEG4HP41: "-xn", uid.HEVCMP51: "-x4",
}


def test_storescu_folders_in_many_transfer_syntaxes_are_stored_byte_exact(live_server_factory: Any,
                                                                          tmp_path: Path) -> None:
    server = start(live_server_factory, tmp_path)
    study = uid.generate_uid()
    files: dict[str, tuple[Path, str]] = {}  # sop -> (file, transfer syntax)

    def add(name: str, ds: Dataset) -> None:
        ts = str(ds.file_meta.TransferSyntaxUID)
        folder = tmp_path / "in" / PROPOSE[ts].lstrip("-")
        folder.mkdir(parents=True, exist_ok=True)
        files[ds.SOPInstanceUID] = (_write(folder, name, ds), ts)

    add("explicit", make_dataset(study_uid=study, instance_number=1))
    add("implicit", with_transfer_syntax(make_dataset(study_uid=study, instance_number=2), uid.ImplicitVRLittleEndian))
    add("bigendian", with_transfer_syntax(make_dataset(study_uid=study, instance_number=3), uid.ExplicitVRBigEndian))
    add("deflate", with_transfer_syntax(make_dataset(study_uid=study, instance_number=4),
                                        uid.DeflatedExplicitVRLittleEndian))
    add("rle", with_transfer_syntax(make_dataset(study_uid=study, instance_number=5), uid.RLELossless))
    add("jpeg-baseline", with_transfer_syntax(make_dataset(study_uid=study, instance_number=6, bits=8),
                                              uid.JPEGBaseline8Bit))
    add("j2k", with_transfer_syntax(make_dataset(study_uid=study, instance_number=7, rows=64, columns=64),
                                    uid.JPEG2000Lossless))
    # dcmtk's own encoders for JPEG lossless (process 14 SV1) and JPEG-LS
    native = _write(tmp_path, "native", make_dataset(study_uid=study, instance_number=8, bits=8))
    for tool, args, name in (("dcmcjpeg", ["+e1"], "jpeg-lossless"), ("dcmcjpls", ["+el"], "jpeg-ls")):
        out = tmp_path / f"{name}.dcm"
        result = dcmtk(tool, *args, str(native), str(out))
        assert result.returncode == 0, result.stderr
        ds = pydicom.dcmread(out)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
        add(name, ds)
    for ts in (uid.MPEG2MPML, uid.MPEG4HP41, uid.HEVCMP51):
        video = _video(study_uid=study)
        video.file_meta.TransferSyntaxUID = ts
        add(f"video-{ts}", video)
    # the modalities the issue names
    add("mg", make_mg(study_uid=study))
    add("us-mf", make_us_multiframe(study_uid=study))
    add("rt-dose", make_rt_dose(study_uid=study))
    add("wsi", make_whole_slide(study_uid=study))
    add("op", make_ophthalmic(study_uid=study))
    add("sr", make_sr(study_uid=study))
    add("seg", make_seg())

    for folder in sorted((tmp_path / "in").iterdir()):
        result = dcmtk("storescu", "-R", f"-{folder.name}", "+sd", "-aec", "DICOMFLOW", "127.0.0.1",
                       str(dimse_port(server)), str(folder))
        assert result.returncode == 0, (folder.name, result.stderr)

    blobs = stored_blobs(server.settings)
    assert {sop for _, sop in blobs} == set(files)
    for sop, (path, ts) in files.items():
        stored = blobs[("default", sop)]
        stored_ds = pydicom.dcmread(io.BytesIO(stored), stop_before_pixels=True)
        assert stored_ds.file_meta.TransferSyntaxUID == ts, path.name  # stored as received, not transcoded
        if ts == uid.DeflatedExplicitVRLittleEndian:  # storescu deflates again with its own zlib settings
            assert _inflated(dataset_part(stored)) == _inflated(_sent_dataset(path)), path.name
        else:
            assert dataset_part(stored) == _sent_dataset(path), f"{path.name} ({ts}) differs"


def test_all_named_transfer_syntaxes_accepted_and_stored_as_received(live_server_factory: Any,
                                                                     tmp_path: Path) -> None:
    """Every syntax the issue names, including HTJ2K (unknown to dcmtk 3.6.7), with pynetdicom as the SCU."""
    server = start(live_server_factory, tmp_path)
    syntaxes = [uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K, uid.MPEG2MPML, uid.MPEG2MPHL,
                uid.MPEG4HP41, uid.MPEG4HP41BD, uid.MPEG4HP422D, uid.MPEG4HP423D, uid.MPEG4HP42STEREO,
                uid.HEVCMP51, uid.HEVCM10P51, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLSNearLossless,
                uid.JPEG2000, uid.JPEGBaseline8Bit]
    ae = AE(ae_title="MODALITY")
    for ts in syntaxes:
        ae.add_requested_context(VIDEO_PHOTOGRAPHIC, ts)
    assoc = ae.associate("127.0.0.1", dimse_port(server), ae_title="DICOMFLOW")
    assert assoc.is_established
    sent: dict[str, str] = {}
    try:
        assert {cx.transfer_syntax[0] for cx in assoc.accepted_contexts} == set(syntaxes)
        for i, ts in enumerate(syntaxes):
            ds = _video(instance_number=i + 1)
            ds.file_meta.TransferSyntaxUID = ts
            status = assoc.send_c_store(ds)
            assert status.Status == 0x0000, ts
            sent[ds.SOPInstanceUID] = ts
    finally:
        assoc.release()
    blobs = stored_blobs(server.settings)
    for sop, ts in sent.items():
        stored = pydicom.dcmread(io.BytesIO(blobs[("default", sop)]), stop_before_pixels=True)
        assert stored.file_meta.TransferSyntaxUID == ts


def _assoc(server: Any, sop_class: str, ts: str = uid.ExplicitVRLittleEndian, called: str = "DICOMFLOW") -> Any:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(sop_class, ts)
    ae.add_requested_context("1.2.840.10008.1.1", uid.ImplicitVRLittleEndian)  # Verification
    assoc = ae.associate("127.0.0.1", dimse_port(server), ae_title=called)
    assert assoc.is_established
    return assoc


def spool_of(server: Any) -> Path:
    """The server's ingest spool folder (where pynetdicom also receives C-STORE data sets, server.py)."""
    return Path(urlparse(server.settings.storage_url).path) / ".spool"


def _send_file(assoc: Any, path: Path, monkeypatch: pytest.MonkeyPatch) -> Dataset:
    """Send a Part 10 file's data set as it is (pynetdicom reads the command UIDs from its file meta)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    status: Dataset = assoc.send_c_store(path)
    return status


def test_statuses_for_bad_data_sets(live_server_factory: Any, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    server = start(live_server_factory, tmp_path)
    ct = "1.2.840.10008.5.1.4.1.1.2"
    assoc = _assoc(server, ct)
    try:
        # PS3.4 B.2.3 0xA900: the data set is an MR while the request says CT
        sop = uid.generate_uid()
        ct_file = to_bytes(make_dataset(sop_uid=sop))
        mr_dataset = dataset_part(to_bytes(make_dataset(sop_uid=sop, sop_class="1.2.840.10008.5.1.4.1.1.4")))
        path = tmp_path / "mismatch.dcm"
        path.write_bytes(ct_file[: len(ct_file) - len(dataset_part(ct_file))] + mr_dataset)
        status = _send_file(assoc, path, monkeypatch)
        assert status.Status == 0xA900
        assert "SOP Class" in status.ErrorComment

        # 0xA900: a Type 1 UID (Series Instance UID) missing
        no_series = make_dataset()
        del no_series.SeriesInstanceUID
        assert assoc.send_c_store(no_series).Status == 0xA900

        # 0xC000: the data set stops in the middle of the pixel data
        whole = to_bytes(make_dataset())
        path = tmp_path / "truncated.dcm"
        path.write_bytes(whole[:-100])
        status = _send_file(assoc, path, monkeypatch)
        assert status.Status == 0xC000

        # identical bytes again: success; same UID with other bytes: 0x0111 (tenant policy: reject)
        ds = make_dataset()
        assert assoc.send_c_store(ds).Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000
        ds.StudyDescription = "changed"
        status = assoc.send_c_store(ds)
        assert status.Status == 0x0111
        # the association survives all of that
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    state = store_state(server.settings)
    assert len(state.instances) == 1
    assert state.spool == []


def test_overwrite_policy_replaces(live_server_factory: Any, tmp_path: Path) -> None:
    server = start(live_server_factory, tmp_path)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", dimse_port(server), ae_title="GLOBEX")  # tenant globex: overwrite
    assert assoc.is_established
    try:
        ds = make_dataset()
        assert assoc.send_c_store(ds).Status == 0x0000
        ds.StudyDescription = "changed"
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    blobs = stored_blobs(server.settings)
    assert list(blobs) == [("globex", ds.SOPInstanceUID)]
    assert pydicom.dcmread(io.BytesIO(blobs[("globex", ds.SOPInstanceUID)])).StudyDescription == "changed"


def test_unknown_sop_class_context_is_rejected(live_server_factory: Any, tmp_path: Path) -> None:
    server = start(live_server_factory, tmp_path)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.3.4.5.6.7", uid.ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.99")  # unknown transfer syntax
    ae.add_requested_context("1.2.840.10008.1.1", uid.ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", dimse_port(server), ae_title="DICOMFLOW")
    try:
        assert assoc.is_established
        rejected = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
        # PS3.8 9.3.3.2: 0x03 abstract syntax not supported, 0x04 transfer syntaxes not supported
        assert rejected == {"1.2.3.4.5.6.7": 0x03, "1.2.840.10008.5.1.4.1.1.2": 0x04}
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def _store_rq_pdus(ds: Dataset, context_id: int, max_pdu: int) -> list[Any]:
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = ds.SOPClassUID
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 0x0002
    req.DataSet = io.BytesIO(dataset_part(to_bytes(ds)))
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    return list(msg.encode_msg(context_id, max_pdu))


def test_abort_mid_transfer_leaves_nothing(live_server_factory: Any, tmp_path: Path) -> None:
    # pynetdicom receives C-STORE data sets into a temporary file in the ingest spool (server.py)
    server = start(live_server_factory, tmp_path)
    received = spool_of(server)
    ct = "1.2.840.10008.5.1.4.1.1.2"
    assoc = _assoc(server, ct)
    ds = make_dataset(rows=256, columns=256)  # 128 KiB of pixels: many P-DATA-TF PDUs
    cx = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == ct)
    pdus = _store_rq_pdus(ds, cx.context_id, 16384)
    assert len(pdus) > 6
    for pdu in pdus[: len(pdus) // 2]:
        assoc.dul.send_pdu(pdu)
    time.sleep(0.3)
    assoc.abort()
    time.sleep(0.5)
    state = store_state(server.settings)
    assert state.instances == [] and state.blobs == [] and state.spool == []
    assert list(received.iterdir()) == []  # the partial data set was removed too
    # and the server keeps serving
    assoc = _assoc(server, ct)
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert [i[3] for i in store_state(server.settings).instances] == [ds.SOPInstanceUID]
    assert list(received.iterdir()) == []


def test_storescu_aborted_by_the_network_mid_transfer(live_server_factory: Any, tmp_path: Path) -> None:
    """dcmtk killed while sending a large instance: nothing of it is stored."""
    server = start(live_server_factory, tmp_path)
    received = spool_of(server)  # where pynetdicom writes the data set as it arrives (server.py)
    big = _write(tmp_path, "big", make_dataset(rows=4096, columns=4096))  # 32 MiB
    proc = subprocess.Popen(["storescu", "--max-send-pdu", "4096", "-aec", "DICOMFLOW", "127.0.0.1",
                             str(dimse_port(server)), str(big)], env=DCMTK_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill storescu once the server has received part of the data set, but not all of it
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        partial = [p.stat().st_size for p in received.iterdir()]
        if partial and partial[0] > 1 << 20:
            break
        time.sleep(0.002)
    proc.kill()
    assert partial and partial[0] < big.stat().st_size
    proc.wait(10)
    time.sleep(0.5)
    state = store_state(server.settings)
    assert state.instances == [] and state.blobs == [] and state.spool == []
    assert list(received.iterdir()) == []


def test_twenty_parallel_storescu_while_http_answers(live_server_factory: Any, tmp_path: Path) -> None:
    server = start(live_server_factory, tmp_path)
    folders = []
    for n in range(20):
        folder = tmp_path / f"scu{n}"
        folder.mkdir()
        for i in range(5):
            _write(folder, f"{i}", make_dataset(instance_number=i + 1))
        folders.append(folder)
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            with urllib.request.urlopen(f"{server.url}/healthz", timeout=10) as resp:
                assert resp.status == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        procs = [subprocess.Popen(["storescu", "+sd", "-aec", "DICOMFLOW", "127.0.0.1", str(dimse_port(server)),
                                   str(folder)], env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for folder in folders]
        codes = [p.wait(180) for p in procs]
    finally:
        stop.set()
        poller.join(30)
    assert codes == [0] * 20
    assert len(store_state(server.settings).instances) == 100
    assert len(latencies) >= 5
    # the HTTP side is not blocked by DIMSE work (which runs in pynetdicom threads and the offloader)
    assert statistics.median(latencies) < 0.25, latencies
    assert max(latencies) < 2.0, latencies


def test_unindexable_attribute_is_stored_with_warning_b006(live_server_factory: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    server = start(live_server_factory, tmp_path)
    ds = make_dataset(series_number=77777)
    raw = to_bytes(ds)
    assert raw.count(b"77777") == 1
    path = tmp_path / "bad-is.dcm"
    path.write_bytes(raw.replace(b"77777", b"7a7a7"))  # Series Number (IS) that is not an integer
    assoc = _assoc(server, ds.SOPClassUID)
    try:
        status = _send_file(assoc, path, monkeypatch)
    finally:
        assoc.release()
    # PS3.4 B.2.3 Warning: Elements Discarded (from the index; the bytes are stored as received)
    assert status.Status == 0xB006
    assert "00200011" in status.ErrorComment
    stored = stored_blobs(server.settings)[("default", ds.SOPInstanceUID)]
    assert dataset_part(stored) == dataset_part(path.read_bytes())


def test_instance_over_the_size_limit_is_refused_with_a700(live_server_factory: Any, tmp_path: Path) -> None:
    server = start(live_server_factory, tmp_path, limits={"max_instance_size": 4096})
    assoc = _assoc(server, "1.2.840.10008.5.1.4.1.1.2")
    try:
        small = make_dataset(rows=8, columns=8)
        big = make_dataset(rows=128, columns=128)
        assert assoc.send_c_store(small).Status == 0x0000
        status = assoc.send_c_store(big)
        # PS3.4 B.2.3 Refused: Out of Resources (an SCU may retry elsewhere or later)
        assert status.Status == 0xA700
        assert assoc.is_established
    finally:
        assoc.release()
    state = store_state(server.settings)
    assert [i[3] for i in state.instances] == [small.SOPInstanceUID]
    assert state.spool == []


def test_cstore_then_wado_retrieve_is_identical(live_server_factory: Any, tmp_path: Path) -> None:
    """Cross-protocol: what storescu stored, WADO-RS returns byte for byte (PS3.18 10.4.1.1.1)."""
    server = start(live_server_factory, tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    study = uid.generate_uid()
    sent = {}
    for name, ds in (("ct", make_dataset(study_uid=study)),
                     ("rle", with_transfer_syntax(make_dataset(study_uid=study, instance_number=2), uid.RLELossless))):
        sent[ds.SOPInstanceUID] = (_write(folder, name, ds), ds.SeriesInstanceUID, ds.file_meta.TransferSyntaxUID)
    result = dcmtk("storescu", "-R", "-xr", "+sd", "-aec", "DICOMFLOW", "127.0.0.1", str(dimse_port(server)),
                   str(folder))
    assert result.returncode == 0, result.stderr
    blobs = stored_blobs(server.settings)
    for sop, (path, series, ts) in sent.items():
        url = f"{server.dicomweb}/studies/{study}/series/{series}/instances/{sop}"
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        req = urllib.request.Request(url, headers={"Accept": accept})
        with urllib.request.urlopen(req, timeout=30) as resp:
            parts = split_multipart(resp.read(), resp.headers["Content-Type"])
        assert len(parts) == 1
        assert parts[0] == blobs[("default", sop)]  # the stored object, unchanged
        assert dataset_part(parts[0]) == dataset_part(path.read_bytes()), ts  # = what storescu sent


def test_in_memory_receive_mode_stores_the_same_bytes(live_server_factory: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """With pynetdicom's chunked receive switched off (process-wide), the data set arrives in memory."""
    server = start(live_server_factory, tmp_path)
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)
    folder = tmp_path / "in"
    folder.mkdir()
    path = _write(folder, "ct", make_dataset())
    result = dcmtk("storescu", "-aec", "DICOMFLOW", "127.0.0.1", str(dimse_port(server)), str(path))
    assert result.returncode == 0, result.stderr
    (stored,) = stored_blobs(server.settings).values()
    assert dataset_part(stored) == dataset_part(path.read_bytes())
