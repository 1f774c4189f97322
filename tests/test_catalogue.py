"""Every script of the pattern catalogue runs on its own, prints what it did, and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = sorted((ROOT / "patterns").glob("*.py"))

EXPECTED = {
    "pipeline": ["sink: 30 results, sum of squares = 8555", "sink: every worker took a share"],
    "pubsub_topics": ["paris-only got ['weather.paris=sun', 'weather.paris=wind']"],
    "request_reply": ["divide(7, 2) -> 3.5", "RemoteError ZeroDivisionError", "NoProviderError", "MeshTimeoutError"],
    "scatter_gather": ["asked 4 providers, 3 answered within 1.0 s"],
    "worker_pool": ["worker-1 left the mesh", "all 30 jobs done"],
    "last_value_cache": ["snapshot from the cache: {'prices.eur': 1.09, 'prices.gbp': 1.27}"],
    "group_chat": ["bob heard: ['[lobby] alice: hello lobby', '(whisper) alice: psst, bob']"],
}


def test_every_pattern_has_expectations() -> None:
    assert sorted(p.stem for p in PATTERNS) == sorted(EXPECTED)


@pytest.mark.parametrize("script", PATTERNS, ids=lambda p: p.stem)
def test_pattern_script_runs(script: Path) -> None:
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90, cwd=ROOT)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert f"{script.stem}: OK" in out
    for text in EXPECTED[script.stem]:
        assert text in out, f"{text!r} missing from:\n{out}"
    assert "Traceback" not in result.stderr
