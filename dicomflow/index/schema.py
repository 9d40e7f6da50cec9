"""Index tables (SQLAlchemy Core, dialect-neutral: SQLite by default, PostgreSQL at scale).

Every table carries ``tenant`` as the first column of its key. Attribute values are stored as their
DICOM string forms (dates ``YYYYMMDD``, times ``HHMMSS.FFFFFF``) so that range matching compares
strings. ``*_json`` columns hold the PS3.18 JSON model (without bulk data) as text.
"""

from __future__ import annotations

import sqlalchemy as sa

SCHEMA_VERSION = 1

metadata = sa.MetaData()

Json = sa.Text  # JSON kept as text: written once, returned verbatim

#: UIDs compare and sort byte-wise on every database, as in SQLite: a PostgreSQL cluster's locale
#: collation (en_US...) ignores the dots and would order "1.23.4" and "1.2.34" differently.
Uid = sa.String(64).with_variant(sa.String(64, collation="C"), "postgresql")

schema_info = sa.Table(
    "schema_info", metadata,
    sa.Column("version", sa.Integer, nullable=False),
)

studies = sa.Table(
    "studies", metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("study_uid", Uid, primary_key=True),
    sa.Column("patient_id", sa.Text),
    sa.Column("issuer_of_patient_id", sa.Text),
    sa.Column("patient_name", sa.Text),
    sa.Column("patient_name_ci", sa.Text),  # upper-cased, for case-insensitive PN matching
    sa.Column("patient_birth_date", sa.String(8)),
    sa.Column("patient_sex", sa.String(16)),
    sa.Column("study_date", sa.String(8)),
    sa.Column("study_time", sa.String(16)),
    sa.Column("accession_number", sa.Text),
    sa.Column("study_id", sa.Text),
    sa.Column("study_description", sa.Text),
    sa.Column("referring_physician_name", sa.Text),
    sa.Column("referring_physician_name_ci", sa.Text),
    sa.Column("modalities_in_study", sa.Text),  # backslash-separated, sorted
    sa.Column("num_series", sa.Integer, nullable=False, server_default="0"),
    sa.Column("num_instances", sa.Integer, nullable=False, server_default="0"),
    sa.Column("attrs_json", Json, nullable=False),  # study-level attributes (patient + study modules)
    sa.Column("updated_at", sa.Float, nullable=False),
)
sa.Index("ix_studies_patient_id", studies.c.tenant, studies.c.patient_id)
sa.Index("ix_studies_patient_name_ci", studies.c.tenant, studies.c.patient_name_ci)
sa.Index("ix_studies_study_date", studies.c.tenant, studies.c.study_date)
sa.Index("ix_studies_accession", studies.c.tenant, studies.c.accession_number)
sa.Index("ix_studies_updated", studies.c.tenant, studies.c.updated_at)

series = sa.Table(
    "series", metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("series_uid", Uid, primary_key=True),
    sa.Column("study_uid", Uid, nullable=False),
    sa.Column("modality", sa.String(16)),
    sa.Column("series_number", sa.Integer),
    sa.Column("series_description", sa.Text),
    sa.Column("series_date", sa.String(8)),
    sa.Column("series_time", sa.String(16)),
    sa.Column("performed_procedure_step_start_date", sa.String(8)),
    sa.Column("performed_procedure_step_start_time", sa.String(16)),
    sa.Column("body_part_examined", sa.Text),
    sa.Column("num_instances", sa.Integer, nullable=False, server_default="0"),
    sa.Column("attrs_json", Json, nullable=False),  # series-level attributes
    sa.Column("updated_at", sa.Float, nullable=False),
)
sa.Index("ix_series_study", series.c.tenant, series.c.study_uid)
sa.Index("ix_series_modality", series.c.tenant, series.c.modality)

