"""WADO-RS streams: retrieving a study much larger than the allowed growth keeps the server's memory flat."""

from __future__ import annotations

import gc
from typing import Any

import aiohttp
import psutil
import pytest
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from tests.factory import make_dataset, multipart, to_bytes

pytestmark = pytest.mark.e2e

INSTANCES = 60
SIDE = 724  # 724 x 724 x 2 bytes: ~1 MiB per instance


async def test_study_retrieve_keeps_memory_flat(live_server: Any) -> None:
    study, series = generate_uid(), generate_uid()
    async with aiohttp.ClientSession() as session:
        for start in range(0, INSTANCES, 10):
            parts = []
            for n in range(start, start + 10):
                ds = make_dataset(study_uid=study, series_uid=series, instance_number=n, rows=SIDE, columns=SIDE)
                if n % 2:
                    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # needs transcoding by default
                parts.append(to_bytes(ds))
            body, ctype = multipart(parts)
            async with session.post(f"{live_server.dicomweb}/studies", data=body,
                                    headers={"Content-Type": ctype}) as resp:
                assert resp.status == 200
        del parts, body
        gc.collect()
        proc = psutil.Process()  # the live server runs in this process
        for accept in ('multipart/related; type="application/dicom"; transfer-syntax=*',
                       'multipart/related; type="application/dicom"'):
            baseline = proc.memory_info().rss
            peak, received = baseline, 0
            async with session.get(f"{live_server.dicomweb}/studies/{study}", headers={"Accept": accept}) as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_chunked(1 << 20):
                    received += len(chunk)
                    peak = max(peak, proc.memory_info().rss)
            assert received > INSTANCES * SIDE * SIDE * 2
            # a study of ~60 MiB; one instance (~1 MiB, x a few while transcoding) may be in memory at a time
            assert peak - baseline < 40 * 1024 * 1024, (accept, (peak - baseline) / 2**20)
