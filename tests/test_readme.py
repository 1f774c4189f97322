"""The README's "In code" example runs as copied: its two blocks as two processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(60)


def blocks() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## In code"):]
    found = {}
    for code in re.findall(r"```python\n(.*?)```", section, re.S):
        first = code.splitlines()[0]
        if first.startswith("# ") and ".py" in first:
            found[first[2:].split(":")[0]] = code
    return found


def test_the_readme_example_runs_as_two_processes(tmp_path: Path, mesh: dict[str, Any]) -> None:
    files = blocks()
    assert set(files) == {"service.py", "caller.py"}
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    env = {**os.environ, "ZMQMESH_MESH": mesh["mesh"], "ZMQMESH_BEACON_PORT": str(mesh["beacon_port"])}
    service = subprocess.Popen([sys.executable, "service.py"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        caller = subprocess.run([sys.executable, "caller.py"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=40)
        assert caller.returncode == 0, caller.stderr
        assert caller.stdout.strip() == "3"
    finally:
        service.send_signal(signal.SIGTERM)
        out, err = service.communicate(timeout=20)
    assert service.returncode == 0, err
    assert sorted(out.splitlines()) == ["job {'id': 7}", "prices.eur {'bid': 1.08}"]
