"""OHIF with a bearer token on a tenant's DICOMweb root: Authorization on every request, cross-origin.

OHIF puts the ``token`` URL parameter into ``Authorization: Bearer ...`` of every DICOMweb request. The
header is not CORS-safelisted, so each request is preceded by a preflight that dicomflow answers before
authentication; the token itself comes from a real OIDC provider (npm oidc-provider, client credentials)
and grants the ``viewer`` role (read, search) on tenant ``acme`` only.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from tests.conftest import LiveServer, free_port, make_settings, plain_tenants
from tests.factory import make_dataset
from tests.harness import ohif
from tests.harness.browser import Browser
from tests.harness.oidc_provider import OidcProvider

pytestmark = pytest.mark.e2e

CLIENTS = [
    {"client_id": "acme-viewer", "client_secret": "v1", "claims": {"tenants": {"acme": ["viewer"]}}},
    {"client_id": "acme-tech", "client_secret": "t1", "claims": {"tenants": {"acme": ["technologist"]}}},
    {"client_id": "globex-viewer", "client_secret": "g1", "claims": {"tenants": {"globex": ["viewer"]}}},
]


@pytest.fixture
def acme(live_server_factory: Any, tmp_path: Path, provider: OidcProvider) -> dict[str, Any]:
    """dicomflow with bearer-token auth; one CT study of 3 slices stored in tenant acme by a technologist."""
    ohif_port = free_port()
    settings = make_settings(
        tmp_path,
        tenants=plain_tenants(),
        auth=provider.auth_settings(),
        http={"cors_origins": [f"http://127.0.0.1:{ohif_port}"]},
    )
    server: LiveServer = live_server_factory(settings)
    study, series = generate_uid(), generate_uid()
    datasets = [make_dataset(study_uid=study, series_uid=series, instance_number=i + 1, rows=64, columns=64,
                             patient_name="Ohif^Secure", patient_id="OHIF-AUTH-1",
                             ImagePositionPatient=[0, 0, 3.0 * i], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                             PixelSpacing=[1, 1]) for i in range(3)]
    root = server.tenant_dicomweb("acme")
    DICOMwebClient(root, headers={"Authorization": f"Bearer {provider.token('acme-tech')}"}).store_instances(datasets)
    return {"root": root, "study": study, "series": series, "ohif_port": ohif_port}


async def _open(acme: dict[str, Any], tmp_path: Path, token: str, name: str,
                expect_image: bool) -> ohif.ViewerTab:
    dist = await asyncio.to_thread(ohif.install)
    config = ohif.app_config([ohif.data_source(acme["root"])])
    async with ohif.OhifServer(dist, config, acme["ohif_port"]) as site, \
            Browser.launch(tmp_path / f"chromium-{name}") as browser:
        page = await browser.new_page()
        await page.add_init_script(ohif.SKIP_TOURS_JS)
        tab = ohif.ViewerTab(page, site.url, acme["root"], tmp_path)
        await page.goto(f"{site.url}/viewer?StudyInstanceUIDs={acme['study']}&token={token}")
        if expect_image:
            await tab.thumbnails_loaded(1)
            await tab.viewport_image(f"viewer-{name}")
        else:
            await page.wait_for("document.body.innerText.includes('requested studies are not available')", 30,
                                "OHIF's 'not available' page")
        await tab.settle()
        await tab.save(f"page-{name}")
        return tab


async def test_viewer_sends_the_bearer_token_on_every_request(acme: dict[str, Any], provider: OidcProvider,
                                                              tmp_path: Path) -> None:
    token = provider.token("acme-viewer")
    tab = await _open(acme, tmp_path, token, "acme-viewer", expect_image=True)
    requests = [r for r in tab.dicomweb_requests() if r.method != "OPTIONS"]
    ohif.assert_all_ok(requests)
    assert {r.header("Authorization") for r in requests} == {f"Bearer {token}"}
    assert any("/frames/" in r.url for r in requests)
    assert any(r.url.endswith("/metadata") for r in requests)
    # CORS preflights (Authorization is not a safelisted header), answered without credentials
    preflights = [r for r in tab.dicomweb_requests() if r.method == "OPTIONS"]
    assert preflights
    assert all(r.status == 204 and r.header("Access-Control-Request-Headers") == "authorization"
               and r.header("Authorization") is None for r in preflights), [str(r) for r in preflights]
    tab.assert_no_errors()


async def test_token_of_another_tenant_sees_nothing(acme: dict[str, Any], provider: OidcProvider,
                                                    tmp_path: Path) -> None:
    """A globex viewer's token on acme's root: every request answers as if acme did not exist (404)."""
    tab = await _open(acme, tmp_path, provider.token("globex-viewer"), "globex-viewer", expect_image=False)
    requests = [r for r in tab.dicomweb_requests() if r.method != "OPTIONS"]
    assert requests
    assert {r.status for r in requests} == {404}  # readable by the page: no CORS failure
    assert not any("/frames/" in r.url for r in requests)
