"""The real OHIF Viewer (3.13.2, prebuilt from npm, unmodified) on dicomflow's DICOMweb, in headless Chromium.

OHIF is served from an origin of its own and calls ``/dicomweb`` cross-origin, so every request goes
through CORS. The tests assert what a person sees (patient names in the study list, series thumbnails,
a rendered image in the viewport: screenshots saved under tmp_path) and what the browser's network log
shows: every DICOMweb request OHIF made answered 2xx with no CORS failure, and the requests a viewer
depends on happened (QIDO with tag-number keys, includefield, limit=101 and fuzzymatching; series
/metadata; frames with OHIF's loose ``Accept: multipart/related; type=application/octet-stream;
transfer-syntax=*``, received in their stored compressed syntax and decoded by OHIF; /thumbnail and
/rendered).
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest
import pytest_asyncio
from dicomweb_client.api import DICOMwebClient
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from tests.conftest import LiveServer, free_port, make_settings, running_server
from tests.factory import MR_IMAGE, US_MULTIFRAME, make_dataset
from tests.harness import ohif
from tests.harness.browser import Browser, Request
from tests.harness.ohif import ViewerTab as Viewer
from tests.harness.ohif import assert_all_ok

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

OHIF_FRAMES_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


@dataclass
class StoredStudy:
    uid: str
    shown_name: str  # as OHIF displays the Patient Name ("Family, Given")
    modality: str
    series: dict[str, list[str]]  # series uid -> SOP instance uids
    frames: int  # frames per instance
    media_type: str  # frames' media type as OHIF receives them (transfer-syntax=*: as stored)
    datasets: list[Dataset] = field(default_factory=list)


def _disc_phantom(rows: int, cols: int, slice_index: int) -> np.ndarray:
    """A body-like disc with an insert that moves from slice to slice (uint16, 0..2000)."""
    y, x = np.mgrid[0:rows, 0:cols]
    cy, cx = rows / 2, cols / 2
    image = np.where((y - cy) ** 2 + (x - cx) ** 2 < (0.42 * rows) ** 2, 800 + 6 * x, 0)
    iy, ix = cy - 8 + 4 * slice_index, cx + 6
    image = np.where((y - iy) ** 2 + (x - ix) ** 2 < 36, 1900, image)
    return image.astype(np.uint16)


def _color_frames(frames: int, rows: int, cols: int) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols]
    out = np.zeros((frames, rows, cols, 3), dtype=np.uint8)
    for f in range(frames):
        out[f, ..., 0] = (x * 255 // cols).astype(np.uint8)
        out[f, ..., 1] = (y * 255 // rows).astype(np.uint8)
        out[f, ..., 2] = np.where(abs(x - 8 - 12 * f) < 5, 230, 40).astype(np.uint8)
    return out


def _make_studies() -> list[StoredStudy]:
    geometry: dict[str, Any] = {"ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "PixelSpacing": [1, 1],
                                "SliceThickness": 2}
    studies = []
    # CT: five native (Explicit VR Little Endian) 64x64 slices
    ct = StoredStudy(generate_uid(), "Ohif, Alpha", "CT", {}, 1, "application/octet-stream")
    series, frame_of_reference = generate_uid(), generate_uid()
    for i in range(5):
        ds = make_dataset(study_uid=ct.uid, series_uid=series, instance_number=i + 1, rows=64, columns=64,
                          patient_name="Ohif^Alpha", patient_id="OHIF-1", accession="OHIF-ACC-1",
                          ImagePositionPatient=[0, 0, 2.0 * i], FrameOfReferenceUID=frame_of_reference,
                          WindowCenter=1000, WindowWidth=2000, **geometry)
        ds.PixelData = _disc_phantom(64, 64, i).tobytes()
        ct.datasets.append(ds)
    studies.append(ct)
    # MR: three JPEG 2000 Lossless slices, a Latin-1 patient name (ISO_IR 100)
    mr = StoredStudy(generate_uid(), "Ohif, Jérôme", "MR", {}, 1, "image/jp2")
    series, frame_of_reference = generate_uid(), generate_uid()
    for i in range(3):
        ds = make_dataset(study_uid=mr.uid, series_uid=series, instance_number=i + 1, rows=64, columns=64,
                          sop_class=MR_IMAGE, modality="MR", charset="ISO_IR 100", patient_name="Ohif^Jérôme",
                          patient_id="OHIF-2", accession="OHIF-ACC-2", study_date="20240220",
                          ImagePositionPatient=[0, 0, 5.0 * i], FrameOfReferenceUID=frame_of_reference,
                          **geometry)
        ds.PixelData = _disc_phantom(64, 64, i).tobytes()
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        mr.datasets.append(ds)
    studies.append(mr)
    # US: one RLE Lossless multi-frame RGB instance (4 frames)
    us = StoredStudy(generate_uid(), "Ohif, Gamma", "US", {}, 4, "image/dicom-rle")
    ds = make_dataset(study_uid=us.uid, sop_class=US_MULTIFRAME, modality="US", frames=4, bits=8, samples=3,
                      rows=48, columns=64, patient_name="Ohif^Gamma", patient_id="OHIF-3", accession="OHIF-ACC-3",
                      study_date="20240305", FrameTime=40.0, FrameIncrementPointer=0x00181063)
    ds.PixelData = _color_frames(4, 48, 64).tobytes()
    ds.compress(RLELossless, generate_instance_uid=False)
    us.datasets.append(ds)
    studies.append(us)
    # DOC: an Encapsulated PDF; OHIF follows the BulkDataURI of Encapsulated Document (0042,0011)
    doc = StoredStudy(generate_uid(), "Ohif, Delta", "DOC", {}, 0, "application/pdf")
    page = Image.new("RGB", (300, 200), "white")
    ImageDraw.Draw(page).rectangle((40, 40, 260, 160), fill="navy")
    buf = io.BytesIO()
    page.save(buf, "PDF")
    ds = make_dataset(study_uid=doc.uid, sop_class=ENCAPSULATED_PDF, modality="DOC", pixels=False,
                      patient_name="Ohif^Delta", patient_id="OHIF-4", accession="OHIF-ACC-4", study_date="20240410",
                      MIMETypeOfEncapsulatedDocument="application/pdf", BurnedInAnnotation="NO",
                      DocumentTitle="Report")
    ds.EncapsulatedDocument = buf.getvalue() + b"\0" * (len(buf.getvalue()) % 2)
    doc.datasets.append(ds)
    studies.append(doc)
    for study in studies:
        for ds in study.datasets:
            study.series.setdefault(str(ds.SeriesInstanceUID), []).append(str(ds.SOPInstanceUID))
    return studies


@dataclass
class Setup:
    server: LiveServer
    studies: list[StoredStudy]
    ohif_port: int


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """dicomflow on one origin (allowing OHIF's origin only), holding the studies stored with STOW-RS.

    Shared by the module's tests (they only read), like the OHIF site and the browser below.
    """
    ohif_port = free_port()
    settings = make_settings(tmp_path_factory.mktemp("dicomflow"),
                             http={"cors_origins": [f"http://127.0.0.1:{ohif_port}"]})
    with running_server(settings) as server:
        studies = _make_studies()
        client = DICOMwebClient(server.dicomweb)
        for study in studies:
            client.store_instances(study.datasets)
        yield Setup(server, studies, ohif_port)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(stored: Setup, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[str, Browser]]:
    """OHIF served on its own origin, and one headless Chromium for the module."""
    dist = await asyncio.to_thread(ohif.install)
    root = stored.server.dicomweb
    config = ohif.app_config([
        ohif.data_source(root),  # thumbnails: /thumbnail, fetched
        ohif.data_source(root, name="rendered", thumbnailRendering="rendered",
                         thumbnailRequestStrategy="bulkDataRetrieve"),  # thumbnails: /rendered
    ])
    async with ohif.OhifServer(dist, config, stored.ohif_port) as ohif_site, \
            Browser.launch(tmp_path_factory.mktemp("chromium") / "profile") as browser:
        yield ohif_site.url, browser


@pytest_asyncio.fixture(loop_scope="module")
async def viewer(stored: Setup, site: tuple[str, Browser], tmp_path: Path) -> AsyncIterator[Viewer]:
    """A fresh tab (its own network log); screenshots go to this test's tmp_path."""
    url, browser = site
    page = await browser.new_page()
    await page.add_init_script(ohif.SKIP_TOURS_JS)
    yield Viewer(page, url, stored.server.dicomweb, tmp_path)
    if page.exceptions:
        print("page exceptions:", *page.exceptions[:10], sep="\n  ")
    await page.close()


def _query(request: Request) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(request.url).query))


