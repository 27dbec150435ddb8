"""TLS towards upstreams: client certificates to origins (mutual TLS) and TLS between tiers.

Real processes on real sockets, certificates made here (trustme).

* 127.0.100.x: https origins run in this process (the blocking `ssl` module in threads,
  as OpenSSL servers such as nginx do: refusals are sent as TLS alerts) that REQUIRE a
  client certificate from their own CA: .11:8443 speaks TLS 1.3, .12:8443 TLS 1.2 only.
  One edge, l1-1 (.31), with a site per client identity.
* 127.0.101.x: origin .10, an L2 l2-a (.21, listen_tls .21:8443) and three L1s with
  `parent_tls`: l1-1 (.31) trusts the CA that signed the site's certificate, l1-2 (.32) and
  l1-3 (.33, go_direct = false) trust another CA.
"""

from __future__ import annotations

import asyncio
import re
import socketserver
import ssl
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import trustme

from edge import checks, config
from edge.config import ConfigError
from edge.http import tls
from edge.proxy import proxy_status
from edge.upstream.client import UpstreamError
from edge.upstream.http1 import Address, Http1Client, TlsProfile, tls_error
from tests.cluster import Cluster, NodeProcess, topology_text
from tests.cluster import get as cluster_get

WWW = "www.example.com"


def write_leaf(ca: trustme.CA, directory: Path, name: str, *hosts: str, **kwargs) -> tuple[Path, Path]:
    leaf = ca.issue_cert(*hosts, **kwargs)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    leaf.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return cert, key


# --------------------------------------------------------------------------- pure rules

def _ssl_error(reason: str) -> ssl.SSLError:
    exc = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower().replace('_', ' ')}")
    exc.reason = reason
    return exc


def _verify_error(message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"certificate verify failed: {message}")
    exc.reason, exc.verify_message = "CERTIFICATE_VERIFY_FAILED", message
    return exc


@pytest.mark.parametrize("exc, error, params, detail", [
    (_verify_error("unable to get local issuer certificate"), "tls_certificate_error", (),
     "https://o.example:8443: unable to get local issuer certificate"),
    # TLS 1.3: the server refuses a missing client certificate after our side of the handshake.
    (_ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED"), "tls_alert_received",
     (("alert-id", 116), ("alert-message", "certificate_required")),
     "https://o.example:8443: the upstream sent TLS alert certificate_required (116)"),
    (_ssl_error("SSLV3_ALERT_HANDSHAKE_FAILURE"), "tls_alert_received",       # the same refusal in TLS 1.2
     (("alert-id", 40), ("alert-message", "handshake_failure")), None),
    (_ssl_error("TLSV1_ALERT_UNKNOWN_CA"), "tls_alert_received",              # our certificate, not trusted there
     (("alert-id", 48), ("alert-message", "unknown_ca")), None),
    (_ssl_error("TLSV1_UNRECOGNIZED_NAME"), "tls_alert_received",             # an alert without ALERT in its name
     (("alert-id", 112), ("alert-message", "unrecognized_name")), None),
    (_ssl_error("TLSV1_ALERT_SOMETHING_NEW"), "tls_alert_received",           # known to OpenSSL, not to the table
     (("alert-message", "something_new"),), None),
    (_ssl_error("WRONG_VERSION_NUMBER"), "tls_protocol_error", (), None),     # found here: not an alert
    (_ssl_error("CERTIFICATE_VERIFY_FAILED"), "tls_protocol_error", (), None),
])
def test_tls_errors_map_to_rfc_9209_types(exc, error, params, detail):
    mapped = tls_error(exc, Address("https", "o.example", 8443))
    assert (mapped.error, mapped.params) == (error, params)
    if detail is not None:
        assert mapped.detail == detail


