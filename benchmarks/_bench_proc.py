"""Process plumbing of the benchmark harness: spawn roles, talk to them, never hang.

Every role runs in its own process (multiprocessing, "spawn" start method) and talks to
the orchestrator over its own `multiprocessing.Pipe` with ``(tag, dict)`` messages. The
orchestrator (`Trial`) waits for tagged messages with one deadline per trial and, in
``finally``, asks every child to stop, then terminates and kills whatever is left.

Each child also carries its own watchdog (`os._exit` after a hard deadline), so nothing
outlives a trial even if the orchestrator itself is killed. A child's stderr goes to a
log file per role, whose tail is quoted when the role fails.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any

__all__ = ["Ctl", "Trial", "TrialError", "child_entry", "rss_now_kb", "rss_peak_kb"]

_MP = multiprocessing.get_context("spawn")


class TrialError(Exception):
    """A trial failed: a role raised, died, or did not answer in time."""


class CtlAbort(Exception):
    """The orchestrator told this role to give up."""


def free_udp_port() -> int:
    """A UDP port nobody on this host uses right now (a loopback probe), for a run's beacons."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_now_kb() -> int:
    """Resident set size of this process now (KiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def rss_peak_kb() -> int:
    """Peak resident set size of this process image so far (KiB).

    VmHWM, not ``ru_maxrss``: a spawned child is forked from the orchestrator before it
    execs Python, and Linux carries the forked copy's peak into ``ru_maxrss`` across exec,
    so ``ru_maxrss`` never reads below the orchestrator's own size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# -- the child side -----------------------------------------------------------------------


