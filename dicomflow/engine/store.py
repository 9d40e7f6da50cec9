"""SQL for the routing engine: claim outbox events, fan them out to deliveries, emit *.stable events,
claim due deliveries, record outcomes, and the operator's view of the queue and dead letters.

Everything runs on the index database (same engine, same SQLite writer lock as ingest). Claims are single
``UPDATE ... WHERE id IN (SELECT ... [FOR UPDATE SKIP LOCKED]) RETURNING`` statements: on PostgreSQL
several worker processes skip each other's rows; on SQLite the statement takes the write lock first, so
two processes never claim the same row either.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from dicomflow.engine.config import RouteSet
from dicomflow.engine.events import Event, EventType
from dicomflow.engine.matching import attributes_match, wants
from dicomflow.index import schema as t
from dicomflow.index.sql import SqlIndexStore
from dicomflow.mapping.view import InstanceView, SeriesView, StudyView
from dicomflow.settings import Settings


class Status:
    WAITING = "waiting"  # an earlier action of the same route has not succeeded yet
    PENDING = "pending"
    DONE = "done"
    DEAD = "dead"
    DROPPED = "dropped"


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    id: int
    tenant: str
    outbox_id: int
    event: Event
    route: str
    step: int
    action: dict[str, Any]
    destination: str
    status: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    outcome: str | None
    created_at: float
    updated_at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "tenant": self.tenant, "outbox_id": self.outbox_id, "event": self.event.type.value,
            "study_uid": self.event.study_uid, "series_uid": self.event.series_uid, "sop_uid": self.event.sop_uid,
            "route": self.route, "step": self.step, "action": self.action.get("type"),
            "destination": self.destination, "status": self.status, "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at, "last_error": self.last_error, "outcome": self.outcome,
            "created_at": self.created_at, "updated_at": self.updated_at,
            **({"transaction_uid": self.event.extra["transaction_uid"]}
               if "transaction_uid" in self.event.extra else {}),
        }


def _row(m: Any) -> DeliveryRow:
    return DeliveryRow(
        id=m["id"], tenant=m["tenant"], outbox_id=m["outbox_id"], event=Event.from_dict(json.loads(m["event_json"])),
        route=m["route"], step=m["step"], action=json.loads(m["action_json"]), destination=m["destination"],
        status=m["status"], attempts=m["attempts"], next_attempt_at=m["next_attempt_at"],
        last_error=m["last_error"], outcome=m["outcome"], created_at=m["created_at"], updated_at=m["updated_at"],
    )


def backoff_delay(attempts: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Exponential back-off with jitter: uniform in [c/2, c], c = min(max, initial * 2**(attempts-1))."""
    ceiling = min(maximum, initial * (2 ** max(0, attempts - 1)))
    return (rng or random).uniform(ceiling / 2, ceiling)


