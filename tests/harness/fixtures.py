"""pytest fixtures for real backing services: PostgreSQL and SeaweedFS S3 (started once per session), and
an OIDC provider (once per test module).

``pg_url`` is a fresh, empty database per test; ``s3_options`` a fresh prefix in a session bucket
and ``s3_bucket`` a fresh bucket (slower: ~1 s) on the session's ``seaweed``; ``provider`` an
oidc-provider that knows the clients of the test module's ``CLIENTS``. Services start only when a test
asks for them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from dicomflow.storage.s3 import S3Options
from tests.harness.oidc_provider import OidcProvider, start_provider
from tests.harness.postgres import ENV_URL, PgCluster, create_database, drop_database, run_async, upgrade_schema
from tests.harness.seaweed import SeaweedS3


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """URL of a database on a server where tests may create databases."""
    configured = os.environ.get(ENV_URL)
    if configured:
        yield configured
        return
    cluster = PgCluster.start()
    try:
        yield cluster.admin_url
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """``postgresql://...`` of an empty database of this test's own."""
    url = create_database(pg_admin_url)
    try:
        yield url
    finally:
        drop_database(pg_admin_url, url)


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedS3]:
    server = SeaweedS3.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(seaweed: SeaweedS3) -> Iterator[str]:
    """An empty bucket of this test's own (deleted with its objects afterwards)."""
    name = seaweed.create_bucket()
    try:
        yield name
    finally:
        seaweed.delete_bucket(name)


@pytest.fixture(scope="session")
def s3_shared_bucket(seaweed: SeaweedS3) -> str:
    """One bucket for the session (creating a SeaweedFS bucket allocates volumes: ~1 s)."""
    return seaweed.create_bucket()


@pytest.fixture
def s3_options(seaweed: SeaweedS3, s3_shared_bucket: str) -> S3Options:
    """Options for an S3 blob store under a prefix of this test's own in the session bucket."""
    return seaweed.options(s3_shared_bucket, prefix=f"t-{uuid.uuid4().hex[:12]}/", part_size=5 * 1024**2)


def scaleout_overrides(pg_url: str, seaweed: SeaweedS3, bucket: str, prefix: str) -> dict[str, object]:
    """Settings overrides for the scale-out backends: PostgreSQL index, S3 blobs on SeaweedFS."""
    return {
        "index": pg_url,
        "storage": f"s3://{bucket}/{prefix}",
        "s3": {"endpoint_url": seaweed.endpoint, "access_key_id": seaweed.access_key,
               "secret_access_key": seaweed.secret_key, "path_style": True, "max_attempts": 3,
               "connect_timeout": 2.0, "read_timeout": 20.0},
    }


@pytest.fixture
def scaleout_backend(pg_url: str, seaweed: SeaweedS3, s3_shared_bucket: str) -> dict[str, object]:
    """``make_settings`` overrides for scale-out: a fresh PostgreSQL database with the schema created
    as ``dicomflow db upgrade`` does, and a fresh prefix in the session's S3 bucket."""
    run_async(upgrade_schema(pg_url))
    return scaleout_overrides(pg_url, seaweed, s3_shared_bucket, f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["sqlite+file", pytest.param("postgresql+s3", marks=pytest.mark.integration)])
def backend_overrides(request: pytest.FixtureRequest) -> dict[str, object]:
    """``make_settings`` overrides for each pair of backends: the embedded default, and scale-out."""
    if request.param == "sqlite+file":
        return {}
    overrides: dict[str, object] = request.getfixturevalue("scaleout_backend")
    return overrides


@pytest.fixture(scope="module")
def provider(request: pytest.FixtureRequest) -> Iterator[OidcProvider]:
    """An OIDC provider for the test module, knowing the clients in its module-level ``CLIENTS`` list."""
    p = start_provider(request.module.CLIENTS)
    yield p
    p.stop()
