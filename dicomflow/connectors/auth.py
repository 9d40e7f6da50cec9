"""Credentials for outgoing HTTP: OAuth2 client credentials (RFC 6749 4.4) with token caching, or basic."""

from __future__ import annotations

import asyncio
import base64
import time
from urllib.parse import quote_plus

import aiohttp

from dicomflow.connectors.base import DeliveryError, http_failure
from dicomflow.settings import BasicAuth, OAuth2ClientCredentials


class TokenCache:
    """Access tokens per client, renewed shortly before they expire."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = asyncio.Lock()

    async def authorization(self, oauth2: OAuth2ClientCredentials | None, basic: BasicAuth | None,
                            request_timeout: float) -> str | None:
        """The ``Authorization`` header value for a destination, or None."""
        if basic is not None:
            return _basic(basic.username, basic.password.get_secret_value())
        if oauth2 is None:
            return None
        return "Bearer " + await self.token(oauth2, request_timeout)

    async def token(self, oauth2: OAuth2ClientCredentials, request_timeout: float) -> str:
        key = (oauth2.token_url, oauth2.client_id)
        async with self._lock:
            cached = self._tokens.get(key)
            if cached is not None and cached[1] > time.time() + 30:
                return cached[0]
            form = {"grant_type": "client_credentials"}
            if oauth2.scope:
                form["scope"] = oauth2.scope
            if oauth2.resource:
                form["resource"] = oauth2.resource
            # RFC 6749 2.3.1: HTTP Basic (which servers must support) or the credentials in the form
            headers: dict[str, str] = {}
            if oauth2.auth_method == "client_secret_post":
                form["client_id"] = oauth2.client_id
                form["client_secret"] = oauth2.client_secret.get_secret_value()
            else:
                # RFC 6749 2.3.1: id and secret are form-encoded before Basic encoding
                headers["Authorization"] = _basic(quote_plus(oauth2.client_id),
                                                  quote_plus(oauth2.client_secret.get_secret_value()))
            try:
                async with self._session.post(oauth2.token_url, data=form, headers=headers,
                                              timeout=aiohttp.ClientTimeout(total=request_timeout)) as resp:
                    text = await resp.text()
                    if resp.status != 200:
                        failure = http_failure(resp.status, "token endpoint", text)
                        raise DeliveryError(failure.summary, retryable=True, detail=failure.detail)
                    data = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise DeliveryError(f"token endpoint unreachable or invalid: {type(exc).__name__}",
                                    retryable=True) from None
            token = data.get("access_token") if isinstance(data, dict) else None
            if not isinstance(token, str):
                raise DeliveryError("token endpoint answered without an access_token", retryable=True)
            expires = float(data.get("expires_in", 300))
            self._tokens[key] = (token, time.time() + expires)
            return token



def _basic(user: str, password: str) -> str:
    """RFC 7617 Basic credentials."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
