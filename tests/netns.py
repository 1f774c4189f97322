"""Virtual hosts for the multi-host tests and benchmark: Linux network namespaces, bridges
and veth pairs, and zmqmesh nodes running inside them. Not a test module.

A `Lab` owns everything it creates and removes it in `Lab.close` (idempotent, also after
a failure): node processes first, then any process still inside one of its namespaces,
then the namespaces (which takes their interfaces, bridges and routes with them).

Network hygiene: every interface is created *inside* a namespace of the lab
(``ip -n NS link add ... peer name ... netns OTHER``), so nothing ever appears in, is
changed in, or is sent on the root namespace. Names are unique per lab
(``zmqmesh-<pid>x<random>-<host>``), so labs of parallel test runs never meet.

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2; `unavailable_reason` says why
not, for a clean skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from helpers import pid_alive

HERE = Path(__file__).resolve().parent
HOST_NODE = HERE / "host_node.py"
NS_PREFIX = "zmqmesh-"
_NS_NAME = re.compile(r"^zmqmesh-(\d+)x[0-9a-f]{6}-[a-z0-9]+$")
_COMMAND_TIMEOUT_S = 15.0


class LabError(RuntimeError):
    """A command that builds the lab failed."""


def run(cmd: list[str], check: bool = True, timeout: float = _COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; `LabError` with its stderr if ``check`` and it fails."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` failed ({result.returncode}): {(result.stderr or result.stdout).strip()}")
    return result


def add_veth_here(address: str, iface: str = "zre0", peer: str = "zre0p") -> None:
    """In this process's own fresh namespace (``unshare -n``): bring ``lo`` up and add a veth
    pair whose end ``iface`` has ``address``/24, for software that can only beacon on a
    broadcast-capable interface (pyre). Raises `LabError` if a command fails."""
    for cmd in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "link", "add", iface, "type", "veth", "peer", "name", peer],
        ["ip", "addr", "add", f"{address}/24", "brd", "+", "dev", iface],
        ["ip", "link", "set", peer, "up"],
        ["ip", "link", "set", iface, "up"],
    ):
        try:
            run(cmd)
        except (OSError, subprocess.SubprocessError) as exc:
            raise LabError(f"`{' '.join(cmd)}` failed: {exc}") from exc


_availability: list[str | None] = []


def unavailable_reason() -> str | None:
    """None if network namespaces, bridges and veth pairs can be made here, else why not (cached)."""
    if _availability:
        return _availability[0]
    reason: str | None = None
    if sys.platform != "linux":
        reason = "network namespaces need Linux"
    elif shutil.which("ip") is None:
        reason = "`ip` (iproute2) is not installed"
    elif os.geteuid() != 0:
        reason = "needs root to create network namespaces (`ip netns add`)"
    else:
        probe = f"{NS_PREFIX}{os.getpid()}x{uuid.uuid4().hex[:6]}-probe"
        try:
            run(["ip", "netns", "add", probe])
        except (LabError, OSError, subprocess.SubprocessError) as exc:
            reason = f"cannot create a network namespace: {exc}"
        else:
            try:
                run(["ip", "-n", probe, "link", "add", "br0", "type", "bridge"])
                run(["ip", "-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"])
                run(["ip", "netns", "exec", probe, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
            except (LabError, OSError, subprocess.SubprocessError) as exc:
                reason = f"cannot build a network in a namespace (bridge, veth, ip netns exec, sysctl): {exc}"
            finally:
                run(["ip", "netns", "del", probe], check=False)
    _availability.append(reason)
    return reason


def sweep_stale() -> list[str]:
    """Delete lab namespaces left by runs that were killed (their creating pid is gone).

    Only names of this module's exact format are touched; returns the names deleted.
    """
    result = run(["ip", "netns", "list"], check=False)
    removed = []
    for line in result.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NS_NAME.match(name)
        if not match or pid_alive(int(match.group(1))):
            continue
        _kill_namespace_processes(name)
        if run(["ip", "netns", "del", name], check=False).returncode == 0:
            removed.append(name)
    return removed


def _kill_namespace_processes(ns: str) -> None:
    """SIGKILL every process still inside namespace ``ns`` (one we created), by pid."""
    pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


class Switch:
    """An Ethernet switch: a bridge ``br0`` alone in its own namespace."""

    def __init__(self, lab: Lab, ns: str) -> None:
        self.lab = lab
        self.ns = ns
        self.ports: dict[str, str] = {}  # "host/ifname" -> port name in this namespace

    def port_of(self, host: Host, ifname: str) -> str:
        return self.ports[f"{host.short}/{ifname}"]

    def detach(self, host: Host, ifname: str) -> None:
        """Pull the cable: the port leaves the bridge (the host's interface stays up)."""
        self.lab.ip(self.ns, "link", "set", "dev", self.port_of(host, ifname), "nomaster")

    def attach(self, host: Host, ifname: str) -> None:
        """Plug the cable back in."""
        self.lab.ip(self.ns, "link", "set", "dev", self.port_of(host, ifname), "master", "br0")


class Host:
    """A machine: a namespace with ``lo`` and the interfaces `Lab.wire` gives it."""

    def __init__(self, lab: Lab, short: str, ns: str) -> None:
        self.lab = lab
        self.short = short
        self.ns = ns
        self.addresses: dict[str, str] = {}  # ifname -> IPv4 address (no prefix length)

    def address(self, ifname: str | None = None) -> str:
        if ifname is None:
            (ifname,) = self.addresses  # only for single-homed hosts
        return self.addresses[ifname]

    def ip(self, *args: str) -> None:
        self.lab.ip(self.ns, *args)

    def interfaces(self) -> set[str]:
        return {"lo", *self.addresses}


class Lab:
    """Namespaces, switches, cables and node processes of one test (see the module docstring)."""

    def __init__(self, label: str = "") -> None:
        self.tag = f"{os.getpid()}x{uuid.uuid4().hex[:6]}"
        self.label = label
        self.namespaces: list[str] = []
        self.nodes: list[HostNode] = []
        self.processes: list[LabProcess] = []
        self._closed = False
        self._port_serial = 0

    # -- building -------------------------------------------------------------------------

    def ip(self, ns: str, *args: str) -> None:
        run(["ip", "-n", ns, *args])

    def _namespace(self, short: str) -> str:
        if not re.fullmatch(r"[a-z0-9]{1,12}", short):
            raise ValueError(f"bad short name {short!r}")
        name = f"{NS_PREFIX}{self.tag}-{short}"
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        self.ip(name, "link", "set", "lo", "up")
        return name

    def switch(self, short: str = "sw") -> Switch:
        """A new switch (bridge in its own namespace)."""
        ns = self._namespace(short)
        self.ip(ns, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        self.ip(ns, "link", "set", "br0", "up")
        return Switch(self, ns)

    def host(self, short: str) -> Host:
        """A new host with only ``lo``."""
        return Host(self, short, self._namespace(short))

    def wire(self, host: Host, ifname: str, switch: Switch, cidr: str) -> None:
        """Cable ``host``'s new interface ``ifname`` (address ``cidr``) to ``switch``.

        The veth pair is created inside the host's namespace with its other end placed
        directly in the switch's namespace: it never exists in the root namespace.
        """
        self._port_serial += 1
        port = f"p{self._port_serial}-{host.short}"[:15]
        self.ip(host.ns, "link", "add", ifname, "type", "veth", "peer", "name", port, "netns", switch.ns)
        self.ip(switch.ns, "link", "set", "dev", port, "master", "br0")
        self.ip(switch.ns, "link", "set", "dev", port, "up")
        self.ip(host.ns, "addr", "add", cidr, "brd", "+", "dev", ifname)
        self.ip(host.ns, "link", "set", "dev", ifname, "up")
        host.addresses[ifname] = cidr.split("/")[0]
        switch.ports[f"{host.short}/{ifname}"] = port

    def sysctl(self, host: Host, setting: str) -> None:
        """Set a (per-namespace) sysctl inside ``host``, e.g. ``net.ipv4.ip_forward=1``."""
        run(["ip", "netns", "exec", host.ns, "sysctl", "-q", "-w", setting])

    # -- nodes ----------------------------------------------------------------------------

    def node(self, host: Host, name: str, options: dict[str, Any] | None = None, env: dict[str, str] | None = None,
             ifname: str | None = None, **spec: Any) -> HostNode:
        """Start a node process (tests/host_node.py) inside ``host``; see `HostNode`.

        ``ifname`` names the interface the node should advertise (``node.advertised``);
        by default the host's only one. ``spec`` adds handlers (see host_node.py).
        """
        full = {"name": name, "options": options or {}, "allowed_interfaces": sorted(host.interfaces()),
                "log_level": "info", **spec}  # membership logs end up in failure messages
        node = HostNode(self, host, full, env or {})
        node.advertised = host.address(ifname) if ifname or len(host.addresses) == 1 else ""
        self.nodes.append(node)
        return node

    def spawn(self, host: Host, argv: list[str], env: dict[str, str] | None = None, label: str = "") -> LabProcess:
        """Run any command inside ``host`` (e.g. ``zmqmesh launch``), its output collected line by line."""
        proc = LabProcess(host, argv, env or {}, label or argv[-1])
        self.processes.append(proc)
        return proc

    # -- cleaning up ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop every node (clean stop, then kill), then delete every namespace. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for node in self.nodes:
            node.request_stop()
        for proc in self.processes:
            proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for node in self.nodes:
            node.finish(max(0.1, deadline - time.monotonic()))
        for proc in self.processes:
            proc.finish(max(0.1, deadline - time.monotonic()))
        for ns in reversed(self.namespaces):
            _kill_namespace_processes(ns)
            run(["ip", "netns", "del", ns], check=False)
        self.namespaces.clear()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lab_env(env: dict[str, str]) -> dict[str, str]:
    """Our environment without ZMQMESH_* variables (a child gets only those the test gives)."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("ZMQMESH_")}
    return {**inherited, "PYTHONUNBUFFERED": "1", **env}


def _finish(proc: subprocess.Popen[str], reader: threading.Thread, timeout: float) -> int:
    """Wait for ``proc`` to exit (kill its process group after ``timeout``); returns the status."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)
    reader.join(5)
    if proc.stdout is not None:
        try:
            proc.stdout.close()
        except OSError:
            pass
    return proc.returncode


class LabProcess:
    """A command running inside a lab host, with its output (stdout and stderr) kept by line."""

    def __init__(self, host: Host, argv: list[str], env: dict[str, str], label: str) -> None:
        self.host = host
        self.label = label
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", host.ns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_lab_env(env),
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"read-{label}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def output(self, last: int = 60) -> str:
        with self._cond:
            tail = self.lines[-last:]
        return f"--- {self.label} on {self.host.short} (exit {self.proc.poll()}) ---\n" + "\n".join(tail)

    def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait for a line matching the regular expression ``pattern``; returns the match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    match = regex.search(line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    break
                self._cond.wait(min(left, 0.1))
        raise NodeError(f"{self.label}: no line matching {pattern!r} within {timeout} s\n{self.output()}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def finish(self, timeout: float) -> int:
        """Wait for the exit (kill its process group after ``timeout``); returns the status."""
        return _finish(self.proc, self._reader, timeout)


class NodeError(AssertionError):
    """A node process failed, answered an error, or did not answer in time."""


class HostNode:
    """One zmqmesh node process inside a lab host, driven by JSON lines (see host_node.py).

    ``events`` collects every event line (dicts with ``ev`` and ``t``, the child's
    ``time.monotonic()``, comparable with ours: CLOCK_MONOTONIC is shared by namespaces).
    """

    def __init__(self, lab: Lab, host: Host, spec: dict[str, Any], env: dict[str, str]) -> None:
        self.lab = lab
        self.host = host
        self.name = spec["name"]
        self.spec = spec
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.id = ""
        self.mailbox = ""
        self.endpoints: dict[str, str] = {}
        self.advertised = ""  # the address the node should advertise (set by Lab.node)
        self._replies: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._serial = 0
        self._write_lock = threading.Lock()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", host.ns, sys.executable, "-u", str(HOST_NODE), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_lab_env(env),
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"read-{self.name}", daemon=True)
        self._reader.start()

    def __repr__(self) -> str:
        return f"<HostNode {self.name} on {self.host.short} {self.id[:8]}>"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            try:
                item = json.loads(line)
            except ValueError:
                item = None
            with self._cond:
                if isinstance(item, dict) and "re" in item:
                    self._replies[item["re"]] = item
                elif isinstance(item, dict) and "ev" in item:
                    self.events.append(item)
                else:
                    self.raw.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def output(self, last: int = 25) -> str:
        """Recent non-protocol output (errors, tracebacks) and events, for failure messages."""
        with self._cond:
            raw = self.raw[-last:]
            events = [json.dumps(e)[:200] for e in self.events[-last:]]
        return f"--- {self.name} ({self.host.short}) exit={self.proc.poll()} ---\n" + "\n".join(
            ["raw:", *raw, "events:", *events]
        )

    # -- waiting on events ----------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Wait (on new output, with a deadline) until ``predicate()`` is truthy; returns it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    break
                self._cond.wait(min(left, 0.1))
        raise NodeError(f"{self.name}: timed out after {timeout} s waiting for {what}\n{self.output()}")

    def find(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        """Events of ``kind`` whose fields equal ``match`` (``peer_id``/``peer_name`` look into ``peer``)."""
        out = []
        with self._cond:
            for event in self.events:
                if event["ev"] != kind:
                    continue
                ok = True
                for key, value in match.items():
                    if key == "peer_id":
                        ok = ok and event.get("peer", {}).get("id") == value
                    elif key == "peer_name":
                        ok = ok and event.get("peer", {}).get("name") == value
                    else:
                        ok = ok and event.get(key) == value
                if ok:
                    out.append(event)
        return out

    def ready(self, timeout: float = 20.0) -> HostNode:
        """Wait for the node to run; records its id, mailbox and endpoints."""
        event = self.wait_for(lambda: (self.find("ready") or [None])[0], timeout, "READY")
        self.id = event["id"]
        self.endpoints = event["endpoints"]
        self.mailbox = self.endpoints["mailbox"]
        return self

    def joined_ids(self) -> set[str]:
        """Ids of the peers this node currently considers present, from its join/leave events."""
        present: set[str] = set()
        with self._cond:
            for event in self.events:
                if event["ev"] == "join":
                    present.add(event["peer"]["id"])
                elif event["ev"] == "leave":
                    present.discard(event["peer"]["id"])
        return present

    def wait_peers(self, ids: Iterable[str], timeout: float, what: str = "") -> None:
        """Wait until the present peers (by events) are exactly ``ids``."""
        want = set(ids)
        self.wait_for(lambda: self.joined_ids() == want, timeout,
                      what or f"exactly {len(want)} peers (has {len(self.joined_ids())})")

    # -- commands -------------------------------------------------------------------------

    def call(self, op: str, reply_timeout: float | None = None, **args: Any) -> Any:
        """Run command ``op`` in the node process and return its value; `NodeError` on failure.

        ``args`` go to the command (``timeout`` included); the reply is awaited for
        ``reply_timeout`` seconds, by default the command's own timeout plus 15.
        """
        if reply_timeout is None:
            reply_timeout = float(args.get("timeout") or 0) + 15.0
        with self._write_lock:
            self._serial += 1
            serial = self._serial
            line = json.dumps({"id": serial, "op": op, **args}) + "\n"
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(line)
                self.proc.stdin.flush()
            except (OSError, ValueError) as exc:
                raise NodeError(f"{self.name}: cannot send {op!r}: {exc}\n{self.output()}") from None
        reply = self.wait_for(lambda: self._replies.get(serial), reply_timeout, f"the reply to {op!r}")
        if not reply.get("ok"):
            raise NodeError(f"{self.name}: {op} {args} failed: {reply.get('error')}")
        return reply.get("value")

    def peers(self) -> list[dict[str, Any]]:
        """``node.peers()`` in the process, as dicts (id, name, address, endpoint, headers, ...)."""
        return self.call("peers")

    # -- stopping -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask for a clean stop (closes stdin; the node stops and exits)."""
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except OSError:
            pass

    def finish(self, timeout: float) -> int:
        """Wait for the exit (kill the process group after ``timeout``); returns the status."""
        return _finish(self.proc, self._reader, timeout)

    def stop(self, timeout: float = 5.0) -> int:
        self.request_stop()
        return self.finish(timeout)


__all__ = ["Lab", "Host", "Switch", "HostNode", "LabProcess", "LabError", "NodeError", "run", "sweep_stale", "unavailable_reason"]
