"""deploy/grafana/edge.json and deploy/prometheus/alerts.yml against a real Prometheus and a real `edge up`.

The topology is deploy/local.toml moved to 127.0.97.x; Prometheus (Debian's
`prometheus`, which scripts/test.sh installs) listens on 127.0.97.90, scrapes
every second with the config `edge prometheus-config --interval 1` prints, and
loads alerts.yml.  The test sends traffic (hits, misses, origin errors, DNS
questions), then evaluates every query of the dashboard through Prometheus's
HTTP API and requires data from each.  For the alerts it does not strip the
thresholds: it brings each condition about (a hit ratio under half, origin
5xx, a killed L2, killed L1s) and requires every rule to go pending or firing,
and its expression, as Prometheus loaded it, to return data at that moment.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.message
import pytest

from tests.cluster import REPO, EdgeUp, moved_local_topology

MOVED = {"127.0.0.10": "127.0.97.10", "127.0.2.1": "127.0.97.21", "127.0.2.2": "127.0.97.22",
         "127.0.1.1": "127.0.97.31", "127.0.1.2": "127.0.97.32", "127.0.5.1": "127.0.97.5"}
PROMETHEUS = "127.0.97.90:9090"
DASHBOARD = REPO / "deploy" / "grafana" / "edge.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
L1S = ("http://127.0.97.31:8080", "http://127.0.97.32:8080")
EAST_CLIENT, WEST_CLIENT = "127.0.11.1", "127.0.12.1"
# Grafana's variables, as Grafana would fill them in: the rate window, and every site.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$site": ".*"}


@dataclass
class Stack:
    up: EdgeUp
    prometheus: subprocess.Popen
    log: Path


def prometheus_config(topology: Path, out: Path) -> Path:
    """What the README says to do: `edge prometheus-config`, plus the rule file."""
    text = subprocess.run([sys.executable, "-m", "edge", "prometheus-config", "--config", str(topology),
                           "--interval", "1"], check=True, capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO))).stdout
    out.write_text(text + f"rule_files:\n  - {json.dumps(str(ALERTS))}\n")
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("prometheus")
    up = EdgeUp.start(workdir, moved_local_topology(MOVED, workdir / "var"))
    log = workdir / "prometheus.log"
    try:
        config = prometheus_config(up.config, workdir / "prometheus.yml")
        with open(log, "wb") as sink:
            # Its own session: stopped below by its PID (and nothing else of ours is in its group).
            prometheus = subprocess.Popen(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address={PROMETHEUS}", "--log.level=warn"],
                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            until(lambda: _ready(prometheus, log), 30, "prometheus ready")
            yield Stack(up, prometheus, log)
        finally:
            os.kill(prometheus.pid, signal.SIGTERM)
            try:
                prometheus.wait(timeout=20)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait()
    finally:
        up.stop()


def _ready(prometheus: subprocess.Popen, log: Path) -> bool:
    if prometheus.poll() is not None:
        raise AssertionError(f"prometheus exited with {prometheus.returncode}:\n{log.read_text()}")
    try:
        with urllib.request.urlopen(f"http://{PROMETHEUS}/-/ready", timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


def until(check, deadline: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < deadline:
        if check():
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"not within {deadline}s: {what}")


def api(path: str, **params: str) -> dict:
    url = f"http://{PROMETHEUS}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]


def query(expr: str) -> list[dict]:
    return api("query", query=expr)["result"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, Grafana's variables filled in."""
    found = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                expr = target["expr"]
                for name, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(name, value)
                assert "$" not in expr, f"{panel['title']}: a variable the test does not fill in: {expr}"
                found.append((panel["title"], expr))
    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


def alert_rules() -> dict[str, str]:
    """Every alerting rule as Prometheus loaded it from alerts.yml: name -> expression."""
    groups = api("rules")["groups"]
    rules = {rule["name"]: rule["query"] for group in groups for rule in group["rules"] if rule["type"] == "alerting"}
    assert all(group["file"] == str(ALERTS) for group in groups)
    return rules


def active_alerts() -> dict[str, set[str]]:
    """Alert name -> the states (pending, firing) of its instances now."""
    active: dict[str, set[str]] = {}
    for alert in api("alerts")["alerts"]:
        active.setdefault(alert["labels"]["alertname"], set()).add(alert["state"])
    return active


def test_promtool_checks_the_rules() -> None:
    check = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 6 rules found" in check.stdout


