"""One DICOM-aware error hierarchy, mapped to both HTTP and DIMSE.

Each class fixes its HTTP status and its DIMSE status (also used as the STOW-RS FailureReason,
PS3.18 Table 10.5.3-2 / PS3.4 Annex B.2.3). Only the protocol adapters turn these into responses.
``detail`` is shown to the peer and must never contain patient data.
"""

from __future__ import annotations

from typing import ClassVar


class DicomServiceError(Exception):
    """An error we report to a peer; each subclass fixes its HTTP and DIMSE meaning."""

    http_status: ClassVar[int] = 500
    dimse_status: ClassVar[int] = 0x0110  # PS3.7 Annex C Processing Failure
    retryable: ClassVar[bool] = False

    def __init__(self, detail: str, *, sop_instance_uid: str | None = None,
                 sop_class_uid: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.sop_instance_uid = sop_instance_uid
        #: known once the instance is parsed; reported in the STOW FailedSOPSequence (PS3.18 Table I.1-1)
        self.sop_class_uid = sop_class_uid


class InvalidRequestError(DicomServiceError):
    """Malformed multipart, URL or parameter."""

    http_status = 400
    dimse_status = 0xC000  # PS3.4 B.2.3 Cannot Understand


class UnreadableInstanceError(InvalidRequestError):
    """Not a DICOM Part 10 file, or pydicom cannot parse it."""

    dimse_status = 0xC000


class DatasetMismatchError(InvalidRequestError):
    """Missing Type 1 UIDs, Study UID differs from the URL, dataset does not match SOP Class."""

    dimse_status = 0xA900  # PS3.4 B.2.3 Data Set Does Not Match SOP Class


class InvalidQueryError(InvalidRequestError):
    """A QIDO filter or C-FIND identifier that cannot be served."""

    dimse_status = 0xA900  # PS3.4 C.4.1.1.4 Identifier does not match SOP Class


class UnsupportedSopClassError(DicomServiceError):
    http_status = 400
    dimse_status = 0x0122  # PS3.7 C.5.13 SOP Class Not Supported


class UnsupportedMediaTypeError(DicomServiceError):
    http_status = 415
    dimse_status = 0xC122  # used as STOW FailureReason for an unsupported transfer syntax


class NotAcceptableError(DicomServiceError):
    http_status = 406


class NotFoundError(DicomServiceError):
    http_status = 404
    dimse_status = 0x0000


class UnknownTenantError(NotFoundError):
    pass


class NotAuthenticatedError(DicomServiceError):
    http_status = 401
    dimse_status = 0x0124  # PS3.7 C.5.21 Refused: Not Authorized


class NotAuthorisedError(DicomServiceError):
    http_status = 403
    dimse_status = 0x0124


class DuplicateInstanceError(DicomServiceError):
    """Same SOP Instance UID, different bytes, and the tenant's policy is to reject."""

    http_status = 409
    dimse_status = 0x0111  # PS3.7 C.5.8 Duplicate SOP Instance


class OutOfResourcesError(DicomServiceError):
    """Disk or queue full, backend down, timeout: the peer may retry."""

    http_status = 503
    dimse_status = 0xA700  # PS3.4 B.2.3 Refused: Out of Resources
    retryable = True


class PayloadTooLargeError(DicomServiceError):
    http_status = 413
    dimse_status = 0xA700


class MoveDestinationUnknownError(DicomServiceError):
    http_status = 400
    dimse_status = 0xA801  # PS3.4 C.4.2.1.5 Table C.4-2 Move Destination Unknown