def test_proxy_status_carries_the_alert_parameters():
    exc = UpstreamError("tls_alert_received", 'https://o: alert "x"', ["origin"],
                        (("alert-id", 116), ("alert-message", "certificate_required")))
    assert proxy_status("l1-1", exc) == ('l1-1; error=tls_alert_received; alert-id=116; '
                                         'alert-message="certificate_required"; details="https://o: alert \\"x\\""')
    assert proxy_status("l1-1", UpstreamError("connection_refused", "x", [])) == \
        'l1-1; error=connection_refused; details="x"'


@pytest.mark.parametrize("a, b, same", [
    (Address("https", "o", 443), Address.from_url("https://o"), True),          # the system's store either way
    (Address.from_url("https://o", TlsProfile(Path("ca.pem"))), Address.from_url("https://o"), False),
    (Address.from_url("https://o", TlsProfile(None, Path("a.pem"), Path("a.key"))),
     Address.from_url("https://o", TlsProfile(None, Path("b.pem"), Path("b.key"))), False),
    (Address.from_url("https://o", server_name="a.example"), Address.from_url("https://o", server_name="b.example"),
     False),
    (Address.from_url("http://o", TlsProfile(Path("ca.pem")), "a.example"), Address("http", "o", 80), True),
])
def test_the_tls_identity_is_part_of_the_pool_key(a, b, same):
    assert (a == b) is same
    assert len({a, b}) == (1 if same else 2)


SITE = '[sites.s]\nhosts = ["www.example.com"]\norigin = "{origin}"\n{site}\n'
NODES = ('[nodes.l2]\nrole = "l2"\nlisten = "127.0.100.21:8080"\nadmin = "127.0.100.21:8091"\n{l2}\n'
         '[nodes.e]\nrole = "l1"\nlisten = "127.0.100.1:8080"\nadmin = "127.0.100.1:8091"\n{l1}\n')


@pytest.mark.parametrize("origin, site, l2, l1, key, problem", [
    ("https://o", 'origin_client_cert = "c.pem"', "", "", "sites.s.origin_client_key", "go together"),
    ("https://o", 'origin_client_key = "k.pem"', "", "", "sites.s.origin_client_cert", "go together"),
    ("http://o", 'origin_client_cert = "c.pem"\norigin_client_key = "k.pem"', "", "",
     "sites.s.origin_client_cert", "only to an https:// origin"),
    ("http://o", "", "", 'parent_ca = "ca.pem"', "nodes.e.parent_ca", "only with parent_tls = true"),
    ("http://o", "", "parent_tls = true", "", "nodes.l2.parent_tls", "only an l1 node has parents"),
    ("http://o", 'tls_cert = "c.pem"\ntls_key = "k.pem"', "", "parent_tls = true", "nodes.e.parent_tls",
     "parent 'l2' has no listen_tls"),
    ("http://o", "", 'listen_tls = "127.0.100.21:8443"', "parent_tls = true", "nodes.l2.listen_tls",
     "no site has tls_cert"),
    ("http://o", 'tls_cert = "c.pem"\ntls_key = "k.pem"\n[sites.t]\nhosts = ["t.example.com"]\norigin = "http://o"',
     'listen_tls = "127.0.100.21:8443"', "parent_tls = true", "nodes.e.parent_tls",
     "site 't' has no tls_cert: a parent could not prove it serves 't.example.com'"),
    ("http://o", "", "", "parent_tls = 1", "nodes.e.parent_tls", "expected true or false"),
])
def test_config_errors(origin, site, l2, l1, key, problem):
    text = SITE.format(origin=origin, site=site) + NODES.format(l2=l2, l1=l1)
    with pytest.raises(ConfigError) as caught:
        config.parse(text, "t.toml", Path("/tmp"))
    assert caught.value.key == key and problem in caught.value.problem, caught.value


