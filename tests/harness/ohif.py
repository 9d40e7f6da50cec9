"""The OHIF Viewer (prebuilt, from npm) served on an origin of its own, configured for a dicomflow server.

``install()`` runs ``npm pack @ohif/app@VERSION`` once into the test cache and unpacks only
``package/dist`` (the built static site: nothing is npm-installed or built here). ``OhifServer`` serves
that folder with a single-page-app fallback and an ``app-config.js`` whose DICOMweb data source points
at a dicomflow ``/dicomweb`` root on another origin, so every DICOMweb call is cross-origin (CORS).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from PIL import Image

from tests.harness.browser import Page, Request

VERSION = "3.13.2"
CACHE = Path(os.environ.get("DICOMFLOW_TEST_CACHE", Path.home() / ".cache" / "dicomflow-tests"))

#: The app's own data source module (OHIF extension-default), as in the configs OHIF ships in dist/.
DICOMWEB_SOURCE = "@ohif/extension-default.dataSourcesModule.dicomweb"

#: Run before OHIF's scripts: a returning user, so the first-visit guided tour does not cover the viewport.
SKIP_TOURS_JS = "try { localStorage.setItem('shownTours', '[\"basicViewerTour\"]') } catch (e) {}"

_TYPES = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript"}


def install() -> Path:
    """The unpacked ``dist`` folder of @ohif/app (fetched with npm pack on first use)."""
    target = CACHE / f"ohif-{VERSION}"
    dist = target / "package" / "dist"
    if (dist / "index.html").is_file():
        return dist
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        subprocess.run(["npm", "pack", f"@ohif/app@{VERSION}", "--pack-destination", tmp, "--silent"],
                       cwd=tmp, check=True, timeout=600, stdout=subprocess.DEVNULL)
        tgz = next(Path(tmp).glob("*.tgz"))
        with tarfile.open(tgz) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            tar.extractall(tmp, members=members, filter="data")
        if not dist.is_dir():  # another run may have finished first
            shutil.move(str(Path(tmp) / "package"), str(target / "package"))
    return dist


def data_source(dicomweb_root: str, name: str = "dicomflow", **overrides: Any) -> dict[str, Any]:
    """A DICOMweb data source for a full QIDO/WADO-RS server (not a static-wado bucket)."""
    configuration: dict[str, Any] = {
        "friendlyName": f"dicomflow ({name})",
        "name": name,
        "qidoRoot": dicomweb_root,
        "wadoRoot": dicomweb_root,
        "wadoUriRoot": dicomweb_root,
        "qidoSupportsIncludeField": True,
        "supportsReject": False,
        "supportsStow": True,
        "imageRendering": "wadors",
        "thumbnailRendering": "thumbnail",
        "thumbnailRequestStrategy": "fetch",
        "enableStudyLazyLoad": True,
        "supportsFuzzyMatching": True,
        "supportsWildcard": True,
        "staticWado": False,
        "singlepart": "bulkdata,video",
        "bulkDataURI": {"enabled": True},
        "omitQuotationForMultipartRequest": True,
    }
    configuration.update(overrides)
    return {"namespace": DICOMWEB_SOURCE, "sourceName": name, "configuration": configuration}


def app_config(sources: list[dict[str, Any]]) -> str:
    """``window.config`` for OHIF 3.13 (shape of dist/app-config.js), the first source the default."""
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 10},
        "showErrorDetails": "always",
        "defaultDataSourceName": sources[0]["sourceName"],
        "dataSources": sources,
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


#: RFC 9110 7.6.1 connection-specific fields a proxy does not forward
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
               "host"}


class OhifServer:
    """Serves the OHIF dist folder on 127.0.0.1:``port`` (``async with``); ``url`` is its origin.

    With ``proxy`` ({path prefix: backend origin}) it is also the reverse proxy of a same-origin
    deployment (as nginx in front of OHIF and the archive): requests under a prefix are streamed to the
    backend with ``Forwarded`` (RFC 7239, ``forwarded="rfc7239"``) or ``X-Forwarded-Host``/``-Proto``
    (``forwarded="x-forwarded"``) naming this origin, and without the client's Host.
    """

    def __init__(self, dist: Path, config_js: str, port: int, proxy: dict[str, str] | None = None,
                 forwarded: str = "rfc7239") -> None:
        self.dist = dist.resolve()
        self.config_js = config_js
        self.port = port
        self.proxy = proxy or {}
        self.forwarded = forwarded
        self.requests: list[str] = []
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        for prefix, backend in self.proxy.items():
            if request.path == prefix or request.path.startswith(prefix + "/"):
                return await self._forward(request, backend)
        if request.method != "GET":
            raise web.HTTPMethodNotAllowed(request.method, ["GET"])
        if request.path == "/app-config.js":
            return web.Response(text=self.config_js, content_type="text/javascript")
        path = (self.dist / request.path.lstrip("/")).resolve()
        if path.is_relative_to(self.dist) and path.is_file():
            headers = {"Content-Type": _TYPES[path.suffix]} if path.suffix in _TYPES else None
            return web.FileResponse(path, headers=headers)
        # single-page app: every route (/, /viewer?..., /segmentation...) is index.html
        return web.FileResponse(self.dist / "index.html", headers={"Cache-Control": "no-store"})

    async def _forward(self, request: web.Request, backend: str) -> web.StreamResponse:
        assert self._client is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        if self.forwarded == "rfc7239":
            headers["Forwarded"] = f'for=127.0.0.1;proto=http;host="{request.host}"'
        else:
            headers["X-Forwarded-Host"] = request.host
            headers["X-Forwarded-Proto"] = "http"
        async with self._client.request(request.method, backend + request.path_qs, headers=headers,
                                        data=request.content if request.can_read_body else None,
                                        allow_redirects=False) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP})
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(1 << 16):
                await response.write(chunk)
            await response.write_eof()
            return response

    async def __aenter__(self) -> OhifServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._serve)
        self._client = aiohttp.ClientSession(auto_decompress=False)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.close()


def assert_all_ok(requests: list[Request], allow_empty: bool = False) -> None:
    """Every DICOMweb request OHIF made was answered 2xx and readable cross-origin (no CORS error)."""
    assert requests or allow_empty, "OHIF made no DICOMweb request"
    bad = [str(r) for r in requests if r.failed is not None or r.status is None or not 200 <= r.status < 300]
    assert not bad, "DICOMweb requests that failed:\n" + "\n".join(bad)


def image_stats(png: bytes) -> tuple[float, int]:
    """Standard deviation and number of distinct grey levels of a screenshot."""
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    return float(grey.std()), len(np.unique(grey))


@dataclass
class ViewerTab:
    """A browser tab on OHIF: its network log filtered to one DICOMweb root, screenshots to ``shots``."""

    page: Page
    url: str  # OHIF's origin
    dicomweb: str
    shots: Path

    def dicomweb_requests(self) -> list[Request]:
        return [r for r in self.page.requests.values() if r.url.startswith(self.dicomweb)]

    def fail_on_errors(self) -> None:
        """Fail at once (not after a timeout) when a DICOMweb request already came back in error."""
        assert_all_ok([r for r in self.dicomweb_requests() if r.done], allow_empty=True)

    def assert_no_errors(self) -> None:
        """OHIF itself reported nothing wrong: no uncaught exception, no console error."""
        errors = [c for c in self.page.console if c.startswith(("error", "assert"))]
        assert not self.page.exceptions and not errors, [*self.page.exceptions, *errors][:10]

    async def settle(self) -> None:
        """Until no DICOMweb request has been in flight for a moment."""
        await self.page.wait_network_idle(quiet=0.8, within=30, only=lambda r: r.url.startswith(self.dicomweb))

    async def save(self, name: str, clip: dict[str, float] | None = None) -> bytes:
        png = await self.page.screenshot(clip)
        (self.shots / f"{name}.png").write_bytes(png)
        return png

    async def viewport_image(self, name: str) -> tuple[bytes, float]:
        """Screenshot of the cornerstone viewport once it shows an image (not blank), within ~30 s."""
        rect = await self.page.wait_for(
            "(() => { const c = document.querySelector('canvas.cornerstone-canvas');"
            " if (!c) return null; const r = c.getBoundingClientRect();"
            " return r.width > 100 && r.height > 100 ? {x: r.x, y: r.y, width: r.width, height: r.height} : null"
            " })()", 30, "the viewport canvas", self.fail_on_errors)
        std = 0.0
        for _ in range(60):
            self.fail_on_errors()
            png = await self.save(name, rect)
            std, levels = image_stats(png)
            if std > 15 and levels > 16:
                return png, std
            await asyncio.sleep(0.5)
        raise AssertionError(f"viewport stayed blank (std {std:.1f}); see {self.shots / name}.png")

    async def thumbnails_loaded(self, count: int) -> int:
        """Until ``count`` series thumbnails (images OHIF made from fetched data) have loaded."""
        loaded: int = await self.page.wait_for(
            "(() => { const n = Array.from(document.querySelectorAll('img')).filter(i => i.src.startsWith('blob:')"
            f" && i.complete && i.naturalWidth > 0).length; return n >= {count} ? n : 0 }})()",
            30, f"{count} series thumbnail(s)", self.fail_on_errors)
        return loaded
