"""series.stable / study.stable timing, and route files changed (and broken) while the server runs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from dicomflow.app import create_app
from dicomflow.engine.admin import ENGINE
from tests.factory import make_instance, multipart
from tests.routing_support import WebhookReceiver, routing_settings, wait_for

pytestmark = pytest.mark.e2e

SECRET = "stable-secret"
STUDY = "1.2.826.0.1.3680043.10.1045.11.1"


async def stow(client: Any, parts: list[bytes]) -> float:
    """Store; returns the time just before the request (instances are stored after it)."""
    before = time.time()
    body, ctype = multipart(parts)
    resp = await client.post("/dicomweb/studies", data=body, headers={"Content-Type": ctype})
    assert resp.status == 200, await resp.text()
    return before


def hook(url: str) -> dict[str, Any]:
    return {"hook": {"type": "webhook", "url": url, "secret": SECRET}}


async def test_stable_events_fire_once_after_the_quiet_time(aiohttp_client: Any, aiohttp_server: Any,
                                                            tmp_path: Path) -> None:
    receiver = WebhookReceiver(SECRET)
    server = await aiohttp_server(receiver.app())
    routes = {
        "study.yaml": "name: study-done\nevents: [study.stable]\nstable_after: 1.2s\n"
                      "actions: [{type: webhook, destination: hook}]\n",
        "series.yaml": "name: series-done\nevents: [series.stable]\nstable_after: 0.6s\n"
                       "actions: [{type: webhook, destination: hook}]\n",
    }
    client = await aiohttp_client(create_app(routing_settings(tmp_path, routes, hook(str(server.make_url("/hook"))))))
    t1 = await stow(client, [make_instance(study_uid=STUDY, series_uid=f"{STUDY}.1", instance_number=1)])
    await asyncio.sleep(0.5)
    t2 = await stow(client, [make_instance(study_uid=STUDY, series_uid=f"{STUDY}.2", instance_number=1)])
    await asyncio.sleep(0.4)
    t3 = await stow(client, [make_instance(study_uid=STUDY, series_uid=f"{STUDY}.2", instance_number=2)])
    assert t3 > t2

    def events(kind: str) -> list[dict[str, Any]]:
        return [r for r in receiver.received if r["body"]["event"]["event"] == kind]

    await wait_for(lambda: _true(len(events("study.stable")) == 1), what="study.stable")
    await asyncio.sleep(1.5)  # nothing more may come
    study = events("study.stable")
    series = sorted(events("series.stable"), key=lambda r: r["at"])
    assert len(study) == 1 and len(series) == 2
    assert study[0]["at"] >= t3 + 1.2  # quiet time counted from the last instance of the study
    assert study[0]["body"]["event"]["quiet"] == 1.2 and study[0]["body"]["event"]["study_uid"] == STUDY
    assert [s["body"]["event"]["series_uid"] for s in series] == [f"{STUDY}.1", f"{STUDY}.2"]
    assert series[0]["at"] >= t1 + 0.6 and series[0]["at"] < study[0]["at"]
    assert series[1]["at"] >= t3 + 0.6
    engine = client.app[ENGINE]
    assert engine.metrics.registry.get_sample_value("dicomflow_stable_events_total") == 3


async def test_a_route_file_broken_while_running_keeps_the_last_good_set(aiohttp_client: Any, aiohttp_server: Any,
                                                                        tmp_path: Path) -> None:
    receiver = WebhookReceiver(SECRET)
    server = await aiohttp_server(receiver.app())
    good = ("name: ct-only\nevents: [instance.stored]\nmatch: {Modality: CT}\n"
            "actions: [{type: webhook, destination: hook}]\n")
    settings = routing_settings(tmp_path, {"r.yaml": good}, hook(str(server.make_url("/hook"))))
    route_file = tmp_path / "routes" / "r.yaml"
    client = await aiohttp_client(create_app(settings))
    engine = client.app[ENGINE]

    await stow(client, [make_instance(modality="CT")])
    await wait_for(lambda: _true(len(receiver.received) == 1), what="first delivery")

    route_file.write_text(good.replace("match: {Modality: CT}", "match: {Modality: {equals: CT, regex: '('}}"))
    await wait_for(lambda: _true(bool(engine.problems)), what="reload with problems")
    status = await (await client.get("/admin/routes")).json()
    assert status["loaded"] is True and [r["name"] for r in status["routes"]] == ["ct-only"]
    assert status["problems"] and status["problems"][0].startswith(f"{route_file}:3: match.Modality:")
    metrics = await (await client.get("/metrics")).text()
    assert "dicomflow_routes_config_valid 0.0" in metrics

    await stow(client, [make_instance(modality="CT"), make_instance(modality="MR")])  # old set still routes
    await wait_for(lambda: _true(len(receiver.received) == 2), what="delivery with the last good set")

    route_file.write_text(good.replace("Modality: CT", "Modality: MR").replace("ct-only", "mr-only"))
    await wait_for(lambda: _true("mr-only" in engine.routes.routes), what="reload of the fixed file")
    assert engine.problems == []
    await stow(client, [make_instance(modality="CT"), make_instance(modality="MR")])
    await wait_for(lambda: _true(len(receiver.received) == 3), what="delivery with the new set")
    await asyncio.sleep(0.5)
    assert [r["body"]["route"] for r in receiver.received] == ["ct-only", "ct-only", "mr-only"]


async def test_no_valid_route_set_at_start_keeps_events_in_the_outbox(aiohttp_client: Any, aiohttp_server: Any,
                                                                     tmp_path: Path) -> None:
    receiver = WebhookReceiver(SECRET)
    server = await aiohttp_server(receiver.app())
    broken = "name: late\nevents: [instance.stored]\nactions: [{type: webhook, destination: nowhere}]\n"
    settings = routing_settings(tmp_path, {"r.yaml": broken}, hook(str(server.make_url("/hook"))))
    client = await aiohttp_client(create_app(settings))
    engine = client.app[ENGINE]
    assert engine.loaded is False and "unknown destination 'nowhere'" in str(engine.problems[0])
    await stow(client, [make_instance()])
    await asyncio.sleep(0.5)
    assert await engine.store.outbox_backlog() == [("default", 1)]  # not routed to nothing: it waits
    (tmp_path / "routes" / "r.yaml").write_text(broken.replace("nowhere", "hook"))
    await wait_for(lambda: _true(len(receiver.received) == 1), what="delivery after the fix")
    assert await engine.store.outbox_backlog() == []


async def _true(value: bool) -> bool:
    return value
