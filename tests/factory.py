"""Synthetic DICOM instances for tests (made with pydicom; no real patient data)."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

#: Every test patient name component and ID generated in this run: the log check in tests/conftest.py
#: fails the run if any of them appears in a log record at INFO or above (no PHI in logs).
PHI_SEEN: set[str] = set()

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"


def make_dataset(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    sop_class: str = CT_IMAGE,
    modality: str = "CT",
    patient_name: str = "Doe^John",
    patient_id: str = "PID-0001",
    study_date: str = "20240115",
    study_time: str = "101500",
    accession: str = "ACC-0001",
    series_number: int = 1,
    instance_number: int = 1,
    rows: int = 16,
    columns: int = 16,
    frames: int = 1,
    bits: int = 16,
    samples: int = 1,
    charset: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    pixels: bool = True,
    **extra: Any,
) -> Dataset:
    """A small but complete instance with native pixel data (compress it with ds.compress if needed)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    sop = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1045.1"
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    # only values long enough to mean something: an empty or 1-character ID would match every log line
    PHI_SEEN.update(c for c in (patient_id, *patient_name.replace("=", "^").split("^")) if len(c) >= 4)
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = study_date
    ds.StudyTime = study_time
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = "Ref^Doctor"
    ds.StudyID = "S1"
    ds.StudyDescription = "Synthetic study"
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"Synthetic {modality} series"
    ds.InstanceNumber = instance_number
    for key, value in extra.items():
        setattr(ds, key, value)
    if pixels:
        ds.Rows = rows
        ds.Columns = columns
        ds.SamplesPerPixel = samples
        ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
        if samples == 3:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = bits
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 0
        if frames > 1:
            ds.NumberOfFrames = frames
        dtype = np.uint16 if bits == 16 else np.uint8
        shape: tuple[int, ...] = (rows, columns) if samples == 1 else (rows, columns, samples)
        if frames > 1:
            shape = (frames, *shape)
        rng = np.random.default_rng(instance_number)
        arr = rng.integers(0, 2 ** min(bits, 12), size=shape, dtype=dtype)
        ds.PixelData = arr.tobytes()
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """Part 10 bytes of a dataset (with preamble and file meta)."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def make_instance(**kwargs: Any) -> bytes:
    return to_bytes(make_dataset(**kwargs))


def multipart(parts: list[bytes], boundary: str = "dicomflow-test-boundary",
              part_type: str = "application/dicom") -> tuple[bytes, str]:
    """A multipart/related body and its Content-Type header."""
    out = io.BytesIO()
    for part in parts:
        out.write(f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode())
        out.write(part)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f'multipart/related; type="application/dicom"; boundary={boundary}'


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The part bodies of a multipart/related message (PS3.18 8.7.1), given its Content-Type header."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    assert match, content_type
    parts = []
    for chunk in body.split(b"--" + match.group(1).encode())[1:]:
        if chunk.startswith(b"--"):
            break
        _headers, _, content = chunk.partition(b"\r\n\r\n")
        parts.append(content.removesuffix(b"\r\n"))
    return parts


async def get_multipart(url: str, accept: str | None,
                        session: aiohttp.ClientSession | None = None) -> tuple[int, str, list[tuple[str, bytes]]]:
    """GET ``url`` and read the answer with aiohttp's multipart reader: the status, the Content-Type and the
    (Content-Type, body) of every part ([] unless the status is 200)."""
    headers = {"Accept": accept} if accept is not None else {}
    async with contextlib.AsyncExitStack() as stack:
        if session is None:
            session = await stack.enter_async_context(aiohttp.ClientSession())
        resp = await stack.enter_async_context(session.get(url, headers=headers))
        if resp.status != 200:
            return resp.status, resp.headers.get("Content-Type", ""), []
        reader = aiohttp.MultipartReader.from_response(resp)
        parts = []
        while (part := await reader.next()) is not None:
            assert isinstance(part, aiohttp.BodyPartReader)
            parts.append((part.headers["Content-Type"], bytes(await part.read())))
        return resp.status, resp.headers["Content-Type"], parts


# -- more modalities, transfer syntaxes and character sets (issue 2, item 9) --------------------------

MG_IMAGE = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image - For Presentation
RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"
VL_WHOLE_SLIDE = "1.2.840.10008.5.1.4.1.1.77.1.6"
OPHTHALMIC_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


def make_us_multiframe(frames: int = 4, **kwargs: Any) -> Dataset:
    """US Multi-frame Image, RGB 8-bit."""
    kwargs.setdefault("modality", "US")
    return make_dataset(sop_class=US_MULTIFRAME, frames=frames, bits=8, samples=3, rows=24, columns=32,
                        FrameTime=33.3, FrameIncrementPointer=0x00181063, **kwargs)


def make_mg(**kwargs: Any) -> Dataset:
    kwargs.setdefault("modality", "MG")
    return make_dataset(sop_class=MG_IMAGE, ImageLaterality="L", ViewPosition="CC",
                        PresentationIntentType="FOR PRESENTATION", **kwargs)


def make_rt_dose(frames: int = 3, **kwargs: Any) -> Dataset:
    """RT Dose with a multi-frame dose grid (FrameIncrementPointer is an AT value)."""
    kwargs.setdefault("modality", "RTDOSE")
    return make_dataset(sop_class=RT_DOSE, frames=frames, bits=16, DoseUnits="GY", DoseType="PHYSICAL",
                        DoseSummationType="PLAN", DoseGridScaling=0.001,
                        GridFrameOffsetVector=[float(i) * 2.5 for i in range(frames)],
                        FrameIncrementPointer=0x3004000C, **kwargs)


def make_whole_slide(frames: int = 4, **kwargs: Any) -> Dataset:
    """VL Whole Slide Microscopy Image, TILED_FULL, RGB 8-bit tiles."""
    kwargs.setdefault("modality", "SM")
    ds = make_dataset(sop_class=VL_WHOLE_SLIDE, frames=frames, bits=8, samples=3, rows=16, columns=16,
                      ImageType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"],
                      DimensionOrganizationType="TILED_FULL", TotalPixelMatrixColumns=32,
                      TotalPixelMatrixRows=32, TotalPixelMatrixFocalPlanes=1, ContainerIdentifier="SLIDE-1",
                      **kwargs)
    return ds


def make_ophthalmic(**kwargs: Any) -> Dataset:
    """Ophthalmic Photography 8 Bit Image, RGB."""
    kwargs.setdefault("modality", "OP")
    return make_dataset(sop_class=OPHTHALMIC_8BIT, bits=8, samples=3, rows=24, columns=24,
                        ImageLaterality="R", **kwargs)


def _quiet_highdicom() -> None:
    # highdicom logs what it copies ("copy Patient-related attributes ...") at INFO: test-side noise that
    # the no-PHI-in-logs check (tests/conftest.py) would match against names like "Secret^Patient"
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def make_sr(**kwargs: Any) -> Dataset:
    """A Comprehensive SR document made with highdicom (nested content sequences, code items)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    _quiet_highdicom()
    evidence = make_dataset(study_uid=kwargs.pop("study_uid", None))
    item = hd.sr.TextContentItem(name=codes.DCM.Finding, value="No abnormality",
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport, template_id="1500")
    root.ContentSequence = [item]
    sr = hd.sr.ComprehensiveSR(
        evidence=[evidence], content=root, series_instance_uid=kwargs.pop("series_uid", None) or generate_uid(),
        series_number=kwargs.pop("series_number", 10), sop_instance_uid=kwargs.pop("sop_uid", None) or generate_uid(),
        instance_number=kwargs.pop("instance_number", 1), manufacturer="dicomflow tests", **kwargs)
    return sr


