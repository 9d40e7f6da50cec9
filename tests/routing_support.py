"""Helpers for routing-engine tests: settings with routes, a webhook receiver, waiting for deliveries."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from dicomflow.settings import Settings
from tests.conftest import make_settings

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MAPPINGS = REPO / "mappings"
SHIPPED_ROUTES = REPO / "routes"


def routing_settings(tmp_path: Path, routes: dict[str, str], destinations: dict[str, Any],
                     mappings_dir: Path = SHIPPED_MAPPINGS, **routing: Any) -> Settings:
    """Settings whose routes folder holds ``routes`` (file name -> YAML text); fast polling."""
    routes_dir = tmp_path / "routes"
    routes_dir.mkdir(parents=True, exist_ok=True)
    for name, text in routes.items():
        (routes_dir / name).write_text(text)
    options: dict[str, Any] = {"routes_dir": routes_dir, "mappings_dir": mappings_dir,
                               "destinations": destinations, "poll_interval": 0.05, "reload_interval": 0.1,
                               "backoff_initial": 0.05, "backoff_max": 0.2, "max_attempts": 5}
    options.update(routing)
    return make_settings(tmp_path, routing=options)


async def wait_for(predicate: Callable[[], Awaitable[Any]], within: float = 20.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class WebhookReceiver:
    """A local HTTP receiver that checks HMAC signatures and records what it got."""

    secret: str
    received: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    #: status codes to answer, in order (then 200)
    script: list[int] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        timestamp = request.headers["X-Dicomflow-Timestamp"]
        expected = "sha256=" + hmac.new(self.secret.encode(), timestamp.encode() + b"." + body,
                                        hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers.get("X-Dicomflow-Signature", "")):
            self.bad_signatures += 1
            return web.Response(status=401)
        if self.script:
            status = self.script.pop(0)
            if status != 200:
                return web.Response(status=status, text="scripted failure")
        self.received.append({"headers": dict(request.headers), "body": json.loads(body), "at": time.time()})
        return web.Response(status=204)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        return app
