"""The local scale-out topology (tests/harness/topology.py) comes up and behaves as one store."""

from __future__ import annotations

import pytest
import requests

from tests.factory import make_dataset, multipart, to_bytes
from tests.harness.seaweed import SeaweedS3
from tests.harness.topology import Topology

pytestmark = pytest.mark.integration


def test_two_servers_and_a_worker(pg_admin_url: str, seaweed: SeaweedS3) -> None:
    with Topology(servers=2, workers=1, pg_admin_url=pg_admin_url, seaweed=seaweed) as topology:
        first, second = topology.server_processes
        assert all(w.process is not None and w.process.poll() is None for w in topology.worker_processes)
        ds = make_dataset(patient_id="PID-TOPOLOGY")
        body, content_type = multipart([to_bytes(ds)])
        stored = requests.post(f"{first.dicomweb}/studies", data=body, headers={"Content-Type": content_type},
                               timeout=60)
        assert stored.status_code == 200
        found = requests.get(f"{second.dicomweb}/studies", params={"PatientID": "PID-TOPOLOGY"}, timeout=30)
        assert [s["0020000D"]["Value"][0] for s in found.json()] == [ds.StudyInstanceUID]
        description = topology.describe()
        assert description["dicomweb"] == [first.dicomweb, second.dicomweb] and description["workers"] == 1
        assert description["storage"].startswith("s3://")
