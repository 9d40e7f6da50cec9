"""Scale-out benchmark: ``python -m bench.scaleout [--short] [options]``.

In one run, on one throwaway PostgreSQL cluster and one SeaweedFS (``weed mini``):

1. **ingest**: STOW-RS of small instances (10 per request, ``--clients`` concurrent clients spread round
   robin over the servers, as a load balancer would) into 1, 2 and 4 ``dicomflow serve`` processes on
   PostgreSQL + S3, and into Orthanc on its PostgreSQL index plugin (its own database on the same cluster;
   Orthanc keeps its files on local disk). Every instance is counted: stored, failed, or unreported, and
   what the index really holds afterwards (``lost`` = acknowledged but not held).
2. **qido**: the same query mix (bench/qido.py) with ``--clients`` concurrent clients over the data each
   ingested, against the same servers.
3. **index-only QIDO at scale**: metadata rows cloned from one really ingested instance are COPYed into a
   fresh dicomflow database up to 100k and then 1M instances (no blobs: QIDO never opens one), and the
   query mix is timed through one server. Orthanc is not part of this phase: its PostgreSQL schema cannot
   be filled without ingesting through it.

Each measurement is repeated ``--repeats`` times and the median reported (the machine is shared). Every
phase has a time budget; a phase over budget stops and says so. Prints Markdown; ``--json`` keeps raw data.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]

from bench import data
from bench.qido import QUERY_KINDS, LatencyResult, Query, query_mix, timed_get
from bench.servers import ORTHANC_START, Server, free_port
from bench.stow import stow_spread
from dicomflow.index.sql import SqlIndexStore
from dicomflow.ingest.parse import parse_part10
from dicomflow.model import Protocol, Source
from dicomflow.settings import DuplicatePolicy, Settings
from dicomflow.storage.base import new_blob_key
from tests.harness.postgres import PgCluster, create_database, run_async, upgrade_schema
from tests.harness.processes import ServerProcess, write_config
from tests.harness.seaweed import SeaweedS3

PER_REQUEST = 10
ORTHANC = "orthanc (PostgreSQL index)"
FILE_BLOBS = "dicomflow x1, blobs in a local folder"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help="CI-sized run (~3 min): fewer instances, one repeat, 100k only")
    p.add_argument("--phases", default="ingest,qido,scale")
    p.add_argument("--servers", type=lambda s: [int(x) for x in s.split(",")], help="server counts; default 1,2,4")
    p.add_argument("--repeats", type=int, help="default 3, short 1")
    p.add_argument("--clients", type=int, default=8, help="concurrent STOW and QIDO clients (default 8)")
    p.add_argument("--ingest", type=int, help="small instances per ingest measurement; default 2000, short 400")
    p.add_argument("--queries", type=int, help="queries per kind per QIDO measurement; default 20, short 5")
    p.add_argument("--scale", type=lambda s: [int(x) for x in s.split(",")],
                   help="index sizes for the index-only phase; default 100000,1000000, short 100000")
    p.add_argument("--budget", type=float, help="seconds per phase before it stops; default 900, short 240")
    p.add_argument("--no-orthanc", action="store_true")
    p.add_argument("--file-blobs", action="store_true",
                   help="also 1 dicomflow process on PostgreSQL with blobs in a local folder (as Orthanc keeps them)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    short = args.short
    for key, value in {"servers": [1, 2, 4], "repeats": 1 if short else 3, "ingest": 400 if short else 2000,
                       "queries": 5 if short else 20, "scale": [100_000] if short else [100_000, 1_000_000],
                       "budget": 240.0 if short else 900.0}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.phases = args.phases.split(",")
    return args


# -- the systems under test ---------------------------------------------------------------------------


@dataclass
class Backends:
    cluster: PgCluster
    seaweed: SeaweedS3
    bucket: str
    base: Path

    def database(self) -> str:
        return create_database(self.cluster.admin_url)


async def _count(url: str, table: str = "instances") -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


@dataclass
class Dicomflow:
    """N ``dicomflow serve`` processes on one database and one S3 prefix."""

    url: str
    processes: list[ServerProcess]

    @classmethod
    async def start(cls, backends: Backends, n: int, *, storage: str | None = None) -> Dicomflow:
        url = backends.database()
        await upgrade_schema(url)
        prefix = f"bench-{uuid.uuid4().hex[:8]}/"
        settings = Settings(
            data_dir=backends.base / f"df-{prefix[:-1]}", index=url + f"?pool_size={max(4, 16 // n)}",
            storage=storage or f"s3://{backends.bucket}/{prefix}", log_level="WARNING",
            s3={"endpoint_url": backends.seaweed.endpoint, "access_key_id": backends.seaweed.access_key,
                "secret_access_key": backends.seaweed.secret_key, "path_style": True})  # type: ignore[arg-type]
        config = write_config(settings, backends.base / f"{prefix[:-1]}.yaml", routing={"enabled": False})
        processes = [ServerProcess(config, free_port(), backends.base / f"{prefix[:-1]}-{i}.log") for i in range(n)]
        flow = cls(url, processes)
        try:
            for process in processes:
                await asyncio.to_thread(process.start)
        except BaseException:
            flow.stop()
            raise
        return flow

    @classmethod
    async def start_on(cls, backends: Backends, url: str) -> Dicomflow:
        """One server on an existing database, blobs in a folder (the index-only phase opens none)."""
        settings = Settings(data_dir=backends.base / "scale", index=url, log_level="WARNING",
                            storage=f"file://{backends.base / 'scale-blobs'}")
        config = write_config(settings, backends.base / "scale.yaml", routing={"enabled": False})
        process = ServerProcess(config, free_port(), backends.base / "scale.log")
        await asyncio.to_thread(process.start)
        return cls(url, [process])

    def targets(self) -> list[Server]:
        return [_as_server(p, self) for p in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


class _DicomflowServer(Server):
    flow: Dicomflow

    def count_instances(self) -> int:
        return run_async(_count(self.flow.url))


def _as_server(process: ServerProcess, flow: Dicomflow) -> Server:
    assert process.process is not None
    server = _DicomflowServer("dicomflow", process.dicomweb, process.log.parent, process.process, process.log)
    server.flow = flow
    return server


def start_orthanc(backends: Backends) -> tuple[Server, str]:
    url = backends.database()
    name = url.rpartition("/")[2]
    workdir = backends.base / "orthanc"
    workdir.mkdir()
    http, dicom = free_port(), free_port()
    log = workdir / "orthanc.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            ["bash", str(ORTHANC_START), "--http-port", str(http), "--dicom-port", str(dicom), "--dir", str(workdir),
             "--postgres", f"127.0.0.1:{backends.cluster.port}:{name}:postgres"],
            stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/system", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("Orthanc not ready") from None
            time.sleep(0.3)
    return Server("orthanc", f"http://127.0.0.1:{http}/dicom-web", workdir, proc, log,
                  headers={"Accept-Encoding": "identity"}), url


# -- load -----------------------------------------------------------------------------------------------


async def qido_spread(targets: list[Server], queries: list[Query], clients: int,
                      budget: float) -> tuple[dict[str, LatencyResult], float]:
    """The query mix from ``clients`` concurrent clients spread over the servers; (per kind, queries/s)."""
    out = {kind: LatencyResult() for kind in QUERY_KINDS}
    queue: asyncio.Queue[Query] = asyncio.Queue()
    for q in queries:
        queue.put_nowait(q)
    rotation = itertools.cycle(targets)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for q in queries[:5]:
            for target in targets:
                await timed_get(session, target, q.path, "application/dicom+json", LatencyResult())

        async def client() -> None:
            while True:
                try:
                    q = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                body = await timed_get(session, next(rotation), q.path, "application/dicom+json", out[q.kind])
                if body is not None:
                    out[q.kind].results.append(len(json.loads(body)) if body.strip() else 0)

        start = time.perf_counter()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), budget)
        seconds = time.perf_counter() - start
    done = sum(len(r.latencies) for r in out.values())
    return out, done / seconds if seconds else 0.0


def ingest_bodies(instances: int) -> tuple[list[data.StudyPlan], list[tuple[bytes, int]]]:
    plans = data.qido_dataset(instances, per_series=PER_REQUEST)
    parts = list(data.instances_of(plans, PER_REQUEST))
    return plans, [(data.multipart(chunk), len(chunk)) for chunk in data.batch(parts, PER_REQUEST)]


# -- index-only rows ------------------------------------------------------------------------------------

_T_STUDY, _T_SERIES, _T_SOP = data.ROOT + "1" + "7" * 24, data.ROOT + "2" + "7" * 24, data.ROOT + "3" + "7" * 24
_T_PID, _T_NAME, _T_DATE = "TPLPID0000", "TPLSURNAME^TPLGIVEN", "19990909"


async def _template_rows(url: str, tmp: Path) -> dict[str, dict[str, Any]]:
    """Ingest one instance per modality for real and read back its study/series/instance rows."""
    rows: dict[str, dict[str, Any]] = {}
    index = await SqlIndexStore.open(url)
    try:
        for n, modality in enumerate(["CT", "MR"]):
            study, series, sop = (u[:-1] + str(n) for u in (_T_STUDY, _T_SERIES, _T_SOP))
            template = data.series_template(study_uid=study, series_uid=series, modality=modality,
                                            patient_name=_T_NAME, patient_id=_T_PID, study_date=_T_DATE)
            blob = template.blob.replace(data._SOP_PLACEHOLDER.encode(), sop.encode())
            path = tmp / f"template-{modality}.dcm"
            path.write_bytes(blob)
            parsed = parse_part10(path, 1024)
            await index.store_instance("default", parsed, blob_key=new_blob_key("default"), size=len(blob),
                                       sha256=hashlib.sha256(blob).hexdigest(), source=Source(Protocol.DICOMWEB),
                                       policy=DuplicatePolicy.REJECT)
    finally:
        await index.close()
    conn = await asyncpg.connect(url)
    try:
        for n, modality in enumerate(["CT", "MR"]):
            study, series, sop = (u[:-1] + str(n) for u in (_T_STUDY, _T_SERIES, _T_SOP))
            rows[modality] = {
                "study": dict(await conn.fetchrow("SELECT * FROM studies WHERE study_uid = $1", study)),
                "series": dict(await conn.fetchrow("SELECT * FROM series WHERE series_uid = $1", series)),
                "instance": dict(await conn.fetchrow("SELECT * FROM instances WHERE sop_uid = $1", sop)),
                "uids": (study, series, sop),
            }
        await conn.execute("DELETE FROM outbox; DELETE FROM instances; DELETE FROM series; DELETE FROM studies")
    finally:
        await conn.close()
    return rows


def _sub(value: Any, replacements: list[tuple[str, str]]) -> Any:
    if not isinstance(value, str):
        return value
    for old, new in replacements:
        value = value.replace(old, new)
    return value


def _generate(templates: dict[str, dict[str, Any]], start: int, count: int, per_series: int,
              rng: random.Random) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """(table, record) for ``count`` instances in studies of 1-3 series, ~2 studies per patient."""
    made = 0
    n = start
    while made < count:
        n += 1
        modalities = [rng.choice(["CT", "MR"]) for _ in range(rng.randint(1, 3))]
        patient = (n + 1) // 2  # two studies per patient
        name = f"{rng.choice(data.SURNAMES)}^{rng.choice(data.GIVEN)}"
        date = f"{rng.randint(2019, 2024)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        study_uid = f"{data.ROOT}1{n:024d}"
        base = [(_T_PID, f"PID{patient:07d}"), (_T_NAME, name), (_T_DATE, date)]
        first = templates[modalities[0]]
        study_row = dict(first["study"])
        study_subs = [(first["uids"][0], study_uid), *base]
        for key, value in study_row.items():
            study_row[key] = _sub(value, study_subs)
        study_row.update(patient_name_ci=name.upper(), modalities_in_study="\\".join(sorted(set(modalities))),
                         num_series=len(modalities), num_instances=len(modalities) * per_series)
        yield "studies", tuple(study_row.values())
        for s, modality in enumerate(modalities):
            tpl = templates[modality]
            series_uid = f"{data.ROOT}2{n:020d}{s:04d}"
            subs = [(tpl["uids"][0], study_uid), (tpl["uids"][1], series_uid), *base]
            series_row = {k: _sub(v, subs) for k, v in tpl["series"].items()}
            series_row.update(series_number=s + 1, num_instances=per_series)
            yield "series", tuple(series_row.values())
            for i in range(per_series):
                sop_uid = f"{data.ROOT}3{n:018d}{s:02d}{i:04d}"
                row = {k: _sub(v, [*subs, (tpl["uids"][2], sop_uid)]) for k, v in tpl["instance"].items()}
                row.update(instance_number=i + 1, blob_key=f"default/bench/{sop_uid}")
                yield "instances", tuple(row.values())
                made += 1


async def populate(url: str, templates: dict[str, dict[str, Any]], have: int, want: int,
                   state: dict[str, Any]) -> float:
    """COPY generated rows until the index holds ``want`` instances; returns seconds spent."""
    started = time.perf_counter()
    conn = await asyncpg.connect(url)
    try:
        columns = {table: list(templates["CT"][key].keys())
                   for table, key in (("studies", "study"), ("series", "series"), ("instances", "instance"))}
        buffers: dict[str, list[tuple[Any, ...]]] = {t: [] for t in columns}

        async def flush() -> None:
            for table in ("studies", "series", "instances"):  # parents first
                if buffers[table]:
                    await conn.copy_records_to_table(table, records=buffers[table], columns=columns[table])
                    buffers[table] = []

        for table, record in _generate(templates, state.setdefault("studies", 0), want - have, 10, state["rng"]):
            buffers[table].append(record)
            if table == "studies":
                state["studies"] += 1
            if len(buffers["instances"]) >= 20_000:
                await flush()
        await flush()
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return time.perf_counter() - started


def scale_queries(rng: random.Random, studies: int, per_kind: int) -> list[Query]:
    """Query mix over the generated rows (same kinds as bench/qido.py)."""
    prefixes = sorted({s[:3] for s in data.SURNAMES})
    queries: list[Query] = []
    for _ in range(per_kind):
        n = rng.randint(1, studies)
        year, month = rng.randint(2019, 2024), rng.randint(1, 12)
        study_uid = f"{data.ROOT}1{n:024d}"
        queries += [
            Query("PatientID", f"/studies?PatientID=PID{(n + 1) // 2:07d}"),
            Query("PatientName SMI*", f"/studies?PatientName={rng.choice(prefixes)}*&limit=100"),
            Query("StudyDate range", f"/studies?StudyDate={year}{month:02d}01-{year}{month:02d}02&limit=100"),
            Query("ModalitiesInStudy", f"/studies?ModalitiesInStudy={rng.choice(['CT', 'MR'])}&limit=100"),
            Query("series in study", f"/studies/{study_uid}/series"),
            Query("instances in series", f"/studies/{study_uid}/series/{data.ROOT}2{n:020d}0000/instances"),
        ]
    rng.shuffle(queries)
    return queries


# -- report ---------------------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:.1f}"


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _median_of(runs: list[dict[str, Any]], stat: str, kind: str) -> float | None:
    """The median over repeats of one latency (``p50`` or ``p95``) of one query kind, where measured."""
    return _median([r[stat][kind] for r in runs if r[stat].get(kind) is not None])


@dataclass
class Report:
    args: dict[str, Any]
    machine: dict[str, Any]
    ingest: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # system -> repeats
    qido: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # system -> repeats: kind -> (p50, p95)
    scale: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # size -> repeats
    populate_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        out = [f"machine: {self.machine}", f"options: {self.args}", ""]
        if self.ingest:
            base = _median([r["rate"] for r in self.ingest.get(ORTHANC, [])])
            out += ["### Ingest (STOW-RS, small instances, 10 per request)", "",
                    "| system | instances/s (median) | runs | sent | stored | failed | unreported | lost "
                    "| vs Orthanc |",
                    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for system, runs in self.ingest.items():
                rate = _median([r["rate"] for r in runs])
                ratio = f"{rate / base:.2f}" if rate and base else "n/a"
                out.append(f"| {system} | {rate or 0:.0f} | {len(runs)} | {sum(r['sent'] for r in runs)} | "
                           f"{sum(r['stored'] for r in runs)} | {sum(r['failed'] for r in runs)} | "
                           f"{sum(r['unreported'] for r in runs)} | {sum(r['lost'] for r in runs)} | {ratio} |")
            out.append("")
        if self.qido:
            out += ["### QIDO-RS over the ingested data (concurrent clients spread over the servers)", "",
                    "| system | queries/s | " + " | ".join(f"{k} p50 ms" for k in QUERY_KINDS) + " |",
                    "| --- | ---: | " + " | ".join("---:" for _ in QUERY_KINDS) + " |"]
            for system, runs in self.qido.items():
                qps = _median([r["qps"] for r in runs])
                cells = [_ms(_median_of(runs, "p50", k)) for k in QUERY_KINDS]
                out.append(f"| {system} | {qps or 0:.0f} | " + " | ".join(cells) + " |")
            reference = self.qido.get(ORTHANC)
            if reference:
                out += ["", "ratio Orthanc p50 / dicomflow p50 (above 1: dicomflow faster):", ""]
                for system, runs in self.qido.items():
                    if system == ORTHANC:
                        continue
                    cells = []
                    for k in QUERY_KINDS:
                        a, b = _median_of(reference, "p50", k), _median_of(runs, "p50", k)
                        cells.append(f"{k} {a / b:.2f}" if a and b else f"{k} n/a")
                    out.append(f"- {system}: " + ", ".join(cells))
            out.append("")
        if self.scale:
            out += ["### Index-only QIDO at scale (1 dicomflow server, generated rows, 1 client)", "",
                    "| instances | " + " | ".join(f"{k} p50 / p95 ms" for k in QUERY_KINDS) + " |",
                    "| ---: | " + " | ".join("---:" for _ in QUERY_KINDS) + " |"]
            for size, runs in self.scale.items():
                cells = []
                for k in QUERY_KINDS:
                    cells.append(f"{_ms(_median_of(runs, 'p50', k))} / {_ms(_median_of(runs, 'p95', k))}")
                out.append(f"| {size} | " + " | ".join(cells) + " |")
            out += ["", "median matches per query: " + "; ".join(
                f"{size}: " + ", ".join(f"{k} {_median([r['matches'][k] for r in runs if r['matches'][k] is not None])}"
                                        for k in QUERY_KINDS) for size, runs in self.scale.items())]
            out += ["", "generation (COPY) seconds: " + ", ".join(f"{k}: {v:.0f}" for k, v in
                                                               self.populate_seconds.items()), ""]
        out += [f"- {note}" for note in self.notes]
        return "\n".join(out)


def _latencies(results: dict[str, LatencyResult]) -> dict[str, Any]:
    return {"p50": {k: r.p50 for k, r in results.items()}, "p95": {k: r.p95 for k, r in results.items()},
            "matches": {k: _median([float(x) for x in r.results]) for k, r in results.items()},
            "errors": sum(len(r.errors) for r in results.values())}


# -- phases ---------------------------------------------------------------------------------------------


async def ingest_and_qido(args: argparse.Namespace, backends: Backends, report: Report) -> None:
    systems: list[tuple[str, Any]] = [(f"dicomflow x{n}", n) for n in args.servers]
    if args.file_blobs:
        systems.append((FILE_BLOBS, "file"))
    if not args.no_orthanc:
        systems.append((ORTHANC, "orthanc"))
    for name, what in systems:
        flow: Dicomflow | None = None
        orthanc: Server | None = None
        targets: list[Server]
        try:
            if what == "orthanc":
                started, _ = await asyncio.to_thread(start_orthanc, backends)
                orthanc, targets = started, [started]
            else:
                storage = f"file://{backends.base / uuid.uuid4().hex}" if what == "file" else None
                flow = await Dicomflow.start(backends, 1 if what == "file" else what, storage=storage)
                targets = flow.targets()
            plans_all: list[data.StudyPlan] = []
            deadline = time.monotonic() + args.budget
            if "ingest" in args.phases or "qido" in args.phases:
                for _ in range(args.repeats):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        report.notes.append(f"{name}: ingest stopped at the phase budget")
                        break
                    plans, bodies = ingest_bodies(args.ingest)
                    plans_all += plans
                    res = await stow_spread(targets, bodies, args.clients, left, request_timeout=300)
                    report.ingest.setdefault(name, []).append({**asdict(res), "rate": res.rate, "lost": res.lost})
            if "qido" in args.phases and plans_all:
                deadline = time.monotonic() + args.budget
                for r in range(args.repeats):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        report.notes.append(f"{name}: QIDO stopped at the phase budget")
                        break
                    queries = query_mix(plans_all, args.queries, seed=100 + r)
                    results, qps = await qido_spread(targets, queries, args.clients, left)
                    report.qido.setdefault(name, []).append({**_latencies(results), "qps": qps})
        finally:
            if flow is not None:
                flow.stop()
            if orthanc is not None:
                orthanc.stop()
        if what == "orthanc":
            await asyncio.sleep(1.0)  # its DICOM port stays busy for a moment


async def scale(args: argparse.Namespace, backends: Backends, report: Report) -> None:
    url = backends.database()
    await upgrade_schema(url)
    templates = await _template_rows(url, backends.base)
    flow = await Dicomflow.start_on(backends, url)
    try:
        target = flow.targets()[0]
        state: dict[str, Any] = {"rng": random.Random(5)}
        have = 0
        for size in sorted(args.scale):
            seconds = await populate(url, templates, have, size, state)
            have = size
            report.populate_seconds[str(size)] = seconds
            deadline = time.monotonic() + args.budget
            for r in range(args.repeats):
                left = deadline - time.monotonic()
                if left <= 0:
                    report.notes.append(f"index-only QIDO at {size}: stopped at the phase budget")
                    break
                queries = scale_queries(random.Random(200 + r), state["studies"], args.queries)
                results, _ = await qido_spread([target], queries, 1, left)
                report.scale.setdefault(str(size), []).append(_latencies(results))
    finally:
        flow.stop()


async def main_async(args: argparse.Namespace) -> Report:
    report = Report(args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    machine={"cpus": os.cpu_count(), "python": platform.python_version(),
                             "load": [round(x, 1) for x in os.getloadavg()]})
    base = Path(tempfile.mkdtemp(prefix="dicomflow-scaleout-"))
    cluster = await asyncio.to_thread(PgCluster.start)
    seaweed: SeaweedS3 | None = None
    try:
        seaweed = await asyncio.to_thread(SeaweedS3.start)
        backends = Backends(cluster, seaweed, await asyncio.to_thread(seaweed.create_bucket), base)
        if "ingest" in args.phases or "qido" in args.phases:
            await ingest_and_qido(args, backends, report)
        if "scale" in args.phases:
            await scale(args, backends, report)
    finally:
        if seaweed is not None:
            seaweed.stop()
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(main_async(args))
    sys.stdout.write(report.markdown() + "\n")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