def _path(request: Request, root: str) -> str:
    return urlsplit(request.url).path.removeprefix(urlsplit(root).path)


async def test_study_list_shows_stored_studies_and_filters_by_name(stored: Setup, viewer: Viewer) -> None:
    page = viewer.page
    await page.goto(viewer.url + "/")
    names = [s.shown_name for s in stored.studies]
    await page.wait_for(f"{names!r}.every(n => document.body.innerText.includes(n))", 30,
                        f"patient names {names} in the study list", viewer.fail_on_errors)
    await viewer.settle()
    await viewer.save("study-list")
    text = await page.evaluate("document.body.innerText")
    for study in stored.studies:
        assert study.modality in text
    assert "1-4 of 4" in text.replace("\u2013", "-")

    # the patient-name filter: OHIF sends PatientName=*value* with fuzzymatching=true
    await page.evaluate(
        "(() => { const th = Array.from(document.querySelectorAll('*')).find(e => e.childElementCount <= 2"
        " && e.textContent.trim() === 'Patient').getBoundingClientRect();"
        " const input = Array.from(document.querySelectorAll('input')).find(i => {"
        "   const r = i.getBoundingClientRect();"
        "   return r.left >= th.left - 20 && r.left < th.right && r.top > th.top });"
        " input.focus(); return true })()")
    await page.send("Input.insertText", {"text": "jérô"})
    await page.wait_for("document.body.innerText.includes('Jérôme') && !document.body.innerText.includes('Alpha')"
                        " && !document.body.innerText.includes('Gamma') && !document.body.innerText.includes('Delta')",
                        20, "the list filtered to one patient", viewer.fail_on_errors)
    await viewer.settle()
    await viewer.save("study-list-filtered")

    requests = viewer.dicomweb_requests()
    assert_all_ok(requests)
    searches = [_query(r) for r in requests if _path(r, viewer.dicomweb) == "/studies"]
    assert any(q.get("limit") == "101" and q.get("offset") == "0" and q.get("fuzzymatching") == "true"
               and re.fullmatch(r"[0-9A-F]{8}(,[0-9A-F]{8})+", q.get("includefield", "")) for q in searches), searches
    assert any(q.get("PatientName") == "*jérô*" for q in searches), searches
    for r in requests:  # the server's CORS answer named OHIF's origin
        assert r.response_header("Access-Control-Allow-Origin") == viewer.url
    viewer.assert_no_errors()


