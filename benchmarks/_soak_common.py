"""What the two soaks (``soak.py`` with ``_soak_node.py``, ``soak_durable.py`` with
``_durable_soak_node.py``) share. Not a benchmark by itself.

The harness side: `HarnessError`, and `NodeProcess`, a node process started on its spec
and read line by line. The node side: `say` (one flushed line at a time), `Control` (the
harness's control lines on stdin, and SIGTERM), `Pace` (steps at a rate) and `run_node`
(an exception printed as an ERROR line the harness reads). Each side loads only what it
uses (a node process not ``subprocess``, the harness not ``zmqmesh``): the soak measures
the node processes' memory.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import IO, Any

__all__ = ["Control", "HarnessError", "NodeProcess", "Pace", "run_node", "say"]


# -- the harness side ------------------------------------------------------------------------


class HarnessError(Exception):
    """The soak could not be run (as opposed to a check failing)."""


class NodeProcess:
    """One node process: ``script`` run on ``spec`` (as JSON) in a session of its own, its
    stdin a pipe for the harness's control lines (`send`), its stdout read line by line by
    a thread that hands each to the subclass's `_parse` (a line it cannot parse, torn by a
    kill, goes to ``problems``). A subclass sets what `_parse` fills before it calls this
    ``__init__``: the reading starts in it."""

    def __init__(self, script: Path, spec: dict[str, Any], stderr: int | IO[str]) -> None:
        import subprocess

        self.problems: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(script), json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
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
    threading.Event set from a signal handler can deadlock). From the main thread."""

    def __init__(self, enders: Collection[str] = ("STOP",)) -> None:
        from zmqmesh import StopFlag

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


def run_node(main: Callable[[], None]) -> None:
    """Run a node script's ``main``; an exception it raises is printed first as an
    ``ERROR <type> <message>`` line (the harness reads stdout: the reason stays visible),
    then raised again."""
    try:
        main()
    except Exception as exc:
        say("ERROR", type(exc).__name__, str(exc).replace("\n", " "))
        raise
