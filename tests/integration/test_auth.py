"""OAuth2 bearer tokens from a real OIDC provider (npm oidc-provider): every permission, tenant isolation,
bad tokens (alg none, unknown key, wrong issuer/audience, expired, huge), key rotation."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import aiohttp
import pytest
from joserfc import jwt

from tests.conftest import LiveServer, make_settings, plain_tenants
from tests.factory import make_instance, multipart
from tests.harness.oidc_provider import AUDIENCE, OidcProvider, new_key

pytestmark = pytest.mark.integration

CLIENTS = [
    {"client_id": "acme-viewer", "client_secret": "s1", "claims": {"tenants": {"acme": ["viewer"]}}},
    {"client_id": "acme-tech", "client_secret": "s2", "claims": {"tenants": ["acme"], "roles": ["technologist"]}},
    {"client_id": "acme-manager", "client_secret": "s3", "claims": {"tenants": {"acme": ["data-manager"]}}},
    {"client_id": "globex-admin", "client_secret": "s4", "claims": {"tenants": {"globex": ["admin"]}}},
    {"client_id": "nobody", "client_secret": "s5", "claims": {}},
]


@pytest.fixture
def server(live_server_factory: Any, tmp_path: Any, provider: OidcProvider) -> LiveServer:
    settings = make_settings(
        tmp_path,
        tenants=plain_tenants(),
        auth=provider.auth_settings({"leeway_seconds": 0}, jwks_refresh_interval=0),
    )
    result: LiveServer = live_server_factory(settings)
    return result


async def _req(method: str, url: str, token: str | None = None, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    headers = dict(kw.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as s, s.request(method, url, headers=headers, **kw) as r:
        return r.status, dict(r.headers), await r.read()


async def _stow(server: LiveServer, tenant: str, token: str | None, **kw: Any) -> int:
    body, ctype = multipart([make_instance(**kw)])
    status, _h, _b = await _req("POST", f"{server.tenant_dicomweb(tenant)}/studies", token, data=body,
                                headers={"Content-Type": ctype})
    return status


def _forge(provider: OidcProvider, claims: dict[str, Any], *, key: Any = None, kid: str = "key-1") -> str:
    now = int(time.time())
    base = {"iss": provider.issuer, "aud": AUDIENCE, "sub": "forged", "iat": now, "exp": now + 300,
            "tenants": {"acme": ["admin"]}}
    base.update(claims)
    return jwt.encode({"alg": "RS256", "kid": kid}, base, key or provider.keys[0])


async def test_missing_and_other_scheme_get_401_with_bearer_challenge(server: LiveServer) -> None:
    status, headers, _ = await _req("GET", f"{server.dicomweb}/studies")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer ")
    status, headers, _ = await _req("GET", f"{server.dicomweb}/studies", headers={"Authorization": "Basic eDp5"})
    assert status == 401


async def test_malformed_authorization_header_is_400(server: LiveServer) -> None:
    status, headers, _ = await _req("GET", f"{server.dicomweb}/studies",
                                    headers={"Authorization": "Bearer a b c"})
    assert status == 400
    assert 'error="invalid_request"' in headers["WWW-Authenticate"]


async def test_probes_need_no_token(server: LiveServer) -> None:
    status, _h, body = await _req("GET", f"{server.url}/readyz")
    assert status == 200
    assert json.loads(body)["checks"]["authentication"] == "on"


async def test_permissions_per_role(server: LiveServer, provider: OidcProvider) -> None:
    viewer, tech, manager = (provider.token(c) for c in ("acme-viewer", "acme-tech", "acme-manager"))
    study = "1.2.826.0.1.3680043.10.1045.77.1"
    # write: technologist yes, viewer no (403 insufficient_scope)
    assert await _stow(server, "acme", tech, study_uid=study) == 200
    assert await _stow(server, "acme", viewer) == 403
    # delete: viewer and technologist no, data-manager yes
    url = f"{server.tenant_dicomweb('acme')}/studies/{study}"
    status, headers, _ = await _req("DELETE", url, viewer)
    assert status == 403 and 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    assert (await _req("DELETE", url, tech))[0] == 403
    assert (await _req("DELETE", url, manager))[0] == 204


async def test_other_tenant_looks_like_nothing_exists(server: LiveServer, provider: OidcProvider) -> None:
    acme = provider.token("acme-manager")
    globex = provider.token("globex-admin")
    assert await _stow(server, "globex", globex, study_uid="1.2.826.0.1.3680043.10.1045.77.2") == 200
    for method, path in (("GET", "/studies"), ("POST", "/studies"),
                         ("DELETE", "/studies/1.2.826.0.1.3680043.10.1045.77.2")):
        status, _h, _b = await _req(method, server.tenant_dicomweb("globex") + path, acme)
        unknown = await _req(method, server.tenant_dicomweb("no-such-tenant") + path, acme)
        assert status == 404 == unknown[0]
    # the default tenant is another organization too
    assert (await _req("GET", f"{server.dicomweb}/studies", acme))[0] == 404
    # a token with no organization at all
    assert (await _req("GET", f"{server.tenant_dicomweb('acme')}/studies", provider.token("nobody")))[0] == 404


@pytest.mark.parametrize("case", ["alg-none", "unknown-key", "wrong-issuer", "wrong-audience", "expired",
                                  "not-yet-valid", "tampered", "huge", "garbage"])
async def test_bad_tokens_are_rejected(server: LiveServer, provider: OidcProvider, case: str) -> None:
    now = int(time.time())
    if case == "alg-none":
        def b64(d: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
        token = b64({"alg": "none"}) + "." + b64({"iss": provider.issuer, "aud": AUDIENCE, "sub": "x",
                                                  "exp": now + 300, "tenants": {"acme": ["admin"]}}) + "."
    elif case == "unknown-key":
        token = _forge(provider, {}, key=new_key("rogue"), kid="rogue")
    elif case == "wrong-issuer":
        token = _forge(provider, {"iss": "http://127.0.0.1:1/evil"})
    elif case == "wrong-audience":
        token = _forge(provider, {"aud": "https://someone-else/api"})
    elif case == "expired":
        token = _forge(provider, {"exp": now - 5, "iat": now - 400})
    elif case == "not-yet-valid":
        token = _forge(provider, {"nbf": now + 600})
    elif case == "tampered":
        good = _forge(provider, {})
        header, _claims, sig = good.split(".")
        claims = base64.urlsafe_b64encode(json.dumps({"iss": provider.issuer, "aud": AUDIENCE, "sub": "x",
                                                      "exp": now + 300, "tenants": {"acme": ["admin"]}})
                                          .encode()).rstrip(b"=").decode()
        token = f"{header}.{claims}.{sig}"
    elif case == "huge":
        token = _forge(provider, {"padding": "x" * 9000})
    else:
        token = "not.a.jwt"
    status, headers, _ = await _req("GET", f"{server.tenant_dicomweb('acme')}/studies", token)
    assert status == 401, case
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    # and nothing else happened: a good token still works
    assert (await _req("GET", f"{server.url}/healthz"))[0] == 200


async def test_forged_token_with_the_right_key_is_accepted(server: LiveServer, provider: OidcProvider) -> None:
    """Control for the bad-token cases: the same forging path with valid claims passes."""
    assert await _stow(server, "acme", _forge(provider, {})) == 200


async def test_key_rotation(server: LiveServer, provider: OidcProvider) -> None:
    before = provider.token("acme-tech")
    assert await _stow(server, "acme", before) == 200
    provider.restart_with_keys([new_key("key-2"), *provider.keys])
    try:
        after = provider.token("acme-tech")
        assert json.loads(base64.urlsafe_b64decode(after.split(".")[0] + "=="))["kid"] == "key-2"
        assert await _stow(server, "acme", after) == 200  # unknown kid -> JWKS refreshed
        assert await _stow(server, "acme", before) == 200  # old key still published
    finally:
        provider.restart_with_keys([k for k in provider.keys if k.kid == "key-1"])