@pytest.mark.parametrize("which", ["CT", "MR", "US"])
async def test_viewer_loads_thumbnails_and_renders_the_study(stored: Setup, viewer: Viewer, which: str) -> None:
    study = next(s for s in stored.studies if s.modality == which)
    await viewer.page.goto(f"{viewer.url}/viewer?StudyInstanceUIDs={study.uid}")
    await viewer.thumbnails_loaded(len(study.series))
    _png, std = await viewer.viewport_image(f"viewer-{which}")
    await viewer.settle()
    await viewer.save(f"viewer-{which}-page")
    requests = viewer.dicomweb_requests()
    assert_all_ok(requests)
    paths = [(_path(r, viewer.dicomweb), r) for r in requests]

    # QIDO: the study by UID (limit=101, includefield of tag numbers), its series, the patient's other
    # studies by tag-number key 00100020 (Patient ID)
    studies_q = [_query(r) for p, r in paths if p == "/studies"]
    assert any(q.get("StudyInstanceUID") == study.uid and q.get("limit") == "101" for q in studies_q), studies_q
    assert any("00100020" in q for q in studies_q), studies_q
    series_q = [_query(r) for p, r in paths if p == f"/studies/{study.uid}/series"]
    assert series_q and all(re.fullmatch(r"[0-9A-F]{8}(,[0-9A-F]{8})*", q["includefield"]) for q in series_q)
    # WADO-RS: series metadata for every series, then the frames of the displayed one with OHIF's Accept
    for series in study.series:
        assert f"/studies/{study.uid}/series/{series}/metadata" in [p for p, _r in paths]
    frames = [(p, r) for p, r in paths if "/frames/" in p]
    assert frames, "no frames requested"
    assert {r.header("Accept") for _p, r in frames} == {OHIF_FRAMES_ACCEPT}
    (series, sops), = study.series.items()
    wanted = {f"/studies/{study.uid}/series/{series}/instances/{sop}/frames/{n}"
              for sop in sops for n in range(1, study.frames + 1)}
    assert wanted <= {p for p, _r in frames}, sorted(wanted - {p for p, _r in frames})
    for _p, r in frames:  # stored syntax passed through (transfer-syntax=*), decoded by OHIF in the browser
        ctype = r.response_header("Content-Type") or ""
        assert ctype.startswith("multipart/related") and study.media_type in ctype, ctype
    thumbnails = [r for p, r in paths if p.endswith("/thumbnail")]
    assert thumbnails and all(r.mime_type == "image/jpeg" for r in thumbnails)
    assert std > 15
    viewer.assert_no_errors()


