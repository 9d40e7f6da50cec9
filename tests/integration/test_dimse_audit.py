"""DIMSE accesses produce audit records (PS3.15 A.5.3 semantics, FHIR AuditEvent): C-STORE summaries per
association and study, C-FIND queries, C-MOVE/C-GET retrieves with their final status, rejected
associations. Driven by dcmtk's storescu/findscu/movescu/getscu."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from pydicom.uid import generate_uid

from dicomflow.settings import CallingAe, RemoteNode, TenantSettings
from tests.conftest import LiveServer
from tests.factory import make_dataset
from tests.integration.dcmtk import dimse_server, findscu, run, storescp, storescu, write_instances

pytestmark = pytest.mark.integration


def _events(server: LiveServer, tenant: str, expect: int = 1, **params: str) -> list[dict[str, Any]]:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    url = f"{server.url}/tenants/{tenant}/admin/audit?_count=1000&{query}"
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the writer is asynchronous
        with urllib.request.urlopen(url, timeout=10) as resp:
            events = [e["resource"] for e in json.loads(resp.read())["entry"]]
        # reading the trail over HTTP is audited too: count the DIMSE records only
        events = [e for e in events if e.get("subtype", [{}])[0].get("code") == "dimse"]
        if len(events) >= expect:
            break
        time.sleep(0.1)
    for event in events:
        AuditEvent.model_validate({k: v for k, v in event.items() if k != "id"})
    return events


def _entities(event: dict[str, Any]) -> set[str]:
    return {ent["what"]["identifier"]["value"] for ent in event.get("entity", [])}


def _agents(event: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    requestor = event["agent"][0]
    called = event["agent"][1]["altId"] if len(event["agent"]) > 1 else None
    return requestor.get("altId"), called, requestor.get("network", {}).get("address")


@pytest.fixture
def tenants(tmp_path: Path) -> dict[str, TenantSettings]:
    return {"default": TenantSettings(ae_titles=["DICOMFLOW"]),
            "acme": TenantSettings(ae_titles=["ACME"], require_known_calling_ae=True,
                                   allowed_calling_aes=[CallingAe(ae_title=a) for a in
                                                        ("STORESCU", "FINDSCU", "MOVESCU", "GETSCU")])}


def test_store_query_retrieve_and_rejections_are_audited(live_server_factory: Any, tmp_path: Path,
                                                         tenants: dict[str, TenantSettings]) -> None:
    with storescp(tmp_path / "dest", "DEST") as dest:
        tenants["acme"] = tenants["acme"].model_copy(update={"remote_nodes": {
            "dest": RemoteNode(ae_title="DEST", host="127.0.0.1", port=dest.port)}})
        server = dimse_server(live_server_factory, tmp_path, tenants=tenants)
        study_a, study_b = generate_uid(), generate_uid()
        datasets = [make_dataset(study_uid=study_a, patient_id="AUD-PID-1", patient_name="Auditson^Alma")
                    for _ in range(3)]
        datasets.append(make_dataset(study_uid=study_b, patient_id="AUD-PID-2", patient_name="Auditson^Bert"))
        storescu(server, write_instances(tmp_path / "in", datasets), called="ACME")  # one association

        found = findscu(server, tmp_path / "find", ["QueryRetrieveLevel=STUDY", "PatientID=AUD-PID-1",
                                                    "StudyInstanceUID"], called="ACME")
        assert len(found.responses) == 1, found.output
        (tmp_path / "got").mkdir()
        get = run(["getscu", "-S", "-aec", "ACME", "-aet", "GETSCU", "-od", str(tmp_path / "got"),
                   "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_a}", "127.0.0.1",
                   str(server.settings.dimse.port)])
        assert get.returncode == 0, get.stderr
        move = run(["movescu", "-S", "-aec", "ACME", "-aet", "MOVESCU", "-aem", "DEST",
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_b}", "127.0.0.1",
                    str(server.settings.dimse.port)])
        assert move.returncode == 0, move.stderr
        assert len(dest.wait_files(1)) == 1
        unknown_dest = run(["movescu", "-S", "-aec", "ACME", "-aet", "MOVESCU", "-aem", "NOWHERE",
                            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_b}", "127.0.0.1",
                            str(server.settings.dimse.port)])
        assert "MoveDestinationUnknown" in unknown_dest.stdout + unknown_dest.stderr
    rejected_calling = run(["echoscu", "-aet", "INTRUDER", "-aec", "ACME", "127.0.0.1",
                            str(server.settings.dimse.port)])
    rejected_called = run(["echoscu", "-aet", "PROBE", "-aec", "NOSUCHAE", "127.0.0.1",
                           str(server.settings.dimse.port)])
    assert rejected_calling.returncode != 0 and rejected_called.returncode != 0

    events = _events(server, "acme", expect=7)
    stores = [e for e in events if e["type"]["code"] == "110104" and e["action"] == "C"]
    # one record per association and study (PS3.15 A.5.3.2), with the study's patient
    assert len(stores) == 2
    by_study = {next(v for v in _entities(e) if v.startswith("urn:oid:")): e for e in stores}
    assert _entities(by_study[f"urn:oid:{study_a}"]) == {f"urn:oid:{study_a}", "AUD-PID-1"}
    assert _entities(by_study[f"urn:oid:{study_b}"]) == {f"urn:oid:{study_b}", "AUD-PID-2"}
    assert "3 instance(s) stored, 0 failed" in by_study[f"urn:oid:{study_a}"]["outcomeDesc"]
    assert all(e["outcome"] == "0" for e in stores)
    assert _agents(stores[0]) == ("STORESCU", "ACME", "127.0.0.1")

    queries = [e for e in events if e["type"]["code"] == "110112"]
    assert len(queries) == 1 and queries[0]["outcome"] == "0"
    assert "AUD-PID-1" in _entities(queries[0]) and "level=STUDY" in queries[0]["outcomeDesc"]
    assert "AUD-PID-1" not in queries[0]["outcomeDesc"]  # values are entities, not free text
    assert _agents(queries[0]) == ("FINDSCU", "ACME", "127.0.0.1")

    retrieves = [e for e in events if e["type"]["code"] == "110104" and e["action"] == "R"]
    get_rec = next(e for e in retrieves if "C-GET" in e["outcomeDesc"])
    assert get_rec["outcome"] == "0" and _entities(get_rec) == {f"urn:oid:{study_a}", "AUD-PID-1"}
    assert "completed=3" in get_rec["outcomeDesc"]
    move_rec = next(e for e in retrieves if "C-MOVE to DEST" in e["outcomeDesc"])
    assert move_rec["outcome"] == "0" and _entities(move_rec) == {f"urn:oid:{study_b}", "AUD-PID-2"}
    refused = next(e for e in retrieves if "0xA801" in e["outcomeDesc"])  # Move Destination Unknown
    assert refused["outcome"] == "8"

    auth = [e for e in events if e["type"]["code"] == "110114"]
    assert len(auth) == 1 and auth[0]["outcome"] == "4"
    assert _agents(auth[0]) == ("INTRUDER", "ACME", "127.0.0.1")
    assert "calling AE title not allowed" in auth[0]["outcomeDesc"]
    # an unknown called AE belongs to no tenant: the default tenant's trail has it
    default = _events(server, "default")
    assert any(e["type"]["code"] == "110114" and _agents(e)[:2] == ("PROBE", "NOSUCHAE") for e in default)
    # and nothing of acme's leaked into the default tenant's trail
    assert not any(study_a in json.dumps(e) or study_b in json.dumps(e) for e in default)


def test_failed_stores_are_counted_in_the_summary(live_server_factory: Any, tmp_path: Path,
                                                  tenants: dict[str, TenantSettings]) -> None:
    server = dimse_server(live_server_factory, tmp_path, tenants=tenants)
    study = generate_uid()
    good = make_dataset(study_uid=study)
    dup = make_dataset(study_uid=study, sop_uid=good.SOPInstanceUID)
    dup.SeriesDescription = "different bytes"  # same SOP Instance UID, other content: 0x0111 (reject policy)
    files = write_instances(tmp_path / "in", [good])
    storescu(server, files, called="ACME")
    files2 = write_instances(tmp_path / "in2", [dup])
    proc = run(["storescu", "-v", "-aec", "ACME", "-aet", "STORESCU", "127.0.0.1",
                str(server.settings.dimse.port), str(files2[0])])
    assert "Status: 0x111)" in proc.stderr, proc.stderr  # PS3.4 B.2.3 Duplicate SOP Instance
    events = [e for e in _events(server, "acme", expect=2) if e["type"]["code"] == "110104"]
    outcomes = sorted((e["outcome"], e["outcomeDesc"].split(": ", 1)[1]) for e in events)
    assert outcomes == [("0", "1 instance(s) stored, 0 failed"), ("8", "0 instance(s) stored, 1 failed")]


def test_audit_work_is_per_study_and_association_not_per_instance(live_server_factory: Any, tmp_path: Path,
                                                                  tenants: dict[str, TenantSettings]) -> None:
    """200 instances of 4 studies over one association give 4 records, each counting its 50 instances.

    The store path itself only counts (audit/dimse.py): what costs I/O is one record per study when the
    association closes, so the audit's share of a C-STORE does not grow with the number of instances.
    (How much that costs is measured by the benchmarks, not here.)
    """
    studies = [generate_uid() for _ in range(4)]
    datasets = [make_dataset(study_uid=studies[i // 50]) for i in range(200)]
    server = dimse_server(live_server_factory, tmp_path / "s", tenants=tenants)
    storescu(server, write_instances(tmp_path / "in", datasets), called="ACME")
    events = _events(server, "acme", expect=4)
    stores = [e for e in events if "stored" in e.get("outcomeDesc", "")]
    assert len(stores) == 4, [e.get("outcomeDesc") for e in events]
    assert {next(iter(_entities(e) & {f"urn:oid:{u}" for u in studies})) for e in stores} == \
        {f"urn:oid:{u}" for u in studies}
    assert all("50 instance(s) stored, 0 failed" in e["outcomeDesc"] for e in stores)