def make_seg(source: Dataset | None = None, **kwargs: Any) -> Dataset:
    """A binary Segmentation of ``source`` (a CT made here by default), made with highdicom."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    _quiet_highdicom()
    src = source or make_dataset(ImageOrientationPatient=[1, 0, 0, 0, 1, 0], ImagePositionPatient=[0, 0, 0],
                                 PixelSpacing=[1, 1], SliceThickness=1, FrameOfReferenceUID=generate_uid())
    mask = np.zeros((1, src.Rows, src.Columns), dtype=bool)
    mask[0, 2:8, 2:8] = True
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    return hd.seg.Segmentation(
        source_images=[src], pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc], series_instance_uid=kwargs.pop("series_uid", None) or generate_uid(),
        series_number=kwargs.pop("series_number", 20), sop_instance_uid=kwargs.pop("sop_uid", None) or generate_uid(),
        instance_number=kwargs.pop("instance_number", 1), manufacturer="dicomflow tests",
        manufacturer_model_name="factory", software_versions="1", device_serial_number="1", **kwargs)


def with_transfer_syntax(ds: Dataset, transfer_syntax: str) -> Dataset:
    """``ds`` re-encoded in ``transfer_syntax`` (native, big endian, deflate, RLE, JPEG baseline, JPEG 2000)."""
    from pydicom import uid

    ds = copy.deepcopy(ds)
    ts = uid.UID(transfer_syntax)
    if ts in (uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = ts
    elif ts == uid.ExplicitVRBigEndian:
        if int(ds.BitsAllocated) > 8:  # pydicom writes pixel data as given: swap the 16-bit words
            ds.PixelData = np.frombuffer(ds.PixelData, dtype="<u2").astype(">u2").tobytes()
        ds.file_meta.TransferSyntaxUID = ts
    elif ts == uid.JPEGBaseline8Bit:
        ds = _jpeg_baseline(ds)
    elif ts == uid.JPEG2000:
        ds.compress(ts, j2k_cr=[10])  # lossy JPEG 2000 needs a compression ratio
    else:  # RLE Lossless, JPEG 2000 Lossless (at least 64x64 pixels): pydicom's own encoders
        ds.compress(ts)
    return ds


def _jpeg_baseline(ds: Dataset) -> Dataset:
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    if int(ds.BitsAllocated) != 8:
        raise ValueError("JPEG baseline needs 8-bit samples")
    arr = ds.pixel_array
    frames = arr if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 else arr[None]
    encoded = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=90)
        encoded.append(buf.getvalue())
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if int(ds.SamplesPerPixel) == 3:
        ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.LossyImageCompression = "01"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds


#: Patient names in the three character sets the issue names (PS3.5 Annex H/I examples).
NON_ASCII_NAMES: dict[str, tuple[str | list[str], str]] = {
    "latin1": ("ISO_IR 100", "Buc^Jérôme"),
    "utf8": ("ISO_IR 192", "Wang^XiaoDong=王^小東"),
    "jis": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
}


def make_named(which: str, **kwargs: Any) -> Dataset:
    """A CT whose Patient Name needs the character set ``which`` (a key of :data:`NON_ASCII_NAMES`)."""
    charset, name = NON_ASCII_NAMES[which]
    ds = make_dataset(patient_name=name, **kwargs)
    ds.SpecificCharacterSet = charset
    return ds


@dataclass
class StoreState:
    """What the embedded store holds on disk, read directly (SQLite file and blob folder)."""

    instances: list[tuple[str, str, str, str, str]]  # tenant, study, series, sop, blob_key
    series: dict[tuple[str, str], tuple[str, int]]  # (tenant, series) -> (study, num_instances)
    studies: dict[tuple[str, str], tuple[int, int, str | None]]  # -> (num_series, num_instances, modalities)
    outbox: list[tuple[str, str, str | None]]  # tenant, event, sop_uid
    blobs: list[str]  # keys (paths under the blob root, spool excluded)
    spool: list[str]

    def events(self, event: str) -> list[tuple[str, str, str | None]]:
        return [e for e in self.outbox if e[1] == event]


def store_state(settings: Any) -> StoreState:
    """Read the SQLite index and blob folder of a server built from ``settings`` (embedded default)."""
    import sqlite3
    from pathlib import Path
    from urllib.parse import urlparse

    db = settings.index_url.removeprefix("sqlite:///")
    root = Path(urlparse(settings.storage_url).path)
    con = sqlite3.connect(db)
    try:
        instances = [tuple(r) for r in con.execute(
            "select tenant, study_uid, series_uid, sop_uid, blob_key from instances order by sop_uid")]
        series = {(r[0], r[1]): (r[2], r[3]) for r in con.execute(
            "select tenant, series_uid, study_uid, num_instances from series")}
        studies = {(r[0], r[1]): (r[2], r[3], r[4]) for r in con.execute(
            "select tenant, study_uid, num_series, num_instances, modalities_in_study from studies")}
        outbox = [tuple(r) for r in con.execute("select tenant, event, sop_uid from outbox order by id")]
    finally:
        con.close()
    spool_dir = root / ".spool"
    blobs = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and spool_dir not in p.parents)
    spool = sorted(p.name for p in spool_dir.glob("*")) if spool_dir.is_dir() else []
    return StoreState(instances, series, studies, outbox, blobs, spool)  # type: ignore[arg-type]
