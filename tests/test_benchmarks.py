"""The harness beside the brokers runs and prints its table (no timing is asserted: the
figures belong to benchmarks/, not to tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

PEERS = Path(__file__).resolve().parent.parent / "benchmarks" / "peers.py"


def test_peers_harness_measures_raw_and_zmqmesh(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    done = subprocess.run(
        [sys.executable, str(PEERS), "--quick", "--repeats", "1", "--systems", "raw,zmqmesh",
         "--only", "queue,rtt,cold", "--json", str(out)],
        capture_output=True, text=True, timeout=110,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| work queue, 1 -> 1 | msgs/s |" in done.stdout
    rows = {row["workload"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"queue", "rtt", "cold"}
    for row in rows.values():
        assert not row["errors"], row
        assert all(len(values) == 1 and values[0] > 0 for values in row["values"].values()), row


def test_peers_harness_refuses_unknown_names() -> None:
    done = subprocess.run([sys.executable, str(PEERS), "--only", "nope"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "unknown: nope" in done.stderr
