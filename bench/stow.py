"""STOW-RS load: N clients posting multipart bodies; every instance counted as stored, failed or dropped."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.data import CONTENT_TYPE
from bench.servers import Server


@dataclass
class StowResult:
    sent: int = 0
    stored: int = 0  # in ReferencedSOPSequence
    failed: int = 0  # in FailedSOPSequence, or the whole request failed (HTTP error without a body)
    unreported: int = 0  # neither stored nor failed in the response: silently dropped
    http_errors: int = 0
    seconds: float = 0.0
    held_before: int = 0
    held_after: int = 0

    @property
    def rate(self) -> float:
        return self.stored / self.seconds if self.seconds else 0.0

    @property
    def lost(self) -> int:
        """Acknowledged as stored but not held by the server afterwards."""
        return max(0, self.stored - (self.held_after - self.held_before))


def _count(body: dict[str, Any], key: str) -> int:
    seq = body.get(key)
    return len(seq.get("Value", [])) if isinstance(seq, dict) else 0


async def _post(session: aiohttp.ClientSession, server: Server, body: bytes, n: int, result: StowResult) -> None:
    headers = {**server.headers, "Content-Type": CONTENT_TYPE, "Accept": "application/dicom+json"}
    try:
        async with session.post(f"{server.root}/studies", data=body, headers=headers) as resp:
            raw = await resp.read()
            status = resp.status
    except aiohttp.ClientError:
        result.http_errors += 1
        result.failed += n
        return
    try:
        parsed = json.loads(raw) if raw else {}
    except ValueError:
        parsed = {}
    stored, failed = _count(parsed, "00081199"), _count(parsed, "00081198")
    if status >= 400 and not stored and not failed:
        result.http_errors += 1
        failed = n
    result.stored += stored
    result.failed += failed
    result.unreported += max(0, n - stored - failed)


async def stow_load(server: Server, bodies: list[tuple[bytes, int]], concurrency: int) -> StowResult:
    """Post ``bodies`` (multipart body, instances in it) with ``concurrency`` clients; wall-clock timed."""
    return await stow_spread([server], bodies, concurrency)


async def stow_spread(targets: list[Server], bodies: list[tuple[bytes, int]], clients: int,
                      budget: float | None = None, request_timeout: float = 600) -> StowResult:
    """``clients`` concurrent clients, each request to the next server in turn; timed wall clock. Past
    ``budget`` seconds the rest is not sent (and counts as not stored)."""
    result = StowResult(sent=sum(n for _b, n in bodies))
    queue: asyncio.Queue[tuple[bytes, int]] = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)
    result.held_before = await asyncio.to_thread(targets[0].count_instances)
    rotation = itertools.cycle(targets)
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client() -> None:
            while True:
                try:
                    body, n = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await _post(session, next(rotation), body, n, result)

        start = time.perf_counter()
        load = asyncio.gather(*(client() for _ in range(clients)))
        if budget is None:
            await load
        else:
            try:
                await asyncio.wait_for(load, budget)
            except TimeoutError:
                result.http_errors += 1  # over budget: what was not sent counts as not stored
        result.seconds = time.perf_counter() - start
    result.held_after = await asyncio.to_thread(targets[0].count_instances)
    return result