def test_paths_are_relative_to_the_topology_file():
    text = (SITE.format(origin="https://o", site='origin_client_cert = "c/a.pem"\norigin_client_key = "/k/a.key"\n'
                                                 'tls_cert = "t.pem"\ntls_key = "t.key"')
            + NODES.format(l2='listen_tls = "127.0.100.21:8443"', l1='parent_tls = true\nparent_ca = "ca.pem"'))
    topology = config.parse(text, "/etc/cdn/t.toml", Path("/etc/cdn"))
    site, l1 = topology.sites[0], topology.node("e")
    assert (site.origin_client_cert, site.origin_client_key) == (Path("/etc/cdn/c/a.pem"), Path("/k/a.key"))
    assert (l1.parent_tls, l1.parent_ca) == (True, Path("/etc/cdn/ca.pem"))
    assert topology.node("l2").parent_tls is False and topology.node("l2").parent_ca is None
    assert tls.origin_profile(site) == TlsProfile(None, Path("/etc/cdn/c/a.pem"), Path("/k/a.key"))
    assert tls.parent_profile(l1) == TlsProfile(Path("/etc/cdn/ca.pem"))


# --------------------------------------------------------------------------- files

def test_a_client_key_that_is_not_the_certificate_s_is_a_config_error_naming_both_files(tmp_path: Path):
    ca = trustme.CA()
    cert, _ = write_leaf(ca, tmp_path, "a", "edge-a.example.net")
    _, other_key = write_leaf(ca, tmp_path, "b", "edge-b.example.net")
    text = SITE.format(origin="https://127.0.100.11:8443",
                       site=f'origin_client_cert = "{cert}"\norigin_client_key = "{other_key}"') + \
        NODES.format(l2="", l1="")
    topology = config.parse(text, "t.toml", tmp_path)
    with pytest.raises(ConfigError) as caught:
        tls.load(topology, topology.node("e"))
    assert caught.value.key == "sites.s.origin_client_key"
    assert caught.value.problem == f"{cert} with key {other_key}: the private key does not belong to the certificate"
    missing = tmp_path / "missing.pem"
    topology = config.parse(text.replace(str(cert), str(missing)), "t.toml", tmp_path)
    with pytest.raises(ConfigError) as caught:
        tls.load(topology, topology.node("e"))
    assert caught.value.key == "sites.s.origin_client_cert" and str(missing) in caught.value.problem


def test_edge_check_checks_client_certificates_and_the_parent_ca(tmp_path: Path):
    import datetime
    ca = trustme.CA()
    good = write_leaf(ca, tmp_path, "good", "edge.example.net")
    other = write_leaf(ca, tmp_path, "other", "other.example.net")
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    expired = write_leaf(ca, tmp_path, "expired", "old.example.net", not_before=past,
                         not_after=past + datetime.timedelta(days=30))
    sites = [("good", *good), ("wrongkey", other[0], good[1]), ("old", *expired)]
    text = "".join(f'[sites.{name}]\nhosts = ["{name}.example.com"]\norigin = "https://127.0.100.11:8443"\n'
                   f'origin_client_cert = "{cert.name}"\norigin_client_key = "{key.name}"\n'
                   for name, cert, key in sites)
    text += '[nodes.e]\nrole = "l1"\nlisten = "127.0.100.1:8080"\nadmin = "127.0.100.1:8091"\n'
    topology = config.parse(text, str(tmp_path / "t.toml"), tmp_path)
    found = [(p.key, p.problem) for p in checks.problems(topology)]
    assert found == [
        ("sites.wrongkey.origin_client_key",
         f"{other[0]} is not the certificate of the private key in {good[1]}"),
        ("sites.old.origin_client_cert", f"{expired[0]} expired on 2020-01-31 00:00:00 UTC"),
    ], found
    # The node that would not start is the one reported; the origin needs none of it.
    assert checks.problems(topology, only="e") and not checks.problems(
        config.parse(text + '[nodes.o]\nrole = "origin"\nlisten = "127.0.100.2:8080"\nadmin = "127.0.100.2:8091"\n',
                     "t.toml", tmp_path), only="o")


