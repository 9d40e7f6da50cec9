"""C-GET SCP (PS3.4 C.4.3) driven by dcmtk's getscu: sub-operations on the requesting association."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless, generate_uid

from tests.conftest import LiveServer
from tests.factory import make_dataset
from tests.integration.dcmtk import (
    UNSERVABLE,
    dataset_bytes,
    dimse_server,
    dimse_status,
    offending_element,
    run,
    stored,
    storescu,
    write_instances,
)

pytestmark = pytest.mark.integration


def getscu(server: LiveServer, out: Path, keys: list[str], *, called: str = "DICOMFLOW",
           extra: tuple[str, ...] = ()) -> str:
    out.mkdir(parents=True, exist_ok=True)
    args = ["getscu", "-v", "-S", "-aec", called, "-aet", "GETSCU", "-od", str(out), "+B", *extra]
    for key in keys:
        args += ["-k", key]
    proc = run([*args, "127.0.0.1", str(server.settings.dimse.port)])
    return proc.stdout + proc.stderr


def _final(output: str) -> str:
    """The last C-GET response status getscu -v reports, with its sub-operation counters."""
    found = re.findall(r"Received C-GET Response \(([^)]*)\)", output)
    assert found, output
    counts = dict(re.findall(r"Number of (\w+) Suboperations\s*:\s*(\d+)", output))
    return f"{found[-1]} {counts}"


def test_get_study_as_stored_and_converted(live_server_factory: Any, tmp_path: Path) -> None:
    study = generate_uid()
    native = make_dataset(study_uid=study, instance_number=1)
    rle = make_dataset(study_uid=study, instance_number=2)
    rle.compress(RLELossless, generate_instance_uid=False)
    other = make_dataset(patient_id="OTHER-3")
    server = dimse_server(live_server_factory, tmp_path)
    storescu(server, write_instances(tmp_path / "in", [native, rle, other]))
    output = getscu(server, tmp_path / "out", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"])
    assert _final(output) == "Success {'Remaining': '0', 'Completed': '2', 'Failed': '0', 'Warning': '0'}", output
    files = {pydicom.dcmread(f).SOPInstanceUID: f for f in (tmp_path / "out").iterdir()}
    assert set(files) == {native.SOPInstanceUID, rle.SOPInstanceUID}
    originals = stored(server)
    # getscu proposes uncompressed syntaxes only: the native instance goes as stored, the RLE one decoded
    assert dataset_bytes(files[native.SOPInstanceUID]) == dataset_bytes(originals[native.SOPInstanceUID])
    got = pydicom.dcmread(files[rle.SOPInstanceUID])
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(got.pixel_array, make_dataset(instance_number=2).pixel_array)


def test_get_as_stored_when_requestor_accepts_rle(live_server_factory: Any, tmp_path: Path) -> None:
    """A requestor proposing RLE in a context of its own receives the RLE instance as stored.

    (getscu ``+xr`` proposes RLE and the uncompressed syntaxes in one context, and the acceptor's
    preference, Explicit VR LE first for ingest, picks Explicit VR LE: the instance is then decoded.)
    """
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    ds = make_dataset(instance_number=4)
    ds.compress(RLELossless, generate_instance_uid=False)
    server = dimse_server(live_server_factory, tmp_path)
    storescu(server, write_instances(tmp_path / "in", [ds]))
    received: list[tuple[str, bytes]] = []

    def on_store(event: Any) -> int:
        # the in-process server turned pynetdicom's process-wide STORE_RECV_CHUNKED_DATASET on
        path = getattr(event.request, "_dataset_path", None)
        data = dataset_bytes(Path(path)) if path else bytes(event.request.DataSet.getvalue())
        received.append((str(event.context.transfer_syntax), data))
        return 0x0000

    ae = AE(ae_title="PYGET")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [RLELossless])
    assoc = ae.associate("127.0.0.1", server.settings.dimse.port, ae_title="DICOMFLOW",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = ds.StudyInstanceUID
    identifier.SeriesInstanceUID = ds.SeriesInstanceUID
    responses = list(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
    assoc.release()
    assert responses[-1][0].Status == 0x0000
    assert len(received) == 1
    ts, data = received[0]
    assert ts == RLELossless
    assert data == dataset_bytes(stored(server)[ds.SOPInstanceUID])


def test_get_nothing_for_another_tenant(live_server_factory: Any, tmp_path: Path) -> None:
    ds = make_dataset()
    server = dimse_server(live_server_factory, tmp_path)
    storescu(server, write_instances(tmp_path / "in", [ds]), called="ACME")
    output = getscu(server, tmp_path / "out", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={ds.StudyInstanceUID}"])
    assert "Success" in _final(output), output
    assert list((tmp_path / "out").iterdir()) == []
    output = getscu(server, tmp_path / "acme", ["QueryRetrieveLevel=STUDY",
                                                f"StudyInstanceUID={ds.StudyInstanceUID}"], called="ACME")
    assert "Success" in _final(output), output
    assert len(list((tmp_path / "acme").iterdir())) == 1


def test_identifier_we_cannot_serve_is_a900(live_server_factory: Any, tmp_path: Path) -> None:
    """PS3.4 C.4.3.1.4: 0xA900 Identifier does not match SOP Class with the Offending Element and an Error
    Comment, no sub-operation counted; the server goes on serving."""
    ds = make_dataset()
    server = dimse_server(live_server_factory, tmp_path)
    storescu(server, write_instances(tmp_path / "in", [ds]))
    for keys, offending in UNSERVABLE:
        output = getscu(server, tmp_path / "refused", keys, extra=("-d",))
        assert (dimse_status(output), offending_element(output)) == (0xA900, offending), output
        assert re.search(r"\(0000,0902\) LO \[[^\]]+\]", output), output  # Error Comment
        assert not re.search(r"(Completed|Failed|Warning) Suboperations\s*:\s*[1-9]", output), output
    assert list((tmp_path / "refused").iterdir()) == []
    output = getscu(server, tmp_path / "out", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={ds.StudyInstanceUID}"])
    assert _final(output) == "Success {'Remaining': '0', 'Completed': '1', 'Failed': '0', 'Warning': '0'}", output
    assert [pydicom.dcmread(f).SOPInstanceUID for f in (tmp_path / "out").iterdir()] == [ds.SOPInstanceUID]
