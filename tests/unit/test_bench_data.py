"""The benchmark's instance generator: valid, unique Part 10 files; bodies streamed part by part."""

from __future__ import annotations

import io

import pydicom

from bench import data


def test_template_instances_are_valid_and_unique() -> None:
    template = data.series_template(study_uid=data.new_uid(1), series_uid=data.new_uid(2), rows=64, columns=64)
    seen = set()
    for number in (1, 2, 123):
        sop, blob = template.instance(number)
        ds = pydicom.dcmread(io.BytesIO(blob))
        assert ds.SOPInstanceUID == sop == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.InstanceNumber == number
        assert ds.StudyInstanceUID == template.study_uid
        assert len(ds.PixelData) == 64 * 64 * 2
        seen.add(sop)
    assert len(seen) == 3


def test_qido_dataset_has_the_requested_size_and_varied_keys() -> None:
    plans = data.qido_dataset(500, per_series=10)
    assert sum(len(p.series) for p in plans) * 10 >= 500
    assert len({p.patient_name.split("^")[0] for p in plans}) > 5
    assert len(list(data.instances_of(plans[:2], 10))) == sum(len(p.series) for p in plans[:2]) * 10


async def test_streamed_multipart_is_generated_lazily_to_the_requested_size() -> None:
    template = data.series_template(study_uid=data.new_uid(1), series_uid=data.new_uid(2))
    chunks = [c async for c in data.streamed_multipart(template, 50_000)]
    assert max(len(c) for c in chunks) < len(template.blob) + 200
    body = b"".join(chunks)
    assert body.endswith(f"--{data.BOUNDARY}--\r\n".encode())
    assert body.count(f"--{data.BOUNDARY}\r\n".encode()) == len(chunks) - 1
    assert sum(len(c) for c in chunks[:-1]) >= 50_000
