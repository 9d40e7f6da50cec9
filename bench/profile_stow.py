"""Profile dicomflow's STOW path: ``python -m bench.profile_stow [--clients 4 --batch 10 --count 2000]``.

Starts dicomflow, and while a STOW load runs, records it with py-spy (a dev-only tool:
``pip install py-spy``) into an SVG flame graph and a text summary of the hottest frames.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench import data, servers
from bench.stow import stow_load


async def main_async(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="dicomflow-profile-"))
    server = servers.start_dicomflow(workdir)
    try:
        size = 512 if args.ct else 16
        template = data.series_template(study_uid=data.new_uid(1), series_uid=data.new_uid(2), rows=size,
                                        columns=size)
        warm = [(data.multipart([template.instance(1)[1]]), 1)]
        await stow_load(server, warm, 1)
        items = [template.instance(i + 2)[1] for i in range(args.count)]
        bodies = [(data.multipart(c), len(c)) for c in data.batch(items, args.batch)]
        spy = None
        if not args.no_spy:
            py_spy = shutil.which("py-spy") or str(Path(servers.__file__).parents[1] / ".venv/bin/py-spy")
            cmd = [py_spy, "record", "--pid", str(server.pid), "--rate", "200", "--threads",
                   "--format", args.format, "-o", str(args.out)]
            if args.idle:
                cmd.append("--idle")
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: ASYNC220
            await asyncio.sleep(1.0)
        cpu0 = server.cpu_seconds()
        res = await stow_load(server, bodies, args.clients)
        cpu = server.cpu_seconds() - cpu0
        print(f"{res.rate:.0f} instances/s, stored={res.stored} failed={res.failed} in {res.seconds:.1f}s; "
              f"server CPU {cpu:.1f}s = {cpu / max(res.stored, 1) * 1000:.2f} ms/instance")
        if spy is not None:
            spy.send_signal(2)
            spy.wait(60)
            print(f"profile written to {args.out}")
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile_stow", description=__doc__)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--ct", action="store_true", help="512x512x16 CT instances instead of small ones")
    p.add_argument("--format", default="raw", help="py-spy output format: raw (collapsed stacks), flamegraph")
    p.add_argument("--out", type=Path, default=Path("/tmp/stow-profile.txt"))
    p.add_argument("--idle", action="store_true", help="include idle (waiting) stacks")
    p.add_argument("--no-spy", action="store_true", help="only measure rate and server CPU")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
