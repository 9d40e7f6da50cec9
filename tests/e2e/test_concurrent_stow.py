"""Under concurrent STOW load every instance is stored or reported failed, never silently dropped.

12 clients post batches of 10 at once (some identical re-sends, some conflicting duplicates, some
broken instances); every SOP Instance UID sent is counted in exactly one of ReferencedSOPSequence or
FailedSOPSequence, and the index, outbox and blob folder are counted against the responses.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp
import pytest
from pydicom.uid import generate_uid

from tests.conftest import LiveServer
from tests.factory import make_instance, multipart, store_state

#: routing off: these tests are about ingest, and the outbox must stay as ingest wrote it
pytestmark = [pytest.mark.e2e, pytest.mark.routing_off]

CLIENTS = 12
BATCHES = 4
BATCH = 10


def _batches() -> tuple[list[list[tuple[str, bytes]]], set[str], set[str]]:
    """Per client, per batch: (sop_uid, bytes). Also the SOPs expected to fail and the contested ones."""
    plans: list[list[tuple[str, bytes]]] = []
    broken: set[str] = set()
    contested: set[str] = set()
    shared = [make_instance(sop_uid=f"1.2.826.0.1.3680043.10.1045.9.{i}") for i in range(1, 6)]
    conflicting = {f"1.2.826.0.1.3680043.10.1045.8.{i}" for i in range(1, 4)}
    contested |= conflicting
    for c in range(CLIENTS):
        study = generate_uid()
        for b in range(BATCHES):
            batch: list[tuple[str, bytes]] = []
            series = generate_uid()
            for i in range(BATCH):
                sop = generate_uid()
                batch.append((sop, make_instance(study_uid=study, series_uid=series, sop_uid=sop,
                                                 instance_number=b * BATCH + i + 1)))
            if b == 0:  # identical bytes re-sent by every client at the same time: idempotent success
                batch[0] = (f"1.2.826.0.1.3680043.10.1045.9.{c % 5 + 1}", shared[c % 5])
            if b == 1:  # same SOP Instance UID, different bytes, from several clients: one wins (0x0111)
                sop = f"1.2.826.0.1.3680043.10.1045.8.{c % 3 + 1}"
                batch[1] = (sop, make_instance(sop_uid=sop, patient_name=f"Client^{c}"))
            if b == 2:  # a broken part
                sop = generate_uid()
                batch[2] = (sop, make_instance(sop_uid=sop)[:-9])
                broken.add(sop)
            plans.append(batch)
    return plans, broken, contested


async def _post(session: aiohttp.ClientSession, url: str, batch: list[tuple[str, bytes]]) -> tuple[int, Any]:
    body, ctype = multipart([data for _sop, data in batch])
    async with session.post(url, data=body, headers={"Content-Type": ctype}) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_every_instance_is_stored_or_reported(live_server: LiveServer) -> None:
    plans, broken, contested = _batches()
    url = f"{live_server.dicomweb}/studies"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=240)) as session:

        async def client(batches: list[list[tuple[str, bytes]]]) -> list[tuple[list[str], int, Any]]:
            results = []
            for batch in batches:
                status, body = await _post(session, url, batch)
                results.append(([sop for sop, _ in batch], status, body))
            return results

        per_client = [plans[c * BATCHES:(c + 1) * BATCHES] for c in range(CLIENTS)]
        outcomes = [r for rs in await asyncio.gather(*(client(b) for b in per_client)) for r in rs]

    referenced: Counter[str] = Counter()
    failed: dict[str, list[int]] = {}
    for sent, status, body in outcomes:
        assert status in (200, 202), status
        refs = [i["00081155"]["Value"][0] for i in body.get("00081199", {}).get("Value", [])]
        fails = {i["00081155"]["Value"][0]: i["00081197"]["Value"][0]
                 for i in body.get("00081198", {}).get("Value", []) if "00081155" in i}
        unnamed = [i for i in body.get("00081198", {}).get("Value", []) if "00081155" not in i]
        # nothing silently dropped: each part is either referenced or failed, once
        assert len(refs) + len(fails) + len(unnamed) == len(sent)
        assert set(refs) | set(fails) <= set(sent)
        referenced.update(refs)
        for sop, reason in fails.items():
            failed.setdefault(sop, []).append(reason)
        assert len(unnamed) == sum(1 for sop in sent if sop in broken)  # a cut file has no readable UID

    state = store_state(live_server.settings)
    stored = {i[3] for i in state.instances}
    assert stored == set(referenced)  # every acknowledged instance is in the index; nothing else is
    assert not (stored & broken)
    # each contested SOP: stored once, every other sender told 0x0111 Duplicate SOP Instance
    for sop in contested:
        assert sop in stored
        assert failed.get(sop, []) == [0x0111] * (CLIENTS // 3 - referenced[sop])
    # exactly one instance.stored event and one blob per stored instance
    events = Counter(e[2] for e in state.events("instance.stored"))
    assert set(events) == stored and set(events.values()) == {1}
    assert sorted(i[4] for i in state.instances) == state.blobs
    assert state.spool == []
    total = CLIENTS * BATCHES * BATCH
    assert len(stored) == total - len(broken) - (CLIENTS - 5) - (CLIENTS - 3)
    series_total = sum(n for (_t, _s), (_study, n) in state.series.items())
    study_total = sum(n for (_t, _s), (_ns, n, _m) in state.studies.items())
    assert series_total == study_total == len(stored)
