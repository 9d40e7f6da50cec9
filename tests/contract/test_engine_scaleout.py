"""Routing across several workers on one index: what a second worker sees while the first one is busy.

A worker whose fan-out finds nothing (the first worker holds the backlog: SKIP LOCKED on PostgreSQL)
goes on to emit due stable timers. A study must not go stable while instances of it still wait in the
outbox, or each later-routed instance arms a new timer and the study goes stable again: two
``study.stable`` deliveries for one study.
"""

from __future__ import annotations

import time

import sqlalchemy as sa

from dicomflow.engine.store import EngineStore
from dicomflow.index import schema as t
from dicomflow.index.sql import SqlIndexStore
from tests.contract.test_engine_store import SETTINGS, add_events, routes


async def _stable_events(index: SqlIndexStore) -> list[tuple[str, str | None]]:
    async with index.engine.connect() as conn:
        rows = (await conn.execute(sa.select(t.outbox.c.event, t.outbox.c.series_uid)
                                   .where(t.outbox.c.event.like("%.stable")).order_by(t.outbox.c.id))).all()
    return [(r.event, r.series_uid) for r in rows]


async def test_no_stable_event_while_instances_of_the_study_wait_in_the_outbox(index: SqlIndexStore) -> None:
    first, second = EngineStore(index), EngineStore(index)
    rs = routes({"name": "s", "events": ["study.stable"], "stable_after": "1s"},
                {"name": "q", "events": ["series.stable"], "stable_after": "1s"})
    await add_events(index, 4, created_at=time.time() - 30)  # a backlog: quiet time long past
    assert await first.fan_out(rs, SETTINGS, "w1", limit=1) == 1  # worker 1 routed one, 3 still waiting
    assert await second.emit_stable(10) == 0  # worker 2 must not call the study stable yet
    while await first.fan_out(rs, SETTINGS, "w1", limit=1):
        pass
    assert await second.emit_stable(10) == 2
    while await first.fan_out(rs, SETTINGS, "w1", limit=10):
        pass
    assert await second.emit_stable(10) == 0
    assert sorted(await _stable_events(index)) == [("series.stable", "1.2.3.1"), ("study.stable", None)]
    stable_deliveries = [d for d in await first.list_deliveries(limit=100) if d.event.type.value.endswith("stable")]
    assert sorted(d.route for d in stable_deliveries) == ["q", "s"]  # once each


async def test_other_studies_still_go_stable(index: SqlIndexStore) -> None:
    store = EngineStore(index)
    rs = routes({"name": "s", "events": ["study.stable"], "stable_after": "1s"})
    await add_events(index, 1, study="1.2.4", created_at=time.time() - 30)
    assert await store.fan_out(rs, SETTINGS, "w1", limit=10) == 1
    await add_events(index, 2, study="1.2.5", created_at=time.time() - 30)  # another study's backlog
    assert await store.emit_stable(10) == 1
    assert await _stable_events(index) == [("study.stable", None)]
