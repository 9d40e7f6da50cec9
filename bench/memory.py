"""Server RSS before, during (peak) and after one large STOW request streamed from a generator."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp

from bench.data import CONTENT_TYPE, SeriesTemplate, streamed_multipart
from bench.servers import Server


@dataclass
class MemoryResult:
    request_bytes: int
    rss_before: int
    rss_peak: int
    rss_after: int
    seconds: float
    status: int
    stored: int
    failed: int
    error: str | None = None

    @property
    def growth(self) -> int:
        return self.rss_peak - self.rss_before


async def big_stow(server: Server, template: SeriesTemplate, total_bytes: int) -> MemoryResult:
    await asyncio.sleep(1.0)  # let the server settle after the previous phase
    before = server.rss()
    peak = before
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, server.rss())
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    headers = {**server.headers, "Content-Type": CONTENT_TYPE, "Accept": "application/dicom+json"}
    status, stored, failed, error = 0, 0, 0, None
    start = time.perf_counter()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session, session.post(
                f"{server.root}/studies", data=streamed_multipart(template, total_bytes), headers=headers) as resp:
            status = resp.status
            raw = await resp.read()
        body = json.loads(raw) if raw else {}
        stored = len(body.get("00081199", {}).get("Value", []))
        failed = len(body.get("00081198", {}).get("Value", []))
    except (aiohttp.ClientError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    seconds = time.perf_counter() - start
    done.set()
    await sampler
    await asyncio.sleep(1.0)
    after = server.rss()
    return MemoryResult(total_bytes, before, max(peak, after), after, seconds, status, stored, failed, error)
