"""Synthetic instances for the benchmark, made fast enough to generate tens of thousands.

pydicom writes one Part 10 template per series with fixed-width placeholder values for the SOP
Instance UID and Instance Number; every instance is then a byte substitution of the template (the
value lengths never change, so the encoding stays valid). No real patient data.
"""

from __future__ import annotations

import io
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
#: pydicom's UID root; the rest of each UID is a fixed-width decimal so templates can be patched
ROOT = "1.2.826.0.1.3680043.8.498."
_SOP_PLACEHOLDER = ROOT + "3" + "0" * 24
_NUMBER_PLACEHOLDER = "999999"

SURNAMES = ["SMITH", "SMITHSON", "SMIRNOV", "JONES", "BROWN", "TAYLOR", "WILSON", "DAVIES", "EVANS", "THOMAS",
            "JOHNSON", "ROBERTS", "WALKER", "WRIGHT", "ROBINSON", "THOMPSON", "WHITE", "HUGHES", "EDWARDS",
            "GREEN", "HALL", "WOOD", "HARRIS", "LEWIS", "MARTIN", "JACKSON", "CLARKE", "CLARK", "TURNER"]
GIVEN = ["JOHN", "JANE", "ALEX", "MARIA", "PETER", "ANNA", "DAVID", "SARA", "PAUL", "EMMA"]
MODALITIES = {"CT": CT_IMAGE, "MR": MR_IMAGE}

_seq = iter(range(1, 1 << 62))
_run = uuid.uuid4().int % 10**12  # keeps UIDs unique across runs against a kept data dir


def new_uid(kind: int) -> str:
    """A unique UID of fixed length: ROOT + kind digit + 24 digits."""
    return f"{ROOT}{kind}{_run:012d}{next(_seq):012d}"


@dataclass(frozen=True)
class SeriesTemplate:
    study_uid: str
    series_uid: str
    blob: bytes

    def instance(self, number: int) -> tuple[str, bytes]:
        sop = new_uid(3)
        data = self.blob.replace(_SOP_PLACEHOLDER.encode(), sop.encode())
        return sop, data.replace(_NUMBER_PLACEHOLDER.encode(), f"{number:06d}".encode(), 1)


def series_template(*, study_uid: str, series_uid: str, modality: str = "CT", patient_name: str = "SMITH^JOHN",
                    patient_id: str = "PID000001", study_date: str = "20240115", accession: str = "ACC000001",
                    rows: int = 16, columns: int = 16, series_number: int = 1) -> SeriesTemplate:
    sop_class = MODALITIES.get(modality, CT_IMAGE)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = _SOP_PLACEHOLDER
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1045.1"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = _SOP_PLACEHOLDER
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.SeriesDate = study_date
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = "REF^DOCTOR"
    ds.StudyID = "S1"
    ds.StudyDescription = "Benchmark study"
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"Benchmark {modality} series"
    ds.InstanceNumber = _NUMBER_PLACEHOLDER
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.PixelData = (np.arange(rows * columns, dtype=np.uint16) % 4096).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return SeriesTemplate(study_uid, series_uid, buf.getvalue())


@dataclass
class StudyPlan:
    """One study of the QIDO data set: its query keys and its series templates."""

    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    modalities: list[str]
    series: list[SeriesTemplate] = field(default_factory=list)


def qido_dataset(instances: int, *, per_series: int = 10, seed: int = 7) -> list[StudyPlan]:
    """Studies of 1-3 series of ``per_series`` small instances, ~2 studies per patient, dates 2019-2024."""
    rng = random.Random(seed)
    plans: list[StudyPlan] = []
    total = 0
    n = 0
    while total < instances:
        n += 1
        patient = rng.randrange(1, max(2, instances // (per_series * 4)))
        name = f"{rng.choice(SURNAMES)}^{rng.choice(GIVEN)}"
        date = f"{rng.randint(2019, 2024)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        mods = [rng.choice(["CT", "CT", "MR", "MR", "CR", "US", "DX"]) for _ in range(rng.randint(1, 3))]
        plan = StudyPlan(new_uid(1), f"PID{patient:06d}", name, date, mods)
        for i, mod in enumerate(mods):
            plan.series.append(series_template(
                study_uid=plan.study_uid, series_uid=new_uid(2), modality=mod, patient_name=name,
                patient_id=plan.patient_id, study_date=date, accession=f"ACC{n:06d}", series_number=i + 1))
            total += per_series
        plans.append(plan)
    return plans


def instances_of(plans: list[StudyPlan], per_series: int) -> Iterator[bytes]:
    for plan in plans:
        for series in plan.series:
            for i in range(per_series):
                yield series.instance(i + 1)[1]


def batch(items: list[bytes], size: int) -> list[list[bytes]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


BOUNDARY = "dicomflow-bench-boundary-7f3a9c"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def multipart(parts: list[bytes]) -> bytes:
    out = bytearray()
    for p in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        out += p
        out += b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


async def streamed_multipart(template: SeriesTemplate, total_bytes: int) -> AsyncIterator[bytes]:
    """A multipart body of about ``total_bytes`` generated part by part (never held in memory)."""
    sent = 0
    number = 0
    while sent < total_bytes:
        number += 1
        _sop, data = template.instance(number % 999999)
        head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield head + data + b"\r\n"
        sent += len(data)
    yield f"--{BOUNDARY}--\r\n".encode()