instances = sa.Table(
    "instances", metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("sop_uid", Uid, primary_key=True),
    sa.Column("study_uid", Uid, nullable=False),
    sa.Column("series_uid", Uid, nullable=False),
    sa.Column("sop_class_uid", Uid, nullable=False),
    sa.Column("instance_number", sa.Integer),
    sa.Column("transfer_syntax_uid", Uid, nullable=False),
    sa.Column("number_of_frames", sa.Integer),
    sa.Column("pixel_data_offset", sa.BigInteger),
    sa.Column("blob_key", sa.Text, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("metadata_json", Json, nullable=False),  # full instance metadata, bulk data as placeholders
    sa.Column("created_at", sa.Float, nullable=False),
)
sa.Index("ix_instances_series", instances.c.tenant, instances.c.series_uid, instances.c.instance_number)
sa.Index("ix_instances_study", instances.c.tenant, instances.c.study_uid)
sa.Index("ix_instances_blob", instances.c.blob_key)

#: Per-tenant extra indexed attributes (like extended query tags): one row per attribute value.
extra_attributes = sa.Table(
    "extra_attributes", metadata,
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("sop_uid", Uid, nullable=False),
    sa.Column("tag", sa.String(8), nullable=False),
    sa.Column("value", sa.Text),
)
sa.Index("ix_extra_lookup", extra_attributes.c.tenant, extra_attributes.c.tag, extra_attributes.c.value)
sa.Index("ix_extra_sop", extra_attributes.c.tenant, extra_attributes.c.sop_uid)

#: Durable outbox: written in the same transaction as the index rows, read by the routing engine.
outbox = sa.Table(
    "outbox", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("study_uid", Uid),
    sa.Column("series_uid", Uid),
    sa.Column("sop_uid", Uid),
    sa.Column("payload_json", Json, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("claimed_by", sa.Text),
    sa.Column("claimed_until", sa.Float),
    sa.Column("done_at", sa.Float),
)
sa.Index("ix_outbox_pending", outbox.c.done_at, outbox.c.id)

#: Routing engine: one row per (outbox event, route, action step); the delivery queue and dead-letter list.
deliveries = sa.Table(
    "deliveries", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("outbox_id", sa.BigInteger, nullable=False),
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("route", sa.String(64), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),  # index of the action in the route
    sa.Column("action", sa.String(16), nullable=False),  # fhir | dicomweb | dicom | webhook
    sa.Column("destination", sa.String(64), nullable=False),
    sa.Column("study_uid", Uid),
    sa.Column("series_uid", Uid),
    sa.Column("sop_uid", Uid),
    sa.Column("event_json", Json, nullable=False),
    sa.Column("action_json", Json, nullable=False),  # the action as configured when the event was routed
    sa.Column("status", sa.String(16), nullable=False),  # waiting | pending | done | dead | dropped
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("claimed_by", sa.Text),
    sa.Column("claimed_until", sa.Float),
    sa.Column("last_error", sa.Text),
    sa.Column("outcome", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.UniqueConstraint("outbox_id", "route", "step", name="uq_deliveries_event_route_step"),
)
sa.Index("ix_deliveries_due", deliveries.c.status, deliveries.c.next_attempt_at)
sa.Index("ix_deliveries_study", deliveries.c.tenant, deliveries.c.study_uid)

#: series.stable / study.stable detection: one row per (level, UID, quiet window) until the event is emitted.
stability = sa.Table(
    "stability", metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("level", sa.String(8), primary_key=True),  # study | series
    sa.Column("uid", sa.String(64), primary_key=True),
    sa.Column("quiet", sa.Float, primary_key=True),  # seconds without a new instance
    sa.Column("study_uid", Uid, nullable=False),
    sa.Column("due_at", sa.Float, nullable=False),
)
sa.Index("ix_stability_due", stability.c.due_at)

#: Audit trail (PS3.15 A.5 semantics as FHIR AuditEvent JSON): append-only, hash-chained per tenant.
audit_events = sa.Table(
    "audit_events", metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("recorded", sa.Float, nullable=False),
    sa.Column("action", sa.String(32), nullable=False),  # store | query | retrieve | delete | ... | login
    sa.Column("outcome", sa.Integer, nullable=False),  # FHIR AuditEvent.outcome: 0, 4, 8, 12
    sa.Column("study_uid", Uid),
    sa.Column("event_json", Json, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),  # sha256(prev_hash + event_json)
)
sa.Index("ix_audit_recorded", audit_events.c.tenant, audit_events.c.recorded)
sa.Index("ix_audit_study", audit_events.c.tenant, audit_events.c.study_uid)

#: Head of each tenant's audit chain; updated in the same transaction as the records it covers.
audit_heads = sa.Table(
    "audit_heads", metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)
