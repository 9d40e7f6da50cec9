"""Benchmark dicomflow side by side with Orthanc: ``python -m bench.run [--quick] [options]``.

Starts both servers on free ports with temporary data dirs, runs the STOW, QIDO, WADO and memory
phases against each with the same requests, and prints a Markdown report (ratios dicomflow/Orthanc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

from bench import data, servers
from bench.memory import MemoryResult, big_stow
from bench.qido import QUERY_KINDS, LatencyResult, qido_latency, query_mix
from bench.servers import Server
from bench.stow import StowResult, stow_load
from bench.wado import RetrieveResult, series_metadata, study_retrieve

GOALS = {"stow": 1.5, "qido": 3.0, "wado": 1.5, "metadata": 5.0}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short run (~3 min): smaller sizes, one repeat")
    p.add_argument("--phases", default="stow,qido,wado,memory")
    p.add_argument("--servers", default="dicomflow,orthanc")
    p.add_argument("--repeats", type=int, help="repeats per measurement (median reported); default 3, quick 1")
    p.add_argument("--clients", type=_ints, help="STOW concurrency levels; default 1,2,4,8,16")
    p.add_argument("--batches", type=_ints, help="STOW instances per request; default 1,10")
    p.add_argument("--small", type=int, help="small instances per STOW measurement; default 400, quick 200")
    p.add_argument("--ct", type=int, help="CT (512x512x16) instances per STOW measurement; default 100, quick 40")
    p.add_argument("--qido-instances", type=int, help="QIDO data set size; default 10000, quick 2000")
    p.add_argument("--qido-queries", type=int, help="queries per kind per repeat; default 30, quick 10")
    p.add_argument("--wado-mb", type=int, help="WADO study size (MB); default 100, quick 53 (100 CT instances)")
    p.add_argument("--memory-mb", type=int, help="size of the one streamed STOW request; default 1024, quick 256")
    p.add_argument("--orthanc-postgres", metavar="HOST:PORT:USER",
                   help="also run Orthanc on its PostgreSQL index (fresh database), e.g. 127.0.0.1:5432:postgres")
    p.add_argument("--json", type=Path, help="also write raw results here")
    p.add_argument("--keep", action="store_true", help="keep the temporary data dirs")
    args = p.parse_args(argv)
    quick = args.quick
    defaults: dict[str, Any] = {
        "repeats": 1 if quick else 3, "clients": [1, 4, 16] if quick else [1, 2, 4, 8, 16],
        "batches": [1, 10], "small": 200 if quick else 400, "ct": 40 if quick else 100,
        "qido_instances": 2000 if quick else 10000, "qido_queries": 10 if quick else 30,
        "wado_mb": 53 if quick else 105, "memory_mb": 256 if quick else 1024,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.phases = args.phases.split(",")
    args.servers = args.servers.split(",")
    return args


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}"


def _flat(lists: Any) -> list[Any]:
    return [x for sub in lists for x in sub]


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


class Bench:
    def __init__(self, args: argparse.Namespace, started: list[Server]) -> None:
        self.args = args
        self.servers = started
        self.raw: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "json"}}
        self.lines: list[str] = []

    def order(self, r: int, servers: list[Server] | None = None) -> list[Server]:
        """Alternate which server goes first, so neither always runs on a warmer or cooler machine."""
        chosen = self.servers if servers is None else servers
        return chosen if r % 2 == 0 else list(reversed(chosen))

    @property
    def compared(self) -> list[Server]:
        """Servers in the QIDO/WADO/memory phases: Orthanc on PostgreSQL only takes part in STOW (loss check)."""
        return [s for s in self.servers if s.name != "orthanc-pg"]

    def out(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    # -- STOW -------------------------------------------------------------------------------------

    async def stow(self) -> None:
        a = self.args
        kinds = {"small": (16, a.small), "CT 512x512": (512, a.ct)}
        results: dict[tuple[str, int, int], dict[str, list[StowResult]]] = {}
        for r in range(a.repeats):
            for kind, (size, count) in kinds.items():
                template = data.series_template(study_uid=data.new_uid(1), series_uid=data.new_uid(2), rows=size,
                                                columns=size)
                for b in a.batches:
                    for c in a.clients:
                        items = [template.instance(i + 1)[1] for i in range(count)]
                        bodies = [(data.multipart(chunk), len(chunk)) for chunk in data.batch(items, b)]
                        del items
                        for server in self.order(r):
                            res = await stow_load(server, bodies, c)
                            results.setdefault((kind, b, c), {}).setdefault(server.name, []).append(res)
                            print(f"  stow r{r} {kind} batch={b} clients={c} {server.name}: {res.rate:.0f}/s "
                                  f"stored={res.stored} failed={res.failed} unreported={res.unreported} "
                                  f"lost={res.lost}", flush=True)
        names = [s.name for s in self.servers]
        self.out(f"### STOW-RS ingest (instances/s, median of {a.repeats})")
        self.out()
        head = "| instance | batch | clients | " + " | ".join(names) + " | ratio | failed / unreported / lost |"
        self.out(head)
        self.out("|" + "---|" * (head.count("|") - 1))
        raw = []
        ratios = []
        for (kind, b, c), per in results.items():
            meds = {n: _median([x.rate for x in per.get(n, [])]) for n in names}
            ratio = _ratio(meds.get("dicomflow"), meds.get("orthanc"))
            if ratio != "n/a":
                ratios.append(float(ratio))
            losses = "; ".join(
                f"{n} {sum(x.failed for x in per[n])}/{sum(x.unreported for x in per[n])}/{sum(x.lost for x in per[n])}"
                for n in names if n in per)
            cells = " | ".join(f"{meds[n]:.0f}" if meds[n] else "n/a" for n in names)
            self.out(f"| {kind} | {b} | {c} | {cells} | {ratio} | {losses} |")
            raw.append({"kind": kind, "batch": b, "clients": c,
                        "results": {n: [asdict(x) | {"rate": x.rate, "lost": x.lost} for x in v]
                                    for n, v in per.items()}})
        self.raw["stow"] = raw
        if ratios:
            self.out()
            self.out(f"STOW ratio dicomflow/Orthanc: min {min(ratios):.2f}, median {statistics.median(ratios):.2f}, "
                     f"max {max(ratios):.2f} (goal >= {GOALS['stow']})")
        self.out()

    # -- QIDO -------------------------------------------------------------------------------------

    async def load(self, plans: list[data.StudyPlan], per_series: int) -> None:
        items = list(data.instances_of(plans, per_series))
        bodies = [(data.multipart(chunk), len(chunk)) for chunk in data.batch(items, 10)]
        del items
        for server in self.compared:
            res = await stow_load(server, bodies, 4)
            print(f"  loaded {res.stored} instances into {server.name} in {res.seconds:.1f}s "
                  f"({res.rate:.0f}/s, failed={res.failed} unreported={res.unreported} lost={res.lost})", flush=True)
            self.raw.setdefault("loads", []).append({"server": server.name, **asdict(res)})

    async def qido(self) -> None:
        a = self.args
        plans = data.qido_dataset(a.qido_instances, per_series=10)
        await self.load(plans, 10)
        queries = query_mix(plans, a.qido_queries)
        per: dict[str, dict[str, list[LatencyResult]]] = {s.name: {k: [] for k in QUERY_KINDS} for s in self.compared}
        for r in range(a.repeats):
            for server in self.order(r, self.compared):
                res = await qido_latency(server, queries)
                for kind, lat in res.items():
                    per[server.name][kind].append(lat)
        held = {s.name: s.count_instances() for s in self.compared}
        names = [s.name for s in self.compared]
        self.out(f"### QIDO-RS latency, ms (one client; {len(plans)} studies, {held} instances held; "
                 f"{a.qido_queries} queries per kind x {a.repeats} repeats; median of per-repeat p50/p95)")
        self.out()
        head = ("| query | " + " | ".join(f"{n} p50 | {n} p95" for n in names)
                + " | p50 ratio orthanc/dicomflow | matches (mean) | errors |")
        self.out(head)
        self.out("|" + "---|" * (head.count("|") - 1))
        raw: dict[str, Any] = {}
        for kind in QUERY_KINDS:
            p50 = {n: _median([x.p50 for x in per[n][kind] if x.p50 is not None]) for n in names}
            p95 = {n: _median([x.p95 for x in per[n][kind] if x.p95 is not None]) for n in names}
            matches = " / ".join(
                f"{statistics.mean(_flat(x.results for x in per[n][kind])):.1f}"
                if any(x.results for x in per[n][kind]) else "-" for n in names)
            errors = "; ".join(f"{n}: {sorted(set(_flat(x.errors for x in per[n][kind])))}"
                               for n in names if any(x.errors for x in per[n][kind]))
            cells = " | ".join(f"{_ms(p50[n])} | {_ms(p95[n])}" for n in names)
            self.out(f"| {kind} | {cells} | {_ratio(p50.get('orthanc'), p50.get('dicomflow'))} | {matches} | "
                     f"{errors or '-'} |")
            raw[kind] = {n: {"p50": p50[n], "p95": p95[n]} for n in names}
        self.raw["qido"] = raw
        self.out()

    # -- WADO -------------------------------------------------------------------------------------

    async def wado(self) -> None:
        a = self.args
        study = data.new_uid(1)
        ct_size = len(data.series_template(study_uid=study, series_uid=data.new_uid(2), rows=512, columns=512).blob)
        total = max(100, round(a.wado_mb * 1e6 / ct_size))
        first = data.series_template(study_uid=study, series_uid=data.new_uid(2), rows=512, columns=512)
        items = [first.instance(i + 1)[1] for i in range(100)]
        if total > 100:
            second = data.series_template(study_uid=study, series_uid=data.new_uid(2), rows=512, columns=512,
                                          series_number=2)
            items += [second.instance(i + 1)[1] for i in range(total - 100)]
        bodies = [(data.multipart(chunk), len(chunk)) for chunk in data.batch(items, 10)]
        study_bytes = sum(len(x) for x in items)
        del items
        for server in self.compared:
            res = await stow_load(server, bodies, 4)
            print(f"  WADO study: {res.stored} instances into {server.name} ({res.failed} failed)", flush=True)
        del bodies
        retrieve: dict[str, list[RetrieveResult]] = {s.name: [] for s in self.compared}
        meta: dict[str, list[LatencyResult]] = {s.name: [] for s in self.compared}
        for r in range(a.repeats):
            for server in self.order(r, self.compared):
                retrieve[server.name].append(await study_retrieve(server, study, 3))
                meta[server.name].append(await series_metadata(server, study, first.series_uid, 10))
        names = [s.name for s in self.compared]
        rate = {n: _median(_flat(x.rates for x in retrieve[n])) for n in names}
        mp50 = {n: _median([x.p50 for x in meta[n] if x.p50 is not None]) for n in names}
        mp95 = {n: _median([x.p95 for x in meta[n] if x.p95 is not None]) for n in names}
        self.out(f"### WADO-RS ({total} CT instances, {study_bytes / 1e6:.0f} MB of DICOM; series of 100 instances)")
        self.out()
        self.out("| measure | " + " | ".join(names) + " | ratio | notes |")
        self.out("|---|" + "---|" * (len(names) + 2))
        notes = "; ".join(f"{n}: {sorted(set(_flat(x.errors for x in retrieve[n])))}" for n in names
                          if any(x.errors for x in retrieve[n]))
        sizes = " / ".join(f"{statistics.mean(_flat(x.sizes for x in retrieve[n])) / 1e6:.1f}"
                           if any(x.sizes for x in retrieve[n]) else "-" for n in names)
        self.out("| study retrieve MB/s (median) | " + " | ".join(
            f"{rate[n]:.0f}" if rate[n] else "n/a" for n in names)
            + f" | {_ratio(rate.get('dicomflow'), rate.get('orthanc'))} | body MB {sizes} {notes} |")
        merr = "; ".join(f"{n}: {sorted(set(_flat(x.errors for x in meta[n])))}" for n in names
                         if any(x.errors for x in meta[n]))
        self.out("| series /metadata p50 ms | " + " | ".join(_ms(mp50[n]) for n in names)
                 + f" | {_ratio(mp50.get('orthanc'), mp50.get('dicomflow'))} (orthanc/dicomflow) | {merr or '-'} |")
        self.out("| series /metadata p95 ms | " + " | ".join(_ms(mp95[n]) for n in names) + " | | |")
        self.raw["wado"] = {"retrieve_mb_s": rate, "metadata_p50": mp50, "metadata_p95": mp95,
                            "study_bytes": study_bytes}
        self.out()

    # -- memory -----------------------------------------------------------------------------------

    async def memory(self) -> None:
        a = self.args
        template = data.series_template(study_uid=data.new_uid(1), series_uid=data.new_uid(2), rows=512, columns=512)
        results: dict[str, MemoryResult] = {}
        for server in self.compared:
            res = await big_stow(server, template, a.memory_mb * 1024 * 1024)
            results[server.name] = res
            print(f"  memory {server.name}: {res}", flush=True)
        mb = 1024 * 1024
        self.out(f"### Memory: one streamed STOW request of {a.memory_mb} MiB "
                 f"({a.memory_mb * mb // len(template.blob)} CT instances), server RSS (MiB)")
        self.out()
        self.out("| server | before | peak | after | peak growth | stored / failed | seconds | HTTP | error |")
        self.out("|---|---|---|---|---|---|---|---|---|")
        for name, res in results.items():
            self.out(f"| {name} | {res.rss_before / mb:.0f} | {res.rss_peak / mb:.0f} | {res.rss_after / mb:.0f} | "
                     f"{res.growth / mb:.0f} | {res.stored} / {res.failed} | {res.seconds:.1f} | {res.status} | "
                     f"{res.error or '-'} |")
        self.raw["memory"] = {n: asdict(r) for n, r in results.items()}
        self.out()


def machine_notes() -> str:
    load = os.getloadavg()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs ({cpu}); "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; load average {load[0]:.1f}/{load[1]:.1f}/"
            f"{load[2]:.1f}; Python {platform.python_version()}")


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="dicomflow-bench-"))
    started: list[Server] = []
    try:
        if "dicomflow" in args.servers:
            started.append(servers.start_dicomflow(workdir))
        if "orthanc" in args.servers:
            started.append(servers.start_orthanc(workdir))
        if args.orthanc_postgres:
            started.append(servers.start_orthanc(workdir, postgres=args.orthanc_postgres))
        bench = Bench(args, started)
        bench.out(f"## Benchmark run: {machine_notes()}")
        bench.out()
        t0 = time.perf_counter()
        for phase in ("stow", "qido", "wado", "memory"):
            if phase in args.phases:
                t = time.perf_counter()
                await getattr(bench, phase)()
                print(f"  ({phase} phase took {time.perf_counter() - t:.0f}s)", flush=True)
        bench.out(f"Finished in {time.perf_counter() - t0:.0f}s; load average at the end "
                  f"{os.getloadavg()[0]:.1f}. Server logs: {'kept in ' + str(workdir) if args.keep else 'discarded'}")
        if args.json:
            bench.raw["report"] = bench.lines
            args.json.write_text(json.dumps(bench.raw, indent=1, default=str))
    finally:
        for server in started:
            server.stop()
            servers.drop_orthanc_database(server)
        if not args.keep:
            servers.cleanup(workdir)
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
