"""The scale-out topology end to end: 3 `dicomflow serve` + 2 `dicomflow worker` processes on one
PostgreSQL + SeaweedFS S3; 8 concurrent STOW-RS clients and a dcmtk storescu send studies (patients shared
between clients, so two workers upsert the same Patient at once); then every instance is found and
retrieved from every server, and every route is delivered exactly once: one ImagingStudy per study and one
Patient per patient in a real FHIR server (Medplum), each instance once at a dcmtk storescp."""

from __future__ import annotations

import io
import itertools
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from tests.factory import make_dataset, multipart, split_multipart, to_bytes
from tests.harness.medplum import FhirServer, fhir_server  # noqa: F401
from tests.harness.postgres import run_async
from tests.harness.seaweed import SeaweedS3
from tests.harness.topology import Topology
from tests.integration.dcmtk import DCMTK_ENV, storescp
from tests.routing_support import SHIPPED_MAPPINGS

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

CLIENTS, STUDIES_PER_CLIENT, PER_STUDY, PATIENTS, DIMSE_INSTANCES = 8, 2, 5, 3, 10
QUIET = 3.0  # stable_after: every study arrives in one request / association, well within it
MULTIPART = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ROUTES = f"""name: studies-to-emr
events: [study.stable]
stable_after: {QUIET}s
actions: [{{type: fhir, destination: emr, mapping: imagingstudy-default}}]
"""
PACS_ROUTE = f"""name: studies-to-pacs
events: [study.stable]
stable_after: {QUIET}s
actions: [{{type: dicom, destination: pacs}}]
"""


async def _deliveries(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch("SELECT id, route, study_uid, status, attempts, last_error FROM deliveries"))
    finally:
        await conn.close()


def _fhir_search(fhir: FhirServer, kind: str, identifier: str) -> list[dict[str, Any]]:
    bundle = requests.get(f"{fhir.url}/{kind}", params={"identifier": identifier, "_count": "50"}, timeout=30).json()
    return [entry["resource"] for entry in bundle.get("entry", [])]


