"""Audit trail: who did what to which study, from where, with what outcome (PS3.15 A.5, FHIR AuditEvent)."""
