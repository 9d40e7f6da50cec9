"""The scale-out topology from local processes: PostgreSQL + SeaweedFS S3 + N servers + M route workers.

The same shape as a deployment behind a load balancer, without Docker, for tests and for trying it out::

    .venv/bin/python -m tests.harness.topology --servers 3 --workers 2 [--routes-dir routes]

prints the endpoints as JSON and runs until Ctrl-C. ``Topology`` does the same inside a test.
With workers, the servers' own routing is switched off so that only the workers deliver.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from dicomflow.settings import Settings
from tests.harness.fixtures import scaleout_overrides
from tests.harness.postgres import PgCluster, create_database, drop_database, free_port, run_async, upgrade_schema
from tests.harness.processes import ServerProcess, WorkerProcess, write_config
from tests.harness.seaweed import SeaweedS3


@dataclass
class Topology:
    servers: int = 3
    workers: int = 0
    routes_dir: Path | None = None
    dimse: bool = False
    #: more ``routing`` settings for servers and workers (destinations, mappings_dir, poll_interval, ...)
    routing: dict[str, Any] = field(default_factory=dict)
    #: an existing PostgreSQL to create the database on (else a private cluster)
    pg_admin_url: str | None = None
    #: an existing SeaweedFS (else a private one)
    seaweed: SeaweedS3 | None = None
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dicomflow-topology-")))
    server_processes: list[ServerProcess] = field(default_factory=list)
    worker_processes: list[WorkerProcess] = field(default_factory=list)
    index_url: str = ""
    storage_url: str = ""
    _cluster: PgCluster | None = None
    _own_seaweed: bool = False

    def start(self) -> Topology:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        if self.pg_admin_url is None:
            self._cluster = PgCluster.start()
            self.pg_admin_url = self._cluster.admin_url
        self.index_url = create_database(self.pg_admin_url)

        run_async(upgrade_schema(self.index_url))  # what `dicomflow db upgrade` does before a rollout
        if self.seaweed is None:
            self.seaweed, self._own_seaweed = SeaweedS3.start(), True
        bucket = self.seaweed.create_bucket()
        overrides = scaleout_overrides(self.index_url, self.seaweed, bucket, f"t-{uuid.uuid4().hex[:8]}")
        self.storage_url = str(overrides["storage"])
        settings = Settings(data_dir=self.base / "data", **overrides)  # type: ignore[arg-type]
        routing: dict[str, Any] = {**self.routing, "enabled": self.workers == 0}
        if self.routes_dir is not None:
            routing["routes_dir"] = str(self.routes_dir.resolve())
        extra: dict[str, Any] = {"dimse": {"enabled": self.dimse}}
        server_config = write_config(settings, self.base / "server.yaml", routing=routing, **extra)
        worker_config = write_config(settings, self.base / "worker.yaml", routing={**routing, "enabled": True})
        for n in range(self.servers):
            server = ServerProcess(server_config, free_port(), self.base / f"server{n}.log",
                                   dimse_port=free_port() if self.dimse else None)
            self.server_processes.append(server)
            server.start()
        for n in range(self.workers):
            worker = WorkerProcess(worker_config, self.base / f"worker{n}.log")
            self.worker_processes.append(worker)
            worker.start()

    def describe(self) -> dict[str, Any]:
        return {
            "dicomweb": [s.dicomweb for s in self.server_processes],
            "dimse": [f"127.0.0.1:{s.dimse_port}" for s in self.server_processes if s.dimse_port],
            "workers": len(self.worker_processes),
            "index": self.index_url,
            "storage": self.storage_url,
            "s3_endpoint": self.seaweed.endpoint if self.seaweed else None,
            "logs": str(self.base),
        }

    def stop(self) -> None:
        for process in [*self.worker_processes, *self.server_processes]:
            process.stop()
        if self._own_seaweed and self.seaweed is not None:
            self.seaweed.stop()
        if self._cluster is not None:
            self._cluster.stop()
        elif self.index_url and self.pg_admin_url:
            drop_database(self.pg_admin_url, self.index_url)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Topology:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.topology", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--routes-dir", type=Path)
    parser.add_argument("--dimse", action="store_true", help="also serve DIMSE, one port per server")
    args = parser.parse_args(argv)
    done = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with Topology(args.servers, args.workers, args.routes_dir, args.dimse) as topology:
        sys.stdout.write(json.dumps(topology.describe(), indent=2) + "\n")
        sys.stdout.flush()
        done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
