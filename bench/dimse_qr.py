"""C-FIND latency and C-MOVE throughput side by side with Orthanc: ``python -m bench.dimse_qr [--quick]``.

Both servers run at the same time on free ports, each with its own data dir, and get the same data
through dcmtk ``storescu`` (not timed). Then, interleaved so both see the same machine load:

* C-FIND: the same queries over one association per server (pynetdicom as the SCU), each timed from
  the request to the final response with every pending response read: Study Root STUDY level by
  Patient ID, by Patient Name wild card, by Study Date range, SERIES level of a study, IMAGE level of
  a series, and Patient Root PATIENT level by Patient ID. p50/p95 per kind.
* C-MOVE: a whole study (small 16x16 instances, then 512x512 CT slices) to a dcmtk ``storescp
  --ignore`` started here (registered in dicomflow's ``remote_nodes`` and with Orthanc's
  ``--modality``), timed from the C-MOVE request to its final response. Instances/s and MB/s.

Prints a Markdown table with the Orthanc/dicomflow latency ratio (above 1: dicomflow is faster) and the
dicomflow/Orthanc throughput ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association

from bench import data, servers
from bench.dimse_store import DCMTK_ENV, dimse_port, run_storescu
from bench.servers import Server
from dicomflow.dimse.scu import set_nodelay

AE_TITLES = {"dicomflow": "DICOMFLOW", "orthanc": "ORTHANC"}
DEST_AE = "BENCHDEST"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"


@dataclass
class FindResult:
    server: str
    kind: str
    seconds: list[float]
    matches: list[int]


@dataclass
class MoveResult:
    server: str
    kind: str
    instances: int
    bytes: int
    seconds: float
    completed: int
    failed: int

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds if self.seconds else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0


def start_orthanc_with_destination(workdir: Path, dest_port: int) -> Server:
    """Orthanc as servers.start_orthanc, with the move destination registered (--modality)."""
    dir_ = workdir / "orthanc"
    dir_.mkdir(parents=True, exist_ok=True)
    http, dicom = servers.free_port(), servers.free_port()
    log = workdir / "orthanc.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            ["bash", str(servers.ORTHANC_START), "--http-port", str(http), "--dicom-port", str(dicom),
             "--dir", str(dir_), "--modality", f"{DEST_AE}:127.0.0.1:{dest_port}"],
            stdout=fh, stderr=subprocess.STDOUT)
    servers._wait_ready(f"http://127.0.0.1:{http}/system", proc, log)
    return Server("orthanc", f"http://127.0.0.1:{http}/dicom-web", dir_, proc, log,
                  headers={"Accept-Encoding": "identity"})


def start_dicomflow_with_destination(workdir: Path, dest_port: int) -> Server:
    tenants = {"default": {"ae_titles": [AE_TITLES["dicomflow"]],
                           "remote_nodes": {"dest": {"ae_title": DEST_AE, "host": "127.0.0.1", "port": dest_port}}}}
    return servers.start_dicomflow(workdir, {"DICOMFLOW_DIMSE__ENABLED": "true",
                                             "DICOMFLOW_TENANTS": json.dumps(tenants)})


def start_storescp(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = servers.free_port()
    out = workdir / "storescp"
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["storescp", "-aet", DEST_AE, "+xa", "--ignore", "-od", str(out), str(port)],
                            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("storescp did not start")


def load(started: list[Server], ports: dict[str, int], blobs: list[bytes], workdir: Path, name: str) -> None:
    """Store the same instances on every server (4 storescu associations each)."""
    folders = [workdir / f"load-{name}-{i}" for i in range(4)]
    for f in folders:
        f.mkdir(parents=True)
    for n, blob in enumerate(blobs):
        (folders[n % 4] / f"{n:06d}.dcm").write_bytes(blob)
    for server in started:
        run_storescu(ports[server.name], AE_TITLES[server.name], folders)
    for f in folders:
        shutil.rmtree(f, ignore_errors=True)


def _associate(port: int, called: str, contexts: list[str]) -> Association:
    ae = AE(ae_title="BENCHSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    for cx in contexts:
        ae.add_requested_context(cx)
    # the SCU disables Nagle too, or each request waits for the server's delayed ACK (~40 ms)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    if not assoc.is_established:
        raise RuntimeError(f"association with {called} failed")
    return assoc


def _identifier(**keys: Any) -> Dataset:
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def query_kinds(plans: list[data.StudyPlan]) -> dict[str, Callable[[int], tuple[str, Dataset]]]:
    """Query kind -> (i -> (information model, identifier)), cycling over the loaded studies."""
    def study_keys(**keys: Any) -> Dataset:
        base: dict[str, Any] = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "PatientName": "",
                                "PatientID": "", "StudyDate": "", "AccessionNumber": "", "ModalitiesInStudy": "",
                                "NumberOfStudyRelatedInstances": ""}
        return _identifier(**(base | keys))

    def plan(i: int) -> data.StudyPlan:
        return plans[(i * 7919) % len(plans)]

    return {
        "STUDY PatientID": lambda i: (STUDY_ROOT_FIND, study_keys(PatientID=plan(i).patient_id)),
        "STUDY PatientName SMI*": lambda i: (STUDY_ROOT_FIND, study_keys(PatientName="SMI*")),
        "STUDY StudyDate 1 month": lambda i: (STUDY_ROOT_FIND, study_keys(
            StudyDate=f"{plan(i).study_date[:6]}01-{plan(i).study_date[:6]}28")),
        "SERIES of a study": lambda i: (STUDY_ROOT_FIND, _identifier(
            QueryRetrieveLevel="SERIES", StudyInstanceUID=plan(i).study_uid, SeriesInstanceUID="", Modality="",
            SeriesNumber="", NumberOfSeriesRelatedInstances="")),
        "IMAGE of a series": lambda i: (STUDY_ROOT_FIND, _identifier(
            QueryRetrieveLevel="IMAGE", StudyInstanceUID=plan(i).study_uid,
            SeriesInstanceUID=plan(i).series[0].series_uid, SOPInstanceUID="", InstanceNumber="")),
        "PATIENT by PatientID": lambda i: (PATIENT_ROOT_FIND, _identifier(
            QueryRetrieveLevel="PATIENT", PatientID=plan(i).patient_id, PatientName="",
            NumberOfPatientRelatedStudies="")),
    }


def find_latency(server: Server, port: int, kind: str, make: Callable[[int], tuple[str, Dataset]],
                 queries: int) -> FindResult:
    assoc = _associate(port, AE_TITLES[server.name], [STUDY_ROOT_FIND, PATIENT_ROOT_FIND])
    seconds: list[float] = []
    matches: list[int] = []
    try:
        for i in range(queries):
            model, identifier = make(i)
            t0 = time.perf_counter()
            n = 0
            final = None
            for status, _ident in assoc.send_c_find(identifier, model):
                if status and status.Status in (0xFF00, 0xFF01):
                    n += 1
                else:
                    final = status.Status if status else None
            seconds.append(time.perf_counter() - t0)
            matches.append(n)
            if final != 0x0000:
                raise RuntimeError(f"{server.name} C-FIND {kind!r} ended with {final!r}")
    finally:
        assoc.release()
    return FindResult(server.name, kind, seconds, matches)


def move_study(server: Server, port: int, kind: str, study_uid: str, instances: int, size: int) -> MoveResult:
    assoc = _associate(port, AE_TITLES[server.name], [STUDY_ROOT_MOVE])
    try:
        t0 = time.perf_counter()
        final = None
        for status, _ident in assoc.send_c_move(_identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study_uid),
                                                DEST_AE, STUDY_ROOT_MOVE):
            if status and status.Status != 0xFF00:
                final = status
        seconds = time.perf_counter() - t0
    finally:
        assoc.release()
    if final is None:
        raise RuntimeError(f"{server.name} C-MOVE gave no final response")
    completed = int(final.get("NumberOfCompletedSuboperations", 0) or 0)
    failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
    if final.Status != 0x0000:
        raise RuntimeError(f"{server.name} C-MOVE ended with 0x{final.Status:04X} ({completed} ok, {failed} failed)")
    return MoveResult(server.name, kind, instances, size, seconds, completed, failed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.dimse_qr", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short run: smaller data set, fewer repeats")
    p.add_argument("--instances", type=int, help="C-FIND data set size; default 10000, quick 2000")
    p.add_argument("--queries", type=int, help="queries per kind and server; default 30, quick 10")
    p.add_argument("--move-small", type=int, help="16x16 instances in the moved study; default 1000, quick 300")
    p.add_argument("--move-ct", type=int, help="512x512 CT instances in the moved study; default 200, quick 60")
    p.add_argument("--repeats", type=int, help="C-MOVE repeats (median reported); default 3, quick 1")
    p.add_argument("--servers", default="dicomflow,orthanc")
    p.add_argument("--json", type=Path, help="also write raw results here")
    args = p.parse_args(argv)
    args.instances = args.instances or (2000 if args.quick else 10000)
    args.queries = args.queries or (10 if args.quick else 30)
    args.move_small = args.move_small or (300 if args.quick else 1000)
    args.move_ct = args.move_ct or (60 if args.quick else 200)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="dicomflow-bench-qr-"))
    started: list[Server] = []
    finds: list[FindResult] = []
    moves: list[MoveResult] = []
    dest, dest_port = start_storescp(workdir)
    try:
        names = args.servers.split(",")
        if "dicomflow" in names:
            started.append(start_dicomflow_with_destination(workdir, dest_port))
        if "orthanc" in names:
            started.append(start_orthanc_with_destination(workdir, dest_port))
        ports = {s.name: dimse_port(s) for s in started}

        plans = data.qido_dataset(args.instances)
        load(started, ports, list(data.instances_of(plans, 10)), workdir, "find")
        for kind, make in query_kinds(plans).items():
            for server in started:
                find_latency(server, ports[server.name], kind, make, 2)  # warm-up
            for server in started:
                finds.append(find_latency(server, ports[server.name], kind, make, args.queries))

        for kind, count, rows in (("small", args.move_small, 16), ("ct", args.move_ct, 512)):
            for _ in range(args.repeats):
                template = data.series_template(study_uid=data.new_uid(1), series_uid=data.new_uid(2),
                                                rows=rows, columns=rows)
                blobs = [template.instance(n + 1)[1] for n in range(count)]
                size = sum(len(b) for b in blobs)
                load(started, ports, blobs, workdir, f"move-{kind}")
                del blobs
                for server in started:
                    moves.append(move_study(server, ports[server.name], kind, template.study_uid, count, size))
    finally:
        for s in started:
            s.stop()
        dest.terminate()
        dest.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(finds, moves))
    if args.json:
        args.json.write_text(json.dumps({"find": [asdict(r) for r in finds],
                                         "move": [asdict(r) | {"per_second": r.per_second,
                                                               "mb_per_second": r.mb_per_second} for r in moves]},
                                        indent=2))
    return 0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(finds: list[FindResult], moves: list[MoveResult]) -> str:
    rows = ["| C-FIND query | matches (median) | dicomflow p50 / p95 ms | Orthanc p50 / p95 ms | "
            "p50 ratio Orthanc/dicomflow |", "| --- | --- | --- | --- | --- |"]
    for kind in dict.fromkeys(r.kind for r in finds):
        by = {r.server: r for r in finds if r.kind == kind}
        cells = []
        for name in ("dicomflow", "orthanc"):
            r = by.get(name)
            cells.append(f"{_pct(r.seconds, 0.5) * 1000:.1f} / {_pct(r.seconds, 0.95) * 1000:.1f}" if r else "n/a")
        ratio = (f"{_pct(by['orthanc'].seconds, 0.5) / _pct(by['dicomflow'].seconds, 0.5):.2f}"
                 if len(by) == 2 else "n/a")
        any_r = next(iter(by.values()))
        rows.append(f"| {kind} | {statistics.median(any_r.matches):.0f} | {cells[0]} | {cells[1]} | {ratio} |")
    rows += ["", "| C-MOVE study | instances | dicomflow inst/s (MB/s) | Orthanc inst/s (MB/s) | "
             "ratio dicomflow/Orthanc |", "| --- | --- | --- | --- | --- |"]
    for kind in dict.fromkeys(r.kind for r in moves):
        rate: dict[str, tuple[float, float]] = {}
        count = 0
        for name in ("dicomflow", "orthanc"):
            mine = [r for r in moves if r.server == name and r.kind == kind]
            if mine:
                rate[name] = (statistics.median(r.per_second for r in mine),
                              statistics.median(r.mb_per_second for r in mine))
                count = mine[0].instances
        cells = [f"{rate[n][0]:.0f} ({rate[n][1]:.1f})" if n in rate else "n/a" for n in ("dicomflow", "orthanc")]
        ratio = f"{rate['dicomflow'][0] / rate['orthanc'][0]:.2f}" if len(rate) == 2 else "n/a"
        label = "small 16x16" if kind == "small" else "CT 512x512"
        rows.append(f"| {label} | {count} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(rows)


if __name__ == "__main__":
    os.environ.setdefault("TCP_NODELAY", "1")
    raise SystemExit(main())