def test_edge_check_reports_a_client_certificate_not_for_client_authentication(tmp_path: Path):
    cert, key = _server_only_certificate(tmp_path)
    text = (f'[sites.s]\nhosts = ["www.example.com"]\norigin = "https://127.0.100.11:8443"\n'
            f'origin_client_cert = "{cert}"\norigin_client_key = "{key}"\n'
            '[nodes.e]\nrole = "l1"\nlisten = "127.0.100.1:8080"\nadmin = "127.0.100.1:8091"\n')
    found = checks.problems(config.parse(text, "t.toml", tmp_path))
    assert [(p.key, p.problem) for p in found] == [
        ("sites.s.origin_client_cert", f"{cert} is not for client authentication (its extendedKeyUsage "
                                       "lacks clientAuth): an origin that checks it refuses it")]


def _server_only_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate whose extendedKeyUsage allows serverAuth only."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server-only")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "server-only.pem", directory / "server-only.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_edge_check_reports_an_unreadable_parent_ca(tmp_path: Path):
    ca = trustme.CA()
    cert, key = write_leaf(ca, tmp_path, "www", WWW)
    (tmp_path / "not-pem.pem").write_text("hello\n")
    text = (SITE.format(origin="http://o", site=f'tls_cert = "{cert}"\ntls_key = "{key}"')
            + NODES.format(l2='listen_tls = "127.0.100.21:8443"', l1='parent_tls = true\nparent_ca = "{ca}"'))
    for ca_file, problem in ((tmp_path / "nowhere.pem", "No such file or directory"),
                             (tmp_path / "not-pem.pem", "no PEM certificate in it")):
        topology = config.parse(text.replace("{ca}", str(ca_file)), "t.toml", tmp_path)
        found = [(p.key, p.problem) for p in checks.problems(topology)]
        assert found == [("nodes.e.parent_ca", f"{ca_file}: {problem}")], found
        assert checks.problems(topology, only="l2") == []      # the L2 does not read it


# --------------------------------------------------------------------------- mutual TLS to an origin

