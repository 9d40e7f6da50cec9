"""Settings: the commented example loads, environment overrides win over the file, bad values are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dicomflow.settings import AuthSettings, Settings, TenantSettings, load_settings

EXAMPLE = Path(__file__).parents[2] / "config" / "settings.example.yaml"


def test_example_config_loads() -> None:
    s = load_settings(EXAMPLE)
    assert s.default_tenant == "default"
    assert s.tenants["default"].ae_titles == ["DICOMFLOW"]
    assert not s.auth.enabled


def test_environment_overrides_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMFLOW_HTTP__PORT", "18123")
    monkeypatch.setenv("DICOMFLOW_LIMITS__QIDO_DEFAULT_LIMIT", "7")
    s = load_settings(EXAMPLE)
    assert s.http.port == 18123
    assert s.limits.qido_default_limit == 7


def test_explicit_arguments_override_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DICOMFLOW_DATA_DIR", "/nonexistent")
    assert load_settings(EXAMPLE, data_dir=tmp_path).data_dir == tmp_path


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "nope.yaml")


@pytest.mark.parametrize("ae", ["", "THIS_AE_TITLE_IS_TOO_LONG", "BACK\\SLASH", "TAB\tAE"])
def test_illegal_ae_titles_are_refused(ae: str) -> None:
    with pytest.raises(ValidationError):
        TenantSettings(ae_titles=[ae])


def test_an_ae_title_belongs_to_one_tenant() -> None:
    with pytest.raises(ValidationError, match="belongs to both"):
        Settings(tenants={"default": TenantSettings(ae_titles=["X"]), "b": TenantSettings(ae_titles=["X"])})


def test_default_tenant_must_exist_and_names_are_checked() -> None:
    with pytest.raises(ValidationError):
        Settings(default_tenant="nope")
    with pytest.raises(ValidationError):
        Settings(tenants={"default": TenantSettings(), "Bad_Name": TenantSettings()})


def test_unknown_permission_in_role_table_is_refused() -> None:
    with pytest.raises(ValidationError, match="unknown permissions"):
        AuthSettings(role_permissions={"viewer": ["read", "fly"]})
