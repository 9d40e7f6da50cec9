"""QIDO-RS latency for a query mix, one client, the same queries against every server."""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass, field

import aiohttp

from bench.data import SURNAMES, StudyPlan
from bench.servers import Server


@dataclass
class Query:
    kind: str
    path: str  # relative to the DICOMweb root, with the query string


@dataclass
class LatencyResult:
    latencies: list[float] = field(default_factory=list)  # seconds
    results: list[int] = field(default_factory=list)  # matches per query (sanity check across servers)
    errors: list[str] = field(default_factory=list)

    def pct(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    @property
    def p50(self) -> float | None:
        return statistics.median(self.latencies) if self.latencies else None

    @property
    def p95(self) -> float | None:
        return self.pct(0.95)


QUERY_KINDS = ["PatientID", "PatientName SMI*", "StudyDate range", "ModalitiesInStudy", "series in study",
               "instances in series"]


def query_mix(plans: list[StudyPlan], per_kind: int, seed: int = 11) -> list[Query]:
    rng = random.Random(seed)
    queries: list[Query] = []
    prefixes = sorted({s[:3] for s in SURNAMES})
    for _ in range(per_kind):
        plan = rng.choice(plans)
        year, month = rng.randint(2019, 2024), rng.randint(1, 12)
        series = rng.choice(plan.series)
        queries += [
            Query("PatientID", f"/studies?PatientID={plan.patient_id}"),
            Query("PatientName SMI*", f"/studies?PatientName={rng.choice(prefixes)}*"),
            Query("StudyDate range", f"/studies?StudyDate={year}{month:02d}01-{year}{month:02d}28"),
            Query("ModalitiesInStudy", f"/studies?ModalitiesInStudy={rng.choice(['CT', 'MR', 'US'])}&limit=100"),
            Query("series in study", f"/studies/{plan.study_uid}/series"),
            Query("instances in series", f"/studies/{plan.study_uid}/series/{series.series_uid}/instances"),
        ]
    rng.shuffle(queries)
    return queries


async def timed_get(session: aiohttp.ClientSession, server: Server, path: str, accept: str,
                    result: LatencyResult) -> bytes | None:
    headers = {**server.headers, "Accept": accept}
    start = time.perf_counter()
    try:
        async with session.get(f"{server.root}{path}", headers=headers) as resp:
            body = await resp.read()
            status = resp.status
    except aiohttp.ClientError as exc:
        result.errors.append(f"{type(exc).__name__}")
        return None
    elapsed = time.perf_counter() - start
    if status >= 400:
        result.errors.append(f"HTTP {status}")
        return None
    result.latencies.append(elapsed)
    return body


async def qido_latency(server: Server, queries: list[Query]) -> dict[str, LatencyResult]:
    out = {kind: LatencyResult() for kind in QUERY_KINDS}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for q in queries[:5]:  # warm-up (connection, caches), not recorded
            await timed_get(session, server, q.path, "application/dicom+json", LatencyResult())
        for q in queries:
            res = out[q.kind]
            body = await timed_get(session, server, q.path, "application/dicom+json", res)
            if body is not None:
                res.results.append(len(json.loads(body)) if body.strip() else 0)
    return out
