"""Bearer JWT validation against OIDC issuers: discovery document + JWKS, cached, refreshed on rotation.

RFC 6750 (bearer tokens), RFC 7519 (JWT), RFC 8725 (JWT best current practice: explicit algorithm
allow-list, never ``none``), OpenID Connect Discovery 1.0. Signature checks are joserfc's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from dicomflow.auth.model import Principal
from dicomflow.errors import DicomServiceError, NotAuthenticatedError
from dicomflow.settings import AuthSettings, ClaimPreset, IssuerSettings

logger = logging.getLogger(__name__)


class InvalidTokenError(NotAuthenticatedError):
    """RFC 6750 3.1 ``invalid_token``: expired, revoked, malformed or otherwise invalid."""


class IssuerUnavailableError(DicomServiceError):
    """The issuer's discovery document or JWKS could not be fetched."""

    http_status = 503
    retryable = True


def _b64json(segment: str) -> dict[str, Any]:
    padded = segment + "=" * (-len(segment) % 4)
    value = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def unverified_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a compact JWS, *unverified*: only to pick the issuer and key."""
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidTokenError("malformed token: not a compact JWS")
    try:
        return _b64json(parts[0]), _b64json(parts[1])
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidTokenError("malformed token") from exc


def _claim(claims: dict[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v for v in value.split() if v]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def memberships_from_claims(claims: dict[str, Any], issuer: IssuerSettings) -> dict[str, frozenset[str]]:
    """Organizations (tenants) and the roles held in each, per the issuer's claim preset."""
    result: dict[str, set[str]] = {}
    keycloak = issuer.preset is ClaimPreset.KEYCLOAK
    tenants_claim = issuer.tenants_claim or ("organization" if keycloak else "tenants")
    roles_claims = issuer.roles_claims
    if roles_claims is None:
        roles_claims = (["realm_access.roles"] + [f"resource_access.{a}.roles" for a in issuer.audience]
                        if keycloak else ["roles"])
    roles: set[str] = set()
    for path in roles_claims:
        roles.update(_strings(_claim(claims, path)))
    orgs = _claim(claims, tenants_claim)
    if isinstance(orgs, dict):  # {"acme": ["viewer"]} (generic) or {"acme": {"id": ...}} (Keycloak)
        for name, value in orgs.items():
            own = set(_strings(value)) if not keycloak else set()
            result.setdefault(str(name), set()).update(own or roles)
    else:
        for name in _strings(orgs):
            result.setdefault(name, set()).update(roles)
    if not keycloak:  # scope strings "dicomflow:<tenant>:<role>"
        for scope in _strings(claims.get("scope")):
            pieces = scope.split(":")
            if len(pieces) == 3 and pieces[0] == "dicomflow":
                result.setdefault(pieces[1], set()).add(pieces[2])
    aliased: dict[str, frozenset[str]] = {}
    for name, held in result.items():
        tenant = issuer.tenant_aliases.get(name, name)
        aliased[tenant] = frozenset(held) | aliased.get(tenant, frozenset())
    return aliased


@dataclass
class _IssuerState:
    settings: IssuerSettings
    jwks_uri: str | None = None
    keys: KeySet | None = None
    fetched_at: float = 0.0


class Authenticator:
    """Validates bearer tokens from any configured issuer and returns the :class:`Principal`."""

    def __init__(self, settings: AuthSettings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self._session = session
        self._issuers = {i.issuer.rstrip("/"): _IssuerState(i) for i in settings.issuers}
        self._locks = {name: asyncio.Lock() for name in self._issuers}

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                if resp.status != 200:
                    raise IssuerUnavailableError(f"issuer answered {resp.status} for {url}")
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise IssuerUnavailableError(f"issuer unreachable: {type(exc).__name__}") from exc
        if not isinstance(data, dict):
            raise IssuerUnavailableError("issuer document is not a JSON object")
        return data

    async def _refresh(self, name: str, state: _IssuerState, *, force: bool) -> KeySet:
        async with self._locks[name]:
            fresh = time.monotonic() - state.fetched_at < self.settings.jwks_refresh_interval
            if state.keys is not None and (not force or fresh):
                return state.keys
            if state.jwks_uri is None:
                url = state.settings.discovery_url or f"{name}/.well-known/openid-configuration"
                doc = await self._get_json(url)
                if str(doc.get("issuer", "")).rstrip("/") != name:
                    raise IssuerUnavailableError("discovery document names a different issuer")
                jwks_uri = doc.get("jwks_uri")
                if not isinstance(jwks_uri, str):
                    raise IssuerUnavailableError("discovery document has no jwks_uri")
                state.jwks_uri = jwks_uri
            try:
                state.keys = KeySet.import_key_set(await self._get_json(state.jwks_uri))  # type: ignore[arg-type]
            except JoseError as exc:
                raise IssuerUnavailableError("issuer JWKS could not be read") from exc
            state.fetched_at = time.monotonic()
            return state.keys

    async def authenticate(self, token: str) -> Principal:
        if len(token) > self.settings.max_token_bytes:
            raise InvalidTokenError("token too large")
        header, unverified = unverified_parts(token)
        alg = header.get("alg")
        name = str(unverified.get("iss", "")).rstrip("/")
        state = self._issuers.get(name)
        if state is None:
            raise InvalidTokenError("token issuer is not trusted")
        if not isinstance(alg, str) or alg not in state.settings.algorithms:
            raise InvalidTokenError("token algorithm not allowed")
        keys = await self._refresh(name, state, force=False)
        kid = header.get("kid")
        if kid is not None and not any(k.kid == kid for k in keys.keys):
            keys = await self._refresh(name, state, force=True)  # key rotation
            if not any(k.kid == kid for k in keys.keys):
                raise InvalidTokenError("token signed with an unknown key")
        try:
            decoded = jwt.decode(token, keys, algorithms=state.settings.algorithms)
            registry = jwt.JWTClaimsRegistry(
                leeway=state.settings.leeway_seconds,
                iss={"essential": True, "value": str(unverified.get("iss"))},
                aud={"essential": True, "values": state.settings.audience},
                exp={"essential": True},
                sub={"essential": False},
            )
            registry.validate(decoded.claims)
        except JoseError as exc:
            raise InvalidTokenError(f"token rejected: {exc.error}") from exc
        except (ValueError, TypeError) as exc:
            raise InvalidTokenError("malformed token") from exc
        claims = decoded.claims
        subject = str(claims.get("sub") or claims.get("client_id") or claims.get("azp") or "")
        if not subject:
            raise InvalidTokenError("token has no subject")
        client = claims.get("client_id") or claims.get("azp")
        return Principal(subject=subject, issuer=name, client_id=str(client) if client else None,
                         memberships=memberships_from_claims(claims, state.settings))
