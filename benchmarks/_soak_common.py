"""What the soaks (``soak.py`` with ``_soak_node.py``, ``soak_durable.py`` with
``_durable_soak_node.py``, ``soak_replay.py`` with ``_replay_soak_node.py``) share. Not a
benchmark by itself.

The harness side: `HarnessError`, `NodeProcess` (a node process started on its spec, read
line by line, signalled, killed or waited for) and `wait_ready` (until processes printed
READY). The node side: `say` (one flushed line at a time), `Control` (the harness's control
lines on stdin, and SIGTERM), `Pace` (steps at a rate), `serve` (the node's main loop:
watchdog, QUIESCED once the workers stopped, periodic STATS lines, until the stop) and
`run_node` (an exception printed as an ERROR line the harness reads). Each side loads only
what it uses (a node process not ``subprocess``, the harness not ``zmqmesh``): the soak
measures the node processes' memory.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["Control", "HarnessError", "NodeProcess", "Pace", "run_node", "say", "serve", "wait_ready"]


# -- the harness side ------------------------------------------------------------------------


class HarnessError(Exception):
    """The soak could not be run (as opposed to a check failing)."""


class NodeProcess:
    """One node process: ``script`` run on ``spec`` (as JSON) in a session of its own, its
    stdin a pipe for the harness's control lines (`send`), its stdout read line by line by
    a thread that hands each to the subclass's `_parse` (a line it cannot parse, torn by a
    kill, goes to ``problems``). ``stderr`` is ``subprocess.PIPE`` (the subclass reads it) or
    a file's path, ``log``: the process's stderr is written there, until `close`. A subclass
    sets what `_parse` fills before it calls this ``__init__``: the reading starts in it,
    and names the process in ``label``; its `_parse` sets ``ready`` on the process's READY
    line, if `wait_ready` is to wait for it."""

    label: str
    ready: bool = False

    def __init__(self, script: Path, spec: dict[str, Any], stderr: int | Path) -> None:
        import subprocess

        self.problems: list[str] = []
        self.log: Path | None = None
        self._log_file: IO[str] | None = None
        err_to: int | IO[str]
        if isinstance(stderr, Path):
            self.log = stderr
            self._log_file = err_to = open(stderr, "w")  # noqa: SIM115 (closed in close())
        else:
            err_to = stderr
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(script), json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err_to,
            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
        )
        self._stdout_reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._stdout_reader.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self._parse(line.rstrip("\n"))
            except Exception as exc:  # a torn line from a killed process: keep reading
                self.problems.append(f"unparsable line {line[:120]!r}: {exc}")

    def _parse(self, line: str) -> None:
        raise NotImplementedError

    def join_stdout(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the process's output to be read to its end."""
        self._stdout_reader.join(timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process, if it is still running."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the process (also when stopped), then read what it printed to the end."""
        self.signal(signal.SIGKILL)
        self.proc.wait(10)
        self.join_stdout(5)

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to exit, then read what it printed
        to the end; False if it had not exited."""
        import subprocess

        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self.join_stdout(5)
        return True

    def send(self, line: str) -> None:
        """Write a control line to the process's stdin; a process gone ignores it."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass

    def close_pipes(self) -> None:
        """Close the pipes to and from the process. Never raises."""
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    def close(self) -> None:
        """Close the pipes to and from the process, and its ``log`` file. Never raises."""
        self.close_pipes()
        if self._log_file is not None:
            self._log_file.close()

    def log_text(self) -> str:
        """What the process wrote to its ``log`` file ("" without one, or unreadable)."""
        try:
            return self.log.read_text(errors="replace") if self.log is not None else ""
        except OSError:
            return ""


def wait_ready(processes: Sequence[NodeProcess], timeout: float) -> None:
    """Wait until every one of ``processes`` is ``ready``. Raises HarnessError, naming those
    not ready, if one of them exits before it is, or past ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not all(p.ready for p in processes):
        dead = [p for p in processes if not p.alive() and not p.ready]
        if dead or time.monotonic() > deadline:
            raise HarnessError("did not start: " + "; ".join(
                f"{p.label} alive={p.alive()} problems={p.problems[-2:]} log={p.log}" for p in processes if not p.ready))
        time.sleep(0.05)


# -- the node side ---------------------------------------------------------------------------

_OUT = threading.Lock()


def say(*parts: object) -> None:
    """Print ``parts`` as one line, flushed at once."""
    line = " ".join(str(p) for p in parts) + "\n"
    with _OUT:  # handlers and traffic threads print concurrently: one write per line
        sys.stdout.write(line)
        sys.stdout.flush()


class Control:
    """A node process's control by the harness, read on stdin by a thread of its own, one
    word a line: ``QUIESCE`` sets ``quiesce``; a line whose word is one of ``enders``
    (``STOP`` by default) ends the reading, and is kept in ``ended_by``; then, as at the end
    of stdin, ``quiesce`` and ``stop`` are set. SIGTERM sets ``stop`` too (a `StopFlag`: a
    threading.Event set from a signal handler can deadlock). ``born`` is when it was made
    (`time.monotonic`): `serve`'s watchdog counts the process's life from it. From the main
    thread."""

    def __init__(self, enders: Collection[str] = ("STOP",)) -> None:
        from zmqmesh import StopFlag

        self.born = time.monotonic()
        self.stop = StopFlag()
        self.quiesce = threading.Event()
        self.ended_by: str | None = None
        self._enders = enders
        signal.signal(signal.SIGTERM, self.stop.set)
        threading.Thread(target=self._read, name="soak-control", daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            word = line.strip().partition(" ")[0]
            if word == "QUIESCE":
                self.quiesce.set()
            elif word in self._enders:
                self.ended_by = line.strip()
                break
        self.quiesce.set()
        self.stop.set()


class Pace:
    """Steps at ``rate`` units a second: `after` each step waits (on ``quiesce``) until
    the next is due; behind by more than a second, it starts again from now rather than
    burst to catch up."""

    def __init__(self, rate: float, quiesce: threading.Event) -> None:
        self.rate = rate
        self.quiesce = quiesce
        self.due = time.monotonic()

    def after(self, units: int = 1) -> None:
        """A step of ``units`` was taken: wait until the next is due (or ``quiesce``)."""
        self.due += units / self.rate
        delay = self.due - time.monotonic()
        if delay > 0:
            self.quiesce.wait(delay)
        elif delay < -1.0:
            self.due = time.monotonic()


def serve(control: Control, max_life_s: float, stats: Callable[[], str], *,
          workers: Sequence[threading.Thread] = (), quiesced: Callable[[], Sequence[object]] = tuple,
          stats_every_s: float = 2.0, join_s: float = 30.0, stamp: Callable[[], Sequence[object]] = tuple) -> None:
    """A node script's main loop, until ``control.stop``: a ``STATS <stats()>`` line every
    ``stats_every_s`` seconds (the first at once); once ``control.quiesce`` is set, with
    ``workers`` (the threads making the traffic), each started one joined (up to ``join_s``
    seconds) and a ``QUIESCED <quiesced()>`` line; past ``max_life_s`` seconds from
    ``control.born``, a ``WATCHDOG`` line and the process's exit, status 3. Each line starts
    with ``stamp()``'s words after its own. It returns with ``quiesce`` set and the started
    workers joined again (up to ``join_s`` each); stopping the node is the caller's."""
    stop, quiesce = control.stop, control.quiesce
    done_quiescing = False
    next_stats = time.monotonic()
    while not stop.is_set():
        if time.monotonic() - control.born > max_life_s:
            say("WATCHDOG", *stamp())
            os._exit(3)
        if workers and quiesce.is_set() and not done_quiescing:
            _join_started(workers, join_s)
            done_quiescing = True
            say("QUIESCED", *stamp(), *quiesced())
        if time.monotonic() >= next_stats:
            next_stats += stats_every_s
            say("STATS", *stamp(), stats())
        stop.wait(0.1)
    quiesce.set()
    _join_started(workers, join_s)


def _join_started(threads: Sequence[threading.Thread], timeout: float) -> None:
    for thread in threads:
        if thread.ident is not None:  # (a thread never started has no ident)
            thread.join(timeout)


def run_node(main: Callable[[], None]) -> None:
    """Run a node script's ``main``; an exception it raises is printed first as an
    ``ERROR <type> <message>`` line (the harness reads stdout: the reason stays visible),
    then raised again."""
    try:
        main()
    except Exception as exc:
        say("ERROR", type(exc).__name__, str(exc).replace("\n", " "))
        raise
