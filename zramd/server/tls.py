"""Server-side TLS for STARTTLS: an ``ssl.SSLContext`` from a certificates directory.

Theory of operation
-------------------
The directory follows nbdkit's layout (nbd.md 5): :data:`SERVER_CERT` (the server's certificate,
optionally followed by intermediates), :data:`SERVER_KEY` (its private key) and :data:`CA_CERT`
(the CA that signs *client* certificates; only needed with ``verify_peer``). The context is built
once at start (a missing or unreadable file is a :class:`~zramd.config.ConfigError` naming it) and
shared by every connection. Policy: TLS >= 1.2 (:data:`MIN_TLS_VERSION`), no renegotiation, no
compression; with ``verify_peer`` a client must present a certificate signed by the CA or the
TLS handshake fails (the session closes the connection).

This module knows nothing about NBD or asyncio: ``server/session.py`` runs the handshake with
``loop.start_tls`` when the protocol core yields ``StartTLS``.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

from zramd.config import ConfigError

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
#: Oldest protocol version accepted (nbd.md 5: TLS >= 1.2).
MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2


def _path(cert_dir: str, name: str) -> str:
    path = os.path.join(cert_dir, name)
    if not os.path.isfile(path):
        raise ConfigError(f"tls-certificates: {path} is missing")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"tls-certificates: {path} is not readable")
    return path


def server_context(cert_dir: str, *, verify_peer: bool = False) -> ssl.SSLContext:
    """The SSLContext for ``cert_dir`` (nbdkit layout). Raises ConfigError naming the bad file."""
    if not os.path.isdir(cert_dir):
        raise ConfigError(f"tls-certificates: {cert_dir} is not a directory")
    cert = _path(cert_dir, SERVER_CERT)
    key = _path(cert_dir, SERVER_KEY)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_TLS_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"tls-certificates: cannot load {cert} / {key}: {e}") from None
    if verify_peer:
        ca = _path(cert_dir, CA_CERT)
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"tls-certificates: cannot load {ca}: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def peer_summary(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384`` (+ client subject CN when verified), for debug logs."""
    if ssl_object is None:
        return "?"
    parts = [str(ssl_object.version() or "?")]
    cipher = ssl_object.cipher()
    if cipher:
        parts.append(cipher[0])
    peer: dict[str, Any] = dict(ssl_object.getpeercert() or {})
    for rdn in peer.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                parts.append(f"client CN={value}")
    return " ".join(parts)