class Ctl:
    """A role's end of its pipe to the orchestrator."""

    def __init__(self, conn: multiprocessing.connection.Connection, deadline: float) -> None:
        self.conn = conn
        self.deadline = deadline
        self._lock = threading.Lock()

    def send(self, tag: str, **data: Any) -> None:
        with self._lock:
            self.conn.send((tag, data))

    def remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0.0)

    def wait(self, tag: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the orchestrator sends ``tag``; raises on abort, timeout or a wrong tag."""
        limit = self.remaining() if timeout is None else min(timeout, self.remaining())
        if not self.conn.poll(limit):
            raise TimeoutError(f"no {tag!r} from the orchestrator within {limit:.1f} s")
        got, data = self.conn.recv()
        if got == "abort" or (got == "stop" and tag != "stop"):
            raise CtlAbort()
        if got != tag:
            raise RuntimeError(f"expected {tag!r} from the orchestrator, got {got!r}")
        return data

    def poll(self, timeout: float = 0.0) -> bool:
        return self.conn.poll(timeout)


def child_entry(
    module: str, role: str, conn: Any, kwargs: dict[str, Any], soft_timeout: float, hard_timeout: float, log_path: str | None
) -> None:
    """Run ``module.role(ctl, **kwargs)`` in this (spawned) process, then exit hard."""
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stderr = open(2, "w", buffering=1, closefd=False)

    def watchdog() -> None:
        time.sleep(hard_timeout)
        sys.stderr.write(f"[bench] {role}: watchdog fired after {hard_timeout:.0f} s, exiting\n")
        sys.stderr.flush()
        os._exit(124)

    threading.Thread(target=watchdog, name="bench-watchdog", daemon=True).start()
    level = os.environ.get("ZMQMESH_BENCH_LOG_LEVEL")
    if level:  # --child-log-level: the library's logging into this role's log file
        import logging

        logging.basicConfig(
            level=level.upper(), stream=sys.stderr, format=f"%(created).3f {role} %(threadName)s %(name)s %(levelname)s %(message)s"
        )
    # roles give up (and say why, with their counters) at the soft deadline, a little before
    # the orchestrator's; the watchdog ends the process at the hard one whatever happens
    ctl = Ctl(conn, time.monotonic() + soft_timeout)
    code = 0
    try:
        mod = __import__(module)
        getattr(mod, role)(ctl, **kwargs)
    except CtlAbort:
        code = 3
    except BaseException:  # report everything, then exit
        code = 1
        tb = traceback.format_exc()
        sys.stderr.write(tb)
        try:
            ctl.send("error", traceback=tb)
        except Exception:
            pass
    finally:
        try:
            sys.stderr.flush()
            sys.stdout.flush()
        except Exception:
            pass
        os._exit(code)


# -- the orchestrator side --------------------------------------------------------------------


class _Child:
    def __init__(self, name: str, proc: Any, conn: Any, log_path: str | None) -> None:
        self.name = name
        self.proc = proc
        self.conn = conn
        self.log_path = log_path
        self.inbox: deque[tuple[str, dict[str, Any]]] = deque()
        self.eof = False


class Trial:
    """One run of one measurement: a few role processes and a deadline for all of it.

    Use as a context manager; leaving it (normally or by an exception) stops every child.
    """

    def __init__(
        self, label: str, timeout: float, log_dir: str | None, module: str = "_bench_roles", profile_dir: str | None = None
    ) -> None:
        self.label = label
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.log_dir = log_dir
        self.module = module
        self.children: dict[str, _Child] = {}
        self.notes: list[str] = []
        self.stage = "starting"
        self.pids: dict[str, int] = {}
        self.started = time.monotonic()
        self.timeline: list[tuple[float, str, str]] = []  # (seconds since start, child, tag received)
        self.close_s = 0.0
        self.profile_dir = profile_dir
        self._profilers: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Trial:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def spawn(self, name: str, role: str, /, **kwargs: Any) -> None:
        """Start ``role`` (a function of the roles module) in a new process called ``name``."""
        parent, child = _MP.Pipe()
        log_path = None
        if self.log_dir:
            log_path = os.path.join(self.log_dir, f"{self.label}.{name}.log")
        # the child's own watchdog fires a little after our deadline, so we see our timeout first
        soft = max(self.timeout - 4.0, self.timeout * 0.8)
        hard = self.timeout + 15.0
        proc = _MP.Process(
            target=child_entry,
            args=(self.module, role, child, kwargs, soft, hard, log_path),
            name=f"bench-{self.label}-{name}",
            daemon=True,
        )
        proc.start()
        child.close()
        self.children[name] = _Child(name, proc, parent, log_path)
        self.pids[name] = proc.pid
        if self.profile_dir:
            self._profile(name, proc.pid)

    def _profile(self, name: str, pid: int) -> None:
        """Sample the child with py-spy (all threads, native frames off) until it exits."""
        out = os.path.join(self.profile_dir or ".", f"{self.label}.{name}.txt")
        cmd = ["py-spy", "record", "--pid", str(pid), "--rate", "400", "--format", "raw", "--threads", "--nonblocking", "-o", out]
        extra = os.environ.get("ZMQMESH_BENCH_PYSPY_ARGS", "").split()  # e.g. "--native" or "--gil"
        if "--native" in extra:  # py-spy cannot unwind native stacks without pausing the process
            cmd.remove("--nonblocking")
        cmd += extra
        try:
            self._profilers.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        except OSError as exc:
            self.notes.append(f"py-spy not started: {exc}")

    def tell(self, name: str, tag: str, **data: Any) -> None:
        """Send ``(tag, data)`` to one child."""
        child = self.children[name]
        try:
            child.conn.send((tag, data))
        except (BrokenPipeError, OSError) as exc:
            raise TrialError(f"{name}: cannot send {tag!r} ({exc}){self._tail(child)}") from None

    def tell_all(self, tag: str, **data: Any) -> None:
        for child in self.children.values():
            try:
                child.conn.send((tag, data))
            except Exception:
                pass

    def expect(self, name: str, tag: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait for ``tag`` from child ``name`` (an error from any child fails the trial)."""
        self.stage = f"waiting for {tag!r} from {name}"
        limit = self.deadline if timeout is None else min(self.deadline, time.monotonic() + timeout)
        child = self.children[name]
        while True:
            if child.inbox:
                got, data = child.inbox.popleft()
                if got != tag:
                    raise TrialError(f"{name}: expected {tag!r}, got {got!r}")
                return data
            if child.eof:
                raise TrialError(f"{name} exited (code {child.proc.exitcode}) before sending {tag!r}{self._tail(child)}")
            remaining = limit - time.monotonic()
            if remaining <= 0:
                raise TrialError(f"timeout after {self.timeout:.0f} s {self.stage}{self._tail(child)}")
            self._pump(remaining)

    def _pump(self, timeout: float) -> None:
        live = [c for c in self.children.values() if not c.eof]
        if not live:
            return
        ready = multiprocessing.connection.wait([c.conn for c in live], timeout=min(timeout, 0.5))
        for c in live:
            if c.conn not in ready:
                continue
            try:
                got, data = c.conn.recv()
            except (EOFError, OSError):
                c.eof = True
                c.proc.join(1.0)
                continue
            if got == "error":
                last = data.get("traceback", "").strip().splitlines()
                raise TrialError(f"{c.name} raised: {last[-1] if last else '?'}\n{data.get('traceback', '')}")
            self.timeline.append((time.monotonic() - self.started, c.name, got))
            c.inbox.append((got, data))

    def _tail(self, child: _Child, lines: int = 6) -> str:
        if not child.log_path or not os.path.exists(child.log_path):
            return ""
        try:
            with open(child.log_path, errors="replace") as f:
                tail = [line.rstrip() for line in f.readlines()[-lines:] if line.strip()]
        except OSError:
            return ""
        return ("\n    stderr of " + child.name + ": " + "\n    ".join(tail)) if tail else ""

    def close(self, grace: float = 8.0) -> None:
        """Ask every child to stop, wait ``grace`` seconds in all, then terminate and kill."""
        begun = time.monotonic()
        self.tell_all("stop")
        end = time.monotonic() + grace
        for child in self.children.values():
            child.proc.join(max(end - time.monotonic(), 0.05))
        slow = [c.name for c in self.children.values() if c.proc.is_alive()]
        if slow:
            self.notes.append(f"did not exit within {grace:.0f} s of 'stop' (killed): {', '.join(slow)}")
        for child in self.children.values():
            if child.proc.is_alive():
                child.proc.terminate()
                child.proc.join(1.0)
            if child.proc.is_alive():
                child.proc.kill()
                child.proc.join(1.0)
            try:
                child.conn.close()
            except Exception:
                pass
        for prof in self._profilers:  # each ends when its target exits
            try:
                prof.wait(5.0)
            except subprocess.TimeoutExpired:
                prof.kill()
                prof.wait(1.0)
        self.close_s = time.monotonic() - begun
