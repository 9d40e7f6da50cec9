"""Headless Debian Chromium, driven over the Chrome DevTools Protocol from Python (aiohttp websocket).

Enough of CDP for browser tests of a web viewer: open a page, evaluate JavaScript, wait for a
condition, take screenshots, and keep a log of every network request the page and its workers made
(status, failure, CORS error). Chromium comes from Debian (scripts/install-sysdeps.sh); nothing here
ever downloads a browser.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp

#: Flags for a quiet, deterministic headless Chromium that never reaches for the network by itself;
#: SwiftShader gives the viewer WebGL without a GPU.
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--enable-unsafe-swiftshader",
    "--disable-default-apps", "--disable-extensions", "--mute-audio", "--no-default-browser-check",
    "--disable-dev-shm-usage", "--hide-scrollbars",
]


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError("chromium is not installed: run scripts/install-sysdeps.sh (Debian package chromium)")
    return found


@dataclass
class Request:
    """One network request as the browser saw it."""

    url: str
    method: str
    resource_type: str
    headers: dict[str, str]
    target: str  # "page" or the worker's type
    status: int | None = None
    mime_type: str | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    failed: str | None = None  # net error text
    canceled: bool = False
    cors_error: str | None = None
    blocked: str | None = None
    finished: bool = False

    @property
    def done(self) -> bool:
        return self.finished or self.failed is not None

    def header(self, name: str) -> str | None:
        """A request header (case-insensitive)."""
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)

    def response_header(self, name: str) -> str | None:
        return next((v for k, v in self.response_headers.items() if k.lower() == name.lower()), None)

    def __str__(self) -> str:
        outcome = self.status if self.failed is None else f"{self.failed} cors={self.cors_error}"
        return f"{self.method} {self.url} -> {outcome}"


class Page:
    """A tab: its CDP session, console messages, uncaught exceptions and network log."""

    def __init__(self, browser: Browser, target_id: str, session_id: str) -> None:
        self.browser = browser
        self.target_id = target_id
        self.session_id = session_id
        self.requests: dict[tuple[str, str], Request] = {}
        self.console: list[str] = []
        self.exceptions: list[str] = []

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, self.session_id)

    async def close(self) -> None:
        await self.browser.send("Target.closeTarget", {"targetId": self.target_id})

    async def add_init_script(self, source: str) -> None:
        """JavaScript run in every new document of this page before its own scripts."""
        await self.send("Page.addScriptToEvaluateOnNewDocument", {"source": source})

    async def goto(self, url: str) -> None:
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise RuntimeError(f"navigation to {url} failed: {result['errorText']}")

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, within: float, what: str | None = None,
                       check: Callable[[], None] | None = None) -> Any:
        """Poll a JavaScript expression until it is truthy (for at most ``within`` s); returns its value.

        ``check`` runs before each poll and may raise to fail early (e.g. a request already failed).
        """
        deadline = time.monotonic() + within
        error: RuntimeError | None = None
        while True:
            if check is not None:
                check()
            try:  # a page still loading (or navigating) may throw: poll on
                value = await self.evaluate(expression)
            except RuntimeError as exc:
                value, error = None, exc
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {within} s waiting for {what or expression}"
                                   + (f" (last error: {error})" if error else ""))
            await asyncio.sleep(0.2)

    async def screenshot(self, clip: dict[str, float] | None = None) -> bytes:
        """PNG of the page, or of ``clip`` ({x, y, width, height} in CSS pixels)."""
        params: dict[str, Any] = {"format": "png"}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
        return base64.b64decode((await self.send("Page.captureScreenshot", params))["data"])

    async def wait_network_idle(self, quiet: float = 1.0, within: float = 30.0,
                                only: Callable[[Request], bool] | None = None) -> None:
        """Wait until no (matching) request has been in flight or started for ``quiet`` seconds."""
        deadline = time.monotonic() + within
        signature, changed = (-1, -1), time.monotonic()
        while True:
            chosen = [r for r in self.requests.values() if only is None or only(r)]
            now = time.monotonic()
            current = (len(chosen), sum(r.done for r in chosen))
            if current != signature:
                signature, changed = current, now
            elif current[0] == current[1] and now - changed >= quiet:
                return
            if now > deadline:
                pending = [str(r) for r in chosen if not r.done]
                raise TimeoutError(f"network not idle after {within} s; pending: {pending[:10]}")
            await asyncio.sleep(0.1)

    # -- CDP events ---------------------------------------------------------------------------------
    def on_event(self, method: str, params: dict[str, Any], session_id: str, target: str) -> None:
        key = (session_id, str(params.get("requestId", "")))
        if method == "Network.requestWillBeSent":
            req = params["request"]
            if key in self.requests and params.get("redirectResponse"):
                self.requests[key].status = params["redirectResponse"]["status"]
                key = (session_id, f"{key[1]}:{req['url']}")
            self.requests[key] = Request(url=req["url"], method=req["method"],
                                         resource_type=params.get("type", "Other"),
                                         headers=dict(req.get("headers", {})), target=target)
        elif method == "Network.responseReceived" and key in self.requests:
            response = params["response"]
            self.requests[key].status = int(response["status"])
            self.requests[key].mime_type = response.get("mimeType")
            self.requests[key].response_headers = dict(response.get("headers", {}))
        elif method == "Network.loadingFinished" and key in self.requests:
            self.requests[key].finished = True
        elif method == "Network.loadingFailed" and key in self.requests:
            r = self.requests[key]
            r.failed = params.get("errorText") or "failed"
            r.canceled = bool(params.get("canceled"))
            r.blocked = params.get("blockedReason")
            cors = params.get("corsErrorStatus")
            r.cors_error = cors.get("corsError") if cors else None
        elif method == "Runtime.consoleAPICalled":
            texts = [str(a.get("value", a.get("description", ""))) for a in params.get("args", [])]
            self.console.append(f"{params.get('type')}: {' '.join(texts)}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.exceptions.append(str(details.get("exception", {}).get("description") or details.get("text")))


def _start(profile: Path, width: int, height: int) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    profile.mkdir(parents=True, exist_ok=True)
    log = open(profile.parent / f"{profile.name}-chromium.log", "wb")  # noqa: SIM115 - closed by launch()
    process = subprocess.Popen(
        [chromium_path(), *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return process, log


class Browser:
    """One Chromium process with a fresh profile; ``async with Browser.launch(profile) as b``."""

    def __init__(self, process: subprocess.Popen[bytes], session: aiohttp.ClientSession,
                 ws: aiohttp.ClientWebSocketResponse) -> None:
        self.process = process
        self._http = session
        self._ws = ws
        self._ids = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, tuple[Page, str]] = {}  # session id -> (page, target type)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.viewport = (1280, 800)
        self._reader = asyncio.create_task(self._read())

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls, profile: Path, width: int = 1280, height: int = 800) -> Any:
        process, log = _start(profile, width, height)
        browser: Browser | None = None
        try:
            port_file = profile / "DevToolsActivePort"
            deadline = time.monotonic() + 30
            while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not start; see {log.name}")
                await asyncio.sleep(0.05)
            port, path = port_file.read_text().splitlines()[:2]
            session = aiohttp.ClientSession()
            try:
                ws = await session.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
            except BaseException:
                await session.close()
                raise
            browser = cls(process, session, ws)
            browser.viewport = (width, height)
            yield browser
        finally:
            if browser is not None:
                await browser._close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
            log.close()

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.send("Browser.close"), 5)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        for task in list(self._tasks):
            task.cancel()
        await self._ws.close()
        await self._http.close()

    async def send(self, method: str, params: dict[str, Any] | None = None,
                   session_id: str | None = None, within: float = 30) -> dict[str, Any]:
        self._ids += 1
        message: dict[str, Any] = {"id": self._ids, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._ids] = future
        await self._ws.send_str(json.dumps(message))
        return await asyncio.wait_for(future, within)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    if "error" in data:
                        future.set_exception(RuntimeError(f"CDP error: {data['error']}"))
                    else:
                        future.set_result(data.get("result", {}))
                continue
            method, params, session_id = data.get("method", ""), data.get("params", {}), data.get("sessionId")
            if method == "Target.attachedToTarget" and session_id in self._pages:
                self._attach_child(self._pages[session_id][0], params)
            elif session_id in self._pages:
                page, target = self._pages[session_id]
                try:
                    page.on_event(method, params, session_id, target)
                except Exception as exc:  # keep reading: a lost reader would hang every later command
                    page.exceptions.append(f"harness could not handle {method}: {exc!r}")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError("browser connection closed"))

    def _attach_child(self, page: Page, params: dict[str, Any]) -> None:
        """A worker (or frame) of the page started: log its network too, then let it run."""
        child = params["sessionId"]
        kind = params["targetInfo"]["type"]
        self._pages[child] = (page, kind)

        async def start() -> None:
            with contextlib.suppress(RuntimeError):
                if kind in ("worker", "shared_worker", "service_worker", "iframe"):
                    await self.send("Network.enable", {}, child)
                    await self.send("Runtime.enable", {}, child)
                await self.send("Runtime.runIfWaitingForDebugger", {}, child)

        self._spawn(start())

    async def new_page(self) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, target["targetId"], attached["sessionId"])
        self._pages[page.session_id] = (page, "page")
        width, height = self.viewport
        for method, params in (
            ("Page.enable", {}), ("Runtime.enable", {}), ("Network.enable", {}),
            ("Network.setBypassServiceWorker", {"bypass": True}),
            ("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                    "mobile": False}),
            ("Target.setAutoAttach", {"autoAttach": True, "waitForDebuggerOnStart": True, "flatten": True}),
        ):
            await page.send(method, params)
        return page