async def test_rendered_thumbnails_data_source(stored: Setup, viewer: Viewer) -> None:
    """OHIF's ``thumbnailRendering: rendered`` asks /rendered?accept=image/jpeg per series (its own route)."""
    study = next(s for s in stored.studies if s.modality == "US")
    await viewer.page.goto(f"{viewer.url}/viewer/rendered?StudyInstanceUIDs={study.uid}")
    await viewer.thumbnails_loaded(len(study.series))
    await viewer.viewport_image("viewer-rendered-US")
    await viewer.settle()
    requests = viewer.dicomweb_requests()
    assert_all_ok(requests)
    rendered = [r for r in requests if urlsplit(r.url).path.endswith("/rendered")]
    assert rendered, [str(r) for r in requests]
    assert all(_query(r).get("accept") == "image/jpeg" for r in rendered)
    # the thumbnail OHIF shows is the server-rendered JPEG: decode it from the page
    size = await viewer.page.evaluate(
        "(() => { const i = Array.from(document.querySelectorAll('img')).find(i => i.src.startsWith('blob:'));"
        " return [i.naturalWidth, i.naturalHeight] })()")
    assert size == [64, 48]
    viewer.assert_no_errors()


async def test_viewer_follows_bulkdata_uri_of_an_encapsulated_pdf(stored: Setup, viewer: Viewer) -> None:
    """OHIF's PDF viewport fetches Encapsulated Document through the BulkDataURI in the series metadata."""
    study = next(s for s in stored.studies if s.modality == "DOC")
    await viewer.page.goto(f"{viewer.url}/viewer?StudyInstanceUIDs={study.uid}")
    # headless Chromium has no PDF plugin: read back the document OHIF handed to its <object>
    size = await viewer.page.wait_for(
        "(async () => { const o = document.querySelector('object[type=\"application/pdf\"]');"
        " if (!o || !o.data) return null; const b = new Uint8Array(await (await fetch(o.data)).arrayBuffer());"
        " return [b.length, String.fromCharCode(...b.slice(0, 5))] })()", 30, "the PDF in OHIF's viewport",
        viewer.fail_on_errors)
    await viewer.settle()
    await viewer.save("viewer-DOC-page")
    requests = viewer.dicomweb_requests()
    assert_all_ok(requests)
    (ds,) = study.datasets
    assert size == [len(ds.EncapsulatedDocument), "%PDF-"]
    (series,) = study.series
    (sop,) = study.series[series]
    bulk = [r for r in requests if urlsplit(r.url).path.endswith(
        f"/studies/{study.uid}/series/{series}/instances/{sop}/bulkdata/00420011")]
    assert bulk and all(r.status == 200 for r in bulk), [str(r) for r in requests]
    viewer.assert_no_errors()
