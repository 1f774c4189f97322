"""Shared fixtures: isolated mesh options per test, and node processes that are always cleaned up."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import NodeProcess, ScriptProcess, free_tcp_port, free_udp_port


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
    port = free_tcp_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "zmqmesh", "gateway", "--listen", f"127.0.0.1:{port}",
         "--mesh", mesh["mesh"], "--beacon-port", str(mesh["beacon_port"])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "gateway listening on" in line, line + proc.stdout.read()
    yield f"http://127.0.0.1:{port}"
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()
