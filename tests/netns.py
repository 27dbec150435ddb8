"""Hosts as network namespaces on one machine, for tests of the CDN spread over several hosts.

A :class:`Lab` is a set of network namespaces, one per host, each with one
interface (``eth0``) on one private subnet.  The other end of each host's
veth pair is a port of a bridge that lives in a namespace of its own, the
"switch": so the subnet exists only inside the lab, and nothing (no link, no
address, no route) is added to the machine's own network namespace.  Only
root can make namespaces; :func:`refusal` says why a lab cannot be built here
before anything is tried, and :meth:`Lab.open` raises :class:`Refused` with
the kernel's own words when building the switch fails.

Every name starts with ``edgetest-<pid>-``, the PID of the test process that
made it.  :func:`remove_leftovers` deletes the namespaces of test processes
that are gone (a run killed before its cleanup), and the processes still in
them; a lab of a test run that is still going is left alone.  :meth:`Lab.close`
stops the processes the lab started (by PID), deletes every link and
namespace it made, and fails if any is left.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "edgetest-"
IP = shutil.which("ip") or ("/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else None)
BRIDGE = "br0"


class Refused(Exception):
    """The kernel or the environment refuses to make namespaces, bridges or veth pairs here."""


class NetnsError(Exception):
    """An `ip` command failed."""


def refusal() -> str | None:
    """Why no lab can be built here, found without trying (None: try)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the suite as root)"
    if IP is None:
        return "no `ip` command (install iproute2)"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([IP, *args], capture_output=True, text=True, timeout=20)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {(done.stderr or done.stdout).strip()}")
    return done


def namespaces() -> list[str]:
    """Names of every named network namespace (`ip netns list`)."""
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]


def pids_in(netns: str) -> list[int]:
    done = ip("netns", "pids", netns, check=False)
    return [int(pid) for pid in done.stdout.split() if pid.isdigit()]


def _alive(pid: int) -> bool:
    """Is `pid` a process that has not exited (a zombie counts as exited)?"""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _kill_and_wait(pids: list[int], deadline: float = 10.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + deadline
    while any(_alive(pid) for pid in pids) and time.monotonic() < end:
        time.sleep(0.02)


def remove_leftovers(prefix: str = PREFIX) -> list[str]:
    """Delete the namespaces named `prefix<pid>-...` whose test process <pid> is gone, after
    killing (by PID) the processes still inside them; return the names removed."""
    removed = []
    for name in namespaces():
        if not name.startswith(prefix):
            continue
        owner = name[len(prefix):].split("-", 1)[0]
        if owner.isdigit() and int(owner) != os.getpid() and _alive(int(owner)):
            continue            # another test run, still going: its lab is its own
        _kill_and_wait(pids_in(name))
        ip("netns", "delete", name, check=False)
        removed.append(name)
    return removed


@dataclass
class Host:
    name: str                       # the test's name for it: "origin", "client-east", ...
    netns: str                      # the namespace: edgetest-<pid>-<name>
    address: str
    link: str                       # its veth's end in the switch namespace
    procs: list[subprocess.Popen] = field(default_factory=list)
    removed: bool = False


class Lab:
    """Namespaces wired to one bridge on `subnet` (every host's address is inside it)."""

    def __init__(self, subnet: str, prefix: str = PREFIX):
        self.subnet = ipaddress.ip_network(subnet)
        self.tag = f"{prefix}{os.getpid()}-"
        self.switch = f"{self.tag}switch"
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []      # namespaces made, in order

    # ------------------------------------------------------------ building

    def open(self) -> Lab:
        """Make the switch (a namespace holding the bridge) and prove that a veth pair can
        join a namespace to it; raise Refused, with the kernel's message, if any step fails."""
        probe = f"{self.tag}probe"
        try:
            self._netns_add(self.switch)
            ip("-n", self.switch, "link", "add", BRIDGE, "type", "bridge")
            ip("-n", self.switch, "link", "set", BRIDGE, "up")
            self._netns_add(probe)
            ip("-n", self.switch, "link", "add", "probe", "type", "veth", "peer", "name", "eth0", "netns", probe)
        except NetnsError as exc:
            raise Refused(str(exc)) from None
        ip("-n", self.switch, "link", "del", "probe")
        self._netns_delete(probe)
        return self

    def add_host(self, name: str, address: str) -> Host:
        """A namespace with `address` on eth0, plugged into the switch, and loopback up."""
        if ipaddress.ip_address(address) not in self.subnet:
            raise ValueError(f"{address} is outside the lab's subnet {self.subnet}")
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists already")
        host = Host(name, f"{self.tag}{name}", address, f"h{len(self.hosts)}")
        self._netns_add(host.netns)
        self.hosts[name] = host
        ip("-n", self.switch, "link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        ip("-n", self.switch, "link", "set", host.link, "master", BRIDGE, "up")
        ip("-n", host.netns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        ip("-n", host.netns, "link", "set", "eth0", "up")
        ip("-n", host.netns, "link", "set", "lo", "up")
        return host

    # ------------------------------------------------------------ running things on a host

    def run(self, host: str, argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run a command inside `host`'s namespace and wait for it (output captured, as bytes)."""
        return subprocess.run([IP, "netns", "exec", self.hosts[host].netns, *argv], capture_output=True,
                              timeout=timeout)

    def spawn(self, host: str, argv: list[str], log: Path, **kwargs) -> subprocess.Popen:
        """Start a long-running process inside `host`'s namespace, output to `log`.  `ip netns
        exec` execs the command itself, so the PID is the command's."""
        with open(log, "ab") as sink:
            proc = subprocess.Popen([IP, "netns", "exec", self.hosts[host].netns, *argv], stdout=sink,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs)
        self.hosts[host].procs.append(proc)
        return proc

    def kill_host(self, name: str) -> None:
        """The host dies: SIGKILL to its processes, then its link and namespace are deleted,
        so its address no longer exists on the subnet (packets to it go unanswered)."""
        host = self.hosts[name]
        for proc in host.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in host.procs:
            proc.wait(timeout=10)
        self._unplug(host)

    # ------------------------------------------------------------ cleanup

    def close(self) -> None:
        """Stop every process started here (SIGTERM, then SIGKILL after a few seconds), delete
        every link and namespace made here; raise NetnsError if any is still there after."""
        procs = [proc for host in self.hosts.values() for proc in host.procs if proc.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 5.0
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        problems = []
        for host in self.hosts.values():
            try:
                self._unplug(host)
            except NetnsError as exc:
                problems.append(str(exc))
        for name in reversed(self._made):
            try:
                self._netns_delete(name)
            except NetnsError as exc:
                problems.append(str(exc))
        left = [name for name in namespaces() if name.startswith(self.tag)]
        if left or problems:
            raise NetnsError(f"lab not cleaned up: namespaces left {left}; {'; '.join(problems)}")

    def _unplug(self, host: Host) -> None:
        if host.removed:
            return
        # Processes not started through spawn() (curl, dig) end with their `run`; anything
        # else still inside was started by this lab too, and goes now.
        _kill_and_wait(pids_in(host.netns))
        if host.netns in self._made:
            # Deleting either end of a veth pair deletes both.
            ip("-n", self.switch, "link", "del", host.link, check=False)
            self._netns_delete(host.netns)
        host.removed = True

    def _netns_add(self, name: str) -> None:
        ip("netns", "add", name)
        self._made.append(name)

    def _netns_delete(self, name: str) -> None:
        if name not in self._made:
            return
        _kill_and_wait(pids_in(name))
        ip("netns", "delete", name)
        self._made.remove(name)
