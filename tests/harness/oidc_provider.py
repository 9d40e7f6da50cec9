"""Start a real OIDC provider (npm oidc-provider) for tests; installs it on first use."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from joserfc.jwk import RSAKey

HERE = Path(__file__).parent / "oidc"
CACHE = Path(os.environ.get("DICOMFLOW_TEST_CACHE", Path.home() / ".cache" / "dicomflow-tests"))
AUDIENCE = "https://dicomflow.test/api"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def install() -> Path:
    """npm install oidc-provider into a cache folder (once); returns the folder to run from."""
    target = CACHE / "oidc-provider-9.13.3"
    if not (target / "node_modules" / "oidc-provider").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(HERE / "package.json", target / "package.json")
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=target, check=True,
                       timeout=300)
    shutil.copy(HERE / "server.mjs", target / "server.mjs")
    return target


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
        env = {**os.environ, "OIDC_PORT": str(self.port), "OIDC_AUDIENCE": AUDIENCE,
               "OIDC_JWKS": json.dumps({"keys": [k.as_dict(private=True) for k in self.keys]}),
               "OIDC_CLIENTS": json.dumps(self.clients)}
        self.log = folder / f"provider-{self.port}.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(["node", "server.mjs"], cwd=folder, env=env, stdout=out,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.issuer}/.well-known/openid-configuration", timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"oidc-provider exited: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        raise RuntimeError("oidc-provider did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
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


def start_provider(clients: list[dict[str, Any]]) -> OidcProvider:
    provider = OidcProvider(port=_free_port(), keys=[new_key("key-1")], clients=clients)
    provider.start()
    return provider
