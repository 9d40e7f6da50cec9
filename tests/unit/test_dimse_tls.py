"""dimse.tls settings and the TLS contexts built from them (PS3.15 B.9: TLS 1.2 at least)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError

from dicomflow.dimse import tls
from dicomflow.settings import DimseSettings, DimseTlsSettings
from tests.harness.certs import CertificateAuthority


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "ca")


def test_client_certificates_need_a_ca_file(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="ca_file"):
        DimseTlsSettings(cert_file=tmp_path / "c", key_file=tmp_path / "k", require_client_cert=True)
    with pytest.raises(ValidationError):
        DimseTlsSettings(cert_file=tmp_path / "c", key_file=tmp_path / "k", min_version="1.1")  # type: ignore[arg-type]
    assert DimseSettings().tls is None  # plain TCP unless configured


def test_server_context(ca: CertificateAuthority) -> None:
    pair = ca.issue("server", "scp", server=True)
    required = tls.server_context(DimseTlsSettings(cert_file=pair.cert, key_file=pair.key, ca_file=ca.pem,
                                                   require_client_cert=True))
    assert required.minimum_version == ssl.TLSVersion.TLSv1_2
    assert required.verify_mode == ssl.CERT_REQUIRED
    optional = tls.server_context(DimseTlsSettings(cert_file=pair.cert, key_file=pair.key, ca_file=ca.pem))
    assert optional.verify_mode == ssl.CERT_OPTIONAL  # a certificate offered must still verify
    anonymous = tls.server_context(DimseTlsSettings(cert_file=pair.cert, key_file=pair.key, min_version="1.3"))
    assert anonymous.verify_mode == ssl.CERT_NONE and anonymous.minimum_version == ssl.TLSVersion.TLSv1_3


def test_unusable_files_name_the_setting(ca: CertificateAuthority, tmp_path: Path) -> None:
    pair = ca.issue("server", "scp", server=True)
    with pytest.raises(ValueError, match=r"dimse\.tls: cannot use cert_file"):
        tls.server_context(DimseTlsSettings(cert_file=tmp_path / "missing.crt", key_file=pair.key))
    other = ca.issue("other", "other", server=True)
    with pytest.raises(ValueError, match=r"dimse\.tls: cannot use cert_file"):  # key of another certificate
        tls.server_context(DimseTlsSettings(cert_file=pair.cert, key_file=other.key))
    with pytest.raises(ValueError, match=r"dimse\.tls: cannot use ca_file"):
        tls.server_context(DimseTlsSettings(cert_file=pair.cert, key_file=pair.key, ca_file=pair.key))


def test_client_context_verifies_the_server(ca: CertificateAuthority) -> None:
    pair = ca.issue("client", "scu", server=False)
    ctx = tls.client_context(DimseTlsSettings(cert_file=pair.cert, key_file=pair.key, ca_file=ca.pem))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls.client_context(None).verify_mode == ssl.CERT_REQUIRED  # no dimse.tls: system CAs only