MTLS_ORIGIN = ("127.0.100.11", 8443)
MTLS_ORIGIN_12 = ("127.0.100.12", 8443)
EDGE = "127.0.100.31"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"       # keep-alive, as a real origin

    def handle(self) -> None:
        try:
            self.connection.do_handshake()
        except (ssl.SSLError, OSError):
            self.server.refused += 1
            return
        super().handle()

    def do_GET(self) -> None:
        name = self.connection.getpeercert()["subjectAltName"][0][1]
        self.server.hits.append(name)
        body = f"hello {name}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")       # every request reaches the origin
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class MutualTlsOrigin(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """An https origin that requires a client certificate its context trusts; answers
    `hello <the client certificate's first subjectAltName>`.  Handshakes run in each connection's
    thread with the `ssl` module, which sends OpenSSL's alerts before closing."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext):
        super().__init__(address, _Handler)
        self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        self.hits: list[str] = []
        self.refused = 0
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(10)


def origin_context(server_ca: trustme.CA, client_ca: trustme.CA, host: str,
                   maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ca.issue_cert(host).configure_cert(context)
    context.verify_mode = ssl.CERT_REQUIRED
    client_ca.configure_trust(context)
    if maximum is not None:
        context.maximum_version = maximum
    return context


@pytest.fixture(scope="module")
def mtls(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mtls")
    server_ca, client_ca, stranger_ca = trustme.CA(), trustme.CA(), trustme.CA()
    server_ca.cert_pem.write_to_path(str(tmp / "origin-ca.pem"))
    edge_a = write_leaf(client_ca, tmp, "edge-a", "edge-a.example.net")
    edge_b = write_leaf(client_ca, tmp, "edge-b", "edge-b.example.net")
    stranger = write_leaf(stranger_ca, tmp, "stranger", "stranger.example.net")
    origins = [MutualTlsOrigin(MTLS_ORIGIN, origin_context(server_ca, client_ca, MTLS_ORIGIN[0])),
               MutualTlsOrigin(MTLS_ORIGIN_12, origin_context(server_ca, client_ca, MTLS_ORIGIN_12[0],
                                                              ssl.TLSVersion.TLSv1_2))]
    url, url12 = (f"https://{host}:{port}" for host, port in (MTLS_ORIGIN, MTLS_ORIGIN_12))

    def site(name: str, origin: str, client: tuple[Path, Path] | None) -> str:
        text = f'[sites.{name}]\nhosts = ["{name}.example.com"]\norigin = "{origin}"\norigin_ca = "origin-ca.pem"\n'
        if client is not None:
            text += f'origin_client_cert = "{client[0]}"\norigin_client_key = "{client[1]}"\n'
        return text

    extra = (site("a", url, edge_a) + site("b", url, edge_b) + site("nocert", url, None)
             + site("stranger", url, stranger) + site("a12", url12, edge_a) + site("nocert12", url12, None))
    cluster = Cluster(tmp / "topology.toml", "100")
    cluster.config.write_text(topology_text("100", cache_dir=tmp / "state", extra=extra))
    try:
        cluster.start("l1-1")
        yield cluster, origins
    finally:
        cluster.stop_all()
        for origin in origins:
            origin.stop()


get = cluster_get


def test_a_site_with_a_client_certificate_gets_through_an_origin_that_requires_one(mtls):
    _, (origin, origin12) = mtls
    for host, server in (("a.example.com", origin), ("a12.example.com", origin12)):
        before = len(server.hits)
        status, fields, body = get(EDGE, host, f"/m-{uuid.uuid4().hex[:12]}")
        assert (status, body) == (200, b"hello edge-a.example.net\n"), (status, fields, body)
        assert server.hits[before:] == ["edge-a.example.net"]


@pytest.mark.parametrize("host, alert", [
    ("nocert.example.com", 'alert-id=116; alert-message="certificate_required"'),       # TLS 1.3: after the handshake
    ("nocert12.example.com", 'alert-id=40; alert-message="handshake_failure"'),         # TLS 1.2: in it
    ("stranger.example.com", 'alert-id=48; alert-message="unknown_ca"'),               # a certificate it does not trust
])
def test_without_a_certificate_the_origin_trusts_the_answer_is_a_502_naming_the_alert(mtls, host, alert):
    _, origins = mtls
    hits = [len(o.hits) for o in origins]
    refused = sum(o.refused for o in origins)
    status, fields, _ = get(EDGE, host, f"/m-{uuid.uuid4().hex[:12]}")
    assert status == 502, fields
    assert re.fullmatch(rf'l1-1; error=tls_alert_received; {alert}; details="https://127\.0\.100\.1[12]:8443: '
                        r'the upstream sent TLS alert \w+ \(\d+\)"', fields["proxy-status"]), fields["proxy-status"]
    assert [len(o.hits) for o in origins] == hits      # no request got through
    deadline = time.monotonic() + 5
    while sum(o.refused for o in origins) == refused:  # the origin's side of it (its thread may lag)
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_two_sites_with_the_same_origin_and_different_certificates_never_share_a_connection(mtls):
    _, (origin, _) = mtls
    before = len(origin.hits)
    # Interleaved, so that each site's request finds the other's connection idle in the pool.
    answers = [get(EDGE, f"{name}.example.com", f"/m-{uuid.uuid4().hex[:12]}") for name in "ababab"]
    assert [body for _, _, body in answers] == [b"hello edge-a.example.net\n", b"hello edge-b.example.net\n"] * 3
    assert origin.hits[before:] == ["edge-a.example.net", "edge-b.example.net"] * 3
    # And a site without a certificate never borrows one of theirs.
    assert get(EDGE, "nocert.example.com", "/m-after")[0] == 502


async def test_the_pool_keeps_one_connection_per_client_identity(tmp_path: Path):
    server_ca, client_ca = trustme.CA(), trustme.CA()
    server_ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    a, b = write_leaf(client_ca, tmp_path, "a", "a.example.net"), write_leaf(client_ca, tmp_path, "b", "b.example.net")
    origin = MutualTlsOrigin(("127.0.100.13", 0), origin_context(server_ca, client_ca, "127.0.100.13"))
    url = f"https://127.0.100.13:{origin.server_address[1]}"
    client = Http1Client(connect_timeout=2.0, read_timeout=2.0)
    profiles = {name: TlsProfile(tmp_path / "ca.pem", *pair) for name, pair in (("a", a), ("b", b))}
    client.tls_contexts = {p: tls.client_context(config.Topology("t", (), ()), p, "ca") for p in profiles.values()}
    try:
        for name in "abab":
            response = await client.request(Address.from_url(url, profiles[name]), "GET", "/", ())
            assert await response.read() == f"hello {name}.example.net\n".encode()
            response.release()
        stats = sorted((address.tls.cert.name, active, idle) for address, active, idle, _ in client.stats())
        assert stats == [("a.pem", 0, 1), ("b.pem", 0, 1)]      # one each, reused: not one shared
    finally:
        await client.close()
        await asyncio.to_thread(origin.stop)


# --------------------------------------------------------------------------- TLS between tiers

NET = "101"
L2_TLS = "127.0.101.21:8443"


def l1_table(name: str, ip: str, parent_ca: Path, go_direct: bool = True) -> str:
    return (f'[nodes.{name}]\nrole = "l1"\nlisten = "{ip}:8080"\nadmin = "{ip}:8091"\n'
            'memory_size = "16MiB"\ndisk_size = "512MiB"\nparents = "all"\n'
            "parent_fall = 2\nparent_rise = 2\nparent_probe_interval = 0.1\nparent_timeout = 2.0\n"
            f'parent_tls = true\nparent_ca = "{parent_ca}"\ngo_direct = {str(go_direct).lower()}\n')


@pytest.fixture(scope="module")
def tiers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiers")
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    other_ca.cert_pem.write_to_path(str(tmp / "other-ca.pem"))
    www = write_leaf(ca, tmp, "www", WWW, "static.example.com")
    extra = (l1_table("l1-1", "127.0.101.31", tmp / "ca.pem")
             + l1_table("l1-2", "127.0.101.32", tmp / "other-ca.pem")
             + l1_table("l1-3", "127.0.101.33", tmp / "other-ca.pem", go_direct=False))
    cluster = Cluster(tmp / "topology.toml", NET)
    cluster.config.write_text(topology_text(
        NET, l2=1, l1=0, cache_dir=tmp / "state", extra=extra,
        extra_site=f'tls_cert = "{www[0]}"\ntls_key = "{www[1]}"',
        extra_node=f'listen_tls = "{L2_TLS}"'))         # only the L2 (the L1s are in `extra`)
    try:
        cluster.start("origin", "l2-a", "l1-1", "l1-2", "l1-3")
        yield cluster
    finally:
        cluster.stop_all()


def metric(node: NodeProcess, name: str, **labels: str) -> float:
    """The value of the sample of `name` with exactly these labels in the node's /metrics (0 when absent)."""
    for line in node.metrics().splitlines():
        found = re.fullmatch(r'(\w+)(?:\{(.*)\})? (\S+)', line)
        if found and found[1] == name and dict(re.findall(r'(\w+)="([^"]*)"', found[2] or "")) == labels:
            return float(found[3])
    return 0.0


def origin_count(cluster: Cluster) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in cluster.node("origin").metrics().splitlines()
               if line.startswith("origin_requests_total"))


