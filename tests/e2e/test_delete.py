"""DELETE study/series/instance (the Google Cloud / Azure extension): rows, blobs, outbox, counts, tenancy."""

from __future__ import annotations

import errno
from typing import Any

import pytest
import requests
from aiohttp.test_utils import TestClient
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import MRImageStorage, generate_uid

from dicomflow.appkeys import BLOBS
from dicomflow.settings import Settings
from tests.conftest import LiveServer
from tests.factory import StoreState, make_dataset, make_instance, multipart, store_state, to_bytes

#: routing off: these tests are about ingest, and the outbox must stay as ingest wrote it
pytestmark = [pytest.mark.e2e, pytest.mark.routing_off]


class Study:
    """One study with a CT series of 3 and an MR series of 2 instances, stored through STOW."""

    def __init__(self) -> None:
        self.uid = generate_uid()
        self.ct, self.mr = generate_uid(), generate_uid()
        self.ct_sops = [generate_uid() for _ in range(3)]
        self.mr_sops = [generate_uid() for _ in range(2)]

    def parts(self) -> list[bytes]:
        ct = [make_instance(study_uid=self.uid, series_uid=self.ct, sop_uid=s, instance_number=i)
              for i, s in enumerate(self.ct_sops)]
        mr = [make_instance(study_uid=self.uid, series_uid=self.mr, sop_uid=s, instance_number=i,
                            sop_class=MRImageStorage, modality="MR", series_number=2)
              for i, s in enumerate(self.mr_sops)]
        return ct + mr


def stow(live: LiveServer, parts: list[bytes], root: str | None = None) -> None:
    body, ctype = multipart(parts)
    resp = requests.post(f"{root or live.dicomweb}/studies", data=body, headers={"Content-Type": ctype}, timeout=30)
    assert resp.status_code == 200


def sops(state: StoreState, tenant: str = "default") -> set[str]:
    return {i[3] for i in state.instances if i[0] == tenant}


def assert_blobs_match_rows(state: StoreState) -> None:
    assert sorted(i[4] for i in state.instances) == state.blobs


@pytest.fixture
def stored(live_server: LiveServer) -> tuple[Study, Study]:
    a, b = Study(), Study()
    stow(live_server, a.parts() + b.parts())
    return a, b


def test_delete_instance_series_study_keeps_counts_right(live_server: LiveServer, stored: tuple[Study, Study]) -> None:
    a, b = stored
    root = live_server.dicomweb
    before = store_state(live_server.settings)
    assert before.studies[("default", a.uid)] == (2, 5, "CT\\MR")

    resp = requests.delete(f"{root}/studies/{a.uid}/series/{a.ct}/instances/{a.ct_sops[0]}", timeout=30)
    assert resp.status_code == 204
    state = store_state(live_server.settings)
    assert sops(state) == sops(before) - {a.ct_sops[0]}
    assert state.studies[("default", a.uid)] == (2, 4, "CT\\MR")
    assert state.series[("default", a.ct)] == (a.uid, 2)
    assert_blobs_match_rows(state)
    assert state.events("instance.deleted") == [("default", "instance.deleted", a.ct_sops[0])]

    resp = requests.delete(f"{root}/studies/{a.uid}/series/{a.mr}", timeout=30)
    assert resp.status_code == 204
    state = store_state(live_server.settings)
    assert sops(state) == sops(before) - {a.ct_sops[0], *a.mr_sops}
    assert state.studies[("default", a.uid)] == (1, 2, "CT")  # MR gone from ModalitiesInStudy
    assert ("default", a.mr) not in state.series
    assert_blobs_match_rows(state)
    assert len(state.events("series.deleted")) == 1

    resp = requests.delete(f"{root}/studies/{a.uid}", timeout=30)
    assert resp.status_code == 204
    state = store_state(live_server.settings)
    assert sops(state) == set(b.ct_sops + b.mr_sops)  # the other study is untouched
    assert ("default", a.uid) not in state.studies and ("default", a.ct) not in state.series
    assert state.studies[("default", b.uid)] == (2, 5, "CT\\MR")
    assert_blobs_match_rows(state)
    assert len(state.events("study.deleted")) == 1 and state.spool == []


