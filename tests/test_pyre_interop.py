"""Interoperability with pyre, the Python implementation of ZRE (PyPI: colmena-zeromq-pyre).

Runs ``pyre_interop_scenario.py`` in a private network namespace (``unshare -n``), where
the scenario creates a veth pair zre0<->zre0p (10.77.0.1/24) so that UDP broadcast
beacons never touch a real network. In that namespace one zmqmesh `Node` and pyre nodes:

1. discover each other (zmqmesh sees a plain-ZRE peer, ``is_zmqmesh`` False, with the pyre
   node's name and headers; pyre reports ENTER with the zmqmesh node's UUID);
2. join "CHAT" and see each other's JOIN;
3. exchange multi-frame WHISPERs and SHOUTs both ways, compared byte for byte;
3b. stay peers while idle for longer than either side's expiry (PING / PING-OK both ways);
4. zmqmesh leaves "CHAT": pyre reports LEAVE and survives (pyre asserts on the status byte);
5. pyre stops: zmqmesh's ``on_leave`` fires within 2 s; with a second pyre node, zmqmesh
   stops: pyre reports EXIT within 2 s. zmqmesh must have rejected nothing pyre sent.

Skipped when pyre is not installed, or network namespaces or veth pairs are unavailable
(not root, or a restricted kernel/sandbox).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).resolve().parent / "pyre_interop_scenario.py"
EXIT_REFUSED = 3
EXIT_NO_VETH = 4


def _probe(cmd: list[str]) -> str | None:
    """None if ``cmd`` succeeds, else why it failed."""
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if result.returncode != 0:
        return (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
    return None


def _require_private_netns_with_veth() -> None:
    """Skip unless a fresh network namespace with a veth pair can be made here."""
    if shutil.which("unshare") is None:
        pytest.skip("`unshare` (util-linux) is not installed")
    problem = _probe(["unshare", "-n", "true"])
    if problem is not None:
        pytest.skip(f"cannot create a network namespace (`unshare -n true`: {problem}); needs root")
    if shutil.which("ip") is None:
        pytest.skip("`ip` (iproute2) is not installed")
    # In a throwaway namespace, which disappears with the command: nothing outside changes.
    problem = _probe(["unshare", "-n", "--", "ip", "link", "add", "zre0", "type", "veth", "peer", "name", "zre0p"])
    if problem is not None:
        pytest.skip(f"cannot create a veth pair in a network namespace: {problem}")


def _report(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit code {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


@pytest.mark.timeout(120)
def test_pyre_interop_in_private_netns() -> None:
    pytest.importorskip("pyre", reason="pyre (pip install colmena-zeromq-pyre) is not installed")
    _require_private_netns_with_veth()

    try:
        result = subprocess.run(
            ["unshare", "-n", "--", sys.executable, "-u", str(SCENARIO)],
            timeout=90,
            capture_output=True,
            text=True,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"the interop scenario did not finish within 90 s\n--- stdout ---\n{out}\n--- stderr ---\n{err}")

    if result.returncode == EXIT_NO_VETH:
        pytest.skip(f"the scenario could not create its veth pair:\n{result.stdout}")
    assert result.returncode != EXIT_REFUSED, "the scenario refused to run (not a private namespace)\n" + _report(result)
    assert result.returncode == 0 and "INTEROP OK" in result.stdout, _report(result)
