"""What stops a launcher's processes when the launcher itself is killed (Linux).

``zmqmesh launch`` runs this file as a script of its own (``python -I _launch_watch.py
TOKEN STOP_TIMEOUT_S``: the standard library and its sibling `orphans` only, no package
import), in a session of its own, its standard input a pipe of which the launcher holds the only write end. That
pipe ends when the launcher ends, however it ends (SIGKILL, the OOM killer included).
Told ``done`` first (the launcher stopped its processes itself), the watcher exits;
otherwise it stops every process whose environment carries ``TOKEN``
(``ZMQMESH_LAUNCHED_BY=mark/``, inherited by whatever the launcher's processes start, in
their process groups or outside them): SIGTERM, then SIGKILL to those still there
``STOP_TIMEOUT_S`` later, and says so on its standard error (the launcher's), giving
that line up after a second rather than waiting for good on a pipe nobody reads. A process
that cleared or replaced its environment is not found, and nothing is stopped if the
watcher is killed too.
"""

from __future__ import annotations

import os
import signal
import sys
import time

if __name__ == "__main__":  # (run as a script, isolated: its sibling is read from its own folder)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from orphans import carrying
else:
    from .orphans import carrying

__all__ = ["marked", "watch"]


def marked(token: bytes) -> list[int]:
    """The processes alive (but this one) whose environment holds a variable starting with
    ``token`` (`orphans.carrying`)."""
    own = os.getpid()
    return list(carrying(token, (int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != own)))


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def watch(token: bytes, stop_timeout_s: float) -> int:
    """Wait for standard input to end; unless it said ``done``, stop what carries ``token``.
    Returns how many processes were found to stop."""
    if sys.stdin.buffer.read().strip() == b"done":
        return 0
    told: set[int] = set()
    deadline = time.monotonic() + stop_timeout_s
    while time.monotonic() < deadline:
        left = marked(token)
        if not left:
            break
        for pid in set(left) - told:  # (and what they start as they stop)
            _signal(pid, signal.SIGTERM)
            told.add(pid)
        time.sleep(0.05)
    for pid in marked(token):
        _signal(pid, signal.SIGKILL)
    if told:
        _say(f"zmqmesh launch: the launcher ended without stopping its processes: stopped {len(told)}\n")
    return len(told)


class _Unwritten(Exception):
    """The line could not be written in time."""


def _say(line: str, within_s: float = 1.0) -> None:
    """Write ``line`` to standard error, giving up after ``within_s`` (the launcher's stderr
    may be a full pipe that its reader keeps open and never reads: the write would block
    for good, and the watch never end), or if nobody reads it any more."""
    def give_up(_signum: int, _frame: object) -> None:
        raise _Unwritten

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, within_s)
    try:
        os.write(2, line.encode(errors="replace"))
    except (OSError, _Unwritten):
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


if __name__ == "__main__":
    watch(os.fsencode(sys.argv[1]), float(sys.argv[2]))
