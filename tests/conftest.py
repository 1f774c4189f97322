"""Shared fixtures: isolated mesh options per test, and node processes that are always cleaned up."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest
from helpers import NodeProcess, ScriptProcess, free_udp_port, gateway_process


def _ignored_here(_signum: int, _frame: FrameType | None) -> None:
    """What pytest does with a stop signal it was started ignoring: nothing, as before."""


def _children_start_with_default_stop_signals() -> None:
    """Processes the tests start take each stop signal as a terminal's command would, even
    when pytest was started ignoring it (a script's background job ignores SIGINT, nohup
    SIGHUP): an ignored signal is inherited by a child, and the commands leave ignored
    signals ignored. pytest keeps ignoring it, by a handler that does nothing (a handler,
    unlike SIG_IGN, is not inherited)."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is signal.SIG_IGN:
            signal.signal(sig, _ignored_here)


_children_start_with_default_stop_signals()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter: Any) -> Iterator[None]:
    """After pytest's own summary, the tests that failed, a short line each: the tail of a
    CI log names them all, however long their assertion messages (CI does not cut them)."""
    yield
    failed = terminalreporter.stats.get("failed", []) + terminalreporter.stats.get("error", [])
    if not failed:
        return
    terminalreporter.section(f"{len(failed)} failed, a line each")
    for report in failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = (crash.message if crash is not None else str(report.longrepr)).strip()
        first = message.splitlines()[0] if message else ""
        terminalreporter.write_line(f"{report.nodeid} ({report.when}): {first[:140]}")


@pytest.fixture(autouse=True)
def no_node_outlives_its_test(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Stop, after each test, every `Node` it started and left running: a test that fails
    or times out half-way through must not leave its nodes' threads to slow every later
    test (43 nodes left by one test made the rest of a CI run fail one after another).
    A test marked ``lets_nodes_go`` is left alone (it needs its nodes collectable)."""
    import functools

    import zmqmesh

    if request.node.get_closest_marker("lets_nodes_go"):
        yield
        return
    started: list[zmqmesh.Node] = []
    real_start = zmqmesh.Node.start

    @functools.wraps(real_start)  # (what tests read of it stays the real one's)
    def start(self: zmqmesh.Node) -> zmqmesh.Node:
        started.append(self)
        return real_start(self)

    monkeypatch.setattr(zmqmesh.Node, "start", start)
    yield
    for node in started:
        node.stop(timeout=1.0)  # (idempotent: at once for those stopped already)


@pytest.fixture
def mesh() -> dict[str, Any]:
    """Options isolating a test: its own beacon port and mesh name, fast failure detection."""
    return {
        "beacon_port": free_udp_port(),
        "mesh": f"test-{uuid.uuid4().hex[:10]}",
        "heartbeat_interval_s": 0.5,
        "peer_timeout_s": 2.0,
    }


@pytest.fixture
def spawn(mesh: dict[str, Any]) -> Iterator[Callable[..., NodeProcess]]:
    """Start node processes in this test's mesh; every one is stopped or killed at teardown."""
    started: list[NodeProcess] = []

    def start(name: str, wait_ready: bool = True, options: dict[str, Any] | None = None, **spec: Any) -> NodeProcess:
        proc = NodeProcess({"name": name, "options": {**mesh, **(options or {})}, **spec})
        started.append(proc)
        return proc.ready() if wait_ready else proc

    yield start
    for proc in started:
        proc.stop(timeout=5)


@pytest.fixture
def procs() -> Iterator[list[ScriptProcess]]:
    """Script processes a test starts (it appends them); every one is killed at teardown."""
    started: list[ScriptProcess] = []
    yield started
    for proc in started:
        proc.kill()


@pytest.fixture
def gateway(mesh: dict[str, Any]) -> Iterator[str]:
    """A `zmqmesh gateway` process on loopback in this test's mesh; its base URL."""
    pytest.importorskip("aiohttp", reason="the gateway extra (aiohttp) is not installed")
    with gateway_process(mesh) as url:
        yield url


@pytest.fixture
def ctx() -> Iterator[Any]:
    """A ZeroMQ context for a test's bare sockets, destroyed (linger 0) at teardown."""
    import zmq

    context = zmq.Context()
    yield context
    context.destroy(linger=0)
