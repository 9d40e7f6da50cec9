"""Start a real OIDC provider (npm oidc-provider) for tests; installs it on first use."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from joserfc.jwk import RSAKey

from dicomflow.settings import AuthSettings, IssuerSettings
from tests.harness.node import free_port, npm_install, start_node, stop_node

HERE = Path(__file__).parent / "oidc"
AUDIENCE = "https://dicomflow.test/api"


def install() -> Path:
    """npm install oidc-provider into a cache folder (once); returns the folder to run from."""
    return npm_install(HERE, "oidc-provider-9.13.3", "oidc-provider")


def new_key(kid: str) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"})


@dataclass
class OidcProvider:
    """A running provider; ``token(client_id)`` gets a client-credentials access token."""

    port: int
    keys: list[RSAKey]
    clients: list[dict[str, Any]]
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    secrets: dict[str, str] = field(default_factory=dict)

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        folder = install()
        env = {"OIDC_PORT": str(self.port), "OIDC_AUDIENCE": AUDIENCE,
               "OIDC_JWKS": json.dumps({"keys": [k.as_dict(private=True) for k in self.keys]}),
               "OIDC_CLIENTS": json.dumps(self.clients)}
        self.log = folder / f"provider-{self.port}.log"
        self.process = start_node(folder, ["server.mjs"], env, self.log,
                                  f"{self.issuer}/.well-known/openid-configuration", 30, "oidc-provider")

    def stop(self) -> None:
        stop_node(self.process)
        self.process = None

    def restart_with_keys(self, keys: list[RSAKey]) -> None:
        """Key rotation: the first key signs new tokens; the JWKS publishes all of them."""
        self.stop()
        self.keys = keys
        self.start()

    def token(self, client_id: str) -> str:
        secret = next(c["client_secret"] for c in self.clients if c["client_id"] == client_id)
        data = (f"grant_type=client_credentials&client_id={client_id}&client_secret={secret}"
                f"&resource={AUDIENCE}").encode()
        req = urllib.request.Request(f"{self.issuer}/token", data=data,
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return str(json.loads(resp.read())["access_token"])

    def auth_settings(self, issuer: dict[str, Any] | None = None, **auth: Any) -> AuthSettings:
        """Settings of a resource server that takes this provider's tokens for ``AUDIENCE``; ``issuer`` adds
        IssuerSettings fields, ``auth`` AuthSettings fields."""
        return AuthSettings(issuers=[IssuerSettings(issuer=self.issuer, audience=[AUDIENCE], **(issuer or {}))],
                            **auth)


def start_provider(clients: list[dict[str, Any]]) -> OidcProvider:
    provider = OidcProvider(port=free_port(), keys=[new_key("key-1")], clients=clients)
    provider.start()
    return provider
