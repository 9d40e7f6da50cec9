"""A fault-injecting HTTP proxy in front of an S3 endpoint (SeaweedFS) for tests.

Requests are forwarded with their original Host header, so SigV4 signatures still verify. A test
sets ``faults``: a list of callables consulted in order for each request; one that returns a
:class:`Fault` consumes itself and decides that request's fate (answer an error, or cut the body).
Every request's method, path, query and headers are recorded in ``seen``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web


@dataclass
class Fault:
    #: answer this status with an S3 error body instead of forwarding
    status: int | None = None
    code: str = "SlowDown"
    #: forward, but close the connection after this many body bytes
    cut_after: int | None = None
    #: wait this long (seconds) before answering
    delay: float = 0.0


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]


Rule = Callable[[web.Request], Fault | None]


@dataclass
class S3FaultProxy:
    upstream: str
    faults: list[Rule] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, n: int, status: int = 503, code: str = "SlowDown",
                  when: Callable[[web.Request], bool] = lambda r: True) -> None:
        """The next ``n`` requests matching ``when`` get ``status``."""
        left = [n]

        def rule(request: web.Request) -> Fault | None:
            if left[0] > 0 and when(request):
                left[0] -= 1
                return Fault(status=status, code=code)
            return None

        self.faults.append(rule)

    def slow_next(self, n: int, delay: float, when: Callable[[web.Request], bool] = lambda r: True) -> None:
        """The next ``n`` requests matching ``when`` are answered ``delay`` seconds late."""
        left = [n]

        def rule(request: web.Request) -> Fault | None:
            if left[0] > 0 and when(request):
                left[0] -= 1
                return Fault(delay=delay)
            return None

        self.faults.append(rule)

    def cut_next_get(self, after: int) -> None:
        """The next GET of an object body is cut after ``after`` bytes."""
        done = [False]

        def rule(request: web.Request) -> Fault | None:
            if not done[0] and request.method == "GET" and request.path.count("/") >= 2 and not request.query:
                done[0] = True
                return Fault(cut_after=after)
            return None

        self.faults.append(rule)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.method, request.path, dict(request.query), dict(request.headers)))
        fault = None
        for rule in self.faults:
            fault = rule(request)
            if fault is not None:
                break
        body = await request.read()
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)
        if fault is not None and fault.status is not None:
            xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{fault.code}</Code>"
                   f"<Message>injected</Message></Error>")
            return web.Response(status=fault.status, body=xml.encode(), content_type="application/xml")
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length",
                                                                                  "transfer-encoding")}
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body if body else None, allow_redirects=False) as upstream:
            payload = await upstream.read()
            out_headers: dict[str, Any] = {k: v for k, v in upstream.headers.items()
                                           if k.lower() not in ("transfer-encoding", "content-encoding",
                                                                "connection")}
            if fault is not None and fault.cut_after is not None:
                response = web.StreamResponse(status=upstream.status, headers=out_headers)
                await response.prepare(request)
                await response.write(payload[:fault.cut_after])
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.close()  # the peer sees a body shorter than Content-Length
                return response
            return web.Response(status=upstream.status, body=payload, headers=out_headers)
