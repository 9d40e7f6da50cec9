"""Configuration: one ``Settings`` object built from a YAML file plus environment overrides.

Environment variables use the prefix ``DICOMFLOW_`` and ``__`` for nesting, e.g.
``DICOMFLOW_HTTP__PORT=8081`` or ``DICOMFLOW_TENANTS__DEFAULT__DUPLICATE_POLICY=overwrite``.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

# PS3.5 6.2: AE titles are up to 16 characters of the Default Character Repertoire, no backslash or control chars.
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class DuplicatePolicy(StrEnum):
    """What to do when a SOP Instance UID arrives again with different bytes."""

    REJECT = "reject"  # 409 / 0x0111 Duplicate SOP Instance (PS3.4 B.2.3)
    OVERWRITE = "overwrite"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def validate_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_RE.match(stripped):
        raise ValueError(f"invalid AE title {value!r}: 1-16 printable ASCII characters, no backslash")
    return stripped


class RemoteNode(_Model):
    """A DICOM peer this tenant may send to (C-MOVE destination, route target)."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False

    _ae = field_validator("ae_title")(validate_ae_title)


class CallingAe(_Model):
    """An allowed calling AE title, optionally bound to a host."""

    ae_title: str
    host: str | None = None

    _ae = field_validator("ae_title")(validate_ae_title)


class TenantSettings(_Model):
    """Per-organization settings."""

    ae_titles: list[str] = Field(default_factory=list)
    require_known_calling_ae: bool = False
    allowed_calling_aes: list[CallingAe] = Field(default_factory=list)
    remote_nodes: dict[str, RemoteNode] = Field(default_factory=dict)
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.REJECT
    #: PN matching ignores case (PS3.4 C.2.2.2.1 lets the SCP decide for PN).
    pn_case_insensitive: bool = True
    #: Extra attributes (keyword or 8-hex tag) indexed and matchable in QIDO/C-FIND at instance level.
    extra_indexed_attributes: list[str] = Field(default_factory=list)
    #: quiet time (seconds) before series.stable / study.stable for this tenant (default: routing.stable_after)
    stable_after: float | None = Field(default=None, ge=0)

    _ae = field_validator("ae_titles", mode="after")(lambda v: [validate_ae_title(x) for x in v])


class HttpSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    #: Origins allowed to call DICOMweb from a browser (OHIF and other viewers). "*" allows any.
    cors_origins: list[str] = Field(default_factory=lambda: ["*"])
    #: The base URL clients use (e.g. https://dicom.example.org behind a proxy). Without it, URLs in
    #: responses (RetrieveURL, BulkDataURI) come from Forwarded / X-Forwarded-* and Host headers.
    public_url: str | None = None
    #: Largest request line / header field accepted (bytes); beyond it: 431 / 400.
    max_field_size: int = 16384
    max_line_size: int = 16384


class DimseTlsSettings(_Model):
    """TLS for the DIMSE port (PS3.15 B.1 Basic TLS Secure Transport, B.9 BCP 195; TLS 1.2 minimum).

    ``cert_file``/``key_file`` (PEM) identify this node, to peers that connect and to the remote nodes it
    calls; ``ca_file`` lists the CAs trusted for peers' certificates. With ``require_client_cert`` a peer
    without a certificate signed by one of them is refused during the handshake.
    """

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = False
    min_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _ca_for_client_certs(self) -> DimseTlsSettings:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("dimse.tls.require_client_cert needs dimse.tls.ca_file (CAs to check clients against)")
        return self


class DimseSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    enabled: bool = True
    max_associations: int = 64
    #: ARTIM / idle timeouts in seconds (PS3.8 9.1.5)
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    #: Maximum PDU size we receive (bytes)
    max_pdu: int = 262144
    #: TLS on the DIMSE port (PS3.15 B.1 / B.9 secure transport); None: plain TCP
    tls: DimseTlsSettings | None = None


