"""Throw-away certificates for `edge up`: a local CA and one certificate per site, in the state dir.

So that the default topology serves HTTPS on the first run with nothing to
set up, and no private key is ever committed: `edge up` makes a site's
certificate when the site's ``tls_cert`` and ``tls_key`` both point inside the
topology's ``state_dir`` and neither file exists yet.  The CA
(``<state_dir>/tls/ca.pem``, its key beside it, readable by the owner only) is
made once and reused, so a client told to trust it keeps trusting it across
runs.  Certificates an operator put anywhere else are never touched.

Blocking (it writes files): call it before the loop runs or through ``asyncio.to_thread``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from edge.config import Site, Topology

CA_NAME = "edge up throw-away CA"
LEAF_DAYS = 90          # what browsers accept for a leaf (and what ACME issues)
CA_DAYS = 3650


def ca_path(topology: Topology) -> Path:
    return topology.state_dir / "tls" / "ca.pem"


def wanted(topology: Topology) -> list[Site]:
    """Sites whose certificate `edge up` would make (both files missing, both in state_dir)."""
    state = topology.state_dir.resolve()
    out = []
    for site in topology.sites:
        if site.tls_cert is None or site.tls_key is None:
            continue
        files = (site.tls_cert, site.tls_key)
        if all(not f.exists() and f.resolve().is_relative_to(state) for f in files):
            out.append(site)
    return out


def makes(topology: Topology, path: Path) -> bool:
    """Is `path` a file `edge up` is about to make (the throw-away CA, when missing and wanted)?
    A node may name the CA (a parent_ca) before it exists, as a site names its certificate."""
    return path.resolve() == ca_path(topology).resolve() and not path.exists() and bool(wanted(topology))


def ensure(topology: Topology, now: datetime.datetime | None = None) -> list[Site]:
    """Make the certificates :func:`wanted` lists; returns those sites."""
    sites = wanted(topology)
    if not sites:
        return []
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = now or datetime.datetime.now(datetime.timezone.utc)
    ca_cert_file = ca_path(topology)
    ca_key_file = ca_cert_file.with_suffix(".key")
    if ca_cert_file.exists() and ca_key_file.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_file.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
        ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA256()))
        _write(ca_key_file, _key_pem(ca_key), private=True)
        _write(ca_cert_file, ca_cert.public_bytes(serialization.Encoding.PEM))
    for site in sites:
        key = ec.generate_private_key(ec.SECP256R1())
        names = []
        for host in site.hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site.hosts[0])]))
                .issuer_name(ca_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        assert site.tls_key is not None and site.tls_cert is not None
        _write(site.tls_key, _key_pem(key), private=True)
        _write(site.tls_cert, cert.public_bytes(serialization.Encoding.PEM))
    return sites


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A private key is created owner-only from the start, never chmod-ed after being readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