def test_the_generated_config_with_the_rules_passes_promtool(tmp_path: Path) -> None:
    topology = tmp_path / "topology.toml"
    topology.write_text(moved_local_topology(MOVED, tmp_path / "var"))
    config = prometheus_config(topology, tmp_path / "prometheus.yml")
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_dashboard_is_grafana_json_with_a_datasource_and_site_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["site"]["definition"] == "label_values(edge_requests_total, site)"
    titles = [p["title"] for p in dashboard["panels"]]
    for wanted in ("Hit ratio by site (L1)", "Byte hit ratio by site (L1)", "Requests by status class (L1)",
                   "Requests by cache status (L1)", "Upstream errors", "Upstream latency (time to response headers)",
                   "DNS answers per edge", "Parent health"):
        assert wanted in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


async def send_traffic(rounds: int = 4) -> None:
    """Rounds a few scrapes apart (a counter's first sample is its baseline: what a series counted
    before Prometheus first saw it is no increase): per round, 40 misses and 4 hits at the L1s,
    12 origin 503s, and DNS questions from both regions."""
    async with aiohttp.ClientSession(headers={"Host": "www.example.com"}) as http:
        for n in range(rounds):
            for i in range(40):
                async with http.get(f"{L1S[i % 2]}/gen/prom-miss-{n}-{i}?size=1500&cc=max-age%3D600") as reply:
                    assert reply.status == 200
            for i in range(4):
                async with http.get(f"{L1S[i % 2]}/gen/prom-hot?size=800&cc=max-age%3D600") as reply:
                    assert reply.status == 200
            for i in range(12):
                async with http.get(f"{L1S[i % 2]}/gen/prom-error-{n}-{i}?status=503&size=20") as reply:
                    assert reply.status == 503
            for source in (EAST_CLIENT, WEST_CLIENT):
                answer = await dns.asyncquery.udp(dns.message.make_query("www.example.com", "A"), "127.0.97.5",
                                                  port=8053, source=source, timeout=3)
                assert answer.answer
            await asyncio.sleep(2.5)


def test_every_dashboard_query_and_every_alert_returns_data(stack: Stack) -> None:
    rules = alert_rules()
    assert set(rules) == {"EdgeDown", "EdgeOutOfRotation", "EdgeParentDown", "EdgeHitRatioCollapse",
                          "EdgeOriginErrors", "DnsAllEdgesDown"}
    until(lambda: len([r for r in query("up == 1") if r["metric"].get("role")]) == 6, 20,
          "prometheus scraping all six processes")
    asyncio.run(send_traffic())
    time.sleep(2.0)                                         # the last round scraped

    # The whole CDN is up and has traffic: every dashboard query has data.
    empty = [(title, expr) for title, expr in dashboard_queries() if not query(expr)]
    assert not empty, "dashboard queries without data:\n" + "\n".join(f"{t}: {e}" for t, e in empty)
    sites = query("group by (site) (edge_requests_total)")        # the $site variable's label_values
    assert {r["metric"].get("site") for r in sites} >= {"example"}
    # The hit ratio is under a half (some 14 hits in over 200 lookups): a true figure, not an artefact.
    (ratio,) = query(dashboard_queries()[0][1])
    assert 0.0 < float(ratio["value"][1]) < 0.5

    seen: set[str] = set()

    def wait_for(*names: str) -> None:
        def active() -> bool:
            return set(names) <= set(active_alerts())
        until(active, 20, f"alerts {names} pending or firing; active: {active_alerts()}")
        for name in names:
            assert query(rules[name]), f"{name}: its expression returns no data: {rules[name]}"
        seen.update(names)

    wait_for("EdgeHitRatioCollapse", "EdgeOriginErrors")
    assert {a["labels"]["site"] for a in api("alerts")["alerts"]
            if a["labels"]["alertname"] == "EdgeHitRatioCollapse"} == {"example"}

    stack.up.kill("l2-b")            # a parent crashes: the L1s mark it down, Prometheus cannot scrape it
    wait_for("EdgeDown", "EdgeParentDown")
    assert {a["labels"]["parent"] for a in api("alerts")["alerts"]
            if a["labels"]["alertname"] == "EdgeParentDown"} == {"l2-b"}

    stack.up.kill("l1-east")         # then every edge: the scheduler has none left to hand out
    stack.up.kill("l1-west")
    wait_for("EdgeOutOfRotation", "DnsAllEdgesDown")
    down = {a["labels"]["node"] for a in api("alerts")["alerts"] if a["labels"]["alertname"] == "EdgeDown"}
    until(lambda: {a["labels"]["node"] for a in api("alerts")["alerts"]
                   if a["labels"]["alertname"] == "EdgeDown"} == {"l2-b", "l1-east", "l1-west"}, 10,
          f"EdgeDown for the three killed nodes (had {down})")
    assert seen == set(rules)
    assert not re.search(r"level=error", stack.log.read_text()), stack.log.read_text()