class ClaimPreset(StrEnum):
    """How token claims map to organizations and roles."""

    #: ``organization`` claim (list of names or object keyed by name); roles from ``realm_access.roles``
    #: and ``resource_access.<audience>.roles`` apply to every organization in the token.
    KEYCLOAK = "keycloak"
    #: ``tenants`` claim (list, or object tenant -> roles) with ``roles``; and scope strings
    #: ``dicomflow:<tenant>:<role>``.
    GENERIC = "generic"


class IssuerSettings(_Model):
    """One trusted OIDC issuer (RFC 8414 / OpenID Connect Discovery 1.0)."""

    issuer: str
    audience: list[str]
    #: default: ``{issuer}/.well-known/openid-configuration``
    discovery_url: str | None = None
    #: Never ``none`` and never HMAC: only asymmetric algorithms verified against the issuer's JWKS.
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "RS384", "RS512", "PS256", "PS384",
                                                           "PS512", "ES256", "ES384", "ES512", "EdDSA"])
    preset: ClaimPreset = ClaimPreset.GENERIC
    #: Dot path of the claim naming organizations; default per preset.
    tenants_claim: str | None = None
    #: Dot paths of claims holding role lists; default per preset.
    roles_claims: list[str] | None = None
    #: Map an organization name in the token to a tenant name here (default: identical).
    tenant_aliases: dict[str, str] = Field(default_factory=dict)
    leeway_seconds: int = Field(default=30, ge=0, le=300)

    @field_validator("algorithms")
    @classmethod
    def _no_none(cls, value: list[str]) -> list[str]:
        bad = [a for a in value if a.lower() == "none" or a.upper().startswith("HS")]
        if bad:
            raise ValueError(f"algorithms not allowed for bearer tokens: {bad}")
        return value


class AuthSettings(_Model):
    """OAuth2 resource server settings. No issuers: authentication is off (loopback only)."""

    issuers: list[IssuerSettings] = Field(default_factory=list)
    #: role -> permissions (read, search, write, delete, merge, import, export, admin)
    role_permissions: dict[str, list[str]] = Field(default_factory=lambda: {
        "viewer": ["read", "search"],
        "technologist": ["read", "search", "write"],
        "integrator": ["read", "search", "write", "import", "export"],
        "data-manager": ["read", "search", "write", "delete", "merge", "import", "export"],
        "admin": ["read", "search", "write", "delete", "merge", "import", "export", "admin"],
    })
    #: Longest bearer token accepted (bytes)
    max_token_bytes: int = 8192
    #: Minimum seconds between two JWKS refreshes triggered by an unknown key id
    jwks_refresh_interval: float = 10.0

    @field_validator("role_permissions")
    @classmethod
    def _known_permissions(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        known = {"read", "search", "write", "delete", "merge", "import", "export", "admin"}
        for role, perms in value.items():
            unknown = sorted(set(perms) - known)
            if unknown:
                raise ValueError(f"role {role!r} names unknown permissions {unknown}; known: {sorted(known)}")
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.issuers)


class OAuth2ClientCredentials(_Model):
    """OAuth2 client-credentials grant (RFC 6749 4.4) used to call a destination."""

    token_url: str
    client_id: str
    client_secret: SecretStr
    scope: str | None = None
    #: RFC 8707 resource indicator, for servers that issue audience-bound tokens
    resource: str | None = None
    #: how the client authenticates at the token endpoint (RFC 6749 2.3.1)
    auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"


class BasicAuth(_Model):
    username: str
    password: SecretStr


class _HttpDestination(_Model):
    url: str
    oauth2: OAuth2ClientCredentials | None = None
    basic: BasicAuth | None = None
    #: seconds for one request (connect + response)
    timeout: float = Field(default=30.0, gt=0)
    #: deliveries to this destination running at once (per worker process)
    concurrency: int = Field(default=4, ge=1, le=256)

    @model_validator(mode="after")
    def _one_auth(self) -> _HttpDestination:
        if self.oauth2 is not None and self.basic is not None:
            raise ValueError("give either oauth2 or basic credentials, not both")
        return self


