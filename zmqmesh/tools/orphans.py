"""What a launcher's processes leave running outside their process group (Linux).

A process that leaves its group (``setsid()``, as a daemon does) escapes the group signal
with which the launcher stops its processes and what they started. Made a *child
subreaper* (`adopt_orphans`), the launcher becomes the parent of such a process once the
process that started it ends, and finds it among its own children (`orphans`) by the mark
its processes' environment carries (``MARK``, inherited by what they start): a child of
the launcher's process that it did not start is never taken for one, and the mark says
which of the launcher's processes it comes from. Elsewhere than Linux nothing is adopted,
and such a process runs on.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Container, Iterable
from pathlib import Path

__all__ = ["MARK", "adopt_orphans", "carrying", "children", "orphans", "reaped", "reap_ended"]

MARK = "ZMQMESH_LAUNCHED_BY"
"""The environment variable a launcher's processes carry, naming the launcher (`orphans`)."""

_PR_SET_CHILD_SUBREAPER = 36  # (linux/prctl.h)


def adopt_orphans(adopt: bool = True) -> bool:
    """Make this process the parent of the orphans among its descendants (``adopt``), or
    no longer (False); whether the system did (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, int(adopt), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def orphans(mark: str, own: Container[int], among: Iterable[int]) -> dict[int, str]:
    """Of ``among`` (this process's children: `children`), those alive, other than
    ``own``, whose environment carries ``MARK=mark/tag``, each with its ``tag`` (which of
    the launcher's processes it comes from): processes a launcher's processes started and
    left, adopted."""
    found = carrying(f"{MARK}={mark}/".encode(), (pid for pid in among if pid not in own))
    return {pid: rest.decode("ascii", "replace") for pid, rest in found.items()}


def carrying(token: bytes, among: Iterable[int]) -> dict[int, bytes]:
    """Of the processes ``among``, those alive whose environment holds a variable starting
    with ``token``, each with the rest of that variable (from ``/proc``: none elsewhere)."""
    found = {}
    for pid in among:
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # (gone meanwhile, or not ours to read)
            continue
        for variable in environment.split(b"\0"):
            if variable.startswith(token):
                found[pid] = variable[len(token):]
                break
    return found


def reaped(pid: int) -> bool:
    """Whether the child ``pid`` has ended (its status collected now, or before)."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] != 0
    except ChildProcessError:  # (collected already, or no child of this process)
        return True


def reap_ended(own: Container[int], among: Iterable[int]) -> int:
    """Collect the status of each of ``among`` (this process's children: `children`)
    other than ``own`` that has ended; how many there were. Only for a process whose other
    children are all orphans it adopted (the ``zmqmesh launch`` command): one that ended
    before it was seen alive has no environment left to read a mark from, and would stay
    a zombie until this process exits."""
    ended = 0
    for pid in among:
        if pid not in own and reaped(pid):
            ended += 1
    return ended


def children() -> list[int]:
    """This process's children (those that ended too, until collected), from what each of
    its threads is the parent of; none without ``/proc``."""
    pids: list[int] = []
    try:
        for task in Path("/proc/self/task").iterdir():
            try:
                pids.extend(int(p) for p in (task / "children").read_text().split())
            except OSError:  # (a thread that ended meanwhile)
                continue
    except OSError:  # (no /proc)
        return []
    return pids
