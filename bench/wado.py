"""WADO-RS: study retrieve throughput (multipart/related) and series /metadata latency."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import aiohttp

from bench.qido import LatencyResult, timed_get
from bench.servers import Server

MULTIPART_DICOM = 'multipart/related; type="application/dicom"'


@dataclass
class RetrieveResult:
    rates: list[float] = field(default_factory=list)  # MB/s per retrieve (10^6 bytes)
    sizes: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def study_retrieve(server: Server, study_uid: str, repeats: int) -> RetrieveResult:
    out = RetrieveResult()
    headers = {**server.headers, "Accept": MULTIPART_DICOM}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for i in range(repeats + 1):  # the first one warms the page cache and is not recorded
            size = 0
            start = time.perf_counter()
            try:
                async with session.get(f"{server.root}/studies/{study_uid}", headers=headers) as resp:
                    if resp.status != 200:
                        out.errors.append(f"HTTP {resp.status}")
                        await resp.read()
                        continue
                    async for chunk in resp.content.iter_chunked(1 << 20):
                        size += len(chunk)
            except aiohttp.ClientError as exc:
                out.errors.append(type(exc).__name__)
                continue
            elapsed = time.perf_counter() - start
            if i:
                out.rates.append(size / 1e6 / elapsed)
                out.sizes.append(size)
    return out


async def series_metadata(server: Server, study_uid: str, series_uid: str, repeats: int) -> LatencyResult:
    out = LatencyResult()
    path = f"/studies/{study_uid}/series/{series_uid}/metadata"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await timed_get(session, server, path, "application/dicom+json", LatencyResult())
        for _ in range(repeats):
            body = await timed_get(session, server, path, "application/dicom+json", out)
            if body is not None:
                out.results.append(len(json.loads(body)))
    return out
