"""`dicomflow routes validate|schema|test` and `dicomflow deliveries list|retry|drop`, run as a user would."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dicomflow.app import create_app
from dicomflow.engine.admin import ENGINE
from tests.factory import make_instance, multipart
from tests.routing_support import SHIPPED_MAPPINGS, SHIPPED_ROUTES, WebhookReceiver, routing_settings, wait_for

pytestmark = pytest.mark.e2e


def dicomflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomflow", *args], capture_output=True, text=True, timeout=60)


def test_routes_validate_reports_file_and_line(tmp_path: Path) -> None:
    routes = tmp_path / "routes"
    routes.mkdir()
    (routes / "bad.yaml").write_text("name: bad\nevents: [study.stable]\nactions:\n  - type: fhir\n"
                                     "    destination: fhir-server\n    mapping: nope\n")
    result = dicomflow("routes", "validate", "--routes-dir", str(routes), "--mappings-dir", str(SHIPPED_MAPPINGS))
    assert result.returncode == 1
    assert f"{routes / 'bad.yaml'}:5: unknown destination 'fhir-server'" in result.stderr
    assert f"{routes / 'bad.yaml'}:6: unknown mapping 'nope' (known: imagingstudy-default)" in result.stderr

    config = tmp_path / "settings.yaml"
    config.write_text("routing:\n  destinations:\n"
                      "    fhir-server: {type: fhir, url: 'http://emr.example/fhir'}\n"
                      "    research-archive: {type: dicomweb, url: 'http://research.example/dicomweb'}\n"
                      "    pacs: {type: dicom, ae_title: PACS1, host: 10.0.0.5, port: 104}\n"
                      "    ris-hook: {type: webhook, url: 'http://ris.example/hook', secret: x}\n")
    result = dicomflow("routes", "validate", "--config", str(config), "--routes-dir", str(SHIPPED_ROUTES),
                       "--mappings-dir", str(SHIPPED_MAPPINGS))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 4 route(s)")

    sample = tmp_path / "sample.dcm"
    sample.write_bytes(make_instance(modality="CT", InstitutionName="ACME North", patient_id="PID-CLI"))
    result = dicomflow("routes", "test", "--config", str(config), "--routes-dir", str(SHIPPED_ROUTES),
                       "--mappings-dir", str(SHIPPED_MAPPINGS), "--file", str(sample))
    assert result.returncode == 0, result.stderr
    report = {r["route"]: r for r in json.loads(result.stdout.split("(dry run")[0])}
    assert report["research-copy"]["matches"] == ["study.stable"]
    assert report["forward-to-pacs"]["matches"] == []  # source: dimse only; the dry run says dicomweb
    fhir = report["imagingstudy-to-fhir"]["actions"][0]
    assert [r["resourceType"] for r in fhir["resources"]] == ["Patient", "Endpoint", "ImagingStudy"]
    assert fhir["resources"][0]["identifier"][0]["value"] == "PID-CLI"

    schema = json.loads(dicomflow("routes", "schema").stdout)
    assert schema["title"] == "dicomflow route" and "actions" in schema["required"]


async def test_deliveries_list_retry_drop(aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path) -> None:
    receiver = WebhookReceiver("cli-secret", script=[410, 410])
    hook = await aiohttp_server(receiver.app())
    settings = routing_settings(tmp_path, {"r.yaml": "name: to-hook\nevents: [instance.stored]\n"
                                                    "actions: [{type: webhook, destination: hook}]\n"},
                                {"hook": {"type": "webhook", "url": str(hook.make_url("/hook")),
                                          "secret": "cli-secret"}})
    client = await aiohttp_client(create_app(settings))
    body, ctype = multipart([make_instance(), make_instance()])
    assert (await client.post("/dicomweb/studies", data=body, headers={"Content-Type": ctype})).status == 200
    engine = client.app[ENGINE]
    await wait_for(lambda: _count(engine, "dead", 2), what="two dead letters")
    data_dir = str(settings.data_dir)

    listed = await asyncio.to_thread(dicomflow, "deliveries", "list", "--data-dir", data_dir, "--status", "dead",
                                     "--json")
    rows = json.loads(listed.stdout)
    assert len(rows) == 2 and all("HTTP 410" in r["last_error"] for r in rows)
    first, second = sorted(r["id"] for r in rows)
    text = (await asyncio.to_thread(dicomflow, "deliveries", "list", "--data-dir", data_dir)).stdout
    assert f"{first:>8} dead" in text and "webhook->hook instance.stored" in text

    retried = await asyncio.to_thread(dicomflow, "deliveries", "retry", "--data-dir", data_dir, str(first))
    assert retried.returncode == 0 and "1 delivery(ies) queued again" in retried.stdout
    dropped = await asyncio.to_thread(dicomflow, "deliveries", "drop", "--data-dir", data_dir, str(second))
    assert dropped.returncode == 0 and "1 delivery(ies) dropped" in dropped.stdout
    await wait_for(lambda: _count(engine, "done", 1), what="replayed delivery")
    assert (await engine.store.get(second)).status == "dropped"  # type: ignore[union-attr]
    again = await asyncio.to_thread(dicomflow, "deliveries", "drop", "--data-dir", data_dir, str(first))
    assert again.returncode == 1  # done: nothing to drop
    assert len(receiver.received) == 1


async def _count(engine: Any, status: str, n: int) -> bool:
    return len(await engine.store.list_deliveries(status=status)) == n