class FhirDestination(_HttpDestination):
    """A FHIR R4 server (base URL)."""

    type: Literal["fhir"]


class DicomwebDestination(_HttpDestination):
    """A DICOMweb service root that accepts STOW-RS (PS3.18 10.5)."""

    type: Literal["dicomweb"]
    #: instances per STOW-RS request
    batch_size: int = Field(default=50, ge=1, le=10000)


class WebhookDestination(_Model):
    """An HTTP endpoint receiving JSON events signed with HMAC-SHA256."""

    type: Literal["webhook"]
    url: str
    secret: SecretStr
    timeout: float = Field(default=10.0, gt=0)
    concurrency: int = Field(default=4, ge=1, le=256)


class DicomDestination(_Model):
    """A remote DICOM node receiving C-STORE (PS3.4 Annex B)."""

    type: Literal["dicom"]
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str = "DICOMFLOW"
    timeout: float = Field(default=60.0, gt=0)
    concurrency: int = Field(default=1, ge=1, le=64)
    #: instances sent on one association
    batch_size: int = Field(default=500, ge=1)
    #: TLS (PS3.15 B.1): the node's certificate is checked against dimse.tls.ca_file and the system CAs;
    #: dimse.tls.cert_file/key_file are presented as our client certificate
    tls: bool = False

    _ae = field_validator("ae_title", "calling_ae_title")(validate_ae_title)


Destination = Annotated[
    FhirDestination | DicomwebDestination | WebhookDestination | DicomDestination, Field(discriminator="type")
]


class RoutingSettings(_Model):
    """The routing engine: where routes and mappings live, destinations and their credentials, delivery."""

    enabled: bool = True
    #: folder of routes/*.yaml; None: no routes (the outbox is still drained)
    routes_dir: Path | None = None
    #: folder of mappings/*.yaml used by fhir actions
    mappings_dir: Path = Path("mappings")
    #: named destinations that route actions refer to
    destinations: dict[str, Destination] = Field(default_factory=dict)
    #: base URL under which peers reach this server (FHIR Endpoint.address); default http://host:port
    public_url: str | None = None
    #: seconds between outbox polls and between route-file checks
    poll_interval: float = Field(default=0.5, gt=0)
    reload_interval: float = Field(default=1.0, gt=0)
    #: default quiet time (seconds) before series.stable / study.stable; routes and tenants may override
    stable_after: float = Field(default=90.0, ge=0)
    #: attempts before a delivery becomes a dead letter
    max_attempts: int = Field(default=12, ge=1)
    #: exponential back-off: initial and maximum delay in seconds (jittered)
    backoff_initial: float = Field(default=2.0, gt=0)
    backoff_max: float = Field(default=900.0, gt=0)
    #: seconds a worker owns a claimed delivery; after a crash another worker takes it over
    lease: float = Field(default=300.0, gt=0)
    batch_size: int = Field(default=100, ge=1)


class SyslogSettings(_Model):
    """Forward audit records to a syslog collector (RFC 5424 over UDP, RFC 5425-style octet counting on TCP)."""

    host: str
    port: int = Field(default=514, ge=1, le=65535)
    protocol: str = Field(default="udp", pattern="^(udp|tcp)$")
    app_name: str = "dicomflow"


class AuditSettings(_Model):
    enabled: bool = True
    #: records waiting to be written; beyond this the sink reports itself full (never blocks a protocol)
    queue_size: int = Field(default=10000, ge=10)
    syslog: SyslogSettings | None = None


class LimitSettings(_Model):
    qido_default_limit: int = 1000
    qido_max_limit: int = 10000
    #: Most matches one C-FIND returns (0: no limit); beyond it the search stops with Success (dimse/qr.py)
    dimse_find_max_results: int = Field(default=10000, ge=0)
    #: Largest single instance accepted (bytes)
    max_instance_size: int = 8 * 1024**3
    #: Value length above which metadata carries a BulkDataURI instead of the value (bytes)
    bulk_data_threshold: int = 1024
    #: Parallel pydicom/transcode workers
    parse_workers: int = 4
    #: Threads for blob I/O (fsyncs, renames, reads): they mostly wait on the disk, so they get their own
    #: pool instead of queueing behind pydicom work in parse_workers
    io_workers: int = Field(default=8, ge=1)


