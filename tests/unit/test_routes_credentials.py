"""Credentials for destinations: basic auth, OAuth2 client credentials (both client auth methods), caching."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
from aiohttp import web

from dicomflow.connectors.auth import TokenCache
from dicomflow.connectors.base import DeliveryError
from dicomflow.settings import BasicAuth, OAuth2ClientCredentials


async def test_basic_and_client_credentials(aiohttp_server: Any) -> None:
    calls: list[dict[str, Any]] = []

    async def token(request: web.Request) -> web.Response:
        form = dict(await request.post())
        calls.append({"auth": request.headers.get("Authorization"), **form})
        if form.get("client_id") == "broken":
            return web.Response(status=400, text='{"error": "invalid_client"}')
        return web.json_response({"access_token": f"tok-{len(calls)}", "token_type": "Bearer", "expires_in": 3600})

    app = web.Application()
    app.router.add_post("/token", token)
    server = await aiohttp_server(app)
    url = str(server.make_url("/token"))
    async with aiohttp.ClientSession() as session:
        cache = TokenCache(session)
        basic = await cache.authorization(None, BasicAuth(username="u", password="p:w"), 5)
        assert basic == "Basic " + base64.b64encode(b"u:p:w").decode()
        assert await cache.authorization(None, None, 5) is None

        oauth = OAuth2ClientCredentials(token_url=url, client_id="c", client_secret="s", scope="system/*.write")
        assert await cache.authorization(oauth, None, 5) == "Bearer tok-1"
        assert await cache.authorization(oauth, None, 5) == "Bearer tok-1"  # cached until it nearly expires
        assert calls[0]["auth"] == "Basic " + base64.b64encode(b"c:s").decode()
        assert calls[0]["grant_type"] == "client_credentials" and calls[0]["scope"] == "system/*.write"

        post = OAuth2ClientCredentials(token_url=url, client_id="d", client_secret="t",
                                       auth_method="client_secret_post", resource="https://api.example")
        assert await cache.authorization(post, None, 5) == "Bearer tok-2"
        assert calls[1]["auth"] is None and calls[1]["client_secret"] == "t"
        assert calls[1]["resource"] == "https://api.example"

        broken = OAuth2ClientCredentials(token_url=url, client_id="broken", client_secret="x",
                                         auth_method="client_secret_post")
        try:
            await cache.authorization(broken, None, 5)
        except DeliveryError as exc:
            assert exc.retryable and "token endpoint answered HTTP 400" in exc.summary
        else:
            raise AssertionError("a refused token request must fail the delivery")
