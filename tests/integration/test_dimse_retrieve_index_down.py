"""C-MOVE and C-GET while the index does not answer (PostgreSQL stopped): 0xA701, then served again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomflow.settings import RemoteNode, TenantSettings
from tests.factory import make_dataset
from tests.harness.postgres import PgCluster, run_async, upgrade_schema
from tests.integration.dcmtk import dimse_server, dimse_status, run, storescp, storescu, write_instances

pytestmark = pytest.mark.integration


@pytest.fixture
def private_cluster() -> Iterator[PgCluster]:
    """A cluster of this test's own: it gets stopped, which the shared one must not be."""
    cluster = PgCluster.start()
    try:
        run_async(upgrade_schema(cluster.admin_url))
        yield cluster
    finally:
        cluster.stop()


def test_index_down_is_a701_for_move_and_get(live_server_factory: Any, tmp_path: Path,
                                             private_cluster: PgCluster) -> None:
    """PS3.4 C.4.2.1.5 / C.4.3.1.4: 0xA701 Refused: Out of Resources - Unable to calculate number of
    matches, answered before any sub-operation; once PostgreSQL is back the same requests are served."""
    ds = make_dataset()
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}"]
    with storescp(tmp_path / "recv", "DEST") as dest:
        node = RemoteNode(ae_title="DEST", host="127.0.0.1", port=dest.port)
        tenants = {"default": TenantSettings(ae_titles=["DICOMFLOW"], remote_nodes={"dest": node})}
        server = dimse_server(live_server_factory, tmp_path, tenants=tenants, index=private_cluster.admin_url,
                              dimse={"dimse_timeout": 10.0})
        port = str(server.settings.dimse.port)
        storescu(server, write_instances(tmp_path / "in", [ds]))

        def move() -> str:
            proc = run(["movescu", "-d", "-S", "-aec", "DICOMFLOW", "-aet", "MOVESCU", "-aem", "DEST", *keys,
                        "127.0.0.1", port])
            return proc.stdout + proc.stderr

        def get(out: Path) -> str:
            out.mkdir(parents=True, exist_ok=True)
            proc = run(["getscu", "-d", "-S", "-aec", "DICOMFLOW", "-aet", "GETSCU", "-od", str(out), *keys,
                        "127.0.0.1", port])
            return proc.stdout + proc.stderr

        private_cluster.pause()
        try:
            output = move()
            assert dimse_status(output) == 0xA701, output
            output = get(tmp_path / "down")
            assert dimse_status(output) == 0xA701, output
            assert dest.files() == [] and list((tmp_path / "down").iterdir()) == []
        finally:
            private_cluster.resume()
        output = move()
        assert dimse_status(output) == 0x0000, output
        assert len(dest.wait_files(1)) == 1
        output = get(tmp_path / "up")
        assert dimse_status(output) == 0x0000, output
        assert len(list((tmp_path / "up").iterdir())) == 1
