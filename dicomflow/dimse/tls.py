"""TLS for DIMSE (PS3.15 B.1 The Basic TLS Secure Transport Connection Profile; B.9 Non-Downgrading
BCP 195 TLS Profile: TLS 1.2 or later, never SSL or TLS 1.0/1.1).

Server side: pynetdicom's ``AssociationServer`` wraps every accepted socket with our context in its
accept thread, where a handshake would block every other peer's connection until it ends. The context
here therefore wraps without a handshake (``do_handshake_on_connect=False``), and
:func:`handshake` completes it on the association's own thread, bounded by the ACSE timeout, before the
DUL reads the A-ASSOCIATE-RQ. A peer that fails it (plain TCP, an untrusted or missing client
certificate when one is required) is disconnected; nothing else happens.

Client side (storage commitment reports on a new association, C-MOVE sub-operations and forwards to
remote nodes with ``tls: true``): the server certificate is verified against ``ca_file`` and the system
CAs, and against the node's host name; our certificate is presented for peers that require one.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
from typing import Any

from dicomflow.settings import DimseTlsSettings

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class _DeferredHandshakeContext(ssl.SSLContext):
    """An SSLContext whose server sockets complete their handshake later, in :func:`handshake`."""

    def wrap_socket(self, sock: socket.socket, server_side: bool = False, do_handshake_on_connect: bool = True,
                    *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        return super().wrap_socket(sock, server_side, do_handshake_on_connect and not server_side, *args, **kwargs)


def server_context(tls: DimseTlsSettings) -> ssl.SSLContext:
    """The context for the DIMSE listening port (``ValueError`` naming the setting for unusable files)."""
    ctx = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION  # BCP 195 3.3 (CRIME)
    _load(ctx, tls)
    if tls.ca_file is not None:
        # without require_client_cert a client may present none, but one it presents must verify
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@functools.lru_cache(maxsize=8)
def client_context(tls: DimseTlsSettings | None) -> ssl.SSLContext:
    """The context for associations we open to remote nodes marked ``tls``."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = _VERSIONS[tls.min_version] if tls else ssl.TLSVersion.TLSv1_2
    if tls is not None:
        _load(ctx, tls)
    return ctx


def _load(ctx: ssl.SSLContext, tls: DimseTlsSettings) -> None:
    """Our certificate and key, and the CAs we trust; a clear error naming the setting when unusable."""
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"dimse.tls: cannot use cert_file {tls.cert_file} with key_file {tls.key_file}: "
                         f"{exc}") from exc
    if tls.ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=tls.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"dimse.tls: cannot use ca_file {tls.ca_file}: {exc}") from exc


def handshake(sock: socket.socket, timeout: float) -> str | None:
    """Complete a deferred server-side handshake; None when it succeeded, else why it failed (no PHI)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        sock.do_handshake()
    except ssl.SSLError as exc:
        return exc.reason or exc.__class__.__name__
    except TimeoutError:
        return "handshake timed out"
    except OSError as exc:
        return exc.strerror or exc.__class__.__name__
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous)
    return None


def peer_subject(sock: socket.socket) -> str | None:
    """The verified client certificate's subject common name, if any (for the audit record)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):
        return None
    for rdn in (cert or {}).get("subject", ()):
        for pair in rdn:
            if pair[0] == "commonName":
                return str(pair[1])
    return None
