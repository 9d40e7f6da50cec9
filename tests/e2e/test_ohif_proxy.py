"""OHIF and dicomflow behind one reverse proxy (same origin): URLs dicomflow hands out name the proxy.

A common deployment serves the viewer and ``/dicomweb`` from one public origin. dicomflow then sees the
proxy's request, not the browser's: the BulkDataURI values it writes into /metadata (which OHIF follows
as given, here for an Encapsulated PDF) must come from ``Forwarded`` (RFC 7239) or
``X-Forwarded-Host``/``-Proto``, or the browser would go around the proxy to the backend's address.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image, ImageDraw
from pydicom.uid import generate_uid

from tests.conftest import LiveServer, free_port
from tests.factory import make_dataset
from tests.harness import ohif
from tests.harness.browser import Browser

pytestmark = pytest.mark.e2e

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


@pytest.fixture
def backend(live_server_factory: Any) -> dict[str, Any]:
    """dicomflow allowing no cross-origin caller, holding a CT series and an Encapsulated PDF."""
    server: LiveServer = live_server_factory(http={"cors_origins": []})
    study = generate_uid()
    ct = [make_dataset(study_uid=study, series_uid=(series := generate_uid()) if i == 0 else series,
                       instance_number=i + 1, rows=64, columns=64, patient_name="Ohif^Proxied",
                       patient_id="OHIF-PROXY-1", ImagePositionPatient=[0, 0, 2.0 * i],
                       ImageOrientationPatient=[1, 0, 0, 0, 1, 0], PixelSpacing=[1, 1]) for i in range(3)]
    page = Image.new("RGB", (200, 100), "white")
    ImageDraw.Draw(page).ellipse((20, 20, 180, 80), fill="darkred")
    buf = io.BytesIO()
    page.save(buf, "PDF")
    pdf = make_dataset(study_uid=generate_uid(), sop_class=ENCAPSULATED_PDF, modality="DOC", pixels=False,
                       patient_name="Ohif^Proxied", patient_id="OHIF-PROXY-1", BurnedInAnnotation="NO",
                       MIMETypeOfEncapsulatedDocument="application/pdf", DocumentTitle="Report")
    pdf.EncapsulatedDocument = buf.getvalue() + b"\0" * (len(buf.getvalue()) % 2)
    DICOMwebClient(server.dicomweb).store_instances([*ct, pdf])
    return {"server": server, "ct": study, "pdf": pdf}


@pytest.mark.parametrize("forwarded", ["rfc7239", "x-forwarded"])
async def test_same_origin_deployment_behind_a_proxy(backend: dict[str, Any], tmp_path: Path,
                                                     forwarded: str) -> None:
    server: LiveServer = backend["server"]
    port = free_port()
    public_root = f"http://127.0.0.1:{port}/dicomweb"
    dist = await asyncio.to_thread(ohif.install)
    config = ohif.app_config([ohif.data_source(public_root)])
    async with ohif.OhifServer(dist, config, port, proxy={"/dicomweb": server.url}, forwarded=forwarded) as site, \
            Browser.launch(tmp_path / "chromium") as browser:
        page = await browser.new_page()
        await page.add_init_script(ohif.SKIP_TOURS_JS)
        tab = ohif.ViewerTab(page, site.url, public_root, tmp_path)

        def check() -> None:  # nothing goes around the proxy to the backend's own address
            tab.fail_on_errors()
            around = [str(r) for r in page.requests.values() if urlsplit(r.url).port == server.http_port]
            assert not around, f"requests that went around the proxy: {around}"

        await page.goto(f"{site.url}/viewer?StudyInstanceUIDs={backend['ct']}")
        await tab.thumbnails_loaded(1)
        await tab.viewport_image("viewer-CT")
        await tab.settle()

        pdf = backend["pdf"]
        await page.goto(f"{site.url}/viewer?StudyInstanceUIDs={pdf.StudyInstanceUID}")
        size = await page.wait_for(
            "(async () => { const o = document.querySelector('object[type=\"application/pdf\"]');"
            " if (!o || !o.data) return null; const b = new Uint8Array(await (await fetch(o.data)).arrayBuffer());"
            " return [b.length, String.fromCharCode(...b.slice(0, 5))] })()", 30, "the PDF in OHIF's viewport",
            check)
        await tab.settle()
        await tab.save("viewer-DOC")

    assert size == [len(pdf.EncapsulatedDocument), "%PDF-"]
    requests = tab.dicomweb_requests()
    ohif.assert_all_ok(requests)
    check()  # every URL OHIF used, including the BulkDataURI it followed, is the public one
    bulk = [r for r in requests if urlsplit(r.url).path.endswith(
        f"/instances/{pdf.SOPInstanceUID}/bulkdata/00420011")]
    assert bulk and bulk[0].url.startswith(public_root)
    assert any("/frames/" in r.url for r in requests)
    assert "/dicomweb" in {p[:9] for p in site.requests}
    tab.assert_no_errors()