def established(local: str, remote_ip: str) -> bool:
    """Is there an established TCP connection on `local` (ip:port) from `remote_ip`?"""
    out = subprocess.run(["ss", "-Htn", "state", "established"], capture_output=True, text=True, timeout=10).stdout
    return any(local in line.split()[2:3] and line.split()[3].startswith(f"{remote_ip}:")
               for line in out.splitlines() if len(line.split()) >= 4)


def test_an_l1_with_parent_tls_fetches_through_the_l2_over_tls(tiers):
    cluster = tiers
    path = f"/gen/tier-{uuid.uuid4().hex[:12]}?size=100&cc=max-age=60"
    before = origin_count(cluster)
    status, fields, body = get("127.0.101.31", WWW, path)
    assert (status, len(body)) == (200, 100), fields
    entries = [e.strip().split(";")[0] for e in fields["cache-status"].split(",")]
    assert entries == ["l2-a", "l1-1"], fields["cache-status"]      # the L2 fetched it, then the L1
    assert origin_count(cluster) == before + 1
    l1 = cluster.node("l1-1")
    # The L1's connection to the L2 is on the L2's TLS listener, verified for the site's name...
    assert metric(l1, "edge_upstream_connections", upstream="l2-a",
                  address=f"https://{L2_TLS} (SNI {WWW})", state="idle") == 1
    assert metric(l1, "edge_upstream_requests_total", upstream="l2-a", outcome="2xx") >= 1
    # (The health probes' connection to its admin port counts as the L2's too, not the origin's.)
    assert sum(metric(l1, "edge_upstream_connections", upstream="l2-a", address="http://127.0.101.21:8091",
                      state=state) for state in ("active", "idle")) == 1
    # ...and the L2 holds that connection on its HTTPS port, not on its plain one.
    assert established(L2_TLS, "127.0.101.31")
    assert not established("127.0.101.21:8080", "127.0.101.31")
    # Served again from the L2 for the next L1 request that misses there: the tiers work over TLS.
    status, fields, _ = get("127.0.101.31", WWW, path)
    assert status == 200 and "l1-1; hit" in fields["cache-status"], fields


