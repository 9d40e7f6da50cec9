"""Event-driven reactors for accepted associations, in place of pynetdicom's 1 kHz polling loops.

pynetdicom 3.0.4 runs two threads per association that wake every millisecond: the DUL
(``time.sleep(_run_loop_delay)`` while idle) and the association reactor (``time.sleep(0.001)``
before every message). On a small machine twenty idle associations burn half a core, and every
C-STORE pays up to two extra milliseconds. Here the DUL waits in ``select()`` on its socket and on
a wake-up pipe written whenever a primitive is queued for sending, and the reactor waits on its
DIMSE message queue. Both loops are otherwise the ones of pynetdicom 3.0.4 (``dul.py``
``DULServiceProvider.run_reactor`` and ``association.py`` ``Association._run_reactor``, MIT
licence), so the state machine sees the same sequence of events. pynetdicom is pinned; revisit
this module when upgrading it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import time
from functools import partial
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ

logger = logging.getLogger(__name__)

#: Longest wait of an idle DUL before it looks at its timers and kill flag again (seconds).
DUL_IDLE_WAIT = 0.05
#: Longest wait of an idle reactor before it checks for release, abort and the idle timeout (seconds).
REACTOR_IDLE_WAIT = 0.01


class _WakingQueue(queue.Queue[Any]):
    """The DUL's to-provider queue: every put also wakes the DUL out of ``select()``."""

    def __init__(self, wake: socket.socket) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        with contextlib.suppress(OSError):  # buffer full (already awake) or closed (DUL gone)
            self._wake.send(b"\0")


def make_event_driven(assoc: Association) -> None:
    """Install the event-driven loops on an accepted association before its threads start."""
    dul = assoc.dul
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    dul.to_provider_queue = _WakingQueue(wake_w)
    # Thread.run() calls _target: the DUL thread has not been started yet (EVT_CONN_OPEN comes first).
    dul._target = partial(_dul_reactor, dul, wake_r, wake_w)  # type: ignore[attr-defined]
    assoc._run_reactor = partial(_assoc_reactor, assoc)  # type: ignore[method-assign]


def _wait_dul(dul: DULServiceProvider, wake_r: socket.socket, timeout: float) -> None:
    if dul.to_provider_queue.qsize() or not dul.event_queue.empty():
        return
    sock = dul.socket
    raw = sock.socket if sock is not None else None
    if raw is None or raw.fileno() < 0:
        time.sleep(dul._run_loop_delay)
        return
    if isinstance(raw, ssl.SSLSocket) and raw.pending():
        return
    try:
        readable, _, _ = select.select([raw, wake_r], [], [], timeout)
    except (OSError, ValueError):  # socket closed under us: let the DUL find out
        return
    if wake_r in readable:
        try:
            while wake_r.recv(4096):
                pass
        except OSError:
            pass


def _dul_reactor(dul: DULServiceProvider, wake_r: socket.socket, wake_w: socket.socket) -> None:
    """pynetdicom 3.0.4 ``DULServiceProvider.run_reactor`` with the idle sleep replaced by a wait."""
    dul._idle_timer.start()
    sleep = False
    try:
        while True:
            if not dul.assoc._dul_ready.is_set():
                dul.assoc._dul_ready.set()
                sleep = True
            if sleep:
                _wait_dul(dul, wake_r, DUL_IDLE_WAIT)
            if dul._kill_thread:
                break
            if dul.artim_timer.expired:
                dul.event_queue.put("Evt18")
            try:
                if dul._process_recv_primitive():
                    pass
                elif dul._is_transport_event():
                    dul._idle_timer.restart()
            except Exception:
                logger.exception("DIMSE transport error, aborting association assoc=%s", dul.assoc.name)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                if dul.socket is not None:
                    dul.socket.send(abort_pdu.encode())
                dul.assoc.is_aborted = True
                dul.assoc.is_established = False
                dul.assoc._kill = True
                dul._kill_thread = True
                return
            try:
                event = dul.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            dul.state_machine.do_action(event)
            sleep = False
    finally:
        wake_r.close()
        wake_w.close()


def _wait_for_message(assoc: Association, timeout: float) -> None:
    messages = assoc.dimse.msg_queue
    with messages.not_empty:  # holds the queue's mutex: look at the deque directly, not qsize()
        if not messages.queue:
            messages.not_empty.wait(timeout)


def _assoc_reactor(assoc: Association) -> None:
    """pynetdicom 3.0.4 ``Association._run_reactor`` waiting for messages instead of sleeping 1 ms."""
    assoc._is_paused = False
    while not assoc._kill:
        _wait_for_message(assoc, REACTOR_IDLE_WAIT)
        # send_*() from another thread pauses the reactor so that it does not take their responses
        assoc._is_paused = True
        assoc._reactor_checkpoint.wait()
        assoc._is_paused = False

        context_id, msg = assoc.dimse.get_msg(block=False)
        if msg:
            assoc._serve_request(msg, int(context_id or 0))

        if assoc.is_established and assoc.acse.is_release_requested():
            assoc.acse.send_release(is_response=True)
            assoc.is_released = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_RELEASED, {})
            assoc.kill()
            return

        if assoc.acse.is_aborted():
            assoc.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
            assoc.is_aborted = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_ABORTED, {})
            assoc.kill()
            return

        if not assoc.dul.is_alive():
            assoc.kill()
            return

        if assoc.dul.idle_timer_expired():
            logger.warning("network timeout on assoc=%s", assoc.name)
            if assoc.network_timeout_response == "A-RELEASE":
                assoc._is_paused = True
                assoc._reactor_checkpoint.wait()
                assoc.release()
                assoc._is_paused = False
            else:
                assoc.abort()
            assoc.kill()
            return
