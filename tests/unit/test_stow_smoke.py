"""STOW-RS basics through the in-process client (fuller coverage lives in tests/e2e)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.factory import make_instance, multipart

pytestmark = pytest.mark.routing_off  # only the STOW handler is under test here


async def test_stow_stores_and_reports_retrieve_url(client: Any) -> None:
    body, ctype = multipart([make_instance(study_uid="1.2.3.4", sop_uid="1.2.3.4.5.1")])
    resp = await client.post("/dicomweb/studies", data=body, headers={"Content-Type": ctype})
    assert resp.status == 200
    result = await resp.json()
    ref = result["00081199"]["Value"][0]
    assert ref["00081155"]["Value"] == ["1.2.3.4.5.1"]
    assert ref["00081190"]["Value"][0].endswith("/dicomweb/studies/1.2.3.4/series/"
                                                 + ref["00081190"]["Value"][0].split("/series/")[1])
    assert result["00081190"]["Value"] == [f"http://{client.host}:{client.port}/dicomweb/studies/1.2.3.4"]


async def test_stow_rejects_non_multipart_with_415(client: Any) -> None:
    resp = await client.post("/dicomweb/studies", data=b"x", headers={"Content-Type": "application/dicom"})
    assert resp.status == 415


async def test_unknown_tenant_is_404(client: Any) -> None:
    body, ctype = multipart([make_instance()])
    resp = await client.post("/tenants/nobody/dicomweb/studies", data=body, headers={"Content-Type": ctype})
    assert resp.status == 404
