"""The examples run as users run them: scripts, pools, and `zmqmesh launch` with a TOML file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import free_udp_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

EXPECTED = {
    "order_processing.py": ["order 1 shipped", "order 2 rejected", "card ending 1110 declined", "all orders processed"],
    "notification_fanout.py": ["handled by ['analytics', 'audit', 'email', 'sms']", "sms worker killed",
                               "300 events reached every channel durably"],
    "log_collection.py": ["starting it again", "5000 lines from 5 apps; each exactly once and in order: True"],
    "worker_pools.py": ["multiprocessing.Pool: 40 jobs done by 3 workers", "ProcessPoolExecutor: 40 jobs done by 3 workers"],
    "durable_orders.py": ["killed frontdesk", "killed payments", "killed shipping", "nothing lost, nothing charged twice"],
}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_script(script: str, tmp_path: Path) -> None:
    env = {**os.environ, "ZMQMESH_BEACON_PORT": str(free_udp_port()), "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    for text in EXPECTED[script]:
        assert text in result.stdout, f"{text!r} missing from:\n{result.stdout}"
    # (the traceback itself on failure: pytest's diff of a long stderr against itself took minutes)
    at = result.stderr.find("Traceback")
    assert at < 0, result.stderr[max(0, at - 2000):at + 6000]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # a run that succeeded leaves no temporary files


def launcher(toml: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "zmqmesh", "launch", str(toml)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def read_until(proc: subprocess.Popen[str], text: str, lines: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if text in line:
            return
    raise AssertionError(f"{text!r} never appeared; output:\n" + "\n".join(lines))


def test_launch_runs_the_shop_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    shop = (EXAMPLES / "shop.toml").read_text()
    shop = shop.replace('name = "shop"', f'name = "shop-test-{time.time_ns()}"\nbeacon_port = {free_udp_port()}')
    toml = tmp_path / "shop.toml"
    toml.write_text(shop.replace("order_processing.py", str(EXAMPLES / "order_processing.py")))
    proc = launcher(toml)
    lines: list[str] = []
    try:
        read_until(proc, "client: all orders processed", lines)
        read_until(proc, "exited with status 0", lines)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        lines.extend(out.splitlines())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, "\n".join(lines)
    text = "\n".join(lines)
    for role in ("validator", "payments", "shipping", "frontdesk"):
        assert f"[{role:<9}] {role}: ready" in text
        assert f"[{role:<9}] stopped" in text
    assert "[client   ] client: order 1 shipped" in text


def test_launch_restarts_a_crashed_process(tmp_path: Path) -> None:
    marker = tmp_path / "crashed-once"
    script = (
        "import pathlib, sys; m = pathlib.Path(sys.argv[1]);\n"
        "if not m.exists(): m.write_text('x'); print('crashing'); sys.exit(3)\n"
        "print('second life')"
    )
    (tmp_path / "flaky.py").write_text(script)
    toml = tmp_path / "flaky.toml"
    toml.write_text(f'[[process]]\nname = "flaky"\ncommand = ["python3", "flaky.py", "{marker}"]\nrestart = "on-failure"\n')
    proc = launcher(toml)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "[flaky] crashing" in out and "exited with status 3; restarting" in out
    assert "[flaky] second life" in out and "[flaky] exited with status 0" in out


@pytest.mark.parametrize(
    "content, message",
    [
        ("this is not toml", "not valid TOML"),
        ("[[process]]\nname = 'x'\n", "'command' must be"),
        ("[[process]]\nname = 'x'\ncommand = 'true'\nrestart = 'sometimes'\n", "'restart' must be one of"),
        ("[mesh]\ncolour = 'red'\n[[process]]\nname = 'x'\ncommand = 'true'\n", "unknown key mesh.colour"),
        ("[mesh]\nstore = 'state'\n[[process]]\nname = 'x'\ncommand = 'true'\n", "a store serves one node"),
        # (inf, nan: a process ignoring SIGTERM held Ctrl-C up for ever; nan killed at once)
        ("stop_timeout_s = inf\n[[process]]\nname = 'x'\ncommand = 'true'\n", "stop_timeout_s must be"),
        ("stop_timeout_s = nan\n[[process]]\nname = 'x'\ncommand = 'true'\n", "stop_timeout_s must be"),
        ("stop_timeout_s = true\n[[process]]\nname = 'x'\ncommand = 'true'\n", "stop_timeout_s must be"),
        ("[[process]]\nname = 'x'\ncommand = 'true'\ncount = true\n", "'count' must be"),
    ],
)
def test_launch_rejects_bad_files_in_one_line(tmp_path: Path, content: str, message: str) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text(content)
    result = subprocess.run([sys.executable, "-m", "zmqmesh", "launch", str(toml)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2  # (as bad arguments: 1 is a process that failed)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_launch_exits_1_when_a_process_fails_and_2_when_a_command_cannot_start(tmp_path: Path) -> None:
    toml = tmp_path / "app.toml"
    toml.write_text("[[process]]\nname = 'fails'\ncommand = ['python3', '-c', 'raise SystemExit(3)']\n")
    result = subprocess.run([sys.executable, "-m", "zmqmesh", "launch", str(toml)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "[fails] exited with status 3" in result.stdout
    toml.write_text("[[process]]\nname = 'absent'\ncommand = ['no-such-command-zmqmesh']\n")
    result = subprocess.run([sys.executable, "-m", "zmqmesh", "launch", str(toml)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "cannot start 'no-such-command-zmqmesh'" in result.stderr


def test_launch_gives_each_process_its_own_store(tmp_path: Path) -> None:
    from zmqmesh.tools.launch import load_launch_file

    toml = tmp_path / "app.toml"
    toml.write_text("[[process]]\nname = 'w'\ncommand = 'true'\ncount = 2\nstore = 'state/w'\n"
                    "[[process]]\nname = 'k'\ncommand = 'true'\nstore = 'state/k'\n")
    specs, _timeout = load_launch_file(toml)
    stores = {s.name: s.env.get("ZMQMESH_STORE") for s in specs}
    assert stores == {"w-1": str(tmp_path / "state" / "w-1"), "w-2": str(tmp_path / "state" / "w-2"),
                      "k": str(tmp_path / "state" / "k")}


def test_one_shot_commands_against_a_live_mesh(mesh: dict[str, Any]) -> None:
    import zmqmesh

    got: list[Any] = []
    node = zmqmesh.Node("svc", **mesh)
    node.service("add", lambda m: m.data["a"] + m.data["b"])
    node.pull("jobs", lambda m: got.append(("job", m.data)))
    node.subscribe("news.", lambda m: got.append((m.topic, m.data)))
    common = ["--mesh", mesh["mesh"], "--beacon-port", str(mesh["beacon_port"]), "--wait", "0.5"]

    def run(*args: str, wait: str = "0.5") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "zmqmesh", *args, *common, "--wait", wait], capture_output=True,
                              text=True, timeout=60)

    with node:
        assert run("request", "add", '{"a": 2, "b": 3}').stdout.strip() == "5"
        assert run("push", "jobs", '{"id": 1}').returncode == 0
        assert "published to 1 subscriber" in run("publish", "news.today", '"hello"', wait="3").stdout  # (it counts whom it met)
        watcher = subprocess.Popen(
            [sys.executable, "-m", "zmqmesh", "subscribe", "alerts.", "--count", "1", "--timeout", "30", *common],
            stdout=subprocess.PIPE, text=True,
        )
        assert watcher.stdout is not None
        assert watcher.stdout.readline().startswith("subscribed")
        node.wait_for_subscribers("alerts.fire", 1, timeout=10)
        node.publish("alerts.fire", {"level": 3})
        out, _ = watcher.communicate(timeout=30)
        assert out.strip() == 'alerts.fire {"level": 3} (from svc)'
        failed = run("request", "missing", "{}", "--timeout", "0.3")
        assert failed.returncode == 1 and failed.stderr.startswith("zmqmesh: error: no node offers")
    assert ("job", {"id": 1}) in got and ("news.today", "hello") in got


def test_peers_watch_follows_joins_and_leaves(mesh: dict[str, Any]) -> None:
    import zmqmesh

    common = ["--mesh", mesh["mesh"], "--beacon-port", str(mesh["beacon_port"]), "--wait", "0.2"]
    watcher = subprocess.Popen(
        [sys.executable, "-m", "zmqmesh", "peers", "--watch", "--duration", "30", *common], stdout=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    try:
        read_until(watcher, "watching joins and leaves", lines)
        with zmqmesh.Node("visitor", **mesh):
            read_until(watcher, "+ visitor", lines)
        read_until(watcher, "- visitor", lines)
    finally:
        watcher.terminate()
        watcher.communicate(timeout=10)
