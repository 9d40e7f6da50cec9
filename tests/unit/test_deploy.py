"""docker-compose.yml, deploy/ and the Dockerfile describe a deployment Docker cannot run here: check what
can be checked without it. Every DICOMFLOW_* variable names a real Settings field and parses together with
deploy/dicomflow.yaml; services, dependencies, volumes and mounted files exist; nginx sends traffic to the
ports the servers listen on; the shipped routes load against the destinations configured there."""

from __future__ import annotations

import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from dicomflow.engine.config import load_route_set
from dicomflow.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DICOMFLOW_SERVICES = ["migrate", "server", "worker"]


def _env(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment", {})
    assert isinstance(env, dict), "environment as a mapping (merged from the x-dicomflow anchor)"
    return {k: str(v) for k, v in env.items()}


def _field_path_exists(model: type[BaseModel], parts: list[str]) -> bool:
    """Whether ``a__b__c`` (lower-cased) walks through Settings: nested models, then dict keys or a leaf."""
    name, rest = parts[0], parts[1:]
    field = model.model_fields.get(name)
    if field is None:
        return False
    if not rest:
        return True
    annotation = field.annotation
    candidates = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return _field_path_exists(candidate, rest)
        if typing.get_origin(candidate) is dict:
            return True  # tenants / destinations: the next part is a key
    return False


def test_compose_describes_the_whole_topology() -> None:
    assert {"postgres", "seaweedfs", "hapi", "keycloak", "migrate", "server", "worker", "lb"} <= set(SERVICES)
    assert SERVICES["server"]["deploy"]["replicas"] >= 2 and SERVICES["worker"]["deploy"]["replicas"] >= 2
    assert SERVICES["server"]["command"][:2] == ["dicomflow", "serve"]
    assert SERVICES["worker"]["command"][:2] == ["dicomflow", "worker"]
    assert SERVICES["migrate"]["command"][:3] == ["dicomflow", "db", "upgrade"]
    for name, service in SERVICES.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in SERVICES, f"{name} depends on unknown service {dependency}"
            assert condition["condition"] in {"service_started", "service_healthy", "service_completed_successfully"}
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], f"{dependency} has no healthcheck"
    # servers and workers start only after the schema is upgraded (they refuse another version)
    for name in ("server", "worker"):
        assert SERVICES[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_mounted_files_and_named_volumes_exist() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"
        if "build" in service:
            assert (ROOT / service["build"] / "Dockerfile").is_file()


@pytest.mark.parametrize("service", DICOMFLOW_SERVICES)
def test_every_dicomflow_variable_is_a_settings_field(service: str) -> None:
    env = _env(service)
    assert env, f"{service} has no environment"
    for name in env:
        assert name.startswith("DICOMFLOW_"), name
        parts = name.removeprefix("DICOMFLOW_").lower().split("__")
        assert _field_path_exists(Settings, parts), f"{service}: {name} is not a Settings field"


@pytest.mark.parametrize("service", DICOMFLOW_SERVICES)
def test_settings_load_as_in_the_container(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in _env(service).items():
        monkeypatch.setenv(name, value)
    settings = load_settings(ROOT / "deploy" / "dicomflow.yaml")
    assert settings.index_url.startswith("postgresql://") and settings.storage_url.startswith("s3://")
    assert settings.s3.endpoint_url == "http://seaweedfs:8333" and settings.s3.path_style
    assert settings.auth.enabled  # servers listen on 0.0.0.0: without issuers `serve` would refuse
    # the S3 credentials are the ones the SeaweedFS identity file accepts
    identity = json.loads((ROOT / "deploy" / "seaweedfs" / "s3.json").read_text())["identities"][0]
    assert {"accessKey": settings.s3.access_key_id, "secretKey": settings.s3.secret_access_key.get_secret_value()
            if settings.s3.secret_access_key else None} in identity["credentials"]
    if service == "server":
        assert settings.http.host == "0.0.0.0" and not settings.routing.enabled
        assert (settings.http.port, settings.dimse.port) == (8080, 11112)
    if service == "worker":
        assert settings.routing.enabled


def test_shipped_routes_load_against_the_deployed_destinations(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in _env("worker").items():
        monkeypatch.setenv(name, value)
    settings = load_settings(ROOT / "deploy" / "dicomflow.yaml")
    assert settings.routing.routes_dir == Path("/etc/dicomflow/routes")
    mounts = dict(v.split(":")[1::-1][:2] for v in COMPOSE["x-dicomflow"]["volumes"])  # container -> host
    route_set = load_route_set(ROOT / mounts["/etc/dicomflow/routes"], ROOT / mounts["/etc/dicomflow/mappings"],
                               settings)  # raises ConfigFileError (file:line) on an unknown destination
    assert "imagingstudy-to-fhir" in route_set.routes
    assert settings.routing.destinations["fhir-server"].url == "http://hapi:8080/fhir"  # type: ignore[union-attr]


def test_load_balancer_reaches_the_servers() -> None:
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    upstreams = re.findall(r"server\s+server:(\d+)", conf)
    assert sorted(map(int, upstreams)) == [8080, 11112]
    assert "client_max_body_size 0" in conf and "proxy_request_buffering off" in conf  # STOW streams
    published = {p.split(":")[1] for p in SERVICES["lb"]["ports"]}
    assert published == {"8080", "11112"}
    assert set(SERVICES["server"]["expose"]) == {"8080", "11112"}


def test_dockerfile_runs_the_cli() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", text, re.M)
    assert "pip install ." in text and "USER dicomflow" in text
    assert json.loads(text.split("CMD", 1)[1].strip().splitlines()[0])[:2] == ["dicomflow", "serve"]
