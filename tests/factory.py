"""Synthetic DICOM instances for tests (made with pydicom; no real patient data)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

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
