"""Three `dicomflow serve` processes on one PostgreSQL + SeaweedFS, eight concurrent STOW clients
writing into the same studies and series: every instance is either stored or reported failed, the
study/series counters match, and every stored instance is found and retrieved from every server."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom.uid import generate_uid

from tests.conftest import free_port, make_settings
from tests.factory import make_dataset, multipart, to_bytes
from tests.harness.processes import ServerProcess, write_config

pytestmark = pytest.mark.integration

CLIENTS, REQUESTS, PER_REQUEST, STUDIES = 8, 10, 4, 3
MULTIPART = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _boundary(response: requests.Response) -> bytes:
    return ("--" + response.headers["Content-Type"].split("boundary=")[1].strip('"')).encode()


def test_three_servers_eight_clients(scaleout_backend: dict[str, Any], tmp_path: Path) -> None:
    settings = make_settings(tmp_path, **scaleout_backend)
    config = write_config(settings, tmp_path / "settings.yaml")
    servers = [ServerProcess(config, free_port(), tmp_path / f"server{n}.log") for n in range(3)]
    studies = [(generate_uid(), generate_uid()) for _ in range(STUDIES)]  # (study, series): shared by all
    sent: dict[str, tuple[str, bytes]] = {}
    stored: set[str] = set()
    failed: dict[str, int] = {}
    errors: list[str] = []
    lock = threading.Lock()
    rotation = itertools.count()

    def client(n: int) -> None:
        session = requests.Session()
        for r in range(REQUESTS):
            batch = []
            for k in range(PER_REQUEST):
                study, series = studies[(r + k) % STUDIES]
                ds = make_dataset(study_uid=study, series_uid=series, patient_id="PID-MP",
                                  instance_number=n * 1000 + r * 10 + k)
                batch.append((str(ds.SOPInstanceUID), study, to_bytes(ds)))
            body, content_type = multipart([data for _, _, data in batch])
            server = servers[next(rotation) % len(servers)]
            with lock:
                sent.update({sop: (study, data) for sop, study, data in batch})
            try:
                response = session.post(f"{server.dicomweb}/studies", data=body,
                                        headers={"Content-Type": content_type}, timeout=60)
            except requests.RequestException as exc:
                with lock:
                    errors.append(f"client {n}: {type(exc).__name__}")
                continue
            answer = response.json() if response.content else {}
            ok = {i["00081155"]["Value"][0] for i in answer.get("00081199", {}).get("Value", [])}
            bad = {i["00081155"]["Value"][0]: i["00081197"]["Value"][0]
                   for i in answer.get("00081198", {}).get("Value", [])}
            with lock:
                stored.update(ok)
                failed.update(bad)
                if response.status_code == 200 and len(ok) != len(batch):
                    errors.append(f"200 with {len(ok)} of {len(batch)} referenced")

    try:
        for server in servers:
            server.start()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)

        assert not errors, errors
        assert stored | set(failed) == set(sent), "every instance is either stored or reported failed"
        assert not stored & set(failed)
        assert not failed, f"failures under concurrency: {sorted(set(failed.values()))}"

        per_study: dict[str, set[str]] = {study: set() for study, _ in studies}
        for sop in stored:
            per_study[sent[sop][0]].add(sop)
        for server in servers:
            found = requests.get(f"{server.dicomweb}/studies", params={"PatientID": "PID-MP"}, timeout=30).json()
            counts = {s["0020000D"]["Value"][0]: s["00201208"]["Value"][0] for s in found}
            assert counts == {study: len(sops) for study, sops in per_study.items()}
            for study, series in studies:
                series_found = requests.get(f"{server.dicomweb}/studies/{study}/series", timeout=30).json()
                assert [(s["0020000E"]["Value"][0], s["00201209"]["Value"][0]) for s in series_found] == [
                    (series, len(per_study[study]))]
                response = requests.get(f"{server.dicomweb}/studies/{study}", headers={"Accept": MULTIPART},
                                        timeout=120)
                assert response.status_code == 200
                parts = response.content.split(_boundary(response))[1:-1]
                bodies = {part.split(b"\r\n\r\n", 1)[1][:-2] for part in parts}
                assert bodies == {sent[sop][1] for sop in per_study[study]}, "byte-exact from every server"
    finally:
        for server in servers:
            server.stop()
