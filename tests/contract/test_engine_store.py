"""The routing engine's queue on every index backend (SQLite, PostgreSQL): fan-out exactly once,
claims never shared between workers, retries, dead letters, replay, action order, stable timers."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import sqlalchemy as sa

from dicomflow.engine.config import RouteSet
from dicomflow.engine.routes import Route
from dicomflow.engine.store import EngineStore, Status
from dicomflow.index import schema as t
from dicomflow.index.sql import SqlIndexStore
from dicomflow.settings import Settings

SETTINGS = Settings(routing={"stable_after": 60})


def routes(*defs: dict[str, Any]) -> RouteSet:
    made = {}
    for d in defs:
        route = Route.model_validate({"actions": [{"type": "webhook", "destination": "hook"}], **d})
        made[route.name] = route
    return RouteSet(made, {})


async def add_events(index: SqlIndexStore, n: int, event: str = "instance.stored", study: str = "1.2.3",
                     created_at: float | None = None) -> None:
    now = created_at if created_at is not None else time.time()
    async with index.transaction() as conn:
        for i in range(n):
            payload = {"event": event, "tenant": "default", "study_uid": study, "series_uid": f"{study}.1",
                       "sop_uid": f"{study}.1.{i}", "source": {"protocol": "dicomweb"}}
            await conn.execute(t.outbox.insert().values(tenant="default", event=event, study_uid=study,
                                                        series_uid=f"{study}.1", sop_uid=f"{study}.1.{i}",
                                                        payload_json=json.dumps(payload), created_at=now))


async def test_fan_out_routes_each_event_once(index: SqlIndexStore) -> None:
    store = EngineStore(index)
    rs = routes({"name": "a", "events": ["instance.stored"]},
                {"name": "b", "events": ["instance.stored"],
                 "actions": [{"type": "webhook", "destination": "x"}, {"type": "webhook", "destination": "y"}]},
                {"name": "c", "events": ["study.deleted"]})
    await add_events(index, 5)
    assert await store.fan_out(rs, SETTINGS, "w1", limit=3) == 3
    assert await store.fan_out(rs, SETTINGS, "w1", limit=10) == 2
    assert await store.fan_out(rs, SETTINGS, "w1", limit=10) == 0
    rows = await store.list_deliveries(limit=100)
    assert len(rows) == 5 * 3
    assert sorted({(r.route, r.step, r.status) for r in rows}) == [
        ("a", 0, Status.PENDING), ("b", 0, Status.PENDING), ("b", 1, Status.WAITING)]
    assert await store.outbox_backlog() == []


async def test_two_workers_never_claim_the_same_delivery(index: SqlIndexStore, index_url: str) -> None:
    other_index = await SqlIndexStore.open(index_url)  # a second process, as far as the database can tell
    try:
        first, second = EngineStore(index), EngineStore(other_index)
        await add_events(index, 40)
        await first.fan_out(routes({"name": "a", "events": ["instance.stored"]}), SETTINGS, "w", limit=100)
        ids: list[int] = []
        for _ in range(20):  # claimers racing for the same rows may come back short-handed; none doubles
            claims = await asyncio.gather(*[store.claim(f"w{i}", 60, {}, 7) for i in range(3)
                                            for store in (first, second)])
            ids.extend(row.id for batch in claims for row in batch)
            if len(ids) >= 40:
                break
        assert len(ids) == len(set(ids))  # nobody got a row twice
        assert len(ids) == 40
        assert await first.claim("late", 60, {}, 10) == []  # everything is leased
    finally:
        await other_index.close()


async def test_claim_respects_free_slots_per_destination(index: SqlIndexStore) -> None:
    store = EngineStore(index)
    await add_events(index, 6)
    rs = routes({"name": "a", "events": ["instance.stored"], "actions": [{"type": "webhook", "destination": "x"}]},
                {"name": "b", "events": ["instance.stored"], "actions": [{"type": "webhook", "destination": "y"}]})
    await store.fan_out(rs, SETTINGS, "w", limit=100)
    claimed = await store.claim("w", 60, {"x": 2, "y": 0}, 50)
    assert [r.destination for r in claimed] == ["x", "x"]


async def test_failures_back_off_then_dead_letter_then_replay(index: SqlIndexStore) -> None:
    store = EngineStore(index)
    await add_events(index, 1)
    await store.fan_out(routes({"name": "a", "events": ["instance.stored"],
                                "actions": [{"type": "webhook", "destination": "x"},
                                            {"type": "webhook", "destination": "y"}]}), SETTINGS, "w", limit=10)
    row = (await store.claim("w", 60, {}, 10))[0]
    assert row.attempts == 1
    before = time.time()
    assert await store.fail(row, "HTTP 503", retryable=True, max_attempts=3, backoff=(10.0, 100.0)) == Status.PENDING
    again = await store.get(row.id)
    assert again is not None and again.next_attempt_at >= before + 5.0 and again.last_error == "HTTP 503"
    assert await store.claim("w", 60, {}, 10) == []  # not due yet
    async with index.transaction() as conn:
        await conn.execute(sa.update(t.deliveries).values(next_attempt_at=0))
    row = (await store.claim("w", 60, {}, 10))[0]
    assert await store.fail(row, "HTTP 422", retryable=False, max_attempts=3, backoff=(1.0, 1.0)) == Status.DEAD
    dead = await store.list_deliveries(status=Status.DEAD)
    assert [(d.id, d.attempts, d.last_error) for d in dead] == [(row.id, 2, "HTTP 422")]

    assert await store.retry([row.id]) == 1  # replay
    row = (await store.claim("w", 60, {}, 10))[0]
    assert row.attempts == 1
    await store.succeed(row, "ok")
    step2 = (await store.claim("w", 60, {}, 10))[0]  # the next action starts only now
    assert (step2.route, step2.step, step2.destination) == ("a", 1, "y")
    assert await store.drop([step2.id]) == 1
    assert await store.retry([step2.id]) == 1 and await store.drop([step2.id]) == 1
    assert await store.retry(None, status=Status.DROPPED) == 1


async def test_release_gives_claims_back_without_counting_the_attempt(index: SqlIndexStore) -> None:
    store = EngineStore(index)
    await add_events(index, 2)
    await store.fan_out(routes({"name": "a", "events": ["instance.stored"]}), SETTINGS, "w", limit=10)
    rows = await store.claim("w", 600, {}, 10)
    await store.release([r.id for r in rows])
    again = await store.claim("w2", 600, {}, 10)
    assert sorted(r.id for r in again) == sorted(r.id for r in rows) and all(r.attempts == 1 for r in again)


async def test_stable_timers_wait_for_the_last_instance(index: SqlIndexStore) -> None:
    store = EngineStore(index)
    rs = routes({"name": "s", "events": ["study.stable"], "stable_after": "30s"},
                {"name": "q", "events": ["series.stable"], "stable_after": "10s"})
    now = time.time()
    await add_events(index, 1, created_at=now - 40)  # an old instance: both timers are due
    await store.fan_out(rs, SETTINGS, "w", limit=10)
    await add_events(index, 1, created_at=now - 15)  # a later one moves the study timer (and the series timer)
    await store.fan_out(rs, SETTINGS, "w", limit=10)
    assert await store.emit_stable(10) == 1  # series: due at now-5; study: due at now+15
    await store.fan_out(rs, SETTINGS, "w", limit=10)
    rows = await store.list_deliveries()
    assert [(r.route, r.event.type.value, r.event.quiet) for r in rows] == [("q", "series.stable", 10.0)]
    assert await store.emit_stable(10) == 0
    async with index.transaction() as conn:
        await conn.execute(sa.update(t.stability).values(due_at=sa.literal(now - 1)))
    assert await store.emit_stable(10) == 1
    await store.fan_out(rs, SETTINGS, "w", limit=10)
    assert {r.event.type.value for r in await store.list_deliveries()} == {"series.stable", "study.stable"}


async def test_a_deleted_study_cancels_its_timers(index: SqlIndexStore) -> None:
    store = EngineStore(index)
    rs = routes({"name": "s", "events": ["study.stable"], "stable_after": "30s"})
    await add_events(index, 1, created_at=time.time() - 100)
    await add_events(index, 1, event="study.deleted")
    await store.fan_out(rs, SETTINGS, "w", limit=10)
    assert await store.emit_stable(10) == 0