def test_three_servers_two_workers_deliver_each_route_once(
        pg_admin_url: str, seaweed: SeaweedS3, fhir_server: FhirServer, tmp_path: Path) -> None:  # noqa: F811
    routes = tmp_path / "routes"
    routes.mkdir()
    (routes / "emr.yaml").write_text(ROUTES)
    (routes / "pacs.yaml").write_text(PACS_ROUTE)
    sent: dict[str, dict[str, bytes]] = {}  # study -> sop -> bytes
    patient_of: dict[str, str] = {}
    errors: list[str] = []
    lock = threading.Lock()
    rotation = itertools.count()
    tag = generate_uid()[-8:]  # this run's patients only (the FHIR server lives for the session)
    public_url = f"https://pacs-{tag}.example.org"

    with storescp(tmp_path / "pacs", "PACS", "-v") as scp:
        routing = {"mappings_dir": str(SHIPPED_MAPPINGS), "poll_interval": 0.1, "reload_interval": 0.5,
                   "backoff_initial": 0.2, "backoff_max": 1.0, "public_url": public_url,
                   "destinations": {"emr": {"type": "fhir", "url": fhir_server.url},
                                    "pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                             "port": scp.port}}}
        topology = Topology(servers=3, workers=2, routes_dir=routes, dimse=True, pg_admin_url=pg_admin_url,
                            seaweed=seaweed, base=tmp_path / "topology", routing=routing)
        with topology:
            servers = topology.server_processes

            def client(n: int) -> None:
                session = requests.Session()
                for k in range(STUDIES_PER_CLIENT):
                    study, series = generate_uid(), generate_uid()
                    pid = f"PID-SO-{tag}-{(n + k) % PATIENTS}"
                    datasets = [make_dataset(study_uid=study, series_uid=series, patient_id=pid,
                                             accession=f"ACC-{n}-{k}", instance_number=i + 1)
                                for i in range(PER_STUDY)]
                    data = {str(ds.SOPInstanceUID): to_bytes(ds) for ds in datasets}
                    with lock:
                        sent[study], patient_of[study] = data, pid
                    body, content_type = multipart(list(data.values()))
                    server = servers[next(rotation) % len(servers)]
                    try:
                        response = session.post(f"{server.dicomweb}/studies", data=body,
                                                headers={"Content-Type": content_type}, timeout=120)
                    except requests.RequestException as exc:
                        with lock:
                            errors.append(f"client {n}: {type(exc).__name__}")
                        continue
                    if response.status_code != 200:
                        with lock:
                            errors.append(f"client {n}: HTTP {response.status_code} {response.text[:300]}")

            # a modality: one association of storescu into the third server's DIMSE port
            dimse_study, dimse_series = generate_uid(), generate_uid()
            files = tmp_path / "modality"
            files.mkdir()
            dimse_sops: dict[str, bytes] = {}
            for i in range(DIMSE_INSTANCES):
                ds = make_dataset(study_uid=dimse_study, series_uid=dimse_series,
                                  patient_id=f"PID-SO-{tag}-0", instance_number=i + 1)
                (files / f"{i}.dcm").write_bytes(to_bytes(ds))
                dimse_sops[str(ds.SOPInstanceUID)] = to_bytes(ds)
            patient_of[dimse_study] = f"PID-SO-{tag}-0"
            storescu = subprocess.Popen(
                ["storescu", "-aec", "DICOMFLOW", "-aet", "MODALITY", "127.0.0.1", str(servers[2].dimse_port),
                 *map(str, sorted(files.iterdir()))],
                env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(300)
            out, _ = storescu.communicate(timeout=120)
            assert storescu.returncode == 0, out.decode(errors="replace")
            assert not errors, errors
            studies = {**{s: set(d) for s, d in sent.items()}, dimse_study: set(dimse_sops)}

            # every instance from every server: QIDO finds it, WADO-RS returns it (STOW ones byte-exact)
            for server in servers:
                for study, sops in studies.items():
                    found = requests.get(f"{server.dicomweb}/studies/{study}/instances", timeout=30).json()
                    assert {i["00080018"]["Value"][0] for i in found} == sops
                    response = requests.get(f"{server.dicomweb}/studies/{study}", headers={"Accept": MULTIPART},
                                            timeout=120)
                    assert response.status_code == 200
                    bodies = split_multipart(response.content, response.headers["Content-Type"])
                    if study in sent:
                        assert set(bodies) == set(sent[study].values())
                    else:
                        got = {str(pydicom.dcmread(io.BytesIO(b)).SOPInstanceUID) for b in bodies}
                        assert got == sops

            # both routes, each study: one delivery, done at the first attempt
            expected = {(route, study) for route in ("studies-to-emr", "studies-to-pacs") for study in studies}
            deadline = time.monotonic() + 120
            while True:
                rows = run_async(_deliveries(topology.index_url))
                if sum(r["status"] == "done" for r in rows) >= len(expected) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            time.sleep(2 * QUIET)  # a study wrongly going stable twice would show up by now
            rows = run_async(_deliveries(topology.index_url))
            assert sorted((r["route"], r["study_uid"]) for r in rows) == sorted(expected), \
                [(r["route"], r["status"], r["last_error"]) for r in rows if r["status"] != "done"]
            assert {(r["status"], r["attempts"]) for r in rows} == {("done", 1)}, \
                [(r["route"], r["status"], r["attempts"], r["last_error"]) for r in rows]
            logs = "".join(w.log.read_text(errors="replace") for w in topology.worker_processes)
            delivered = re.findall(r"delivery (\d+) route=", logs)
            assert sorted(map(int, delivered)) == sorted(r["id"] for r in rows)  # each by one worker, once
            assert not any("delivery" in s.log.read_text(errors="replace") for s in servers)  # servers don't

        # FHIR: one ImagingStudy per study with the stored counts; one Patient per patient
        for study, sops in studies.items():
            found = _fhir_search(fhir_server, "ImagingStudy", f"urn:dicom:uid|urn:oid:{study}")
            assert len(found) == 1, study
            assert found[0]["numberOfInstances"] == len(sops)
        puts = [r for r in fhir_server.requests() if r["method"] == "PUT" and r["url"].startswith("/ImagingStudy")
                and any(study in r["url"] for study in studies)]
        assert len(puts) == len(studies)
        for pid in set(patient_of.values()):
            patients = _fhir_search(fhir_server, "Patient", f"urn:dicomflow:default:patient-id|{pid}")
            assert len(patients) == 1, f"{len(patients)} Patient resources for one patient identifier"
        endpoints = _fhir_search(fhir_server, "Endpoint", f"urn:dicomflow:endpoint|{public_url}/dicomweb")
        assert len(endpoints) == 1, f"{len(endpoints)} Endpoint resources for one DICOMweb root"

        # storescp: every instance received exactly once
        all_sops = set().union(*studies.values())
        files_received = {p.name.split(".", 1)[1] for p in scp.wait_files(len(all_sops), timeout=30)}
        assert files_received == all_sops
    log = scp.process.stderr.read().decode(errors="replace") if scp.process.stderr else ""
    assert log.count("Received Store Request") == len(all_sops)
