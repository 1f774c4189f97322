"""Names, ids and trace headers chosen by strangers: what they do to a node's logs,
counters and metrics. Each must reach them escaped and bounded, never raw or unbounded."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from helpers import wait_until

import zmqmesh

pytestmark = pytest.mark.timeout(60)

FORGED = "\n2026-01-01 00:00:00 CRITICAL root: FORGED\x1b[2J"
"""A name that, written raw, would forge a log line (and clear a terminal)."""


def _raw_lines(records: list[logging.LogRecord]) -> list[str]:
    """The messages of ``records`` that carry the forged line raw."""
    return [r.getMessage() for r in records if "\nFORGED" in r.getMessage() or "\n2026" in r.getMessage()
            or "\x1b" in r.getMessage()]


def test_a_peers_name_reaches_the_log_escaped(mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="zmqmesh")
    with zmqmesh.Node("target", **mesh) as target:
        stranger = zmqmesh.Node("stranger" + FORGED, **mesh).start()
        target.wait_for_peers(1, timeout=15)
        stranger.stop()
        wait_until(lambda: not target.peers(), 15, "the stranger's departure")
    said = [r.getMessage() for r in caplog.records if "stranger" in r.getMessage()]
    assert any("joined from" in m for m in said) and any(") gone:" in m for m in said)  # (escaped, still said)
    assert _raw_lines([r for r in caplog.records if r.name == "zmqmesh.membership"]) == []
