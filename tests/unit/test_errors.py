"""Every error class fixes both its HTTP status and its DIMSE status (STYLE 2.3, 2.8 must-have).

The table below is the contract; a class added to dicomflow/errors.py without a row here fails.
Both adapters are exercised: the DICOMweb middleware (problem+json, Retry-After) and the DIMSE
status builder (Status + Error Comment).
"""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from dicomflow import errors
from dicomflow.dicomweb.errors import dicom_errors, problem_response
from dicomflow.dimse.status import error_status
from dicomflow.errors import DicomServiceError

#: class -> (HTTP status, DIMSE status / STOW FailureReason, retryable)
EXPECTED: dict[str, tuple[int, int, bool]] = {
    "DicomServiceError": (500, 0x0110, False),  # PS3.7 C.5 Processing Failure
    "InvalidRequestError": (400, 0xC000, False),  # PS3.4 B.2.3 Error: Cannot Understand
    "UnreadableInstanceError": (400, 0xC000, False),
    "DatasetMismatchError": (400, 0xA900, False),  # PS3.4 B.2.3 Data Set Does Not Match SOP Class
    "InvalidQueryError": (400, 0xA900, False),  # PS3.4 C.4.1.1.4 Identifier Does Not Match SOP Class
    "UnsupportedSopClassError": (400, 0x0122, False),  # PS3.7 C.5 SOP Class Not Supported
    "UnsupportedMediaTypeError": (415, 0xC122, False),  # PS3.18 I.2.2 Transfer Syntax not supported
    "NotAcceptableError": (406, 0x0110, False),
    "NotFoundError": (404, 0x0000, False),  # DIMSE: an empty result, not an error
    "UnknownTenantError": (404, 0x0000, False),
    "NotAuthenticatedError": (401, 0x0124, False),  # PS3.7 C.5 Refused: Not Authorized
    "NotAuthorisedError": (403, 0x0124, False),
    "DuplicateInstanceError": (409, 0x0111, False),  # PS3.7 C.5 Duplicate SOP Instance
    "OutOfResourcesError": (503, 0xA700, True),  # PS3.4 B.2.3 Refused: Out of Resources
    "PayloadTooLargeError": (413, 0xA700, False),
    "MoveDestinationUnknownError": (400, 0xA801, False),  # PS3.4 C.4.2.1.5 Move Destination Unknown
}


def _classes() -> dict[str, type[DicomServiceError]]:
    return {name: obj for name, obj in vars(errors).items()
            if isinstance(obj, type) and issubclass(obj, DicomServiceError)}


def test_every_error_class_is_in_the_table() -> None:
    assert set(_classes()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_http_and_dimse_status(name: str) -> None:
    cls = _classes()[name]
    http, dimse, retryable = EXPECTED[name]
    exc = cls("something went wrong", sop_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.2")
    assert (exc.http_status, exc.dimse_status, exc.retryable) == (http, dimse, retryable)
    assert (exc.detail, exc.sop_instance_uid, exc.sop_class_uid) == (
        "something went wrong", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2")

    # DICOMweb: RFC 9457 problem details with the class's status; Retry-After only when retrying helps
    resp = problem_response(exc)
    assert resp.status == http
    assert resp.content_type == "application/problem+json"
    assert resp.text is not None
    body = json.loads(resp.text)
    assert body["status"] == http and body["detail"] == "something went wrong"
    assert ("Retry-After" in resp.headers) is retryable

    # DIMSE: the status the peer gets (0x0000-mapped errors never answer a request as a success)
    status = error_status(exc)
    assert status.Status == (dimse if dimse != 0x0000 else 0x0110)
    assert status.ErrorComment == "something went wrong"


def _request() -> web.Request:
    return make_mocked_request("POST", "/dicomweb/studies")


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_middleware_maps_each_class(name: str) -> None:
    cls = _classes()[name]

    async def handler(request: web.Request) -> web.StreamResponse:
        raise cls("refused")

    resp = await dicom_errors(_request(), handler)
    assert resp.status == EXPECTED[name][0]


async def test_built_in_exceptions_are_not_mapped_to_4xx() -> None:
    """STYLE anti-pattern 6: a ValueError is our bug, not the client's: it is never turned into a 400."""

    async def handler(request: web.Request) -> web.StreamResponse:
        raise ValueError("bug")

    with pytest.raises(ValueError):
        await dicom_errors(_request(), handler)


def test_dimse_error_comment_fits_lo() -> None:
    exc = errors.DatasetMismatchError("x" * 200 + "\\y")
    assert len(error_status(exc).ErrorComment) == 64
