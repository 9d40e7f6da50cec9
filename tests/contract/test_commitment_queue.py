"""Storage commitment reports in the routing engine's delivery queue, on every index backend (SQLite,
PostgreSQL): durable at once, held by the server for its first attempt, taken over by a worker when that
hold runs out (the server died), retried, done; never routed; listed for operators."""

from __future__ import annotations

import asyncio
import time

from dicomflow.dimse.commitment import CommitmentRequest
from dicomflow.engine.config import RouteSet
from dicomflow.engine.events import COMMITMENT_REPORT, N_EVENT_REPORT, EventType
from dicomflow.engine.routes import Route
from dicomflow.engine.store import EngineStore, Status
from dicomflow.index.sql import SqlIndexStore
from dicomflow.settings import Settings

CT = "1.2.840.10008.5.1.4.1.1.2"
REQUEST = CommitmentRequest("default", "1.2.3.99", ((CT, "1.2.3.4.1"), (CT, "1.2.3.4.2")), "MODALITY",
                            "DICOMFLOW")


async def test_queued_report_is_held_then_taken_over_retried_and_done(index: SqlIndexStore,
                                                                      index_url: str) -> None:
    server = EngineStore(index)
    row = await server.add_delivery(REQUEST.event("10.0.0.7"), COMMITMENT_REPORT, {"type": N_EVENT_REPORT},
                                    "MODALITY", claimed_by="server/dimse-1", lease=0.5)
    assert (row.status, row.attempts, row.route, row.step, row.destination) == (
        Status.PENDING, 1, COMMITMENT_REPORT, 0, "MODALITY")
    assert row.event.type is EventType.COMMITMENT_REQUESTED
    assert CommitmentRequest.from_event(row.event) == REQUEST
    assert row.event.source == {"protocol": "dimse", "calling_ae": "MODALITY", "address": "10.0.0.7"}
    assert row.as_dict()["transaction_uid"] == REQUEST.transaction

    # its event is in the outbox already routed: routes, even one listening to everything, never see it
    everything = Route.model_validate({"name": "all", "events": [e.value for e in EventType if e.is_route_event],
                                       "actions": [{"type": "webhook", "destination": "hook"}]})
    assert await server.outbox_backlog() == []
    assert await server.fan_out(RouteSet({"all": everything}, {}), Settings(), "w", limit=10) == 0

    other = await SqlIndexStore.open(index_url)  # a worker in another process
    try:
        worker = EngineStore(other)
        assert await worker.claim("worker", 60, {}, 10) == []  # the server holds it for its first attempt
        # the server died without recording its attempt: the worker takes it over once the hold has run out
        deadline = time.monotonic() + 10
        while not (claimed := await worker.claim("worker", 60, {}, 10)):
            assert time.monotonic() < deadline, "the worker never took the delivery over"
            await asyncio.sleep(0.05)
        assert [(c.id, c.attempts) for c in claimed] == [(row.id, 2)]
        assert await worker.fail(claimed[0], "association to MODALITY failed", retryable=True, max_attempts=5,
                                 backoff=(0.05, 0.1)) == Status.PENDING
        listed = await worker.list_deliveries(route=COMMITMENT_REPORT, status=Status.PENDING)
        assert [(r.id, r.attempts, r.last_error) for r in listed] == [(row.id, 2, "association to MODALITY failed")]
        deadline = time.monotonic() + 10
        while not (again := await worker.claim("worker", 60, {}, 10)):
            assert time.monotonic() < deadline, "no retry after the back-off"
            await asyncio.sleep(0.02)
        await worker.succeed(again[0], "reported on a new association to MODALITY: 2 committed, 0 failed")
    finally:
        await other.close()
    done = await server.get(row.id)
    assert done is not None
    assert (done.status, done.attempts, done.last_error) == (Status.DONE, 3, None)


async def test_first_attempt_recorded_by_the_server(index: SqlIndexStore) -> None:
    store = EngineStore(index)
    first = await store.add_delivery(REQUEST.event(), COMMITMENT_REPORT, {"type": N_EVENT_REPORT}, "MODALITY",
                                     claimed_by="server/dimse-1", lease=300)
    second = await store.add_delivery(REQUEST.event(), COMMITMENT_REPORT, {"type": N_EVENT_REPORT}, "MODALITY",
                                      claimed_by="server/dimse-2", lease=300)
    assert first.id != second.id and first.outbox_id != second.outbox_id
    await store.succeed(first, "reported on the requesting association dimse-1: 2 committed, 0 failed")
    # not retryable (the AE is not a remote node): a dead letter at once, replayable by an operator
    assert await store.fail(second, "AE 'MODALITY' is not a remote node", retryable=False, max_attempts=12,
                            backoff=(1, 2)) == Status.DEAD
    assert {r.id: r.status for r in await store.list_deliveries(route=COMMITMENT_REPORT)} == {
        first.id: Status.DONE, second.id: Status.DEAD}
    assert await store.retry([second.id]) == 1
    replayed = await store.claim("worker", 60, {}, 10)
    assert [(r.id, r.attempts) for r in replayed] == [(second.id, 1)]


async def test_a_stopping_worker_gives_back_what_it_still_holds(index: SqlIndexStore) -> None:
    """A claim can commit while the claiming call is cancelled (worker stopping): the row must not wait
    for the lease before another worker (a restarted server) takes it."""
    store = EngineStore(index)
    row = await store.add_delivery(REQUEST.event(), COMMITMENT_REPORT, {"type": N_EVENT_REPORT}, "MODALITY",
                                   claimed_by="server/dimse-1", lease=300)
    await store.fail(row, "association failed", retryable=True, max_attempts=5, backoff=(0.01, 0.01))
    deadline = time.monotonic() + 10
    while not (claimed := await store.claim("stopping", 300, {}, 10)):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert claimed[0].attempts == 2
    assert await store.release_worker("other") == 0
    assert await store.release_worker("stopping") == 1
    again = await store.claim("restarted", 300, {}, 10)
    assert [(r.id, r.attempts) for r in again] == [(row.id, 2)]
