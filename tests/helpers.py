"""Test helpers: node processes with a line protocol, free ports, and waiting on conditions."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NODE_PROCESS = HERE / "node_process.py"


def free_udp_port() -> int:
    """A UDP port nobody on this host uses right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_tcp_port() -> int:
    """A TCP port nobody on this host uses right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_outside_ephemeral_range() -> int:
    """A TCP port nobody on this host uses right now, below the kernel's range of ports
    for outgoing connections: for an endpoint that something dials before anything
    listens there. (Dialled again and again with nothing listening, a port within that
    range is now and then given to the dialler itself, which then connects to itself,
    TCP's simultaneous open, and holds the port: a bind there fails, EADDRINUSE.)"""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lowest = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        lowest = 32768
    if lowest <= 1025:
        raise RuntimeError(f"the ephemeral range begins at {lowest}: no port below it to take")
    for _ in range(200):
        port = random.randrange(max(1024, min(10_000, lowest // 2)), lowest)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port below the ephemeral range")


@contextlib.contextmanager
def gateway_process(mesh: dict[str, Any], token: str | None = None) -> Iterator[str]:
    """A `zmqmesh gateway` process on loopback in ``mesh`` (with ``token`` from the
    environment, if given): its base URL; stopped (SIGTERM, then killed) on exit."""
    with gateway_url_and_process(mesh, token) as (url, _proc):
        yield url


@contextlib.contextmanager
def gateway_url_and_process(mesh: dict[str, Any], token: str | None = None) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`gateway_process`, with the process beside its base URL, for a test that signals it,
    waits for it or reads its output (stdout and stderr in one pipe, its first line read
    already); on exit, unless it has ended, it is stopped (SIGTERM, then killed)."""
    env = {**os.environ, **({"ZMQMESH_GATEWAY_TOKEN": token} if token else {})}
    # (port 0: the gateway binds a port of the system's choosing and says which; a port
    # found free beforehand could be taken by another socket before the gateway binds it)
    proc = subprocess.Popen(
        [sys.executable, "-m", "zmqmesh", "gateway", "--listen", "127.0.0.1:0",
         "--mesh", mesh["mesh"], "--beacon-port", str(mesh["beacon_port"])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert "gateway listening on" in line, line + proc.stdout.read()
        url = line.split("gateway listening on", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0"), line
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def rejected(node: Any, reason: str) -> int:
    """How many inputs ``node`` rejected for ``reason``."""
    return int(node.stats()["rejected"].get(reason, 0))


def in_threads(target: Callable[[], object], count: int, timeout: float) -> None:
    """Run ``target`` on ``count`` threads at once, and wait for each up to ``timeout`` s."""
    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), f"a thread still ran after {timeout} s"


def read_event(stream: Any, waiting_for: str = "an event") -> tuple[str, Any]:
    """The next server-sent event on ``stream`` (a gateway's ``/events`` response), of
    whatever kind: ``(kind, data)``, its data parsed as JSON (comments such as keep-alives
    are passed over). Raises ``AssertionError``, naming ``waiting_for``, if the stream
    ends first."""
    kind, data = "", None
    while True:
        raw = stream.readline()
        if not raw:
            raise AssertionError(f"the event stream ended before {waiting_for}")
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif line == "" and kind:
            return kind, data


def next_event(stream: Any, kind: str) -> Any:
    """The data (JSON) of the next server-sent event of ``kind`` on ``stream`` (a gateway's
    ``/events`` response), those of other kinds passed over. Raises ``AssertionError`` if
    the stream ends first."""
    while True:
        got, data = read_event(stream, f"a {kind!r} event")
        if got == kind:
            return data


def rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hold_loop(node: Any, release: threading.Event, timeout: float = 30.0) -> None:
    """Hold ``node``'s loop (it sends nothing) until ``release`` is set, or ``timeout``;
    returns once the loop is held, so that nothing queued from now on goes meanwhile."""
    held = threading.Event()

    def hold() -> None:
        held.set()
        release.wait(timeout)

    node._engine.call_soon(hold)
    if not held.wait(10):
        raise AssertionError("the node's loop was not held within 10 s")


def wait_until(condition: Callable[[], object], timeout: float, what: str = "condition", every: float = 0.01) -> object:
    """Poll ``condition`` (every ``every`` s: more for a costly one) until it returns
    something truthy; fail the test at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


async def until(condition: Callable[[], object]) -> None:
    """Return once ``condition()`` holds: the async twin of `wait_until` (bound it with
    ``asyncio.wait_for``)."""
    import asyncio

    while not condition():
        await asyncio.sleep(0.01)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NodeProcess:
    """A zmqmesh node in a child process (see node_process.py), read line by line."""

    def __init__(self, spec: dict, extra_env: dict[str, str] | None = None) -> None:
        self.name = spec["name"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(NODE_PROCESS), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[tuple[float, str]] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.id = ""
        self.mailbox = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append((time.monotonic(), line))

    def wait_line(self, prefix: str, timeout: float = 10.0, count: int = 1) -> str:
        """Wait until ``count`` lines start with ``prefix``; returns the last such line."""
        def found() -> str | None:
            hits = [text for _, text in self.lines if text.startswith(prefix)]
            return hits[count - 1] if len(hits) >= count else None
        try:
            # (scanning thousands of lines every 10 ms would starve the test's own nodes)
            return str(wait_until(found, timeout, f"{self.name}: {prefix!r}", every=0.01 if count < 1000 else 0.2))
        except AssertionError:
            tail = "\n".join(text for _, text in self.lines[-30:])
            raise AssertionError(f"{self.name} never printed {prefix!r} (x{count}); last output:\n{tail}") from None

    def line_time(self, prefix: str) -> float | None:
        """Monotonic time when the first line starting with ``prefix`` arrived."""
        for t, line in self.lines:
            if line.startswith(prefix):
                return t
        return None

    def with_prefix(self, prefix: str) -> list[str]:
        """Every line so far that starts with ``prefix``."""
        return [text for _, text in self.lines if text.startswith(prefix)]

    def ready(self, timeout: float = 15.0) -> NodeProcess:
        """Wait for READY and record the node's id and mailbox endpoint."""
        _, self.id, self.mailbox = self.wait_line("READY", timeout).split()
        return self

    def signal(self, sig: int) -> None:
        """Send a signal to the process."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """Ask for a clean stop (SIGTERM); kill it if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def _close(self) -> None:
        self._reader.join(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except OSError:
                    pass


class ScriptProcess:
    """A test script run as a child process (``python -u SCRIPT ARGS``), whose output
    lines are collected; it is waited for, killed, or closed through its stdin."""

    def __init__(self, script: Path, *args: object) -> None:
        self.proc = subprocess.Popen([sys.executable, "-u", str(script), *map(str, args)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def wait_for(self, text: str, timeout: float = 30) -> None:
        wait_until(lambda: text in self.lines or self.proc.poll() is not None, timeout, text)
        assert text in self.lines, "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def fake_zre_peer(ctx: Any, mailbox: str) -> tuple[Any, Any, str]:
    """A stranger speaking ZRE to the node whose mailbox is ``mailbox``: ``(inbox, dealer,
    endpoint)``, a ROUTER for the node to connect back to (at ``endpoint``) and a DEALER
    under a fresh ZRE identity, connected to the mailbox. The caller closes both."""
    import zmq

    inbox = ctx.socket(zmq.ROUTER)
    port = inbox.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.ROUTING_ID, b"\x01" + os.urandom(16))
    dealer.connect(mailbox)
    return inbox, dealer, f"tcp://127.0.0.1:{port}"


def send_as(ctx: Any, peer_id: str, mailbox: str, command: Any, hold_s: float = 0.08) -> None:
    """Send the ZRE ``command`` (a `ZreMessage`) to ``mailbox`` under the identity of the
    node ``peer_id``, over a DEALER of its own held ``hold_s`` for it to go out, then closed:
    a stray message of that peer's (sent on a link it dropped since), or a forged one."""
    import zmq

    from zmqmesh._wire import zre

    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.ROUTING_ID, b"\x01" + bytes.fromhex(peer_id))
    dealer.connect(mailbox)
    dealer.send_multipart(zre.encode_command(command))
    time.sleep(hold_s)
    dealer.close(0)
