"""Run a :class:`~dicomflow.index.query.Query` on the SQL index (SQLAlchemy Core).

Conditions on attributes with a column become SQL (using the ``(tenant, column)`` indexes of
:mod:`dicomflow.index.schema`); the rest, and PN matching (whose component-group rules SQL cannot
express), are checked again in Python on the stored JSON. Without a Python post-filter, LIMIT/OFFSET
run in SQL; with one, rows are streamed and counted here, so limit and offset stay exact.

Dialect notes: wild cards use ``GLOB`` on SQLite (case-sensitive, and able to use an index for a
prefix such as ``DOE*``) and ``LIKE`` with escaping elsewhere (on PostgreSQL a prefix LIKE uses an
index only with ``text_pattern_ops`` or the C collation).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from dicomflow.index import schema as t
from dicomflow.index.query import (
    INSTANCE_AVAILABILITY,
    MODALITIES_IN_STUDY,
    NUM_PATIENT_INSTANCES,
    NUM_PATIENT_SERIES,
    NUM_PATIENT_STUDIES,
    NUM_SERIES_INSTANCES,
    NUM_STUDY_INSTANCES,
    NUM_STUDY_SERIES,
    SERIES_UID,
    SOP_CLASSES_IN_STUDY,
    SOP_UID,
    STUDY_UID,
    Condition,
    MatchType,
    Query,
    SearchResults,
    attribute_level,
    build_result,
    element_matches,
    upper_bound,
)
from dicomflow.model import Level

S, SE, I = t.studies.c, t.series.c, t.instances.c  # noqa: E741

#: Attributes with a column (PS3.18 Table 10.6.1-5 keys and a few more).
STUDY_COLUMNS: dict[str, sa.ColumnElement[Any]] = {
    STUDY_UID: S.study_uid, "00100020": S.patient_id, "00100021": S.issuer_of_patient_id,
    "00100010": S.patient_name, "00100030": S.patient_birth_date, "00100040": S.patient_sex,
    "00080020": S.study_date, "00080030": S.study_time, "00080050": S.accession_number,
    "00200010": S.study_id, "00081030": S.study_description, "00080090": S.referring_physician_name,
    NUM_STUDY_SERIES: S.num_series, NUM_STUDY_INSTANCES: S.num_instances,
}
SERIES_COLUMNS: dict[str, sa.ColumnElement[Any]] = {
    SERIES_UID: SE.series_uid, "00080060": SE.modality, "00200011": SE.series_number,
    "0008103E": SE.series_description, "00080021": SE.series_date, "00080031": SE.series_time,
    "00400244": SE.performed_procedure_step_start_date, "00400245": SE.performed_procedure_step_start_time,
    "00180015": SE.body_part_examined, NUM_SERIES_INSTANCES: SE.num_instances,
}
INSTANCE_COLUMNS: dict[str, sa.ColumnElement[Any]] = {
    SOP_UID: I.sop_uid, "00080016": I.sop_class_uid, "00200013": I.instance_number,
}
#: PN columns and their upper-cased twins for case-insensitive matching.
PN_UPPER: dict[str, sa.ColumnElement[Any]] = {"00100010": S.patient_name_ci,
                                              "00080090": S.referring_physician_name_ci}
_INT_COLUMNS = frozenset({"00200011", "00200013", NUM_STUDY_SERIES, NUM_STUDY_INSTANCES, NUM_SERIES_INSTANCES})

BATCH = 200


def _wildcard(col: sa.ColumnElement[Any], pattern: str, dialect: str) -> sa.ColumnElement[bool]:
    """DICOM wild card (``*``, ``?``) as SQL: GLOB on SQLite, escaped LIKE elsewhere."""
    if dialect == "sqlite":
        return col.op("GLOB")(pattern.replace("[", "[[]"))
    like = (pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            .replace("*", "%").replace("?", "_"))
    return col.like(like, escape="\\")


def _value_clause(col: sa.ColumnElement[Any], cond: Condition, dialect: str, integer: bool
                  ) -> sa.ColumnElement[bool]:
    """An exact SQL translation of a non-PN condition on a single-valued column."""
    if cond.match is MatchType.RANGE:
        parts: list[sa.ColumnElement[bool]] = []
        if cond.low is not None:
            parts.append(col >= cond.low)
        if cond.high is not None:
            parts.append(col <= upper_bound(cond.vr, cond.high))
        return sa.and_(*parts)
    if integer:
        numbers = []
        for v in cond.values:
            f = float(v)
            if f.is_integer():
                numbers.append(int(f))
        return col.in_(numbers) if numbers else sa.false()
    plain = [v for v in cond.values if cond.vr == "UI" or ("*" not in v and "?" not in v)]
    wild = [v for v in cond.values if v not in plain]
    clauses: list[sa.ColumnElement[bool]] = []
    if plain:
        clauses.append(col == plain[0] if len(plain) == 1 else col.in_(plain))
    clauses.extend(_wildcard(col, v, dialect) for v in wild)
    return sa.or_(*clauses)


def _pn_prefilter(col: sa.ColumnElement[Any], cond: Condition, dialect: str, upper: bool
                  ) -> sa.ColumnElement[bool]:
    """A superset of the PN matches (the Python post-filter decides); index-friendly for prefixes."""
    clauses: list[sa.ColumnElement[bool]] = []
    for raw in cond.values:
        value = raw.upper() if upper else raw
        if cond.match is MatchType.FUZZY:
            words = [w for w in value.replace("=", " ").replace(",", " ").replace("^", " ").split() if w]
            clauses.append(sa.and_(*[_wildcard(col, f"*{w.strip('*')}*", dialect) for w in words]))
        elif "=" in value:
            groups = [g.rstrip("^ ") or "*" for g in value.split("=")]
            groups = [g + "*" if g != "*" else g for g in groups]
            clauses.append(_wildcard(col, "=".join(groups) + "*", dialect))
        else:
            # one component group: it may be any of Alphabetic=Ideographic=Phonetic, and stored names may
            # carry trailing empty components ("DOE^JOHN^^"): a prefix of the value or of a later group
            value = value.rstrip("^ ")
            clauses.extend([_wildcard(col, value + "*", dialect), _wildcard(col, "*=" + value + "*", dialect)])
    return sa.or_(*clauses)


class _Plan:
    """SQL statement + what the Python side still has to check."""

    def __init__(self) -> None:
        self.where: list[sa.ColumnElement[bool]] = []
        self.post: list[Condition] = []


def _plan_conditions(query: Query, tenant: str, dialect: str) -> _Plan:
    plan = _Plan()
    for cond in query.conditions:
        tag = cond.tag
        level = attribute_level(tag)
        if cond.match is MatchType.SEQUENCE:
            plan.post.append(cond)
            continue
        if tag == MODALITIES_IN_STUDY:
            # IN (subquery) rather than EXISTS: the series are found through ix_series_modality
            se2 = t.series.alias("se2")
            plan.where.append(S.study_uid.in_(sa.select(se2.c.study_uid).where(
                se2.c.tenant == tenant, _value_clause(se2.c.modality, cond, dialect, False))))
            continue
        if tag == SOP_CLASSES_IN_STUDY:
            i2 = t.instances.alias("i2")
            plan.where.append(sa.exists().where(i2.c.tenant == S.tenant, i2.c.study_uid == S.study_uid,
                                                _value_clause(i2.c.sop_class_uid, cond, dialect, False)))
            continue
        if level is Level.PATIENT:
            plan.post.append(cond)  # patient counts: computed per row
            continue
        columns = STUDY_COLUMNS if level is Level.STUDY else SERIES_COLUMNS if level is Level.SERIES \
            else INSTANCE_COLUMNS
        col = columns.get(tag)
        if cond.vr == "PN":
            plan.post.append(cond)
            if col is not None:
                upper = query.pn_case_insensitive or cond.match is MatchType.FUZZY
                plan.where.append(_pn_prefilter(PN_UPPER[tag] if upper else col, cond, dialect, upper))
            continue
        if col is not None:
            plan.where.append(_value_clause(col, cond, dialect, tag in _INT_COLUMNS))
            continue
        if tag in query.extra_tags and query.level is Level.IMAGE:
            x = t.extra_attributes.alias("x")  # found through ix_extra_lookup (tenant, tag, value)
            plan.where.append(I.sop_uid.in_(sa.select(x.c.sop_uid).where(
                x.c.tenant == tenant, x.c.tag == tag, _value_clause(x.c.value, cond, dialect, False))))
            if cond.vr in ("IS", "DS", "US", "UL", "SS", "SL", "FL", "FD"):
                plan.post.append(cond)  # stored as text: let Python compare numbers
            continue
        plan.post.append(cond)
    return plan


def _loads(text: str | None) -> dict[str, Any]:
    return json.loads(text) if text else {}


def _is(value: int | None) -> dict[str, Any]:
    return {"vr": "IS", "Value": [int(value or 0)]}


def _study_computed(row: Any) -> dict[str, Any]:
    computed: dict[str, Any] = {
        NUM_STUDY_SERIES: _is(row.num_series), NUM_STUDY_INSTANCES: _is(row.num_instances),
        INSTANCE_AVAILABILITY: {"vr": "CS", "Value": ["ONLINE"]},
    }
    if row.modalities_in_study:
        computed[MODALITIES_IN_STUDY] = {"vr": "CS", "Value": row.modalities_in_study.split("\\")}
    else:
        computed[MODALITIES_IN_STUDY] = {"vr": "CS"}
    sop_classes = getattr(row, "sop_classes", None)
    if sop_classes:
        computed[SOP_CLASSES_IN_STUDY] = {"vr": "UI", "Value": sorted(sop_classes.split(","))}
    return computed


class SqlSearch:
    """The search half of :class:`~dicomflow.index.sql.SqlIndexStore`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    def search(self, tenant: str, query: Query) -> SearchResults:
        results = SearchResults()
        return results.attach(self._run(tenant, query, results))

    # -- statements -------------------------------------------------------------------------------

    def statement(self, tenant: str, query: Query) -> tuple[sa.Select[Any], list[Condition]]:
        """The SELECT for ``query`` (without paging) and the conditions left for the post-filter."""
        plan = _plan_conditions(query, tenant, self.dialect)
        level = query.level
        studies_join = sa.and_(S.tenant == SE.tenant, S.study_uid == SE.study_uid)
        if level in (Level.PATIENT, Level.STUDY):
            cols: list[Any] = [S.study_uid, S.attrs_json, S.modalities_in_study, S.num_series, S.num_instances]
            stmt = sa.select(*cols).where(S.tenant == tenant)
            if level is Level.PATIENT:
                s2 = t.studies.alias("s2")
                same = sa.and_(s2.c.tenant == S.tenant, s2.c.patient_id.is_not_distinct_from(S.patient_id),
                               s2.c.issuer_of_patient_id.is_not_distinct_from(S.issuer_of_patient_id))
                stmt = stmt.add_columns(
                    S.patient_id, S.issuer_of_patient_id,
                    sa.select(sa.func.count()).where(same).scalar_subquery().label("p_studies"),
                    sa.select(sa.func.coalesce(sa.func.sum(s2.c.num_series), 0)).where(same)
                    .scalar_subquery().label("p_series"),
                    sa.select(sa.func.coalesce(sa.func.sum(s2.c.num_instances), 0)).where(same)
                    .scalar_subquery().label("p_instances"),
                ).order_by(S.patient_id, S.issuer_of_patient_id, S.updated_at.desc(), S.study_uid)
            else:
                # newest first, undated last. With filters, order by an expression so that the planner
                # picks the index of the WHERE terms rather than walking ix_studies_study_date.
                if plan.where:
                    stmt = stmt.order_by(sa.func.coalesce(S.study_date, "").desc(),
                                         sa.func.coalesce(S.study_time, "").desc(), S.study_uid)
                else:
                    stmt = stmt.order_by(sa.nulls_last(S.study_date.desc()), sa.nulls_last(S.study_time.desc()),
                                         S.study_uid)
        elif level is Level.SERIES:
            stmt = (sa.select(SE.series_uid, SE.study_uid, SE.attrs_json.label("series_json"),
                              SE.num_instances.label("series_instances"), S.attrs_json, S.modalities_in_study,
                              S.num_series, S.num_instances)
                    .select_from(t.series.join(t.studies, studies_join))
                    .where(SE.tenant == tenant)
                    .order_by(SE.study_uid, SE.series_number, SE.series_uid))
            if query.study_uid is not None:
                stmt = stmt.where(SE.study_uid == query.study_uid)
        else:
            series_join = sa.and_(SE.tenant == I.tenant, SE.series_uid == I.series_uid)
            stmt = (sa.select(I.sop_uid, I.metadata_json, SE.attrs_json.label("series_json"),
                              SE.num_instances.label("series_instances"), S.attrs_json, S.modalities_in_study,
                              S.num_series, S.num_instances)
                    .select_from(t.instances.join(t.series, series_join).join(t.studies, studies_join))
                    .where(I.tenant == tenant)
                    .order_by(I.study_uid, I.series_uid, I.instance_number, I.sop_uid))
            if query.study_uid is not None:
                stmt = stmt.where(I.study_uid == query.study_uid)
            if query.series_uid is not None:
                stmt = stmt.where(I.series_uid == query.series_uid)
        if level is Level.SERIES and query.series_uid is not None:
            stmt = stmt.where(SE.series_uid == query.series_uid)
        wanted = query.return_tags()
        if level is not Level.PATIENT and (SOP_CLASSES_IN_STUDY in (wanted or ()) or
                                           (wanted is None and level is Level.STUDY)):
            i3 = t.instances.alias("i3")
            # SOP Classes in Study (0008,0062), PS3.4 C.6.1.1.2: UIDs hold no comma, the separator of both
            # SQLite's group_concat(DISTINCT) and string_agg here
            agg = (sa.func.string_agg(sa.distinct(i3.c.sop_class_uid), ",") if self.dialect == "postgresql"
                   else sa.func.group_concat(sa.distinct(i3.c.sop_class_uid)))
            stmt = stmt.add_columns(sa.select(agg).where(i3.c.tenant == S.tenant, i3.c.study_uid == S.study_uid)
                                    .scalar_subquery().label("sop_classes"))
        return stmt.where(*plan.where), plan.post

    # -- execution --------------------------------------------------------------------------------

    def _match(self, query: Query, row: Any, post: list[Condition], wanted: frozenset[str] | None
               ) -> dict[str, Any] | None:
        level = query.level
        ci = query.pn_case_insensitive
        study = _loads(row.attrs_json)
        computed = _study_computed(row)
        sources: list[dict[str, Any]]
        if level is Level.PATIENT:
            computed = {NUM_PATIENT_STUDIES: _is(row.p_studies), NUM_PATIENT_SERIES: _is(row.p_series),
                        NUM_PATIENT_INSTANCES: _is(row.p_instances)}
            patient = {k: v for k, v in study.items() if k.startswith("0010") or k == "00080005"}
            sources = [patient]
            by_level = {Level.PATIENT: {**patient, **computed}, Level.STUDY: patient}
        elif level is Level.STUDY:
            sources = [study]
            by_level = {Level.STUDY: {**study, **computed}}
        else:
            series = _loads(row.series_json)
            computed[NUM_SERIES_INSTANCES] = _is(row.series_instances)
            by_level = {Level.STUDY: {**study, **computed}, Level.SERIES: {**series, **computed}}
            sources = [series, study]
            if level is Level.IMAGE:
                instance = _loads(row.metadata_json)
                by_level[Level.IMAGE] = instance
                sources = [instance, series, study]
        for cond in post:
            # at the IMAGE level every stored attribute is matched on the instance's own value
            attrs = by_level[Level.IMAGE] if level is Level.IMAGE and cond.tag in by_level[Level.IMAGE] \
                else by_level.get(attribute_level(cond.tag)) or by_level[level]
            if not element_matches(cond, attrs, ignore_case=ci):
                return None
        return build_result(query, sources, computed, wanted)

    async def _run(self, tenant: str, query: Query, results: SearchResults) -> AsyncIterator[dict[str, Any]]:
        stmt, post = self.statement(tenant, query)
        limit = query.limit
        sql_paging = not post and query.level is not Level.PATIENT
        if sql_paging:
            if limit is not None:
                stmt = stmt.limit(limit + 1)
            if query.offset:
                stmt = stmt.offset(query.offset)
        skip = 0 if sql_paging else query.offset
        wanted = query.return_tags()
        returned = 0
        last_patient: tuple[Any, Any] | None = None
        async with self.engine.connect() as conn:
            stream = await conn.stream(stmt.execution_options(yield_per=BATCH))
            try:
                # whole partitions per await: one greenlet switch per BATCH rows instead of per row
                async for partition in stream.partitions():
                    for row in partition:
                        if query.level is Level.PATIENT:
                            key = (row.patient_id, row.issuer_of_patient_id)
                            if key == last_patient:
                                continue  # one response per patient (its most recently updated study)
                        match = self._match(query, row, post, wanted)
                        if match is None:
                            continue
                        if query.level is Level.PATIENT:
                            last_patient = key
                        if skip:
                            skip -= 1
                            continue
                        if limit is not None and returned >= limit:
                            results.truncated = True
                            return
                        returned += 1
                        yield match
            finally:
                await stream.close()