def test_unknown_or_already_deleted_is_404(live_server: LiveServer, stored: tuple[Study, Study]) -> None:
    a, b = stored
    root = live_server.dicomweb
    missing = generate_uid()
    for path in (f"/studies/{missing}", f"/studies/{a.uid}/series/{missing}",
                 f"/studies/{a.uid}/series/{a.ct}/instances/{missing}",
                 f"/studies/{a.uid}/series/{b.ct}",  # a series of another study
                 f"/studies/{a.uid}/series/{a.mr}/instances/{a.ct_sops[0]}"):  # an instance of another series
        resp = requests.delete(f"{root}{path}", timeout=30)
        assert resp.status_code == 404, path
        assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert requests.delete(f"{root}/studies/{a.uid}", timeout=30).status_code == 204
    assert requests.delete(f"{root}/studies/{a.uid}", timeout=30).status_code == 404
    state = store_state(live_server.settings)
    assert sops(state) == set(b.ct_sops + b.mr_sops) and len(state.events("study.deleted")) == 1


def test_another_tenants_data_is_404_and_untouched(live_server: LiveServer, stored: tuple[Study, Study]) -> None:
    a, _b = stored
    acme = live_server.tenant_dicomweb("acme")
    assert requests.delete(f"{acme}/studies/{a.uid}", timeout=30).status_code == 404
    assert requests.delete(f"{acme}/studies/{a.uid}/series/{a.ct}/instances/{a.ct_sops[0]}",
                           timeout=30).status_code == 404
    state = store_state(live_server.settings)
    assert set(a.ct_sops + a.mr_sops) <= sops(state) and state.outbox == [e for e in state.outbox
                                                                           if e[1] == "instance.stored"]
    # and the reverse: a study in acme is not reachable from the default root
    other = make_dataset()
    stow(live_server, [to_bytes(other)], root=acme)
    assert requests.delete(f"{live_server.dicomweb}/studies/{other.StudyInstanceUID}", timeout=30).status_code == 404
    assert requests.delete(f"{acme}/studies/{other.StudyInstanceUID}", timeout=30).status_code == 204
    assert sops(store_state(live_server.settings), "acme") == set()


def test_dicomweb_client_deletes(live_server: LiveServer, stored: tuple[Study, Study]) -> None:
    a, b = stored
    client = DICOMwebClient(live_server.dicomweb)
    client.delete_instance(a.uid, a.ct, a.ct_sops[1])
    client.delete_series(a.uid, a.mr)
    client.delete_study(b.uid)
    state = store_state(live_server.settings)
    assert sops(state) == {a.ct_sops[0], a.ct_sops[2]}
    assert state.studies == {("default", a.uid): (1, 2, "CT")}
    assert_blobs_match_rows(state)
    with pytest.raises(requests.HTTPError) as info:
        client.delete_study(b.uid)
    assert info.value.response.status_code == 404


def test_a_deleted_instance_can_be_stored_again_with_other_bytes(live_server: LiveServer) -> None:
    sop = generate_uid()
    first = make_dataset(sop_uid=sop)
    stow(live_server, [to_bytes(first)])
    assert requests.delete(f"{live_server.dicomweb}/studies/{first.StudyInstanceUID}", timeout=30).status_code == 204
    stow(live_server, [make_instance(sop_uid=sop, patient_name="Other^Name")])
    state = store_state(live_server.settings)
    assert sops(state) == {sop} and len(state.blobs) == 1


async def test_blob_delete_failure_still_answers_and_rows_are_gone(
        client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[type-arg]
    ds = make_dataset()
    body, ctype = multipart([to_bytes(ds)])
    assert (await client.post("/dicomweb/studies", data=body, headers={"Content-Type": ctype})).status == 200
    blobs = client.server.app[BLOBS]

    async def failing(key: str) -> Any:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(blobs, "delete", failing)
    resp = await client.delete(f"/dicomweb/studies/{ds.StudyInstanceUID}")
    assert resp.status == 204
    state = store_state(settings)
    assert state.instances == [] and len(state.blobs) == 1  # an orphan blob for fsck, never a row without blob
