"""Routes end to end with a webhook: STOW-RS in, outbox, route match, signed POST to a local receiver."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dicomflow.app import create_app
from dicomflow.engine.admin import ENGINE
from tests.factory import make_instance, multipart
from tests.routing_support import WebhookReceiver, routing_settings, wait_for

pytestmark = pytest.mark.e2e

SECRET = "s3cret-for-tests"

ROUTE_CT = """
name: ct-to-hook
events: [instance.stored]
match:
  Modality: [CT]
actions:
  - type: webhook
    destination: hook
"""


async def stow(client: Any, parts: list[bytes], root: str = "/dicomweb") -> None:
    body, ctype = multipart(parts)
    resp = await client.post(f"{root}/studies", data=body, headers={"Content-Type": ctype})
    assert resp.status == 200, await resp.text()


async def test_matching_instances_reach_the_webhook_signed(aiohttp_client: Any, aiohttp_server: Any,
                                                           tmp_path: Path) -> None:
    receiver = WebhookReceiver(SECRET)
    hook = await aiohttp_server(receiver.app())
    settings = routing_settings(tmp_path, {"ct.yaml": ROUTE_CT}, {
        "hook": {"type": "webhook", "url": str(hook.make_url("/hook")), "secret": SECRET}})
    client = await aiohttp_client(create_app(settings))
    ct = make_instance(modality="CT", patient_name="Zecret^Hiddenname")
    mr = make_instance(modality="MR")
    await stow(client, [ct, mr])

    await wait_for(lambda: _async(len(receiver.received) >= 1), what="webhook delivery")
    engine = client.app[ENGINE]
    done = await wait_for(lambda: engine.store.list_deliveries(status="done"), what="delivery done")
    assert len(done) == 1  # the MR instance matched no route
    got = receiver.received[0]
    assert receiver.bad_signatures == 0
    assert got["headers"]["X-Dicomflow-Event"] == "instance.stored"
    assert got["headers"]["X-Dicomflow-Delivery"] == str(done[0].id)
    event = got["body"]["event"]
    assert got["body"]["route"] == "ct-to-hook"
    assert event["tenant"] == "default" and event["source"]["protocol"] == "dicomweb"
    assert "Zecret" not in str(got["body"])  # UIDs only, never patient data


async def test_webhook_4xx_forever_is_a_dead_letter_then_replayed(aiohttp_client: Any, aiohttp_server: Any,
                                                                 tmp_path: Path) -> None:
    receiver = WebhookReceiver(SECRET, script=[503, 503, 422])
    hook = await aiohttp_server(receiver.app())
    settings = routing_settings(tmp_path, {"ct.yaml": ROUTE_CT}, {
        "hook": {"type": "webhook", "url": str(hook.make_url("/hook")), "secret": SECRET}})
    client = await aiohttp_client(create_app(settings))
    await stow(client, [make_instance(modality="CT")])
    engine = client.app[ENGINE]
    dead = await wait_for(lambda: engine.store.list_deliveries(status="dead"), what="dead letter")
    assert dead[0].attempts == 3  # two 503s retried with back-off, then 422: not worth retrying
    assert "HTTP 422" in (dead[0].last_error or "")
    assert receiver.received == []

    resp = await client.get("/admin/deliveries", params={"status": "dead"})
    listed = await resp.json()
    assert [d["id"] for d in listed] == [dead[0].id] and "422" in listed[0]["last_error"]

    resp = await client.post(f"/admin/deliveries/{dead[0].id}/retry")
    assert resp.status == 200, await resp.text()
    await wait_for(lambda: _async(len(receiver.received) == 1), what="replayed delivery")
    row = await wait_for(lambda: _done(engine, dead[0].id), what="replayed delivery done")
    assert row.attempts == 1

    metrics = await (await client.get("/metrics")).text()
    labels = 'destination="hook",{}route="ct-to-hook",{}tenant="default"'
    assert "dicomflow_delivery_attempts_total{" + labels.format('result="dead",', "") + "} 1.0" in metrics
    assert "dicomflow_delivery_attempts_total{" + labels.format('result="retry",', "") + "} 2.0" in metrics
    assert "dicomflow_deliveries{" + labels.format("", 'status="done",') + "} 1.0" in metrics


async def _done(engine: Any, delivery_id: int) -> Any:
    row = await engine.store.get(delivery_id)
    return row if row is not None and row.status == "done" else None


async def _async(value: Any) -> Any:
    return value


async def test_per_destination_concurrency_limit(aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path) -> None:
    import asyncio

    from aiohttp import web

    running, peak, seen = 0, 0, 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal running, peak, seen
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.2)
        running -= 1
        seen += 1
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", slow)
    hook = await aiohttp_server(app)
    route = "name: all\nevents: [instance.stored]\nactions: [{type: webhook, destination: hook}]\n"
    settings = routing_settings(tmp_path, {"all.yaml": route}, {
        "hook": {"type": "webhook", "url": str(hook.make_url("/hook")), "secret": SECRET, "concurrency": 3}})
    client = await aiohttp_client(create_app(settings))
    await stow(client, [make_instance() for _ in range(12)])
    await wait_for(lambda: _async(seen == 12), what="12 deliveries")
    assert peak == 3  # in parallel, but never more than the destination allows


async def test_admin_api_shows_a_tenant_only_its_own_deliveries(aiohttp_client: Any, aiohttp_server: Any,
                                                                tmp_path: Path) -> None:
    receiver = WebhookReceiver(SECRET)
    hook = await aiohttp_server(receiver.app())
    route = ("name: acme-hook\ntenants: [acme]\nevents: [instance.stored]\n"
             "actions: [{type: webhook, destination: hook}]\n")
    settings = routing_settings(tmp_path, {"r.yaml": route}, {
        "hook": {"type": "webhook", "url": str(hook.make_url("/hook")), "secret": SECRET}})
    client = await aiohttp_client(create_app(settings))
    await stow(client, [make_instance()])  # default tenant: no route
    await stow(client, [make_instance()], root="/tenants/acme/dicomweb")
    await wait_for(lambda: _async(len(receiver.received) == 1), what="acme delivery")
    assert receiver.received[0]["body"]["event"]["tenant"] == "acme"
    await wait_for(lambda: client.app[ENGINE].store.list_deliveries(status="done"), what="acme delivery done")
    acme = await (await client.get("/tenants/acme/admin/deliveries")).json()
    assert [d["tenant"] for d in acme] == ["acme"]
    assert await (await client.get("/admin/deliveries")).json() == []
    assert (await client.get(f"/admin/deliveries/{acme[0]['id']}")).status == 404
    assert (await client.post(f"/admin/deliveries/{acme[0]['id']}/retry")).status == 404
    assert (await client.get(f"/tenants/acme/admin/deliveries/{acme[0]['id']}")).status == 200
    resp = await client.post(f"/tenants/acme/admin/deliveries/{acme[0]['id']}/drop")
    assert resp.status == 400
    assert (await resp.json())["detail"] == (f"delivery {acme[0]['id']} is done; only dead, pending or waiting "
                                             "ones can be dropped")
