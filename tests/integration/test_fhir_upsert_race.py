"""Two routing processes on one index deliver studies of one new patient to a real FHIR server (Medplum)
at the same moment: exactly one Patient is created and every ImagingStudy refers to it. On PostgreSQL
two `dicomflow worker` processes; on SQLite `dicomflow serve` and a `dicomflow worker` beside it.

Medplum's in-memory engine runs the search and the create of a conditional update without yielding to
another request, so on its own it never shows the race; the harness's ``/_latency`` hook adds a delay
between the two, as a server whose search and insert are separate database round trips has (HAPI FHIR:
hapifhir/hapi-fhir#3141, #4597). The first test shows that this server then does create duplicates under
concurrent conditional updates, so the second one fails unless the workers' lock holds across processes.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import requests
from pydicom.uid import generate_uid

from dicomflow.settings import Settings
from tests.conftest import free_port
from tests.factory import make_dataset, multipart, to_bytes
from tests.harness.medplum import FhirServer, fhir_server_factory  # noqa: F401
from tests.harness.postgres import run_async
from tests.harness.processes import ServerProcess, WorkerProcess, write_config
from tests.harness.seaweed import SeaweedS3
from tests.harness.topology import Topology
from tests.routing_support import SHIPPED_MAPPINGS

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

STUDIES = 6
LATENCY_MS = 300  # between the search and the create of each conditional update
ROUTE = """name: studies-to-emr
events: [study.stable]
stable_after: 1s
actions: [{type: fhir, destination: emr, mapping: imagingstudy-default}]
"""


@pytest.fixture
def slow_fhir(fhir_server_factory: Any) -> Iterator[FhirServer]:  # noqa: F811
    server: FhirServer = fhir_server_factory().start()
    requests.post(f"{server.url}/_latency", params={"ms": str(LATENCY_MS)}, timeout=5).raise_for_status()
    yield server


def _search(fhir: FhirServer, kind: str, identifier: str) -> list[dict[str, Any]]:
    bundle = requests.get(f"{fhir.url}/{kind}", params={"identifier": identifier, "_count": "50"},
                          timeout=30).json()
    return [entry["resource"] for entry in bundle.get("entry", [])]


async def _deliveries(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch("SELECT id, study_uid, status, attempts, last_error FROM deliveries"))
    finally:
        await conn.close()


def test_the_test_server_duplicates_concurrent_conditional_updates(slow_fhir: FhirServer) -> None:
    """Without a lock in front of it, concurrent conditional updates of one new Patient all create it."""
    value = generate_uid()
    statuses: list[int] = []

    def put() -> None:
        response = requests.put(
            f"{slow_fhir.url}/Patient", params={"identifier": f"urn:race|{value}"},
            json={"resourceType": "Patient", "identifier": [{"system": "urn:race", "value": value}]},
            headers={"Content-Type": "application/fhir+json"}, timeout=30)
        statuses.append(response.status_code)

    threads = [threading.Thread(target=put) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert statuses == [201, 201]
    assert len(_search(slow_fhir, "Patient", f"urn:race|{value}")) == 2


def _routing(fhir: FhirServer, public_url: str) -> dict[str, Any]:
    # one delivery at a time per worker (the in-process lock already serializes a worker's own): any
    # overlap on the Patient is between the two processes
    return {"mappings_dir": str(SHIPPED_MAPPINGS), "poll_interval": 0.05, "reload_interval": 0.5,
            "backoff_initial": 0.2, "backoff_max": 1.0, "public_url": public_url,
            "destinations": {"emr": {"type": "fhir", "url": fhir.url, "concurrency": 1}}}


def _store_studies_of_one_new_patient(dicomweb: str, pid: str) -> list[str]:
    """STUDIES studies of one patient the FHIR server has never seen, in one STOW-RS request: they go
    stable together and their deliveries are due at once."""
    studies = [generate_uid() for _ in range(STUDIES)]
    datasets = [make_dataset(study_uid=study, patient_id=pid, accession=f"ACC-{n}") for n, study in enumerate(studies)]
    body, content_type = multipart([to_bytes(ds) for ds in datasets])
    response = requests.post(f"{dicomweb}/studies", data=body, headers={"Content-Type": content_type}, timeout=60)
    assert response.status_code == 200, response.text[:500]
    return studies


def _wait_for_deliveries(read: Callable[[], list[Any]]) -> list[Any]:
    deadline = time.monotonic() + 90
    rows: list[Any] = []
    while time.monotonic() < deadline:
        rows = read()
        if len(rows) == STUDIES and all(r["status"] in ("done", "dead") for r in rows):
            break
        time.sleep(0.2)
    return rows


def _check(fhir: FhirServer, pid: str, public_url: str, studies: list[str], rows: list[Any],
           logs: list[str]) -> None:
    patients = _search(fhir, "Patient", f"urn:dicomflow:default:patient-id|{pid}")
    assert len(patients) == 1, f"{len(patients)} Patient resources for one patient identifier"
    endpoints = _search(fhir, "Endpoint", f"urn:dicomflow:endpoint|{public_url}/dicomweb")
    assert len(endpoints) == 1, f"{len(endpoints)} Endpoint resources for one DICOMweb root"
    for study in studies:
        found = _search(fhir, "ImagingStudy", f"urn:dicom:uid|urn:oid:{study}")
        assert len(found) == 1, study
        assert found[0]["subject"]["reference"] == f"Patient/{patients[0]['id']}"
    assert sorted(r["study_uid"] for r in rows) == sorted(studies)
    assert {(r["status"], r["attempts"]) for r in rows} == {("done", 1)}, \
        [(r["status"], r["attempts"], r["last_error"]) for r in rows]
    # both processes delivered: the Patient's conditional updates really came from two of them
    assert all(re.search(r"delivery \d+ route=studies-to-emr", log) for log in logs), logs
    patient_puts = [r for r in fhir.requests() if r["method"] == "PUT" and r["url"].startswith("/Patient")]
    assert sorted(r["status"] for r in patient_puts) == [200] * (STUDIES - 1) + [201]


def test_two_workers_on_postgresql_create_one_patient(
        pg_admin_url: str, seaweed: SeaweedS3, slow_fhir: FhirServer, tmp_path: Path) -> None:
    routes = tmp_path / "routes"
    routes.mkdir()
    (routes / "emr.yaml").write_text(ROUTE)
    tag = generate_uid()[-12:]
    pid, public_url = f"PID-RACE-{tag}", f"https://pacs-{tag}.example.org"
    topology = Topology(servers=1, workers=2, routes_dir=routes, pg_admin_url=pg_admin_url, seaweed=seaweed,
                        base=tmp_path / "topology", routing=_routing(slow_fhir, public_url))
    with topology:
        studies = _store_studies_of_one_new_patient(topology.server_processes[0].dicomweb, pid)
        rows = _wait_for_deliveries(lambda: run_async(_deliveries(topology.index_url)))
        logs = [w.log.read_text(errors="replace") for w in topology.worker_processes]
    _check(slow_fhir, pid, public_url, studies, rows, logs)


def test_serve_and_a_worker_on_one_sqlite_file_create_one_patient(slow_fhir: FhirServer, tmp_path: Path) -> None:
    """The embedded default with `dicomflow worker` beside `dicomflow serve` (both route) on one index."""
    routes = tmp_path / "routes"
    routes.mkdir()
    (routes / "emr.yaml").write_text(ROUTE)
    tag = generate_uid()[-12:]
    pid, public_url = f"PID-RACE-{tag}", f"https://pacs-{tag}.example.org"
    settings = Settings(data_dir=tmp_path / "data")
    config = write_config(settings, tmp_path / "settings.yaml",
                          routing={**_routing(slow_fhir, public_url), "routes_dir": str(routes)})
    server = ServerProcess(config, free_port(), tmp_path / "server.log")
    worker = WorkerProcess(config, tmp_path / "worker.log")
    database = tmp_path / "data" / "index.sqlite"

    def read() -> list[Any]:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as conn:
            conn.row_factory = sqlite3.Row
            return list(conn.execute("SELECT id, study_uid, status, attempts, last_error FROM deliveries"))

    try:
        server.start()  # creates the index
        worker.start()
        studies = _store_studies_of_one_new_patient(server.dicomweb, pid)
        rows = _wait_for_deliveries(read)
    finally:
        worker.stop()
        server.stop()
    _check(slow_fhir, pid, public_url, studies, rows,
           [server.log.read_text(errors="replace"), worker.log.read_text(errors="replace")])
