"""Cross-tenant isolation over DIMSE: through tenant acme's called AE, dcmtk's findscu, movescu and getscu
never see, move or get tenant globex's studies, at any level and in both information models; the answers
are those for UIDs that exist nowhere. A-ASSOCIATE-RQs with illegal AE titles are refused cleanly."""

from __future__ import annotations

import re
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from dicomflow.settings import RemoteNode, TenantSettings
from tests.conftest import LiveServer
from tests.factory import make_dataset
from tests.integration.dcmtk import dimse_server, findscu, run, storescp, storescu, write_instances

pytestmark = pytest.mark.integration


def _move(server: LiveServer, called: str, keys: list[str], model: str = "-S") -> str:
    args = ["movescu", "-v", model, "-aec", called, "-aet", "MOVESCU", "-aem", "DEST"]
    for key in keys:
        args += ["-k", key]
    proc = run([*args, "127.0.0.1", str(server.settings.dimse.port)])
    return proc.stdout + proc.stderr


def _get(server: LiveServer, called: str, keys: list[str], out: Path, model: str = "-S") -> str:
    out.mkdir(parents=True, exist_ok=True)
    args = ["getscu", "-v", model, "-aec", called, "-aet", "GETSCU", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    proc = run([*args, "127.0.0.1", str(server.settings.dimse.port)])
    return proc.stdout + proc.stderr


def _final(output: str, service: str) -> tuple[str, dict[str, str]]:
    found = re.findall(rf"Received (?:Final )?{service} Response \(([^)]*)\)", output)
    assert found, output
    return found[-1], dict(re.findall(r"Number of (\w+) Suboperations\s*:\s*(\d+)", output.split(found[-1])[-1]))


@pytest.fixture
def world(live_server_factory: Any, tmp_path: Path) -> Any:
    with storescp(tmp_path / "dest", "DEST") as dest:
        node = {"dest": RemoteNode(ae_title="DEST", host="127.0.0.1", port=dest.port)}
        server = dimse_server(live_server_factory, tmp_path, tenants={
            "default": TenantSettings(ae_titles=["DICOMFLOW"]),
            "acme": TenantSettings(ae_titles=["ACME"], remote_nodes=node),
            "globex": TenantSettings(ae_titles=["GLOBEX"], remote_nodes=node)})
        acme = make_dataset(patient_id="ISO-ACME-1", patient_name="Acmeson^Ada")
        globex = make_dataset(patient_id="ISO-GLOBEX-1", patient_name="Globexson^Gus")
        storescu(server, write_instances(tmp_path / "a", [acme]), called="ACME")
        storescu(server, write_instances(tmp_path / "g", [globex]), called="GLOBEX")
        yield server, dest, acme, globex


def test_c_find_through_acme_never_sees_globex(world: Any, tmp_path: Path) -> None:
    server, _dest, acme, globex = world
    for model, level, keys in (
        ("-P", "PATIENT", ["PatientID", "PatientName"]),
        ("-S", "STUDY", ["StudyInstanceUID", "PatientID", "PatientName"]),
        ("-S", "SERIES", [f"StudyInstanceUID={globex.StudyInstanceUID}", "SeriesInstanceUID"]),
        ("-S", "IMAGE", [f"StudyInstanceUID={globex.StudyInstanceUID}",
                         f"SeriesInstanceUID={globex.SeriesInstanceUID}", "SOPInstanceUID"]),
    ):
        out = tmp_path / f"find-{level}"
        result = findscu(server, out, [f"QueryRetrieveLevel={level}", *keys], model=model, called="ACME")
        assert "ISO-GLOBEX-1" not in result.output and "Globexson" not in result.output
        uids = {str(r.get("StudyInstanceUID", "")) for r in result.responses}
        assert globex.StudyInstanceUID not in uids, level
        if level in ("PATIENT", "STUDY"):  # acme's own data is there: the query itself works
            assert [str(r.PatientID) for r in result.responses] == ["ISO-ACME-1"], level
        else:
            assert result.responses == [], level
    # the same queries through GLOBEX see globex only
    result = findscu(server, tmp_path / "find-g", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID"],
                     called="GLOBEX")
    assert [str(r.PatientID) for r in result.responses] == ["ISO-GLOBEX-1"]
    # a query naming globex's patient through acme: nothing, exactly as for a patient nobody has
    named = findscu(server, tmp_path / "find-n", ["QueryRetrieveLevel=STUDY", "PatientID=ISO-GLOBEX-1",
                                                  "StudyInstanceUID"], called="ACME")
    nobody = findscu(server, tmp_path / "find-x", ["QueryRetrieveLevel=STUDY", "PatientID=NO-SUCH-PATIENT",
                                                   "StudyInstanceUID"], called="ACME")
    assert named.responses == nobody.responses == []
    assert named.proc.returncode == nobody.proc.returncode == 0
    assert acme.StudyInstanceUID  # stored above


def test_c_move_and_c_get_through_acme_never_send_globex(world: Any, tmp_path: Path) -> None:
    server, dest, _acme, globex = world
    ghost, ghost_series, ghost_sop = generate_uid(), generate_uid(), generate_uid()
    cases = [
        ["QueryRetrieveLevel=STUDY", "StudyInstanceUID={study}"],
        ["QueryRetrieveLevel=SERIES", "StudyInstanceUID={study}", f"SeriesInstanceUID={globex.SeriesInstanceUID}"],
        ["QueryRetrieveLevel=IMAGE", "StudyInstanceUID={study}", f"SeriesInstanceUID={globex.SeriesInstanceUID}",
         f"SOPInstanceUID={globex.SOPInstanceUID}"],
    ]
    for i, template in enumerate(cases):
        theirs = [k.format(study=globex.StudyInstanceUID) for k in template]
        nowhere = [k.format(study=ghost).replace(globex.SeriesInstanceUID, ghost_series)
                   .replace(globex.SOPInstanceUID, ghost_sop) for k in template]
        assert _final(_move(server, "ACME", theirs), "Move") == _final(_move(server, "ACME", nowhere), "Move")
        got = _get(server, "ACME", theirs, tmp_path / f"get-{i}")
        assert _final(got, "C-GET") == _final(_get(server, "ACME", nowhere, tmp_path / f"get-x{i}"), "C-GET")
        assert not list((tmp_path / f"get-{i}").iterdir())
    # patient root, by globex's Patient ID
    move = _move(server, "ACME", ["QueryRetrieveLevel=PATIENT", "PatientID=ISO-GLOBEX-1"], model="-P")
    assert _final(move, "Move") == _final(_move(server, "ACME", ["QueryRetrieveLevel=PATIENT",
                                                                 "PatientID=NO-SUCH-PATIENT"], model="-P"), "Move")
    time.sleep(0.5)
    assert dest.files() == []  # nothing of globex ever reached the destination
    # control: through GLOBEX the same C-MOVE sends it
    move = _move(server, "GLOBEX", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={globex.StudyInstanceUID}"])
    assert _final(move, "Move")[0] == "Success"
    assert len(dest.wait_files(1)) == 1


# -- A-ASSOCIATE-RQ with illegal AE titles (PS3.5 6.2 AE: no backslash, no control characters) -----------


def _item(item_type: int, data: bytes) -> bytes:
    return bytes([item_type, 0]) + struct.pack(">H", len(data)) + data


def _associate_rq(called: bytes, calling: bytes) -> bytes:
    """A-ASSOCIATE-RQ (PS3.8 9.3.2) for Verification, with AE title fields exactly as given."""
    contexts = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, b"1.2.840.10008.1.1") + _item(0x40, b"1.2.840.10008.1.2"))
    body = (struct.pack(">H", 1) + b"\0\0" + called.ljust(16, b" ")[:16] + calling.ljust(16, b" ")[:16] + b"\0" * 32
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + contexts + _item(0x50, _item(0x51, struct.pack(">I", 16384))))
    return bytes([0x01, 0]) + struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(("called", "calling"), [
    (b"ACME\\GLOBEX", b"SCU"),  # backslash: the multi-value delimiter
    (b"ACME\x07", b"SCU"),  # control character
    (b"\xc3\x89ACME", b"SCU"),  # not the default character repertoire
    (b"\0" * 16, b"SCU"),
    (b" " * 16, b"SCU"),  # all spaces: no AE title at all
    (b"ACME", b"BAD\\SCU"),
    (b"ACME", b"SCU\x1b[31m"),  # an escape sequence, e.g. for whoever reads the logs in a terminal
    (b"ACME", b" " * 16),
])
def test_illegal_ae_titles_are_refused_and_the_server_keeps_serving(world: Any, called: bytes,
                                                                   calling: bytes) -> None:
    server = world[0]
    with socket.create_connection(("127.0.0.1", server.settings.dimse.port), timeout=10) as sock:
        sock.sendall(_associate_rq(called, calling))
        reply = b""
        try:
            while chunk := sock.recv(4096):
                reply += chunk
        except OSError:
            pass
    # never an A-ASSOCIATE-AC: an A-ASSOCIATE-RJ (0x03) or A-ABORT (0x07), then the transport closes
    assert reply[:1] in (b"\x03", b"\x07"), reply[:16]
    control = _associate_rq(b"ACME", b"SCU")
    with socket.create_connection(("127.0.0.1", server.settings.dimse.port), timeout=10) as sock:
        sock.sendall(control)
        assert sock.recv(1) == b"\x02"  # A-ASSOCIATE-AC: the same request with legal titles is accepted
    echo = run(["echoscu", "-aec", "ACME", "-aet", "SCU", "127.0.0.1", str(server.settings.dimse.port)])
    assert echo.returncode == 0, echo.stderr
