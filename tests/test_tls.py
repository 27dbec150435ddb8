"""HTTPS on a cache node and TLS to origins, with real sockets and certificates made here (trustme).

Layout on 127.0.98.x: origin .10 (plain HTTP, the test origin), a TLS origin .11:8443 run
in this process (aiohttp with a certificate from a CA the node does not know), l1-1 .31
with listen 8080 and listen_tls 8443.  Sites: www/static (site "example", redirect to
HTTPS), news (the `default = true` site, its own certificate), bad (https origin, system
CAs: must fail), good (the same origin, verified with origin_ca).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from edge import checks, config
from edge.proxy import https_location
from tests.cluster import REPO, Cluster, topology_text
from tests.cluster import get as cluster_get

L1 = "127.0.98.31"
TLS_PORT = 8443
TLS_ORIGIN = ("127.0.98.11", 8443)
WWW, NEWS = "www.example.com", "news.example.com"


# --------------------------------------------------------------------------- pure rules

@pytest.mark.parametrize("names, addresses, host, expected", [
    (["www.example.com"], [], "www.example.com", True),
    (["www.example.com"], [], "static.example.com", False),
    (["*.example.com"], [], "www.example.com", True),
    (["*.example.com"], [], "example.com", False),           # a wildcard is one label, not zero
    (["*.example.com"], [], "a.b.example.com", False),       # nor two
    ([], ["127.0.0.1"], "127.0.0.1", True),
    (["127.0.0.1"], [], "127.0.0.1", False),                 # an IP needs an IP SAN
])
def test_certificate_covers(names, addresses, host, expected):
    assert checks.covers(names, addresses, host) is expected


@pytest.mark.parametrize("host, port, target, expected", [
    ("www.example.com", 443, "/a?b=1", "https://www.example.com/a?b=1"),
    ("WWW.Example.com:8080", 8443, "/a", "https://www.example.com:8443/a"),
    ("[::1]:80", 443, "/", "https://[::1]/"),
])
def test_https_location(host, port, target, expected):
    assert https_location(host, port, target) == expected


@pytest.mark.parametrize("site, node, key, problem", [
    ('tls_cert = "c.pem"', "", "sites.s.tls_key", "go together"),
    ('tls_key = "k.pem"', "", "sites.s.tls_cert", "go together"),
    ("https_redirect = true", "", "sites.s.https_redirect", "needs this site's tls_cert"),
    ('origin_ca = "ca.pem"', "", "sites.s.origin_ca", "only an https:// origin"),
    ("", 'listen_tls = "127.0.98.1:8443"', "nodes.e.listen_tls", "no site has tls_cert"),
    ('tls_cert = "c.pem"\ntls_key = "k.pem"', 'listen_tls = "127.0.98.1:8080"', "nodes.e.listen_tls",
     "already used"),
])
def test_config_errors(site, node, key, problem):
    text = (f'[sites.s]\nhosts = ["www.example.com"]\norigin = "http://127.0.98.10:8080"\n{site}\n'
            f'[nodes.e]\nrole = "l1"\nlisten = "127.0.98.1:8080"\nadmin = "127.0.98.1:8091"\n{node}\n')
    with pytest.raises(config.ConfigError) as caught:
        config.parse(text, "t.toml", Path("/tmp"))
    assert caught.value.key == key and problem in caught.value.problem, caught.value


def test_paths_are_relative_to_the_topology_file():
    text = ('[sites.s]\nhosts = ["www.example.com"]\norigin = "https://127.0.98.11:8443"\n'
            'tls_cert = "certs/c.pem"\ntls_key = "/abs/k.pem"\norigin_ca = "ca.pem"\n'
            '[nodes.e]\nrole = "l1"\nlisten = "127.0.98.1:8080"\nadmin = "127.0.98.1:8091"\n'
            'listen_tls = "127.0.98.1:8443"\n')
    topology = config.parse(text, "/etc/cdn/t.toml", Path("/etc/cdn"))
    site = topology.sites[0]
    assert (site.tls_cert, site.tls_key, site.origin_ca) == (
        Path("/etc/cdn/certs/c.pem"), Path("/abs/k.pem"), Path("/etc/cdn/ca.pem"))
    assert topology.nodes[0].listen_tls == config.Address("127.0.98.1", 8443)


# --------------------------------------------------------------------------- certificates

def write_leaf(ca: trustme.CA, directory: Path, name: str, *hosts: str, **kwargs) -> tuple[Path, Path]:
    leaf = ca.issue_cert(*hosts, **kwargs)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    leaf.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return cert, key


def test_edge_check_names_the_wrong_file(tmp_path: Path):
    ca = trustme.CA()
    good = write_leaf(ca, tmp_path, "good", WWW)
    other = write_leaf(ca, tmp_path, "other", "wrongkey.example.com")
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    expired = write_leaf(ca, tmp_path, "expired", "old.example.com", not_before=past,
                         not_after=past + datetime.timedelta(days=30))
    narrow = write_leaf(ca, tmp_path, "narrow", "narrow.example.com")
    sites = [("good", '"www.example.com"', good[0], good[1]),
             ("wrongkey", '"wrongkey.example.com"', other[0], good[1]),
             ("old", '"old.example.com"', *expired),
             ("narrow", '"narrow.example.com", "extra.example.com"', *narrow)]
    text = "".join(f'[sites.{name}]\nhosts = [{host}]\n'
                   f'origin = "http://127.0.98.10:8080"\ntls_cert = "{cert.name}"\ntls_key = "{key.name}"\n'
                   for name, host, cert, key in sites)
    text += '[nodes.e]\nrole = "l1"\nlisten = "127.0.98.1:8080"\nadmin = "127.0.98.1:8091"\n' \
            'listen_tls = "127.0.98.1:8443"\n'
    topology_file = tmp_path / "t.toml"
    topology_file.write_text(text)
    result = subprocess.run([sys.executable, "-m", "edge", "check", "--config", str(topology_file)],
                            capture_output=True, text=True, cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result
    assert len(lines) == 3, lines       # the good site has none
    assert f"sites.wrongkey.tls_key: {other[0]} is not the certificate of the private key in {good[1]}" in lines[0]
    assert f"sites.old.tls_cert: {expired[0]} expired on 2020-01-31" in lines[1]
    assert f"sites.narrow.tls_cert: {narrow[0]} does not cover 'extra.example.com'" in lines[2]
    # The good one passes on its own: the rule is not just "complain".
    assert checks.certificate_problems(config.load(topology_file), config.load(topology_file).sites[0]) == []


# --------------------------------------------------------------------------- the node

class TlsOrigin:
    """An https origin in a thread: aiohttp with a certificate from its own CA."""

    def __init__(self, context: ssl.SSLContext):
        self.context = context
        self.hits = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def hello(request: web.Request) -> web.Response:
            self.hits += 1
            return web.Response(text="secure hello\n", headers={"Cache-Control": "max-age=60"})

        async def start() -> web.AppRunner:
            app = web.Application()
            app.router.add_get("/{tail:.*}", hello)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, *TLS_ORIGIN, ssl_context=self.context).start()
            return runner

        self.runner = self.loop.run_until_complete(start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    def start(self) -> TlsOrigin:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def cdn(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    www = write_leaf(ca, tmp, "www", WWW, "static.example.com")
    news = write_leaf(ca, tmp, "news", NEWS)
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    origin_ca = trustme.CA()        # a CA nobody trusts unless told
    origin_ca.cert_pem.write_to_path(str(tmp / "origin-ca.pem"))
    origin_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    origin_ca.issue_cert(TLS_ORIGIN[0]).configure_cert(origin_context)
    tls_origin = TlsOrigin(origin_context).start()
    secure = f"https://{TLS_ORIGIN[0]}:{TLS_ORIGIN[1]}"
    extra = (f'[sites.news]\nhosts = ["{NEWS}"]\norigin = "http://127.0.98.10:8080"\ndefault = true\n'
             f'tls_cert = "{news[0]}"\ntls_key = "{news[1]}"\n'
             f'[sites.bad]\nhosts = ["bad.example.com"]\norigin = "{secure}"\n'
             f'[sites.good]\nhosts = ["good.example.com"]\norigin = "{secure}"\norigin_ca = "origin-ca.pem"\n')
    cluster = Cluster(tmp / "topology.toml", "98")
    cluster.config.write_text(topology_text(
        "98", cache_dir=tmp / "state", extra=extra,
        extra_site=f'tls_cert = "{www[0]}"\ntls_key = "{www[1]}"\nhttps_redirect = true',
        extra_node=f'listen_tls = "{L1}:{TLS_PORT}"'))
    try:
        cluster.start("origin", "l1-1")
        yield cluster, tmp, tls_origin
    finally:
        cluster.stop_all()
        tls_origin.stop()


def handshake(context: ssl.SSLContext, server_name: str | None) -> ssl.SSLSocket:
    sock = socket.create_connection((L1, TLS_PORT), timeout=5)
    try:
        return context.wrap_socket(sock, server_hostname=server_name)
    except BaseException:
        sock.close()
        raise


def peer_names(tls: ssl.SSLSocket) -> list[str]:
    from cryptography import x509
    cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)


def test_sni_picks_each_site_certificate(cdn):
    _, tmp, _ = cdn
    context = ssl.create_default_context(cafile=str(tmp / "ca.pem"))     # verifies the host name too
    with handshake(context, WWW) as tls:
        assert peer_names(tls) == [WWW, "static.example.com"]
        assert tls.selected_alpn_protocol() is None      # we offered none: ALPN is optional
    context.set_alpn_protocols(["h2", "http/1.1"])
    with handshake(context, NEWS) as tls:
        assert peer_names(tls) == [NEWS]
        assert tls.selected_alpn_protocol() == "h2"
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_a_client_without_sni_gets_the_default_site_certificate(cdn):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with handshake(context, None) as tls:
        assert peer_names(tls) == [NEWS]        # news is `default = true`, though www comes first


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_is_refused_and_1_2_accepted(cdn):
    def client(maximum: ssl.TLSVersion) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        # Let this client speak TLS 1.1 at all (OpenSSL 3 forbids it at the default level),
        # so that it is the server that refuses.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = maximum
        return context

    with pytest.raises(ssl.SSLError) as refused:
        handshake(client(ssl.TLSVersion.TLSv1_1), WWW).close()
    # The server hangs up on the ClientHello; a client that could not even offer 1.1 would
    # fail on its own with "no protocols available", before any byte is sent.
    assert "no protocols available" not in str(refused.value).lower(), refused.value
    with handshake(client(ssl.TLSVersion.TLSv1_2), WWW) as tls:
        assert tls.version() == "TLSv1.2"


def curl(tmp: Path, url: str, host: str = WWW) -> tuple[int, dict[str, str], str]:
    result = subprocess.run(["curl", "-sS", "-D", "-", "--cacert", str(tmp / "ca.pem"),
                             "--resolve", f"{host}:{TLS_PORT}:{L1}", "--resolve", f"{host}:8080:{L1}", url],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.partition("\n\n")     # text mode: CRLF already read as LF
    lines = head.split("\n")
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), fields, body


def test_curl_gets_miss_then_hit_over_https_as_over_http(cdn):
    _, tmp, _ = cdn
    token = uuid.uuid4().hex[:12]
    seen = {}
    for scheme, port, host in (("https", TLS_PORT, WWW), ("http", 8080, NEWS)):
        url = f"{scheme}://{host}:{port}/gen/tls-{token}?size=300&cc=max-age=60"
        first, second = curl(tmp, url, host), curl(tmp, url, host)
        assert first[0] == second[0] == 200
        assert first[1]["x-cache"] == "MISS" and second[1]["x-cache"] == "HIT", (first[1], second[1])
        assert int(second[1]["age"]) >= 0 and len(second[2]) == 300
        seen[scheme] = [re.sub(r"ttl=-?\d+", "ttl=N", f[1]["cache-status"]) for f in (first, second)]
    assert seen["https"] == seen["http"], seen


def test_https_redirect_is_a_308_on_plain_http_even_for_a_cached_object(cdn):
    _, tmp, _ = cdn
    target = f"/gen/redir-{uuid.uuid4().hex[:12]}?size=10&cc=max-age=60"
    assert curl(tmp, f"https://{WWW}:{TLS_PORT}{target}")[0] == 200     # now a fresh memory hit
    for _ in range(2):
        status, fields, _ = curl(tmp, f"http://{WWW}:8080{target}")
        assert status == 308, fields
        assert fields["location"] == f"https://{WWW}:{TLS_PORT}{target}"
    # A site without https_redirect still serves plain HTTP.
    assert curl(tmp, f"http://{NEWS}:8080{target}", NEWS)[0] == 200


def get(host: str, path: str) -> tuple[int, dict[str, str], bytes]:
    return cluster_get(L1, host, path)


def test_origin_certificate_from_an_unknown_ca_is_a_502_and_origin_ca_makes_it_200(cdn):
    _, _, tls_origin = cdn
    path = f"/o-{uuid.uuid4().hex[:12]}"
    before = tls_origin.hits
    status, fields, _ = get("bad.example.com", path)
    assert status == 502, fields
    assert re.match(r'l1-1; error=tls_certificate_error; details="https://127\.0\.98\.11:8443: unable to get local issuer certificate"', fields["proxy-status"]), \
        fields["proxy-status"]
    assert tls_origin.hits == before        # the handshake failed: no request was sent
    status, fields, body = get("good.example.com", path)
    assert (status, body) == (200, b"secure hello\n"), fields
    assert tls_origin.hits == before + 1


def test_sighup_reloads_the_certificates(cdn):
    cluster, tmp, _ = cdn
    new_ca = trustme.CA()
    new_ca.cert_pem.write_to_path(str(tmp / "new-ca.pem"))
    cert, key = write_leaf(new_ca, tmp, "news-new", NEWS)
    text = cluster.config.read_text()
    cluster.config.write_text(text.replace(str(tmp / "news.pem"), str(cert)).replace(str(tmp / "news.key"), str(key)))
    node = cluster.node("l1-1")
    log_size = node.log.stat().st_size
    os.kill(node.pid, __import__("signal").SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded" not in node.log.read_text()[log_size:]:
        assert time.monotonic() < deadline, node.log.read_text()[log_size:]
        time.sleep(0.05)
    with handshake(ssl.create_default_context(cafile=str(tmp / "new-ca.pem")), NEWS) as tls:
        assert peer_names(tls) == [NEWS]
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ssl.create_default_context(cafile=str(tmp / "ca.pem")), NEWS).close()


# --------------------------------------------------------------------------- edge up

def test_devcerts_makes_certificates_only_in_the_state_dir(tmp_path: Path):
    from edge import devcerts
    text = (f'state_dir = "{tmp_path / "var"}"\n'
            '[sites.a]\nhosts = ["www.example.com", "127.0.98.9"]\norigin = "http://127.0.98.10:8080"\n'
            f'tls_cert = "{tmp_path / "var/tls/a.pem"}"\ntls_key = "{tmp_path / "var/tls/a.key"}"\n'
            '[sites.b]\nhosts = ["b.example.com"]\norigin = "http://127.0.98.10:8080"\n'
            f'tls_cert = "{tmp_path / "elsewhere/b.pem"}"\ntls_key = "{tmp_path / "elsewhere/b.key"}"\n'
            '[nodes.e]\nrole = "l1"\nlisten = "127.0.98.1:8080"\nadmin = "127.0.98.1:8091"\n')
    topology = config.parse(text, "t.toml", tmp_path)
    # Before: the state-dir certificate is not a problem (edge up makes it); the other one is.
    assert [p.key for p in checks.problems(topology)] == ["sites.b.tls_cert"]
    assert [s.name for s in devcerts.ensure(topology)] == ["a"]
    assert not (tmp_path / "elsewhere").exists()
    assert (tmp_path / "var/tls/a.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "var/tls/ca.key").stat().st_mode & 0o777 == 0o600
    assert checks.certificate_problems(topology, topology.sites[0]) == []   # covers both hosts, key matches
    ca = (tmp_path / "var/tls/ca.pem").read_bytes()
    assert devcerts.ensure(topology) == []          # made once; the CA is kept for the next runs
    (tmp_path / "var/tls/a.pem").unlink()
    (tmp_path / "var/tls/a.key").unlink()
    assert [s.name for s in devcerts.ensure(topology)] == ["a"]
    assert (tmp_path / "var/tls/ca.pem").read_bytes() == ca


def test_edge_up_serves_the_default_topology_over_https(tmp_path: Path):
    from tests.cluster import EdgeUp, moved_local_topology
    moved = {"127.0.0.10": "127.0.99.10", "127.0.2.1": "127.0.99.21", "127.0.2.2": "127.0.99.22",
             "127.0.1.1": "127.0.99.31", "127.0.1.2": "127.0.99.32", "127.0.5.1": "127.0.99.5"}
    up = EdgeUp.start(tmp_path, moved_local_topology(moved, tmp_path / "var"))
    try:
        output = up.output.read_text()
        line = next((line.strip() for line in output.splitlines() if "https://" in line and "--cacert" in line), None)
        ca = tmp_path / "var" / "tls" / "ca.pem"
        assert line == (f"curl -sI --cacert {ca} --resolve www.example.com:8443:127.0.99.31 "
                        "https://www.example.com:8443/"), output
        for _ in range(2):      # the printed line works as printed (it verifies against the CA)
            result = subprocess.run(line.split(), capture_output=True, text=True, timeout=20)
            assert result.returncode == 0 and result.stdout.startswith("HTTP/2 200"), (result, output)
        assert "l1-east; hit" in result.stdout, result.stdout
        # The L1 fetched it from its L2 over TLS (parent_tls, verified against edge up's CA).
        with urllib.request.urlopen("http://127.0.99.31:8091/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert re.search(r'edge_upstream_requests_total\{outcome="2xx",upstream="l2-[ab]"\} 1\.0', metrics), metrics
        assert re.search(r'edge_upstream_connections\{address="https://127\.0\.99\.2[12]:8443 '
                         r'\(SNI www\.example\.com\)",state="idle",upstream="l2-[ab]"\} 1\.0', metrics), metrics
        assert "BEGIN" not in subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                             cwd=str(REPO)).stdout    # nothing made inside the repository
    finally:
        up.stop()