class S3Settings(_Model):
    """How to reach the object store when ``storage`` is ``s3://bucket/prefix``.

    Credentials left empty come from botocore's usual chain (``AWS_ACCESS_KEY_ID``..., instance role).
    """

    #: e.g. ``http://127.0.0.1:8333`` for SeaweedFS/MinIO; empty for AWS
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    #: path-style addressing (``endpoint/bucket/key``), which most S3-compatible stores need
    path_style: bool = False
    #: server-side encryption: ``AES256`` (SSE-S3) or ``aws:kms`` (SSE-KMS, with an optional key id)
    sse: Literal["AES256", "aws:kms"] | None = None
    sse_kms_key_id: str | None = None
    #: tenant -> bucket for tenants kept in a bucket of their own (others use the URL's bucket)
    tenant_buckets: dict[str, str] = Field(default_factory=dict)
    #: create missing buckets at start (convenient for a private SeaweedFS/MinIO)
    create_buckets: bool = False
    #: multipart upload part size (bytes, at least 5 MiB) and parts in flight per upload
    part_size: int = Field(default=8 * 1024**2, ge=5 * 1024**2)
    part_concurrency: int = Field(default=4, ge=1)
    #: attempts per request (botocore "standard" retries with exponential back-off)
    max_attempts: int = Field(default=5, ge=1)
    connect_timeout: float = 5.0
    read_timeout: float = 60.0


class Settings(BaseSettings):
    """Everything the server needs; ``create_app(settings)`` takes one of these."""

    model_config = SettingsConfigDict(
        env_prefix="DICOMFLOW_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    data_dir: Path = Path("./dicomflow-data")
    #: ``sqlite:///path`` (default: data_dir/index.sqlite) or ``postgresql://...``
    index: str | None = None
    #: ``file:///path`` (default: data_dir/blobs) or ``s3://bucket/prefix`` (see ``s3``)
    storage: str | None = None
    s3: S3Settings = Field(default_factory=S3Settings)
    default_tenant: str = "default"
    tenants: dict[str, TenantSettings] = Field(
        default_factory=lambda: {"default": TenantSettings(ae_titles=["DICOMFLOW"])}
    )
    http: HttpSettings = Field(default_factory=HttpSettings)
    dimse: DimseSettings = Field(default_factory=DimseSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    #: Serve on a non-loopback address without authentication (refused unless set explicitly).
    insecure: bool = False
    log_level: str = "INFO"

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, value: dict[str, TenantSettings]) -> dict[str, TenantSettings]:
        for name in value:
            if not TENANT_RE.match(name):
                raise ValueError(f"invalid tenant name {name!r}: lowercase letters, digits and '-'")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.default_tenant not in self.tenants:
            raise ValueError(f"default_tenant {self.default_tenant!r} is not declared under tenants")
        seen: dict[str, str] = {}
        for name, tenant in self.tenants.items():
            for ae in tenant.ae_titles:
                if ae in seen:
                    raise ValueError(f"AE title {ae!r} belongs to both {seen[ae]!r} and {name!r}")
                seen[ae] = name
        return self

    @property
    def index_url(self) -> str:
        return self.index or f"sqlite:///{(self.data_dir / 'index.sqlite').resolve()}"

    @property
    def storage_url(self) -> str:
        return self.storage or f"file://{(self.data_dir / 'blobs').resolve()}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments (CLI) > environment > YAML file.
        yaml_file = _CONFIG_FILE.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


_CONFIG_FILE: dict[str, Path | None] = {"path": None}


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from an optional YAML file, the environment and explicit overrides."""
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")
    _CONFIG_FILE["path"] = config_file
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _CONFIG_FILE["path"] = None
