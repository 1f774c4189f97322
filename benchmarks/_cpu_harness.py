"""What the CPU harnesses share (provider_cpu.py, caller_cpu.py, push_cpu.py,
durable_cpu.py): their processes' line protocol on stdin/stdout, a free beacon port,
per-thread CPU from /proc, and callgrind's control and counts."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["free_udp_port", "say", "expect", "thread_cpu", "callgrind_control", "callgrind_counts",
           "end_callgrind_round", "end_pair", "measure_client", "print_rounds"]


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing holds now (a beacon port for one round)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def say(line: str) -> None:
    """Tell the orchestrator ``line`` (a role's stdout, flushed at once)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def expect(proc: subprocess.Popen[str], word: str) -> list[str]:
    """The words of the first line ``proc`` says that begins with ``word`` (the lines
    before it are skipped); raises `RuntimeError` if it ends first."""
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process ended before saying {word!r}")
        parts = line.split()
        if parts and parts[0] == word:
            return parts


def thread_cpu(pid: int, tid: int) -> tuple[int, int, int]:
    """(user ticks, system ticks, CPU ns) of one thread."""
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        ns = int(f.read().split()[0])
    return int(fields[11]), int(fields[12]), ns


def callgrind_control(*command: str | int) -> None:
    """Run ``callgrind_control`` with ``command``; raises `RuntimeError` unless it says OK."""
    done = subprocess.run(["callgrind_control", *(str(c) for c in command)], capture_output=True,
                          text=True, check=True)
    if "OK." not in done.stdout:  # (it says so, and returns 0, when it finds no such run)
        raise RuntimeError(f"callgrind_control {command}: {done.stdout} {done.stderr}")


def callgrind_counts(pattern: str) -> dict[str, int]:
    """Thread number (as callgrind numbers its dumps, ``<file>.1-<thread>``) -> the
    instructions it counted, for the dumps matching ``pattern``; threads with none left out."""
    counts = {}
    for path in glob.glob(pattern):
        with open(path) as f:
            total = sum(int(line.split()[1]) for line in f if line.startswith("summary:"))
        if total:
            counts[path.rsplit("-", 1)[1]] = total
    return counts


def end_callgrind_round(out_dir: str, keep_variable: str, callgrind: bool) -> None:
    """Remove a round's temporary ``out_dir``; with ``callgrind`` and the environment
    variable ``keep_variable`` naming a directory, callgrind's dumps are moved there first
    (for ``callgrind_annotate``; what it held before is removed: the last round's stay)."""
    keep = os.environ.get(keep_variable)
    if keep and callgrind:
        shutil.rmtree(keep, ignore_errors=True)
        shutil.move(out_dir, keep)
    shutil.rmtree(out_dir, ignore_errors=True)


def end_pair(client: subprocess.Popen[str] | None, server: subprocess.Popen[str]) -> None:
    """End a round's processes: ``client`` killed if it still runs, ``server`` told by
    its stdin closing, and killed if it has not ended within a minute."""
    if client is not None and client.poll() is None:
        client.kill()
        client.wait()
    if server.stdin is not None:
        server.stdin.close()
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def measure_client(cli: subprocess.Popen[str], pid: int, tid: int, n: int, callgrind: bool
                   ) -> tuple[dict[str, float], list[str]]:
    """One measured run of a client process that waits for ``go`` and says ``done`` after
    its ``n`` requests, then leaves on ``bye``: the thread ``tid`` of process ``pid`` (the
    one measured) per request, user and system CPU (in us, from clock ticks) and its CPU
    time (``schedstat``, us), with callgrind's counts dumped if it runs under it; and the
    words of the client's ``done`` line."""
    before = thread_cpu(pid, tid)
    assert cli.stdin is not None
    cli.stdin.write("go\n")
    cli.stdin.flush()
    done = expect(cli, "done")
    after = thread_cpu(pid, tid)
    if callgrind:
        callgrind_control("-d", pid)  # (dumped as <file>.1-<thread>: what the requests cost)
    cli.stdin.write("bye\n")
    cli.stdin.flush()
    cli.wait(60)
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    return {"user_us": (after[0] - before[0]) * tick_us / n, "sys_us": (after[1] - before[1]) * tick_us / n,
            "cpu_us": (after[2] - before[2]) / 1e3 / n}, done


def print_rounds(rounds: int, one_round: Callable[[Any], dict[str, float]], args: Any) -> None:
    """Run ``one_round(args)`` ``rounds`` times, printing each one's figures on a line."""
    for _ in range(rounds):
        r = one_round(args)
        print(" ".join(f"{k}={v:.2f}" if k != "instr" else f"{k}={v:,.0f}" for k, v in r.items()), flush=True)
