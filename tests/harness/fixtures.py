"""pytest fixtures for real backing services: PostgreSQL and SeaweedFS S3 (started once per session).

``pg_url`` is a fresh, empty database per test; ``s3_options`` a fresh prefix in a session bucket
and ``s3_bucket`` a fresh bucket (slower: ~1 s) on the session's ``seaweed``. Services start only
when a test asks for them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from dicomflow.storage.s3 import S3Options
from tests.harness.postgres import ENV_URL, PgCluster, create_database, drop_database
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
