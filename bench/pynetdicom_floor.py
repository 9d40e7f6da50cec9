"""The floor under any pynetdicom C-STORE SCP: ``python -m bench.pynetdicom_floor --port P [--dir D]``.

A pynetdicom AE set up the way dicomflow's DIMSE server is (same presentation contexts, the event-driven
reactor of dicomflow/dimse/reactor.py, data sets received into a temporary file, pydicom validation off),
whose C-STORE handler stores nothing and answers 0x0000 at once. Whatever it reaches is the most any
store built on pynetdicom can reach on this machine: bench/dimse_store.py measures it in the same run as
dicomflow and Orthanc, so the report shows how much of the gap is the DICOM layer and how much the store.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from pynetdicom import AE, _config, evt
from pynetdicom.events import Event

from dicomflow.dimse.reactor import make_event_driven
from dicomflow.dimse.server import receive_data_sets_in
from dicomflow.dimse.sop_classes import add_scp_contexts
from dicomflow.ingest.parse import configure_pydicom


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pynetdicom_floor", description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dir", type=Path, help="where the received data sets go (default: the temp dir)")
    args = p.parse_args(argv)
    configure_pydicom()
    _config.STORE_RECV_CHUNKED_DATASET = True
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        receive_data_sets_in(args.dir)
    ae = AE(ae_title="DICOMFLOW")
    ae.maximum_pdu_size = 262144
    ae.require_called_aet = False
    add_scp_contexts(ae)

    def on_store(event: Event) -> int:
        return 0x0000

    handlers = [(evt.EVT_CONN_OPEN, lambda event: make_event_driven(event.assoc)), (evt.EVT_C_STORE, on_store)]
    ae.start_server(("127.0.0.1", args.port), block=False, evt_handlers=handlers)
    print("ready", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
