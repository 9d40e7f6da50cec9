"""C-MOVE SCP (PS3.4 C.4.2) driven by dcmtk's movescu, with a storescp started by each test as destination."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, ImplicitVRLittleEndian, RLELossless, generate_uid

from dicomflow.settings import RemoteNode, TenantSettings
from tests.conftest import LiveServer
from tests.factory import MR_IMAGE, make_dataset
from tests.integration.dcmtk import (
    UNSERVABLE,
    StoreScp,
    dataset_bytes,
    dimse_server,
    dimse_status,
    free_port,
    offending_element,
    run,
    stored,
    storescp,
    storescu,
    transfer_syntax,
    write_instances,
)

pytestmark = pytest.mark.integration


def _tenants(dest: StoreScp) -> dict[str, TenantSettings]:
    node = RemoteNode(ae_title=dest.ae_title, host="127.0.0.1", port=dest.port)
    return {
        "default": TenantSettings(ae_titles=["DICOMFLOW"], remote_nodes={"dest": node}),
        "acme": TenantSettings(ae_titles=["ACME"], remote_nodes={"dest": node}),
        "globex": TenantSettings(ae_titles=["GLOBEX"]),
    }


def movescu(server: LiveServer, keys: list[str], *, dest: str = "DEST", model: str = "-S",
            called: str = "DICOMFLOW", extra: tuple[str, ...] = ()) -> str:
    args = ["movescu", "-v", model, "-aec", called, "-aet", "MOVESCU", "-aem", dest, *extra]
    for key in keys:
        args += ["-k", key]
    proc = run([*args, "127.0.0.1", str(server.settings.dimse.port)])
    return proc.stdout + proc.stderr


def _rle(**kwargs: Any) -> Dataset:
    ds = make_dataset(**kwargs)
    ds.compress(RLELossless, generate_instance_uid=False)
    return ds


def _video(**kwargs: Any) -> Dataset:
    """An MPEG-2 encoded instance: nothing here can decode it, so it can only be sent as stored."""
    ds = make_dataset(pixels=False, **kwargs)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated = 16, 16, 3, 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.NumberOfFrames = 8, 7, 0, 1
    ds.PhotometricInterpretation, ds.PlanarConfiguration = "YBR_PARTIAL_420", 0
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(96)])
    ds["PixelData"].VR = "OB"
    return ds


def _final(output: str) -> str:
    found = re.findall(r"Received Final Move Response \(([^)]*)\)", output)
    assert found, output
    return str(found[-1])


def test_move_study_byte_exact_as_stored(live_server_factory: Any, tmp_path: Path) -> None:
    study = generate_uid()
    series = generate_uid()
    datasets = [
        make_dataset(study_uid=study, series_uid=series, instance_number=1),
        _rle(study_uid=study, series_uid=series, instance_number=2),
        make_dataset(study_uid=study, series_uid=series, instance_number=3, transfer_syntax=ImplicitVRLittleEndian),
        make_dataset(study_uid=study, instance_number=1, sop_class=MR_IMAGE, modality="MR", series_number=2),
        make_dataset(patient_id="OTHER-9"),  # another study: not moved
    ]
    with storescp(tmp_path / "recv", "DEST", "+xa") as dest:
        server = dimse_server(live_server_factory, tmp_path, tenants=_tenants(dest))
        storescu(server, write_instances(tmp_path / "in", datasets))
        output = movescu(server, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"])
        files = dest.wait_files(4)
    assert _final(output) == "Success", output
    assert len(files) == 4
    originals = stored(server)
    received = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
    assert set(received) == {ds.SOPInstanceUID for ds in datasets[:4]}
    for sop, path in received.items():
        assert transfer_syntax(path) == pydicom.dcmread(
            io.BytesIO(originals[sop]), stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert dataset_bytes(path) == dataset_bytes(originals[sop])  # PS3.4 C.4.2: the instance as stored


def test_move_series_and_image_lists_patient_root(live_server_factory: Any, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    datasets = [make_dataset(study_uid=study, series_uid=series, instance_number=n, patient_id="PID-7")
                for n in range(1, 5)]
    with storescp(tmp_path / "recv", "DEST") as dest:
        server = dimse_server(live_server_factory, tmp_path, tenants=_tenants(dest))
        storescu(server, write_instances(tmp_path / "in", datasets))
        wanted = f"{datasets[0].SOPInstanceUID}\\{datasets[2].SOPInstanceUID}"
        output = movescu(server, ["QueryRetrieveLevel=IMAGE", "PatientID=PID-7", f"StudyInstanceUID={study}",
                                  f"SeriesInstanceUID={series}", f"SOPInstanceUID={wanted}"], model="-P")
        files = dest.wait_files(2)
        assert _final(output) == "Success", output
        assert {pydicom.dcmread(f).SOPInstanceUID for f in files} == {datasets[0].SOPInstanceUID,
                                                                       datasets[2].SOPInstanceUID}
        output = movescu(server, ["QueryRetrieveLevel=PATIENT", "PatientID=PID-7"], model="-P")
        assert _final(output) == "Success", output
        assert len(dest.wait_files(4)) == 4  # the two already received are written again under the same name


def test_transcoded_only_when_destination_accepts_nothing_better(live_server_factory: Any, tmp_path: Path) -> None:
    ds = _rle(instance_number=5)
    with storescp(tmp_path / "recv", "DEST", "+xi") as dest:  # Implicit VR Little Endian only
        server = dimse_server(live_server_factory, tmp_path, tenants=_tenants(dest))
        storescu(server, write_instances(tmp_path / "in", [ds]))
        output = movescu(server, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={ds.StudyInstanceUID}"])
        [file] = dest.wait_files(1)
    assert _final(output) == "Success", output
    got = pydicom.dcmread(file)
    assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    original = make_dataset(instance_number=5)
    assert np.array_equal(got.pixel_array, original.pixel_array)
    assert got.SOPInstanceUID == ds.SOPInstanceUID  # PS3.4: a lossless conversion keeps the instance's identity


def test_unknown_destination_is_a801(live_server_factory: Any, tmp_path: Path) -> None:
    ds = make_dataset()
    with storescp(tmp_path / "recv", "DEST") as dest:
        server = dimse_server(live_server_factory, tmp_path, tenants=_tenants(dest))
        storescu(server, write_instances(tmp_path / "in", [ds]))
        output = movescu(server, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={ds.StudyInstanceUID}"],
                         dest="NOWHERE")
        assert "MoveDestinationUnknown" in _final(output), output
        # GLOBEX has no remote nodes: DEST is unknown to that tenant
        output = movescu(server, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={ds.StudyInstanceUID}"],
                         called="GLOBEX")
        assert "MoveDestinationUnknown" in _final(output), output
        assert dest.files() == []


def test_some_failed_b000_all_failed_a702(live_server_factory: Any, tmp_path: Path) -> None:
    study = generate_uid()
    good = make_dataset(study_uid=study, instance_number=1)
    video = _video(study_uid=study, instance_number=2)
    video_only = _video(instance_number=3)
    with storescp(tmp_path / "recv", "DEST") as dest:  # uncompressed only: the video cannot be sent
        server = dimse_server(live_server_factory, tmp_path, tenants=_tenants(dest))
        storescu(server, write_instances(tmp_path / "in", [good, video, video_only]))
        output = movescu(server, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"])
        assert _final(output).startswith("Warning"), output  # 0xB000 Sub-operations Complete - One or more Failures
        assert [pydicom.dcmread(f).SOPInstanceUID for f in dest.wait_files(1)] == [good.SOPInstanceUID]
        output = movescu(server, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={video_only.StudyInstanceUID}"])
        # dcmtk's name for 0xA702 Refused: Out of Resources - Unable to perform sub-operations
        assert _final(output) == "Refused: OutOfResourcesSubOperations", output


def test_tenant_moves_only_its_own_instances(live_server_factory: Any, tmp_path: Path) -> None:
    ds = make_dataset()
    with storescp(tmp_path / "recv", "DEST") as dest:
        server = dimse_server(live_server_factory, tmp_path, tenants=_tenants(dest))
        storescu(server, write_instances(tmp_path / "in", [ds]))  # stored for the default tenant
        output = movescu(server, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={ds.StudyInstanceUID}"],
                         called="ACME")
        assert _final(output) == "Success", output
        assert dest.files() == []


def test_cancel_stops_sub_operations(live_server_factory: Any, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    datasets = [make_dataset(study_uid=study, series_uid=series, instance_number=n, rows=64, columns=64)
                for n in range(60)]
    with storescp(tmp_path / "recv", "DEST") as dest:
        server = dimse_server(live_server_factory, tmp_path, tenants=_tenants(dest))
        storescu(server, write_instances(tmp_path / "in", datasets))
        output = movescu(server, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"], extra=("--cancel", "3"))
        assert "Cancel" in _final(output), output
        assert 3 <= len(dest.wait_files(3, timeout=3)) < 60


def test_identifier_we_cannot_serve_is_a900(live_server_factory: Any, tmp_path: Path) -> None:
    """PS3.4 C.4.2.1.5: 0xA900 Identifier does not match SOP Class, with the Offending Element and an Error
    Comment, before any sub-association; the server goes on serving."""
    ds = make_dataset()
    with storescp(tmp_path / "recv", "DEST") as dest:
        server = dimse_server(live_server_factory, tmp_path, tenants=_tenants(dest))
        storescu(server, write_instances(tmp_path / "in", [ds]))
        for keys, offending in UNSERVABLE:
            output = movescu(server, keys, extra=("-d",))
            assert (dimse_status(output), offending_element(output)) == (0xA900, offending), output
            assert re.search(r"\(0000,0902\) LO \[[^\]]+\]", output), output  # Error Comment
        assert dest.files() == []
        output = movescu(server, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={ds.StudyInstanceUID}"])
        assert _final(output) == "Success", output
        assert [pydicom.dcmread(f).SOPInstanceUID for f in dest.wait_files(1)] == [ds.SOPInstanceUID]


def test_refused_then_served_on_one_association(live_server_factory: Any, tmp_path: Path) -> None:
    """movescu sends each query file on the same association: a refusal leaves it usable."""
    ds = make_dataset()
    bad, good = Dataset(), Dataset()
    bad.QueryRetrieveLevel = "SERIES"
    bad.StudyInstanceUID = ds.StudyInstanceUID  # no Series Instance UID
    good.QueryRetrieveLevel = "STUDY"
    good.StudyInstanceUID = ds.StudyInstanceUID
    queries = []
    for name, query in (("bad", bad), ("good", good)):
        queries.append(tmp_path / f"{name}.dcm")
        query.save_as(queries[-1], implicit_vr=False, little_endian=True)
    with storescp(tmp_path / "recv", "DEST") as dest:
        server = dimse_server(live_server_factory, tmp_path, tenants=_tenants(dest))
        storescu(server, write_instances(tmp_path / "in", [ds]))
        proc = run(["movescu", "-d", "-S", "-aec", "DICOMFLOW", "-aet", "MOVESCU", "-aem", "DEST", "127.0.0.1",
                    str(server.settings.dimse.port), *map(str, queries)])
        output = proc.stdout + proc.stderr
        assert output.count("Requesting Association") == 1, output
        statuses = [int(s, 16) for s in re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", output)]
        assert statuses[0] == 0xA900 and statuses[-1] == 0x0000, output
        assert len(dest.wait_files(1)) == 1


def test_destination_refusing_the_association_fails_all_sub_operations(live_server_factory: Any,
                                                                        tmp_path: Path) -> None:
    """PS3.4 C.4.2.3.1: no association, no presentation context: every sub-operation failed, so the final
    status is a Failure with the counts, 0xA702 (as dcmqrscp answers), not 0xA801 (an unknown destination)."""
    study = generate_uid()
    datasets = [make_dataset(study_uid=study, instance_number=n) for n in (1, 2)]
    closed = free_port()  # nothing listens there
    with storescp(tmp_path / "recv", "DEST", "--refuse") as refusing:
        tenants = _tenants(refusing)
        tenants["default"].remote_nodes["gone"] = RemoteNode(ae_title="GONE", host="127.0.0.1", port=closed)
        server = dimse_server(live_server_factory, tmp_path, tenants=tenants)
        storescu(server, write_instances(tmp_path / "in", datasets))
        for dest in ("DEST", "GONE"):
            output = movescu(server, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"], dest=dest,
                             extra=("-d",))
            assert dimse_status(output) == 0xA702, output
            counts = dict(re.findall(r"(Completed|Failed|Warning) Suboperations\s*:\s*(\d+)", output))  # the last
            assert (counts.get("Completed"), counts.get("Failed"), counts.get("Warning")) == ("0", "2", "0"), output
            for ds in datasets:  # Failed SOP Instance UID List (PS3.4 C.4.2.1.4)
                assert ds.SOPInstanceUID in output, output
        assert refusing.files() == []


def test_sub_association_calls_as_the_tenant_ae(live_server_factory: Any, tmp_path: Path) -> None:
    """The destination sees the AE title the C-MOVE requestor called (the tenant's), the one it allow-lists."""
    calls = tmp_path / "calls.txt"
    a, b = make_dataset(), make_dataset(patient_id="PID-ACME")
    with storescp(tmp_path / "recv", "DEST", "-xcr", f"echo #a #c >> {calls}", "-xs") as dest:
        server = dimse_server(live_server_factory, tmp_path, tenants=_tenants(dest))
        storescu(server, write_instances(tmp_path / "in", [a]))
        storescu(server, write_instances(tmp_path / "in-acme", [b]), called="ACME")
        output = movescu(server, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={a.StudyInstanceUID}"])
        assert _final(output) == "Success", output
        output = movescu(server, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={b.StudyInstanceUID}"],
                         called="ACME")
        assert _final(output) == "Success", output
        dest.wait_files(2)
    assert calls.read_text().split("\n")[:2] == ["DICOMFLOW DEST", "ACME DEST"]


def test_retrieve_without_the_higher_unique_keys(live_server_factory: Any, tmp_path: Path) -> None:
    """Patient Root STUDY level with only the Study Instance UID, as many SCUs send it: served."""
    ds = make_dataset()
    with storescp(tmp_path / "recv", "DEST") as dest:
        server = dimse_server(live_server_factory, tmp_path, tenants=_tenants(dest))
        storescu(server, write_instances(tmp_path / "in", [ds]))
        output = movescu(server, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={ds.StudyInstanceUID}"],
                         model="-P")
        assert _final(output) == "Success", output
        assert [pydicom.dcmread(f).SOPInstanceUID for f in dest.wait_files(1)] == [ds.SOPInstanceUID]




def test_pending_responses_count_sub_operations(live_server_factory: Any, tmp_path: Path) -> None:
    """pynetdicom as the SCU reads the counters of every response (PS3.4 C.4.2.1.5 / C.4.2.3.1)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    study = generate_uid()
    good = [make_dataset(study_uid=study, instance_number=n) for n in (1, 2)]
    video = _video(study_uid=study, instance_number=3)
    with storescp(tmp_path / "recv", "DEST") as dest:
        server = dimse_server(live_server_factory, tmp_path, tenants=_tenants(dest))
        storescu(server, write_instances(tmp_path / "in", [*good, video]))
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", server.settings.dimse.port, ae_title="DICOMFLOW")
        assert assoc.is_established
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study
        responses = list(assoc.send_c_move(identifier, "DEST", StudyRootQueryRetrieveInformationModelMove))
        assoc.release()
    statuses = [status for status, _ in responses]
    pending = [s for s in statuses if s.Status == 0xFF00]
    assert [int(s.NumberOfRemainingSuboperations) for s in pending] == [2, 1, 0]
    final, final_identifier = responses[-1]
    assert final.Status == 0xB000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations,
            final.NumberOfWarningSuboperations) == (2, 1, 0)
    assert final_identifier is not None and final_identifier.FailedSOPInstanceUIDList == video.SOPInstanceUID


def test_move_originator_is_the_move_scu(live_server_factory: Any, tmp_path: Path) -> None:
    """PS3.7 9.1.1.1: each sub-operation names the AE that invoked the C-MOVE and its Message ID."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    seen: list[tuple[str, int]] = []

    def on_store(event: Any) -> int:
        seen.append((str(event.request.MoveOriginatorApplicationEntityTitle).strip(),
                     int(event.request.MoveOriginatorMessageID)))
        return 0x0000

    dest = AE(ae_title="PYDEST")
    dest.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    scp = dest.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        node = RemoteNode(ae_title="PYDEST", host="127.0.0.1", port=port)
        tenants = {"default": TenantSettings(ae_titles=["DICOMFLOW"], remote_nodes={"dest": node})}
        server = dimse_server(live_server_factory, tmp_path, tenants=tenants)
        ds = make_dataset()
        storescu(server, write_instances(tmp_path / "in", [ds]))
        scu = AE(ae_title="THE-MOVER")
        scu.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = scu.associate("127.0.0.1", server.settings.dimse.port, ae_title="DICOMFLOW")
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = ds.StudyInstanceUID
        responses = list(assoc.send_c_move(identifier, "PYDEST", StudyRootQueryRetrieveInformationModelMove,
                                           msg_id=7))
        assoc.release()
    finally:
        scp.shutdown()
    assert responses[-1][0].Status == 0x0000
    assert seen == [("THE-MOVER", 7)]