def test_an_untrusted_l2_certificate_makes_the_l1_go_to_the_origin_and_says_why(tiers):
    cluster = tiers
    l1, l2 = cluster.node("l1-2"), cluster.node("l2-a")
    path = f"/gen/untrusted-{uuid.uuid4().hex[:12]}?size=10&cc=max-age=60"
    before, handshakes = origin_count(cluster), metric(l2, "edge_refused_requests_total", reason="tls_handshake")
    failed = metric(l1, "edge_upstream_requests_total", upstream="l2-a", outcome="tls_certificate_error")
    log_size = l1.log.stat().st_size
    status, fields, _ = get("127.0.101.32", WWW, path)
    assert status == 200, fields
    assert [e.strip().split(";")[0] for e in fields["cache-status"].split(",")] == ["l1-2"], fields
    assert origin_count(cluster) == before + 1                  # it went direct...
    # ...because the L2's certificate did not verify (l1-2's first request: the L2 was up).
    assert metric(l1, "edge_upstream_requests_total", upstream="l2-a", outcome="tls_certificate_error") \
        == failed + 1
    assert (f"upstream l2-a failed: tls_certificate_error: https://{L2_TLS} (SNI {WWW}): "
            "unable to get local issuer certificate") in l1.log.read_text()[log_size:]
    # The L2 saw the L1 give up in the handshake: no request reached it.
    assert metric(l2, "edge_refused_requests_total", reason="tls_handshake") >= handshakes + 1


def test_an_untrusted_l2_without_go_direct_is_a_502_with_the_reason(tiers):
    cluster = tiers
    before = origin_count(cluster)
    status, fields, _ = get("127.0.101.33", WWW, f"/gen/nodirect-{uuid.uuid4().hex[:12]}?size=10")
    assert status == 502, fields
    assert fields["proxy-status"] == (f'l1-3; error=tls_certificate_error; details="https://{L2_TLS} (SNI {WWW}): '
                                      'unable to get local issuer certificate"'), fields["proxy-status"]
    assert origin_count(cluster) == before
