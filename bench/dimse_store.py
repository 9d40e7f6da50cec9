"""C-STORE ingest side by side with Orthanc: ``python -m bench.dimse_store [--quick] [options]``.

Both servers run at the same time on free ports (each with its own data dir) and are measured one
after the other with the same dcmtk ``storescu`` runs: one association, then several in parallel
(one storescu process per association), for small instances and for 512x512 CT slices. Every
measurement sends new SOP Instance UIDs, and the instances each server really holds are counted
afterwards. Prints a Markdown table with instances/s and the dicomflow/Orthanc ratio (goal >= 1.2).

A third peer, ``pynetdicom`` (bench/pynetdicom_floor.py), is pynetdicom set up like dicomflow's DIMSE
server with a C-STORE handler that stores nothing: the ceiling of any pynetdicom-based store here. Its
column and its ratio to Orthanc show how much of the gap the DICOM layer alone accounts for.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from bench import data, servers
from bench.servers import Server

GOAL = 1.2
AE_TITLES = {"dicomflow": "DICOMFLOW", "orthanc": "ORTHANC", "pynetdicom": "DICOMFLOW"}
#: COMPONENTS.md: without TCP_NODELAY dcmtk C-STORE drops from ~400 to ~11 instances/s
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class StoreResult:
    server: str
    kind: str
    associations: int
    instances: int
    seconds: float
    stored: int

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds if self.seconds else 0.0


def dimse_port(server: Server) -> int:
    """The DICOM port: the listening port of the server process that is not its HTTP port."""
    http = int(server.root.split(":")[2].split("/")[0])
    procs = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    ports = {c.laddr.port for p in procs for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    ports.discard(http)
    if len(ports) != 1:
        raise RuntimeError(f"cannot tell the DICOM port of {server.name} from {sorted(ports)}")
    return ports.pop()


def write_folders(root: Path, kind: str, count: int, folders: int) -> list[Path]:
    """``count`` new instances spread over ``folders`` folders (one per association)."""
    rows = 512 if kind == "ct" else 16
    template = data.series_template(study_uid=data.new_uid(1), series_uid=data.new_uid(2), rows=rows, columns=rows)
    paths = [root / f"a{i}" for i in range(folders)]
    for p in paths:
        p.mkdir(parents=True)
    for n in range(count):
        _, blob = template.instance(n + 1)
        (paths[n % folders] / f"{n:06d}.dcm").write_bytes(blob)
    return paths


def run_storescu(port: int, aet: str, folders: list[Path]) -> float:
    """Run one storescu per folder at once; return the wall time until all finished."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "+sd", "-aec", aet, "127.0.0.1", str(port), str(f)], env=DCMTK_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for f in folders]
    errors = []
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            errors.append(err.decode(errors="replace")[-500:])
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError("storescu failed:\n" + "\n".join(errors))
    return elapsed


def measure(server: Server, port: int, kind: str, count: int, associations: int, workdir: Path) -> StoreResult:
    folder_root = workdir / f"send-{server.name}-{kind}-{associations}"
    folders = write_folders(folder_root, kind, count, associations)
    floor = server.name == "pynetdicom"  # stores nothing: every acknowledged instance counts
    before = 0 if floor else server.count_instances()
    seconds = run_storescu(port, AE_TITLES[server.name], folders)
    stored = count if floor else server.count_instances() - before
    shutil.rmtree(folder_root, ignore_errors=True)
    return StoreResult(server.name, kind, associations, count, seconds, stored)


def start_floor(workdir: Path) -> tuple[Server, int]:
    """bench/pynetdicom_floor.py on a free port, receiving into a folder of the work dir (as dicomflow does)."""
    port = servers.free_port()
    data = workdir / "pynetdicom"
    log = workdir / "pynetdicom.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "bench.pynetdicom_floor", "--port", str(port), "--dir",
                                 str(data / "received")], stdout=fh, stderr=subprocess.STDOUT, cwd=servers.REPO)
    deadline = time.monotonic() + 30
    while "ready" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"pynetdicom floor server did not start; see {log}")
        time.sleep(0.1)
    return Server("pynetdicom", "", data, proc, log), port


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.dimse_store", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short run: fewer instances, one repeat")
    p.add_argument("--small", type=int, help="small (16x16) instances per measurement; default 1000, quick 300")
    p.add_argument("--ct", type=int, help="CT 512x512 instances per measurement; default 200, quick 60")
    p.add_argument("--parallel", default="1,4,8", help="associations in parallel (comma list)")
    p.add_argument("--repeats", type=int, help="repeats per measurement (median reported); default 3, quick 1")
    p.add_argument("--servers", default="dicomflow,orthanc,pynetdicom",
                   help="peers to measure; pynetdicom is the floor server of bench/pynetdicom_floor.py")
    p.add_argument("--json", type=Path, help="also write raw results here")
    args = p.parse_args(argv)
    args.small = args.small or (300 if args.quick else 1000)
    args.ct = args.ct or (60 if args.quick else 200)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.parallel = [int(x) for x in args.parallel.split(",") if x]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Orthanc's DICOM server is dcmtk too: without TCP_NODELAY in its environment, Nagle and delayed ACKs
    # cap it at ~20 instances/s per association, which would flatter us. Both servers inherit this.
    os.environ["TCP_NODELAY"] = "1"
    workdir = Path(tempfile.mkdtemp(prefix="dicomflow-bench-dimse-"))
    started: list[Server] = []
    results: list[StoreResult] = []
    try:
        names = args.servers.split(",")
        if "dicomflow" in names:
            started.append(servers.start_dicomflow(workdir, {"DICOMFLOW_DIMSE__ENABLED": "true"}))
        if "orthanc" in names:
            started.append(servers.start_orthanc(workdir))
        ports = {s.name: dimse_port(s) for s in started}
        if "pynetdicom" in names:
            floor, ports["pynetdicom"] = start_floor(workdir)
            started.append(floor)
        for kind, count in (("small", args.small), ("ct", args.ct)):
            for assocs in args.parallel:
                for _ in range(args.repeats):
                    for server in started:  # interleaved, so both see the same machine load
                        results.append(measure(server, ports[server.name], kind, count, assocs, workdir))
    finally:
        for s in started:
            s.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"per_second": r.per_second} for r in results], indent=2))
    return 0


def report(results: list[StoreResult]) -> str:
    rows = ["| instances | associations | dicomflow inst/s | Orthanc inst/s | ratio (goal >= 1.2) | stored ok "
            "| pynetdicom floor inst/s | floor / Orthanc |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r.kind, r.associations) for r in results}, key=lambda k: (k[0] != "small", k[1]))
    nan = float("nan")
    for kind, assocs in keys:
        rate: dict[str, float] = {}
        ok = True
        for name in ("dicomflow", "orthanc", "pynetdicom"):
            mine = [r for r in results if r.server == name and r.kind == kind and r.associations == assocs]
            if mine:
                rate[name] = statistics.median(r.per_second for r in mine)
                ok = ok and all(r.stored == r.instances for r in mine)
        orthanc = rate.get("orthanc") or nan
        label = "small 16x16" if kind == "small" else "CT 512x512"
        rows.append(f"| {label} | {assocs} | {rate.get('dicomflow', nan):.0f} | {orthanc:.0f} | "
                    f"{rate.get('dicomflow', nan) / orthanc:.2f} | {'yes' if ok else 'NO'} | "
                    f"{rate.get('pynetdicom', nan):.0f} | {rate.get('pynetdicom', nan) / orthanc:.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
