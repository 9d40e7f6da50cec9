"""Test data round-trips byte-exact through STOW-RS and WADO-RS instance retrieve (issue 2, item 9).

Every file among pydicom's test files (bundled, plus pydicom-data's: a dev dependency) that is a
valid Part 10 composite instance (pydicom reads it without ``force``; it carries the four UIDs, valid
per PS3.5 9.1) is stored and retrieved with ``transfer-syntax=*`` and must come back byte for byte;
the others (raw data sets, JSON, DICOMDIRs, truncated files) must be refused with a 4xx, never a 5xx.
Generated instances cover what no sample shows (MG, whole slide, ophthalmic, SEG...) in every
transfer syntax and character set.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from tests.conftest import LiveServer, make_settings, running_server
from tests.factory import (
    MR_IMAGE,
    NON_ASCII_NAMES,
    make_dataset,
    make_mg,
    make_named,
    make_ophthalmic,
    make_rt_dose,
    make_seg,
    make_sr,
    make_us_multiframe,
    make_whole_slide,
    multipart,
    split_multipart,
    store_state,
    to_bytes,
    with_transfer_syntax,
)

pytestmark = pytest.mark.e2e

ANY_TS = 'multipart/related; type="application/dicom"; transfer-syntax=*'

#: pydicom samples that are not storable composite instances, and why (they must get a 4xx)
NOT_STORABLE = {
    "MR_truncated.dcm": "pixel data cut short",
    "rtplan_truncated.dcm": "a value runs past the end of the file",
    "emri_small_jpeg_2k_lossless_too_short.dcm": "encapsulated pixel data cut short",  # pydicom-data
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with running_server(make_settings(tmp_path_factory.mktemp("roundtrip"), routing={"enabled": False})) as live:
        yield live


def _storable(path: str) -> bool:
    """Independent of our parser: pydicom reads it as Part 10 and it has the four UIDs."""
    if Path(path).name in NOT_STORABLE:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return False
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
        return False
    uids = [ds.get(k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")]
    return all(uid and pydicom.uid.UID(str(uid)).is_valid for uid in uids)  # PS3.5 9.1 syntax


def roundtrip(server: LiveServer, data: bytes, tenant_url: str | None = None) -> tuple[int, bytes | None]:
    """STOW one instance, fetch it back with WADO-RS (any transfer syntax), then DELETE it."""
    root = tenant_url or server.dicomweb
    body, ctype = multipart([data])
    resp = requests.post(f"{root}/studies", data=body, headers={"Content-Type": ctype}, timeout=60)
    if resp.status_code not in (200, 202):
        return resp.status_code, None
    url = resp.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
    got = requests.get(url, headers={"Accept": ANY_TS}, timeout=60)
    assert got.status_code == 200, url
    (content,) = split_multipart(got.content, got.headers["Content-Type"])
    study_url = url.split("/series/")[0]
    assert requests.delete(study_url, timeout=60).status_code in (200, 202, 204)
    return resp.status_code, content


def test_every_pydicom_sample_round_trips_or_is_refused_with_4xx(server: LiveServer) -> None:
    files = sorted(f for f in get_testdata_files() if os.path.isfile(f))
    stored, refused, wrong = [], [], []
    for path in files:
        data = Path(path).read_bytes()
        status, content = roundtrip(server, data)
        if _storable(path):
            if content != data:
                wrong.append((Path(path).name, status, "not stored" if content is None else "bytes differ"))
            stored.append(path)
        else:
            if not 400 <= status < 500:
                wrong.append((Path(path).name, status, "not refused with a 4xx"))
            refused.append(path)
    assert wrong == []
    assert len(stored) >= 100 and len(refused) >= 20
    assert {Path(p).name for p in refused} >= set(NOT_STORABLE) - {"emri_small_jpeg_2k_lossless_too_short.dcm"}
    state = store_state(server.settings)  # every study was deleted again: nothing left behind
    assert state.instances == [] and state.blobs == [] and state.spool == []
    assert len(state.events("instance.stored")) == len(stored) == len(state.events("study.deleted"))


GENERATORS: dict[str, Callable[[], Dataset]] = {
    "ct": lambda: make_dataset(rows=64, columns=64),
    "mr": lambda: make_dataset(sop_class=MR_IMAGE, modality="MR", rows=64, columns=64),
    "us-multiframe": lambda: make_us_multiframe(frames=3),
    "mg": lambda: make_mg(rows=64, columns=64),
    "rt-dose": lambda: make_rt_dose(frames=2, rows=64, columns=64),
    "whole-slide": make_whole_slide,
    "ophthalmic": make_ophthalmic,
    "sr": make_sr,
    "seg": make_seg,
    **{f"name-{k}": (lambda k=k: make_named(k)) for k in NON_ASCII_NAMES},  # type: ignore[misc]
}

NATIVE = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]


def _cases() -> list[tuple[str, str]]:
    cases = [(kind, str(ts)) for kind in GENERATORS for ts in NATIVE]
    cases += [(kind, str(RLELossless)) for kind in ("ct", "mr", "us-multiframe", "rt-dose", "whole-slide")]
    cases += [(kind, str(JPEG2000Lossless)) for kind in ("ct", "mg")]
    cases += [("ct", str(JPEG2000))]
    cases += [(kind, str(JPEGBaseline8Bit)) for kind in ("us-multiframe", "whole-slide", "ophthalmic")]
    return [c for c in cases if not (c[0] in ("sr", "seg") and c[1] == str(ExplicitVRBigEndian))]


@pytest.mark.parametrize("kind,transfer_syntax", _cases())
def test_generated_instances_round_trip(server: LiveServer, kind: str, transfer_syntax: str) -> None:
    data = to_bytes(with_transfer_syntax(GENERATORS[kind](), transfer_syntax))
    status, content = roundtrip(server, data)
    assert status == 200
    assert content == data


@pytest.mark.parametrize("which", sorted(NON_ASCII_NAMES))
def test_non_ascii_names_through_dicomweb_client(server: LiveServer, which: str) -> None:
    """dicomweb-client stores and retrieves; the decoded Patient Name is the one written."""
    ds = make_named(which)
    client = DICOMwebClient(server.dicomweb)
    client.store_instances([ds])
    got = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                   media_types=(("application/dicom", "*"),))
    assert str(got.PatientName) == NON_ASCII_NAMES[which][1]
    assert got.SpecificCharacterSet == ds.SpecificCharacterSet
    client.delete_study(ds.StudyInstanceUID)
