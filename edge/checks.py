"""What `edge run` would refuse beyond the file itself, found by `edge check` first.

``config.parse`` validates the file; a process can still refuse a valid
file when it starts: the DNS scheduler will not hand out an L1 on a wildcard
address, a cache directory that is a file cannot be created, an origin's
content directory cannot be a file, an access log under a file cannot be opened,
a certificate is not its key's or has expired, a CA bundle holds no certificate.
:func:`problems` runs those same rules without starting anything, so
`edge check` (and `edge up`, before it starts or reloads anything) reports
them as config errors naming the file, the key and the problem.

Paths are checked on the machine this runs on: run `edge check` on each host
of a topology spread over several.  Only what is certain to fail is
reported: a directory that does not exist here is fine (it may be created,
or exist on the node's own host), one that is a file or sits under a file
is not.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

from edge.config import ConfigError, Site, Topology


def problems(topology: Topology, only: str | None = None) -> list[ConfigError]:
    """Every problem found, in topology order; empty when every process would start.

    With `only` (a node name, or "dns"), just that process's: what a reload
    of it checks, without judging other hosts' paths on this one.
    """
    found: list[ConfigError] = []
    # Certificates matter to the nodes that terminate TLS (and to `edge check`, which checks all).
    if only is None or any(n.name == only and n.listen_tls is not None for n in topology.nodes):
        for site in topology.sites:
            found += certificate_problems(topology, site)
    # What reaching an https:// origin takes matters to every cache node: any of them may go there.
    if only is None or any(n.name == only and n.role != "origin" for n in topology.nodes):
        for site in topology.sites:
            found += origin_tls_problems(topology, site)
    if topology.dns is not None and only in (None, "dns"):
        # The scheduler's own construction is the rule (a wildcard L1 address, for one):
        # building it here means `edge check` can never disagree with `edge run dns`.
        from edge.scheduler.answer import Answerer
        try:
            Answerer(topology)
        except ConfigError as exc:
            found.append(exc)
    for node in topology.nodes:
        if only is not None and node.name != only:
            continue
        path = f"nodes.{node.name}"
        if node.role == "origin":
            problem = _directory_problem(node.content_dir) if node.content_dir is not None else None
            if problem:
                found.append(ConfigError(topology.source, f"{path}.content_dir",
                                         f"the origin serves files from it: {problem}"))
            continue
        problem = _directory_problem(topology.cache_dir(node))
        if problem:
            key = f"{path}.cache_dir" if node.cache_dir is not None else "state_dir"
            found.append(ConfigError(topology.source, key, f"cache directory of {node.name}: {problem}"))
        if node.parent_ca is not None:
            from edge import devcerts
            if not devcerts.makes(topology, node.parent_ca):     # `edge up` makes its throw-away CA
                found += ca_bundle_problems(topology, node.parent_ca, f"{path}.parent_ca")
        if node.access_log not in ("-", "off"):
            log_file = Path(node.access_log)
            problem = ("is a directory" if log_file.is_dir() else _directory_problem(log_file.parent))
            if problem:
                found.append(ConfigError(topology.source, f"{path}.access_log",
                                         f"{str(log_file)!r}: {problem}"))
    return found


def _directory_problem(directory: Path) -> str | None:
    """Why `directory` can never be a directory (it or an ancestor is a file); None if it can."""
    for candidate in (directory, *directory.parents):
        if candidate.is_dir():
            return None
        if candidate.exists():
            where = "is a file" if candidate == directory else f"is under {str(candidate)!r}, which is a file"
            return f"{str(directory)!r} {where}, not a directory"
    return None


def certificate_problems(topology: Topology, site: Site, now: datetime.datetime | None = None) -> list[ConfigError]:
    """Why `site`'s tls_cert cannot serve its hosts: unreadable, not the key's, expired or not yet
    valid, or not covering one of its hosts (each problem names the file)."""
    if site.tls_cert is None or site.tls_key is None:
        return []
    from cryptography import x509
    key = f"sites.{site.name}.tls_cert"
    from edge import devcerts
    if site in devcerts.wanted(topology):
        return []       # not certain to fail: `edge up` makes it in the state dir (`edge run` would not)
    leaf, found = _pair_problems(topology, site.tls_cert, site.tls_key, key, f"sites.{site.name}.tls_key", now)
    if leaf is None:
        return found
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]
        addresses = [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names, addresses = [], []       # clients ignore the CN since RFC 6125: nothing is covered
    for host in site.hosts:
        if not covers(names, addresses, host):
            found.append(ConfigError(topology.source, key, f"{site.tls_cert} does not cover {host!r} "
                                                           f"(its names: {', '.join(names + addresses) or 'none'})"))
    return found


def origin_tls_problems(topology: Topology, site: Site, now: datetime.datetime | None = None) -> list[ConfigError]:
    """Why `site`'s origin_ca or origin_client_cert cannot be used: a bundle without a certificate;
    a client certificate unreadable, not the key's, expired or not yet valid, or not allowed for
    client authentication (each problem names the file)."""
    found = []
    if site.origin_ca is not None:
        found += ca_bundle_problems(topology, site.origin_ca, f"sites.{site.name}.origin_ca")
    if site.origin_client_cert is None or site.origin_client_key is None:
        return found
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID
    key = f"sites.{site.name}.origin_client_cert"
    leaf, problems = _pair_problems(topology, site.origin_client_cert, site.origin_client_key, key,
                                    f"sites.{site.name}.origin_client_key", now)
    found += problems
    if leaf is None:
        return found
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None                   # no extendedKeyUsage: good for any purpose
    if usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        # OpenSSL (nginx, Apache, HAProxy) checks the purpose of a client certificate.
        found.append(ConfigError(topology.source, key, f"{site.origin_client_cert} is not for client "
                                                       "authentication (its extendedKeyUsage lacks clientAuth): "
                                                       "an origin that checks it refuses it"))
    return found


def ca_bundle_problems(topology: Topology, bundle: Path, key: str) -> list[ConfigError]:
    """Why `bundle` cannot verify anything: unreadable, or not one PEM certificate in it."""
    from cryptography import x509
    try:
        data = bundle.read_bytes()
    except OSError as exc:
        return [ConfigError(topology.source, key, f"{bundle}: {exc.strerror or exc}")]
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        return [ConfigError(topology.source, key, f"{bundle}: no PEM certificate in it")]
    return []


def _pair_problems(topology: Topology, cert: Path, private_key: Path, cert_key: str, key_key: str,
                   now: datetime.datetime | None) -> tuple[object | None, list[ConfigError]]:
    """A certificate chain and its key: the leaf (None if the chain cannot be read), and why the
    pair cannot be used (unreadable, not the key's, expired or not yet valid)."""
    from cryptography import x509
    try:
        certs = x509.load_pem_x509_certificates(cert.read_bytes())
    except OSError as exc:
        return None, [ConfigError(topology.source, cert_key, f"{cert}: {exc.strerror or exc}")]
    except ValueError as exc:
        return None, [ConfigError(topology.source, cert_key, f"{cert}: not a PEM certificate: {exc}")]
    found = []
    # The key match is the one OpenSSL makes when the node loads them.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, private_key)
    except ssl.SSLError as exc:
        problem = ("is not the certificate of the private key in " if exc.reason == "KEY_VALUES_MISMATCH"
                   else f"cannot be loaded with the key in ({exc.reason or exc}) ")
        found.append(ConfigError(topology.source, key_key, f"{cert} {problem}{private_key}"))
    except OSError as exc:
        found.append(ConfigError(topology.source, key_key, f"{private_key}: {exc.strerror or exc}"))
    leaf = certs[0]
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc < now:
        found.append(ConfigError(topology.source, cert_key, f"{cert} expired on "
                                                            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"))
    elif leaf.not_valid_before_utc > now:
        found.append(ConfigError(topology.source, cert_key, f"{cert} is not valid before "
                                                            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"))
    return leaf, found


def covers(names: list[str], addresses: list[str], host: str) -> bool:
    """Does a certificate with these SAN DNS names and IP addresses serve `host` (RFC 6125:
    a wildcard stands for exactly one left-most label)?"""
    try:
        return str(ipaddress.ip_address(host)) in addresses
    except ValueError:
        pass
    for name in names:
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False
