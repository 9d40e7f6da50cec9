"""Storage commitment reports (PS3.4 J.3.3.1): built from the index as it is when sent, answers classified
for retry, the internal event kept out of route files."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dicomflow.connectors.base import DeliveryError
from dicomflow.dimse.commitment import (
    EVENT_ALL_SUCCEEDED,
    EVENT_SOME_FAILED,
    CommitmentRequest,
    _check_answer,
    event_information,
)
from dicomflow.engine.events import COMMITMENT_REPORT, Event
from dicomflow.engine.routes import Route, route_json_schema

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"


def test_every_reference_is_reported_with_the_request_transaction() -> None:
    refs = ((CT, "1.2.3.1"), (CT, "1.2.3.2"), (CT, "1.2.3.3"))
    report = event_information("1.2.3.99", refs, {"1.2.3.1": CT, "1.2.3.3": MR})  # 1.2.3.2 deleted since
    assert (report.event_type, report.committed, report.failed) == (EVENT_SOME_FAILED, 1, 2)
    assert report.info.TransactionUID == "1.2.3.99"
    assert [i.ReferencedSOPInstanceUID for i in report.info.ReferencedSOPSequence] == ["1.2.3.1"]
    assert {i.ReferencedSOPInstanceUID: int(i.FailureReason) for i in report.info.FailedSOPSequence} == {
        "1.2.3.2": 0x0112, "1.2.3.3": 0x0119}  # PS3.3 C.14.1.1
    everything = event_information("1.2.3.99", refs, dict.fromkeys(("1.2.3.1", "1.2.3.2", "1.2.3.3"), CT))
    assert everything.event_type == EVENT_ALL_SUCCEEDED and "FailedSOPSequence" not in everything.info


def test_request_round_trips_through_the_outbox_event() -> None:
    request = CommitmentRequest("acme", "1.2.3.99", ((CT, "1.2.3.1"), (MR, "1.2.3.2")), "CT01", "ACME")
    stored = Event.from_dict(request.event("10.1.2.3").as_dict())
    assert CommitmentRequest.from_event(stored) == request
    assert stored.study_uid == "" and stored.source["calling_ae"] == "CT01"


@pytest.mark.parametrize(("code", "retryable"), [(None, True), (0x0110, True), (0x0213, True), (0xA700, True),
                                                 (0x0112, False), (0x0113, False), (0x0119, False)])
def test_answers_that_are_not_success_fail_the_attempt(code: int | None, retryable: bool) -> None:
    with pytest.raises(DeliveryError) as failed:
        _check_answer(code, "MODALITY")
    assert failed.value.retryable is retryable


def test_success_and_warning_answers_deliver() -> None:
    _check_answer(0x0000, "MODALITY")
    _check_answer(0x0001, "MODALITY")  # PS3.7 C.2: warning


def test_routes_cannot_listen_to_commitment_requests_nor_take_the_reserved_name() -> None:
    action = [{"type": "webhook", "destination": "hook"}]
    with pytest.raises(ValidationError, match=r"commitment\.requested is not an event routes can listen to"):
        Route.model_validate({"name": "sneaky", "events": ["commitment.requested"], "actions": action})
    with pytest.raises(ValidationError, match="reserved for storage commitment reports"):
        Route.model_validate({"name": COMMITMENT_REPORT, "events": ["instance.stored"], "actions": action})
    assert "commitment.requested" not in route_json_schema()["$defs"]["EventType"]["enum"]
