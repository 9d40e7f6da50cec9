"""Claim presets: organizations and roles from Keycloak-style and generic tokens."""

from __future__ import annotations

import pytest

from dicomflow.auth.middleware import required_permission
from dicomflow.auth.model import Permission, Principal
from dicomflow.auth.oidc import InvalidTokenError, memberships_from_claims, unverified_parts
from dicomflow.settings import AuthSettings, ClaimPreset, IssuerSettings


def _issuer(**kw: object) -> IssuerSettings:
    return IssuerSettings(issuer="https://idp.example", audience=["dicomflow"], **kw)  # type: ignore[arg-type]


def test_keycloak_organization_list_and_realm_and_client_roles() -> None:
    claims = {"organization": ["acme", "globex"], "realm_access": {"roles": ["viewer"]},
              "resource_access": {"dicomflow": {"roles": ["technologist"]}, "other": {"roles": ["admin"]}}}
    got = memberships_from_claims(claims, _issuer(preset=ClaimPreset.KEYCLOAK))
    assert got == {"acme": frozenset({"viewer", "technologist"}), "globex": frozenset({"viewer", "technologist"})}


def test_keycloak_organization_object_form() -> None:
    claims = {"organization": {"acme": {"id": "42"}}, "realm_access": {"roles": ["admin"]}}
    assert memberships_from_claims(claims, _issuer(preset=ClaimPreset.KEYCLOAK)) == {"acme": frozenset({"admin"})}


def test_generic_per_tenant_roles_scopes_and_aliases() -> None:
    claims = {"tenants": {"ACME-Org": ["viewer"]}, "scope": "openid dicomflow:globex:admin read:x"}
    got = memberships_from_claims(claims, _issuer(tenant_aliases={"ACME-Org": "acme"}))
    assert got == {"acme": frozenset({"viewer"}), "globex": frozenset({"admin"})}


def test_no_claims_no_memberships() -> None:
    assert memberships_from_claims({"sub": "x"}, _issuer()) == {}


def test_role_table_maps_to_permissions() -> None:
    table = AuthSettings().role_permissions
    p = Principal("s", "i", memberships={"acme": frozenset({"viewer"})})
    assert p.permissions("acme", table) == {Permission.READ, Permission.SEARCH}
    assert p.permissions("globex", table) == frozenset()


def test_none_and_hmac_algorithms_cannot_be_configured() -> None:
    with pytest.raises(ValueError):
        _issuer(algorithms=["none"])
    with pytest.raises(ValueError):
        _issuer(algorithms=["HS256"])


def test_unverified_parts_rejects_garbage() -> None:
    for bad in ("", "a.b", "a.b.c", "e30.!!!.x"):
        with pytest.raises(InvalidTokenError):
            unverified_parts(bad)


class _Req:
    def __init__(self, method: str, path: str) -> None:
        self.method, self.path = method, path


@pytest.mark.parametrize(("method", "path", "perm"), [
    ("GET", "/dicomweb/studies", Permission.SEARCH),
    ("GET", "/tenants/a/dicomweb/studies/1.2/series", Permission.SEARCH),
    ("GET", "/dicomweb/studies/1.2/instances/", Permission.SEARCH),
    ("GET", "/dicomweb/studies/1.2", Permission.READ),
    ("GET", "/dicomweb/studies/1.2/metadata", Permission.READ),
    ("GET", "/dicomweb/studies/1.2/series/1.3/instances/1.4/frames/1", Permission.READ),
    ("POST", "/dicomweb/studies", Permission.WRITE),
    ("DELETE", "/dicomweb/studies/1.2", Permission.DELETE),
    ("GET", "/tenants/a/admin/deliveries", Permission.ADMIN),
    ("GET", "/metrics", Permission.ADMIN),
])
def test_required_permission(method: str, path: str, perm: Permission) -> None:
    assert required_permission(_Req(method, path)) is perm  # type: ignore[arg-type]
