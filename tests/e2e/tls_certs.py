"""Throw-away X.509 certificates for TLS tests, generated with ``certtool`` (gnutls-bin).

Theory of operation
-------------------
:func:`make_pki` writes, into one directory, a CA and a server and a client certificate in the
layout nbdkit, libnbd and qemu all read: ``ca-cert.pem``, ``server-cert.pem``/``server-key.pem``
(SAN ``localhost`` and ``127.0.0.1``, TLS WWW server usage) and ``client-cert.pem``/
``client-key.pem`` (TLS WWW client usage), all signed by the CA, valid for one day. It returns a
:class:`Pki` with handy sub-directories: ``server`` (what ``zramd serve --tls-certificates``
reads), ``client`` (CA + client certificate, for libnbd/qemu clients), ``anon`` (CA only: a client
that verifies the server but has no certificate of its own), ``rogue`` (a client certificate
from an unrelated CA). Knows nothing of NBD.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

_CA_TEMPLATE = "cn = zramd test CA\nca\ncert_signing_key\nexpiration_days = 1\n"
_SERVER_TEMPLATE = (
    "organization = zramd test\ncn = localhost\ndns_name = localhost\n"
    "ip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n"
    "expiration_days = 1\n"
)
_CLIENT_TEMPLATE = (
    "organization = zramd test\ncn = zramd-test-client\ntls_www_client\n"
    "encryption_key\nsigning_key\nexpiration_days = 1\n"
)


@dataclass(frozen=True)
class Pki:
    root: Path
    server: Path
    client: Path
    anon: Path
    rogue: Path


def _certtool(*args: str) -> None:
    subprocess.run(["certtool", *args], check=True, capture_output=True, timeout=60)


def _key(path: Path) -> None:
    _certtool("--generate-privkey", "--key-type=rsa", "--bits=2048", "--outfile", str(path))


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert, tmpl = d / f"{name}-key.pem", d / f"{name}-cert.pem", d / f"{name}.info"
    tmpl.write_text(_CA_TEMPLATE)
    _key(key)
    _certtool(
        "--generate-self-signed",
        "--load-privkey",
        str(key),
        "--template",
        str(tmpl),
        "--outfile",
        str(cert),
    )
    return cert, key


def _signed(d: Path, name: str, template: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    key, cert, tmpl = d / f"{name}-key.pem", d / f"{name}-cert.pem", d / f"{name}.info"
    tmpl.write_text(template)
    _key(key)
    _certtool(
        "--generate-certificate",
        "--load-privkey",
        str(key),
        "--load-ca-certificate",
        str(ca[0]),
        "--load-ca-privkey",
        str(ca[1]),
        "--template",
        str(tmpl),
        "--outfile",
        str(cert),
    )
    return cert, key


def _dir(root: Path, name: str, files: dict[str, Path]) -> Path:
    d = root / name
    d.mkdir()
    for dest, src in files.items():
        shutil.copy(src, d / dest)
    for key in d.glob("*-key.pem"):
        key.chmod(0o600)
    return d


def make_pki(root: Path) -> Pki:
    if shutil.which("certtool") is None:
        pytest.skip("certtool (gnutls-bin) not installed")
    work = root / "work"
    work.mkdir(parents=True)
    ca = _ca(work, "ca")
    server = _signed(work, "server", _SERVER_TEMPLATE, ca)
    client = _signed(work, "client", _CLIENT_TEMPLATE, ca)
    rogue_ca = _ca(work, "rogue-ca")
    rogue = _signed(work, "rogue", _CLIENT_TEMPLATE, rogue_ca)
    return Pki(
        root=root,
        server=_dir(
            root,
            "server",
            {
                "ca-cert.pem": ca[0],
                "server-cert.pem": server[0],
                "server-key.pem": server[1],
            },
        ),
        client=_dir(
            root,
            "client",
            {
                "ca-cert.pem": ca[0],
                "client-cert.pem": client[0],
                "client-key.pem": client[1],
            },
        ),
        anon=_dir(root, "anon", {"ca-cert.pem": ca[0]}),
        rogue=_dir(
            root,
            "rogue",
            {
                "ca-cert.pem": ca[0],
                "client-cert.pem": rogue[0],
                "client-key.pem": rogue[1],
            },
        ),
    )