class EngineStore:
    """The routing engine's queries on the shared index database."""

    def __init__(self, index: SqlIndexStore) -> None:
        self.index = index
        self.dialect = index.dialect

    def _locked(self, select: sa.Select[Any]) -> sa.Select[Any]:
        return select.with_for_update(skip_locked=True) if self.dialect == "postgresql" else select

    def _insert(self, table: sa.Table) -> Any:
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    # -- outbox -> deliveries -------------------------------------------------------------------------

    async def fan_out(self, routes: RouteSet, settings: Settings, worker: str, limit: int) -> int:
        """Route up to ``limit`` new outbox events: create their deliveries and stable timers, mark them done.

        One transaction: an event is either fully routed or not at all (retried on the next pass).
        """
        now = time.time()
        ob = t.outbox
        async with self.index.transaction() as conn:
            pending = self._locked(
                sa.select(ob.c.id).where(ob.c.done_at.is_(None), sa.or_(ob.c.claimed_until.is_(None),
                                                                         ob.c.claimed_until < now))
                .order_by(ob.c.id).limit(limit))
            claimed = (await conn.execute(
                sa.update(ob).where(ob.c.id.in_(pending.scalar_subquery()))
                .values(claimed_by=worker, claimed_until=now + 60)
                .returning(ob.c.id, ob.c.event, ob.c.payload_json, ob.c.created_at))).all()
            events = sorted((Event.from_outbox(r.id, r.event, r.payload_json, r.created_at) for r in claimed),
                            key=lambda e: e.id)
            for event in events:
                await self._route_event(conn, event, routes, settings, now)
            if events:
                await conn.execute(sa.update(ob).where(ob.c.id.in_([e.id for e in events]))
                                   .values(done_at=now, claimed_by=None, claimed_until=None))
        return len(events)

    async def _route_event(self, conn: AsyncConnection, event: Event, routes: RouteSet, settings: Settings,
                           now: float) -> None:
        candidates = [r for r in routes.routes.values()
                      if wants(r, event, routes.quiet_for(r, event.tenant, settings))]
        attrs: list[dict[str, Any]] | None = None
        rows: list[dict[str, Any]] = []
        for route in candidates:
            if route.match:
                if attrs is None:
                    attrs = await self._attribute_sets(conn, event)
                if not attributes_match(route, attrs):
                    continue
            for step, action in enumerate(route.actions):
                rows.append({
                    "tenant": event.tenant, "outbox_id": event.id, "event": event.type.value, "route": route.name,
                    "step": step, "action": action.type, "destination": action.destination,
                    "study_uid": event.study_uid, "series_uid": event.series_uid, "sop_uid": event.sop_uid,
                    "event_json": json.dumps(event.as_dict()), "action_json": action.model_dump_json(by_alias=True),
                    "status": Status.PENDING if step == 0 else Status.WAITING, "attempts": 0,
                    "next_attempt_at": now, "created_at": now, "updated_at": now,
                })
        if rows:
            ins = self._insert(t.deliveries).values(rows)
            await conn.execute(ins.on_conflict_do_nothing(index_elements=["outbox_id", "route", "step"]))
        await self._stable_timers(conn, event, routes, settings)

    async def _stable_timers(self, conn: AsyncConnection, event: Event, routes: RouteSet,
                             settings: Settings) -> None:
        st = t.stability
        if event.type is EventType.INSTANCE_STORED:
            windows = routes.stable_windows(event.tenant, settings)
            for level, uid in (("series", event.series_uid), ("study", event.study_uid)):
                for quiet in windows[level]:
                    if uid is None:
                        continue
                    # quiet time counts from when the instance was stored, not from when it was routed
                    due = event.created_at + quiet
                    ins = self._insert(st).values(tenant=event.tenant, level=level, uid=uid, quiet=quiet,
                                                  study_uid=event.study_uid, due_at=due)
                    await conn.execute(ins.on_conflict_do_update(
                        index_elements=[st.c.tenant, st.c.level, st.c.uid, st.c.quiet],
                        set_={"due_at": sa.func.max(st.c.due_at, due) if self.dialect == "sqlite"
                              else sa.func.greatest(st.c.due_at, due)}))
        elif event.type is EventType.STUDY_DELETED:
            await conn.execute(sa.delete(st).where(st.c.tenant == event.tenant, st.c.study_uid == event.study_uid))
        elif event.type is EventType.SERIES_DELETED and event.series_uid is not None:
            await conn.execute(sa.delete(st).where(st.c.tenant == event.tenant, st.c.level == "series",
                                                   st.c.uid == event.series_uid))

    async def _attribute_sets(self, conn: AsyncConnection, event: Event) -> list[dict[str, Any]]:
        """The DICOM attributes route conditions are matched against (one set per series for a study)."""
        if event.type.is_deletion:
            return [{}]  # the rows are gone: only tenant, source and exists: false conditions can hold
        if event.type is EventType.INSTANCE_STORED and event.sop_uid is not None:
            md = (await conn.execute(sa.select(t.instances.c.metadata_json).where(
                t.instances.c.tenant == event.tenant, t.instances.c.sop_uid == event.sop_uid))).scalar()
            return [json.loads(md)] if md is not None else []
        study = (await conn.execute(sa.select(t.studies.c.attrs_json).where(
            t.studies.c.tenant == event.tenant, t.studies.c.study_uid == event.study_uid))).scalar()
        if study is None:
            return []
        study_attrs = json.loads(study)
        query = sa.select(t.series.c.attrs_json).where(t.series.c.tenant == event.tenant,
                                                       t.series.c.study_uid == event.study_uid)
        if event.type is EventType.SERIES_STABLE:
            query = query.where(t.series.c.series_uid == event.series_uid)
        series = (await conn.execute(query)).scalars().all()
        return [{**study_attrs, **json.loads(s)} for s in series] or [study_attrs]

    async def emit_stable(self, limit: int) -> int:
        """Turn due stable timers into ``series.stable`` / ``study.stable`` outbox events."""
        now = time.time()
        st = t.stability
        ob = t.outbox
        # Not while instances of the study (series) still wait in the outbox: another worker may hold them
        # (SKIP LOCKED), and routing them afterwards would arm the timer again: the study would go stable twice.
        waiting = sa.exists().where(ob.c.done_at.is_(None), ob.c.event == EventType.INSTANCE_STORED.value,
                                    ob.c.tenant == st.c.tenant, ob.c.study_uid == st.c.study_uid,
                                    sa.or_(st.c.level == "study", ob.c.series_uid == st.c.uid))
        async with self.index.transaction() as conn:
            due = (await conn.execute(self._locked(
                sa.select(st).where(st.c.due_at <= now, ~waiting).order_by(st.c.due_at).limit(limit)))).all()
            emitted = 0
            for row in due:
                gone = await conn.execute(sa.delete(st).where(
                    st.c.tenant == row.tenant, st.c.level == row.level, st.c.uid == row.uid,
                    st.c.quiet == row.quiet, st.c.due_at == row.due_at))
                if gone.rowcount != 1:  # a new instance moved the deadline meanwhile
                    continue
                series_uid = row.uid if row.level == "series" else None
                payload = {"event": f"{row.level}.stable", "tenant": row.tenant, "study_uid": row.study_uid,
                           "series_uid": series_uid, "sop_uid": None, "source": {}, "quiet": row.quiet}
                await conn.execute(t.outbox.insert().values(
                    tenant=row.tenant, event=f"{row.level}.stable", study_uid=row.study_uid, series_uid=series_uid,
                    payload_json=json.dumps(payload), created_at=now))
                emitted += 1
        return emitted

    # -- deliveries ----------------------------------------------------------------------------------

    async def add_delivery(self, event: Event, route: str, action: dict[str, Any], destination: str, *,
                           claimed_by: str, lease: float) -> DeliveryRow:
        """Queue a delivery that the server makes itself, outside any route (a storage commitment report).

        One transaction: the event is appended to the outbox as already routed (``done_at`` set: routes
        never see it) and its delivery is created pending, claimed by ``claimed_by`` for ``lease`` seconds
        with its first attempt counted. The caller makes that attempt at once and records it with
        :meth:`succeed` or :meth:`fail`; should it die first, a worker takes the delivery over when the
        lease has run out, as after any worker's crash.
        """
        now = time.time()
        ob, d = t.outbox, t.deliveries
        payload = {k: v for k, v in event.as_dict().items() if k not in ("id", "created_at")}
        async with self.index.transaction() as conn:
            outbox_id = (await conn.execute(ob.insert().values(
                tenant=event.tenant, event=event.type.value, study_uid=event.study_uid or None,
                series_uid=event.series_uid, sop_uid=event.sop_uid, payload_json=json.dumps(payload),
                created_at=now, done_at=now).returning(ob.c.id))).scalar_one()
            stored = dataclasses.replace(event, id=outbox_id, created_at=now)
            row = (await conn.execute(d.insert().values(
                tenant=event.tenant, outbox_id=outbox_id, event=event.type.value, route=route, step=0,
                action=str(action["type"]), destination=destination, study_uid=event.study_uid or None,
                series_uid=event.series_uid, sop_uid=event.sop_uid, event_json=json.dumps(stored.as_dict()),
                action_json=json.dumps(action), status=Status.PENDING, attempts=1, next_attempt_at=now,
                claimed_by=claimed_by, claimed_until=now + lease, created_at=now, updated_at=now)
                .returning(*d.c))).one()
        return _row(row._mapping)

    async def claim(self, worker: str, lease: float, free: dict[str, int], limit: int) -> list[DeliveryRow]:
        """Claim due deliveries, at most ``free[destination]`` per destination (destinations not in
        ``free`` are not limited here)."""
        now = time.time()
        d = t.deliveries
        due = sa.and_(d.c.status == Status.PENDING, d.c.next_attempt_at <= now,
                      sa.or_(d.c.claimed_until.is_(None), d.c.claimed_until < now))
        async with self.index.transaction() as conn:
            candidates = (await conn.execute(self._locked(
                sa.select(d.c.id, d.c.destination).where(due).order_by(d.c.next_attempt_at, d.c.id)
                .limit(limit * 4)))).all()
            room = dict(free)
            picked: list[int] = []
            for cid, dest in candidates:
                if room.get(dest, 1) <= 0:
                    continue
                if dest in room:
                    room[dest] -= 1
                picked.append(cid)
                if len(picked) >= limit:
                    break
            if not picked:
                return []
            rows = (await conn.execute(
                sa.update(d).where(d.c.id.in_(picked), due)
                .values(claimed_by=worker, claimed_until=now + lease, attempts=d.c.attempts + 1, updated_at=now)
                .returning(*d.c))).all()
        return [_row(r._mapping) for r in rows]

    async def succeed(self, row: DeliveryRow, outcome: str) -> None:
        now = time.time()
        d = t.deliveries
        async with self.index.transaction() as conn:
            done = await conn.execute(sa.update(d).where(d.c.id == row.id, d.c.status == Status.PENDING).values(
                status=Status.DONE, outcome=outcome[:1000], last_error=None, claimed_by=None, claimed_until=None,
                updated_at=now))
            if done.rowcount == 1:  # the next action of the route may start now
                await conn.execute(sa.update(d).where(
                    d.c.outbox_id == row.outbox_id, d.c.route == row.route, d.c.step == row.step + 1,
                    d.c.status == Status.WAITING).values(status=Status.PENDING, next_attempt_at=now, updated_at=now))

    async def fail(self, row: DeliveryRow, error: str, *, retryable: bool, max_attempts: int,
                   backoff: tuple[float, float]) -> str:
        """Record a failed attempt: back off and retry, or make it a dead letter. Returns the new status."""
        now = time.time()
        d = t.deliveries
        dead = not retryable or row.attempts >= max_attempts
        values: dict[str, Any] = {"last_error": error[:2000], "claimed_by": None, "claimed_until": None,
                                  "updated_at": now}
        if dead:
            values["status"] = Status.DEAD
        else:
            values["next_attempt_at"] = now + backoff_delay(row.attempts, *backoff)
        async with self.index.transaction() as conn:
            await conn.execute(sa.update(d).where(d.c.id == row.id, d.c.status == Status.PENDING).values(**values))
        return Status.DEAD if dead else Status.PENDING

    async def release(self, ids: Sequence[int]) -> None:
        """Give claimed deliveries back (on shutdown) without counting the attempt."""
        if not ids:
            return
        d = t.deliveries
        async with self.index.transaction() as conn:
            await conn.execute(sa.update(d).where(d.c.id.in_(list(ids)), d.c.status == Status.PENDING).values(
                claimed_by=None, claimed_until=None, attempts=sa.case((d.c.attempts > 0, d.c.attempts - 1),
                                                                      else_=0)))

    async def release_worker(self, worker: str) -> int:
        """Give back every pending delivery still claimed by ``worker`` (on shutdown), without counting the
        attempt; returns how many."""
        d = t.deliveries
        async with self.index.transaction() as conn:
            result = await conn.execute(sa.update(d).where(d.c.claimed_by == worker, d.c.status == Status.PENDING)
                                        .values(claimed_by=None, claimed_until=None,
                                                attempts=sa.case((d.c.attempts > 0, d.c.attempts - 1), else_=0)))
        return int(result.rowcount)

    # -- operators -------------------------------------------------------------------------------------

    async def list_deliveries(self, *, status: str | None = None, tenant: str | None = None, route: str | None = None,
                   destination: str | None = None, study_uid: str | None = None, limit: int = 100,
                   offset: int = 0) -> list[DeliveryRow]:
        d = t.deliveries
        query = sa.select(d).order_by(d.c.id.desc()).limit(limit).offset(offset)
        for column, value in ((d.c.status, status), (d.c.tenant, tenant), (d.c.route, route),
                              (d.c.destination, destination), (d.c.study_uid, study_uid)):
            if value is not None:
                query = query.where(column == value)
        async with self.index.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_row(r._mapping) for r in rows]

    async def get(self, delivery_id: int) -> DeliveryRow | None:
        async with self.index.engine.connect() as conn:
            row = (await conn.execute(sa.select(t.deliveries).where(t.deliveries.c.id == delivery_id))).first()
        return _row(row._mapping) if row is not None else None

    async def retry(self, ids: Sequence[int] | None = None, *, status: str = Status.DEAD,
                    tenant: str | None = None) -> int:
        """Replay: make deliveries pending again with a fresh attempt budget.

        ``ids``: exactly these (any status but pending/waiting); otherwise every delivery in ``status``.
        """
        now = time.time()
        d = t.deliveries
        query = sa.update(d).values(status=Status.PENDING, attempts=0, next_attempt_at=now, claimed_by=None,
                                    claimed_until=None, updated_at=now)
        if ids is not None:
            query = query.where(d.c.id.in_(list(ids)), d.c.status.in_([Status.DEAD, Status.DROPPED, Status.DONE]))
        else:
            query = query.where(d.c.status == status)
        if tenant is not None:
            query = query.where(d.c.tenant == tenant)
        async with self.index.transaction() as conn:
            result = await conn.execute(query)
        return int(result.rowcount)

    async def drop(self, ids: Sequence[int], tenant: str | None = None) -> int:
        """Give up on deliveries (dead letters or pending ones); they stay listed as dropped."""
        now = time.time()
        d = t.deliveries
        query = sa.update(d).where(d.c.id.in_(list(ids)), d.c.status.in_(
            [Status.DEAD, Status.PENDING, Status.WAITING])).values(status=Status.DROPPED, claimed_by=None,
                                                                  claimed_until=None, updated_at=now)
        if tenant is not None:
            query = query.where(d.c.tenant == tenant)
        async with self.index.transaction() as conn:
            result = await conn.execute(query)
        return int(result.rowcount)

    async def counts(self) -> list[tuple[str, str, str, str, int]]:
        """(tenant, route, destination, status, count) for metrics."""
        d = t.deliveries
        async with self.index.engine.connect() as conn:
            rows = (await conn.execute(sa.select(d.c.tenant, d.c.route, d.c.destination, d.c.status,
                                                 sa.func.count()).group_by(d.c.tenant, d.c.route, d.c.destination,
                                                                           d.c.status))).all()
        return [(r[0], r[1], r[2], r[3], int(r[4])) for r in rows]

    async def outbox_backlog(self) -> list[tuple[str, int]]:
        """(tenant, events not yet routed)."""
        ob = t.outbox
        async with self.index.engine.connect() as conn:
            rows = (await conn.execute(sa.select(ob.c.tenant, sa.func.count()).where(ob.c.done_at.is_(None))
                                       .group_by(ob.c.tenant))).all()
        return [(r[0], int(r[1])) for r in rows]

    # -- what mappings and forwards read ---------------------------------------------------------------

    async def study_view(self, tenant: str, study_uid: str, variables: dict[str, str]) -> StudyView | None:
        """The study as stored now (attributes of study and series; UIDs, classes, numbers of instances)."""
        async with self.index.engine.connect() as conn:
            study = (await conn.execute(sa.select(t.studies.c.attrs_json).where(
                t.studies.c.tenant == tenant, t.studies.c.study_uid == study_uid))).scalar()
            if study is None:
                return None
            series_rows = (await conn.execute(
                sa.select(t.series.c.series_uid, t.series.c.attrs_json)
                .where(t.series.c.tenant == tenant, t.series.c.study_uid == study_uid)
                .order_by(t.series.c.series_number, t.series.c.series_uid))).all()
            instance_rows = (await conn.execute(
                sa.select(t.instances.c.series_uid, t.instances.c.sop_uid, t.instances.c.sop_class_uid,
                          t.instances.c.instance_number)
                .where(t.instances.c.tenant == tenant, t.instances.c.study_uid == study_uid)
                .order_by(t.instances.c.instance_number, t.instances.c.sop_uid))).all()
        per_series: dict[str, list[InstanceView]] = {}
        for r in instance_rows:
            per_series.setdefault(r.series_uid, []).append(InstanceView(r.sop_uid, r.sop_class_uid,
                                                                        r.instance_number))
        series = [SeriesView(r.series_uid, json.loads(r.attrs_json), per_series.get(r.series_uid, []))
                  for r in series_rows]
        return StudyView(tenant, study_uid, json.loads(study), series, variables)
