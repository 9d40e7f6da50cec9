"""The routing worker: routes outbox events, emits stable events, runs deliveries, reloads route files.

It runs inside ``dicomflow serve`` (started from the app's cleanup context) or alone as ``dicomflow
worker``; several may run against one PostgreSQL index. Nothing is held only in memory: a delivery is a
row claimed for a lease, so after a crash (kill -9 included) another pass takes it over once the lease
has run out. Ingest never waits for any of this. The same queue carries storage commitment reports
(route ``storage-commitment-report``) that the DIMSE server queued and could not deliver at once; they go
to a tenant's remote node (connectors/commitment.py), not to a routing destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

import aiohttp

from dicomflow.connectors.auth import TokenCache
from dicomflow.connectors.base import Connector, DeliveryError, DeliveryJob, Outcome
from dicomflow.engine.config import RouteSet, fingerprint, load_route_set
from dicomflow.engine.context import EngineContext
from dicomflow.engine.events import N_EVENT_REPORT
from dicomflow.engine.keylock import KeyLocks
from dicomflow.engine.metrics import EngineMetrics
from dicomflow.engine.store import DeliveryRow, EngineStore, Status
from dicomflow.engine.yamlfile import ConfigFileError, Problem
from dicomflow.index.sql import SqlIndexStore
from dicomflow.mapping.evaluate import MappingError
from dicomflow.offload import Offloader
from dicomflow.settings import Settings
from dicomflow.storage.base import BlobStore

logger = logging.getLogger(__name__)


class RoutingEngine:
    """One worker: owns its loops and in-flight deliveries; shares nothing else with other workers."""

    def __init__(self, settings: Settings, index: SqlIndexStore, blobs: BlobStore, offloader: Offloader) -> None:
        self.settings = settings
        self.index = index
        self.blobs = blobs
        self.offloader = offloader
        self.store = EngineStore(index)
        self.metrics = EngineMetrics()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.routes = RouteSet()
        #: False until a valid set was loaded: until then events stay in the outbox (never routed to nothing)
        self.loaded = settings.routing.routes_dir is None
        self.problems: list[Problem] = []
        self._fingerprint: tuple[tuple[str, float, int], ...] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: dict[int, tuple[asyncio.Task[None], DeliveryRow]] = {}
        self._per_destination: dict[str, int] = {}
        #: destination -> monotonic time before which it gets no new attempt (it just failed retryably)
        self._paused: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._locks: KeyLocks | None = None
        self._connectors: dict[str, Connector] = {}
        #: deliveries the server queues itself, outside routes (action type -> sender of one row)
        self._own: dict[str, Callable[[DeliveryRow], Awaitable[Outcome]]] = {}

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self._locks = KeyLocks(self.index)
        ctx = EngineContext(self.settings, self.index, self.store, self.blobs, self.offloader, self._session,
                            TokenCache(self._session), self._locks, lambda: self.routes)
        from dicomflow.connectors.commitment import CommitmentReportConnector
        from dicomflow.connectors.dicom import DicomConnector
        from dicomflow.connectors.dicomweb import DicomwebConnector
        from dicomflow.connectors.fhir import FhirConnector
        from dicomflow.connectors.webhook import WebhookConnector

        self._connectors = {"fhir": FhirConnector(ctx), "dicomweb": DicomwebConnector(ctx),
                            "dicom": DicomConnector(ctx), "webhook": WebhookConnector(ctx)}
        self._own = {N_EVENT_REPORT: CommitmentReportConnector(ctx).deliver}
        self.reload()
        self._tasks = [asyncio.create_task(self._guard(self._dispatch_loop), name="routing-dispatch"),
                       asyncio.create_task(self._guard(self._deliver_loop), name="routing-deliver"),
                       asyncio.create_task(self._guard(self._reload_loop), name="routing-reload")]
        logger.info("routing worker %s started: %d routes, %d mappings", self.worker_id, len(self.routes.routes),
                    len(self.routes.mappings))

    async def stop(self, grace: float = 5.0) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        pending = [task for task, _ in self._inflight.values()]
        if pending:
            await asyncio.wait(pending, timeout=grace)
        unfinished = [row.id for task, row in self._inflight.values() if not task.done()]
        for task, _ in self._inflight.values():
            task.cancel()
        await asyncio.gather(*(t for t, _ in self._inflight.values()), return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.store.release(unfinished)  # the next worker takes them at once, not after the lease
            # and any whose claim committed while the claiming call was being cancelled: never started here
            await self.store.release_worker(self.worker_id)
        if self._session is not None:
            await self._session.close()
        if self._locks is not None:
            self._locks.close()

    def wake(self) -> None:
        """Look at the outbox now instead of at the next poll (called after ingest, when in-process)."""
        self._wake.set()

    # -- route files ------------------------------------------------------------------------------------

    def reload(self, force: bool = False) -> bool:
        """Load route and mapping files if they changed; keep the last good set when they are invalid."""
        routing = self.settings.routing
        if routing.routes_dir is None:
            return False
        current = fingerprint([routing.routes_dir, routing.mappings_dir])
        if current == self._fingerprint and not force:
            return False
        self._fingerprint = current
        try:
            new = load_route_set(routing.routes_dir, routing.mappings_dir, self.settings)
        except ConfigFileError as exc:
            self.problems = exc.problems
            self.metrics.config_ok.set(0)
            self.metrics.reloads.labels("invalid").inc()
            kept = "keeping the last good set" if self.loaded else "no valid set yet: events wait in the outbox"
            logger.error("route/mapping files invalid (%s):\n%s", kept, "\n".join(str(p) for p in exc.problems))
            return False
        self.routes, self.loaded, self.problems = new, True, []
        self.metrics.config_ok.set(1)
        self.metrics.routes.set(len(new.routes))
        self.metrics.reloads.labels("loaded").inc()
        logger.info("routes loaded: %s; mappings: %s", ", ".join(sorted(new.routes)) or "none",
                    ", ".join(sorted(new.mappings)) or "none")
        return True

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.routing.reload_interval)
            await self.offloader.run(self.reload)

    # -- loops ----------------------------------------------------------------------------------------------

    async def _guard(self, loop_fn: Callable[[], Awaitable[None]]) -> None:
        """Keep a loop alive across unexpected errors (logged once per failure, then retried)."""
        while True:
            try:
                await loop_fn()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # a cancellation that arrived during a database call can surface wrapped in a driver
                    # error: stopping wins over restarting
                    raise asyncio.CancelledError() from None
                logger.exception("routing loop failed; restarting in 1 s")
                await asyncio.sleep(1.0)

    async def _dispatch_loop(self) -> None:
        routing = self.settings.routing
        while True:
            busy = False
            if self.loaded:
                routed = await self.store.fan_out(self.routes, self.settings, self.worker_id, routing.batch_size)
                busy = routed >= routing.batch_size
                if not busy:  # stable timers only once the backlog is routed, so they see every instance
                    emitted = await self.store.emit_stable(routing.batch_size)
                    if emitted:
                        self.metrics.stable.inc(emitted)
                        busy = True
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), routing.poll_interval)
                self._wake.clear()

    def _free_slots(self) -> dict[str, int]:
        free: dict[str, int] = {}
        now = time.monotonic()
        for name, dest in self.settings.routing.destinations.items():
            paused = self._paused.get(name, 0.0) > now
            free[name] = 0 if paused else dest.concurrency - self._per_destination.get(name, 0)
        return free

    async def _deliver_loop(self) -> None:
        routing = self.settings.routing
        while True:
            free = self._free_slots()
            room = sum(max(0, n) for n in free.values()) or 1
            rows = await self.store.claim(self.worker_id, routing.lease, free, min(room, routing.batch_size))
            for row in rows:
                self._per_destination[row.destination] = self._per_destination.get(row.destination, 0) + 1
                task = asyncio.create_task(self._run(row), name=f"delivery-{row.id}")
                self._inflight[row.id] = (task, row)  # tracked: awaited or released on stop; the row is durable
            if not rows:
                await asyncio.sleep(routing.poll_interval)

    # -- one delivery -------------------------------------------------------------------------------------

    async def _run(self, row: DeliveryRow) -> None:
        started = time.monotonic()
        labels = (row.tenant, row.route, row.destination)
        try:
            try:
                outcome = await asyncio.wait_for(self._attempt(row), self.settings.routing.lease * 0.9)
            except DeliveryError as exc:
                await self._failed(row, exc.summary, exc.detail, exc.retryable)
            except MappingError as exc:
                await self._failed(row, "mapping error", str(exc), False)
            except TimeoutError:
                await self._failed(row, "timed out", "the delivery did not finish within the lease", True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.exception("delivery %d route=%s destination=%s: unexpected error", row.id, row.route,
                                 row.destination)
                await self._failed(row, f"internal error: {type(exc).__name__}", repr(exc)[:1500], True)
            else:
                self._paused.pop(row.destination, None)
                await self.store.succeed(row, outcome)
                self.metrics.attempts.labels(*labels, "delivered").inc()
                logger.info("delivery %d route=%s step=%d destination=%s %s study=%s: %s", row.id, row.route,
                            row.step, row.destination, row.event.type.value, row.event.study_uid, outcome)
        finally:
            self.metrics.seconds.labels(row.destination).observe(time.monotonic() - started)
            self._per_destination[row.destination] -= 1
            self._inflight.pop(row.id, None)

    async def _attempt(self, row: DeliveryRow) -> str:
        kind = str(row.action.get("type"))
        own = self._own.get(kind)
        if own is not None:  # storage commitment report: to a tenant's remote node, not a routing destination
            return (await own(row)).detail
        dest = self.settings.routing.destinations.get(row.destination)
        if dest is None:
            raise DeliveryError(f"destination {row.destination!r} is no longer configured", retryable=False)
        connector = self._connectors.get(kind)
        if connector is None:
            raise DeliveryError(f"unknown action type {kind!r}", retryable=False)
        job = DeliveryJob(row.id, row.tenant, row.route, row.step, row.attempts, row.event, row.action,
                          row.destination, dest)
        return (await connector.deliver(job)).detail

    async def _failed(self, row: DeliveryRow, summary: str, detail: str, retryable: bool) -> None:
        routing = self.settings.routing
        status = await self.store.fail(row, detail, retryable=retryable, max_attempts=routing.max_attempts,
                                       backoff=(routing.backoff_initial, routing.backoff_max))
        result = "dead" if status == Status.DEAD else "retry"
        if retryable:
            # a destination that is down or overloaded gets a short rest instead of every queued delivery
            # failing at once against it (and each failure costing a database write beside ingest)
            self._paused[row.destination] = time.monotonic() + routing.backoff_initial
        else:
            self._paused.pop(row.destination, None)
        self.metrics.attempts.labels(row.tenant, row.route, row.destination, result).inc()
        if status == Status.DEAD:
            logger.warning("delivery %d route=%s destination=%s is a dead letter after %d attempt(s): %s",
                           row.id, row.route, row.destination, row.attempts, summary)
        else:
            logger.warning("delivery %d route=%s destination=%s attempt %d failed, will retry: %s", row.id,
                           row.route, row.destination, row.attempts, summary)
