"""Metadata index: studies, series, instances, outbox; QIDO/C-FIND matching."""
