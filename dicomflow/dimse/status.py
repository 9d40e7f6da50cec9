"""DIMSE status datasets built from our results and errors (PS3.7 Annex C, PS3.4 B.2.3).

Only the DIMSE adapter turns a :class:`~dicomflow.errors.DicomServiceError` into a status; the
Error Comment is the error's ``detail`` (never patient data), cut to the LO limit of 64 characters.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset

from dicomflow.errors import DicomServiceError

logger = logging.getLogger(__name__)

SUCCESS = 0x0000  # PS3.7 C.1.1
#: PS3.4 B.2.3 Storage statuses
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
WARNING_COERCION = 0xB000
WARNING_ELEMENTS_DISCARDED = 0xB006
#: PS3.7 C.5 general statuses
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_SOP_INSTANCE = 0x0112
NO_SUCH_ACTION_TYPE = 0x0123
MISSING_ATTRIBUTE = 0x0120
INVALID_ATTRIBUTE_VALUE = 0x0106
NOT_AUTHORIZED = 0x0124

_LO_MAX = 64  # PS3.5 6.2: LO is at most 64 characters


def status_dataset(status: int, comment: str | None = None) -> Dataset:
    """A status Dataset: (0000,0900) Status plus an optional (0000,0902) Error Comment."""
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment.replace("\\", "/")[:_LO_MAX]
    return ds


def error_status(exc: DicomServiceError) -> Dataset:
    """The status a peer gets for one of our errors; 0x0000-mapped errors become processing failures."""
    status = exc.dimse_status if exc.dimse_status != SUCCESS else PROCESSING_FAILURE
    return status_dataset(status, exc.detail)


def log_error(exc: DicomServiceError, what: str, tenant: str, assoc_name: str) -> None:
    """Log an error once, where it becomes a response: peer errors as WARNING, ours as ERROR."""
    if exc.http_status >= 500:
        logger.error("%s failed tenant=%s assoc=%s status=0x%04X: %s", what, tenant, assoc_name,
                     exc.dimse_status, exc.detail, exc_info=exc)
    else:
        logger.warning("%s refused tenant=%s assoc=%s status=0x%04X sop=%s: %s", what, tenant, assoc_name,
                       exc.dimse_status, exc.sop_instance_uid, exc.detail)
