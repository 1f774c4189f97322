"""`zmqmesh launch FILE.toml`: start the processes a file names, watch them, stop them all.

The file::

    [mesh]                       # optional: given to every process as ZMQMESH_* variables
    name = "shop"                # and any node option: beacon_port, interface, seeds, ...
    beacon_port = 5670

    [[process]]
    name = "worker"              # output lines are prefixed with [worker-1], [worker-2]
    command = ["python3", "examples/order_processing.py", "worker"]   # or one string
    count = 2                    # optional, default 1
    restart = "on-failure"       # "never" (default), "on-failure" or "always"
    env = { LOG_LEVEL = "info" } # optional: strings, numbers, true/false (given as written)
    cwd = "."                    # optional, relative to the file
    store = "state/worker"       # optional: a durable store per process (state/worker-1, ...)

Each process runs in a process group of its own, and what it starts stays in that group:
Ctrl-C, SIGTERM or SIGHUP (its terminal closed) stops every group (SIGTERM, then SIGKILL
after ``stop_timeout_s``),
and what a process that ended left running in its group is stopped the same way; so is,
on Linux, what it left running outside its group (``setsid()``, a daemon: the launcher
adopts it, `orphans`); should the launcher be killed, a watch process stops them all
(`_launch_watch`, Linux);
after Ctrl-C the launcher exits 130, as every zmqmesh command does; when the reader of
its output goes away (``zmqmesh launch f.toml | head``), it stops them all the same and
exits 141, as a command that SIGPIPE ends (1 when its output fails otherwise, a full
disk, a closed terminal: logged); after SIGTERM or SIGHUP it exits 0 if every process
stopped cleanly (status 0 or 143, or ended by the SIGTERM) and nothing had to be
killed, 1 otherwise (or if one had ended by itself with another status than 0). A stop
is bounded whatever the reader of its output does: a reader that takes nothing loses
the lines queued for it (`_Output`: counted, said on stderr; the launcher's own lines on
stderr are bounded the same way, `_Logged`). Without restarts,
it ends when every process has ended: status 0 if all exited 0. A crashed process that asks for it is restarted, with a growing delay
(from its first step again after a healthy run, `_HEALTHY_RUN_S`);
a restart that cannot start it (its command deleted meanwhile) is said, and tried again
the same way, while the others run on.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from zmqmesh import StopFlag

from ._stopping import SignalStop
from .orphans import MARK, adopt_orphans, children, orphans, reap_ended, reaped
from .pipes import PIPE_CLOSED, write_nowhere

__all__ = ["LaunchError", "ProcessSpec", "load_launch_file", "Launcher"]

log = logging.getLogger("zmqmesh.launch")

_LINE_CHARS = 65536
"""The longest line of a process's output written as one: a longer one (output with no
line end, however long) is written in pieces of this many characters, never held whole."""
_QUEUED_CHARS = 2**20
"""Output the launcher holds for its reader, in characters: past it, while the processes
run, a process's next line waits for room (and the process, its pipe full, for the
line); during a stop it is dropped, counted (`_Output`). The launcher's own lines may
take as much again."""
_WRITE_CHARS = 65536
"""The most output written to the reader at once."""
_RESTARTS = ("never", "on-failure", "always")
_LONGEST_STOP_S = 3600
_LONGEST_FILE = 16 * 2**20
_MOST_PROCESSES = 1000
"""The most processes a launch file may start, counts together: each takes a pipe, a
thread and a child of the launcher (2,000 entries of ``count = 1000``, 100 kB of text,
made 2 M processes to start, 840 MB in memory before the first)."""


def _mesh_keys() -> dict[str, str]:
    from zmqmesh import NodeConfig

    keys = {f: f.upper() for f in NodeConfig.fields() if f != "mesh"}
    return {"name": "MESH", **keys}


_MESH_KEYS = _mesh_keys()


class LaunchError(ValueError):
    """The launch file is missing, unreadable or describes something impossible."""


@dataclass
class ProcessSpec:
    """One process to run (after ``count`` expansion)."""

    name: str
    command: list[str]
    restart: str = "never"
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "."


def _is_directory(path: Path) -> bool:
    """Whether ``path`` names a directory; False, not `OSError`, for one the system cannot
    look at (a name too long, a directory on the way not searchable)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _is_scalar(value: object) -> bool:
    """Whether a launch file's value can be an environment variable's: a string, a number,
    true or false (not a table, a list, a date or a time)."""
    return isinstance(value, (str, int, float, bool))


def _is_env_name(name: str) -> bool:
    """Whether ``name`` can name an environment variable: not empty, and holding neither
    ``=`` (where the name ends) nor NUL (where the entry ends)."""
    return bool(name) and "=" not in name and "\0" not in name


def _env_text(value: str | float | bool) -> str:
    """A launch file's value as an environment variable holds it: true and false as the
    file writes them (not Python's ``True``), a number in decimal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load_launch_file(path: str | Path) -> tuple[list[ProcessSpec], float]:
    """Parse and check a launch file; returns the processes and the stop timeout.

    Raises `LaunchError` with a one-line reason.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            text = file.read(_LONGEST_FILE + 1)
        if len(text) > _LONGEST_FILE:  # (/dev/zero, say: read whole, it would fill the memory)
            raise LaunchError(f"{path}: longer than {_LONGEST_FILE // 2**20} MiB: not a launch file")
        data = tomllib.loads(text.decode())
    except FileNotFoundError:
        raise LaunchError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LaunchError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise LaunchError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # (tomllib reads a nested array or table by recursion: 1,000 levels, a 2 kB file)
        raise LaunchError(f"{path}: nested too deeply: not a launch file") from None
    unknown = set(data) - {"mesh", "process", "stop_timeout_s"}
    if unknown:  # (a misspelt stop_timeout_s, or [[processes]], would be taken as absent)
        raise LaunchError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (known: mesh, process, stop_timeout_s)")
    mesh = data.get("mesh", {})
    if not isinstance(mesh, dict):
        raise LaunchError(f"{path}: [mesh] must be a table")
    base_env: dict[str, str] = {}
    for key, value in mesh.items():
        if key == "store":
            raise LaunchError(f"{path}: a store serves one node: give 'store' per [[process]], not in [mesh]")
        if key not in _MESH_KEYS:
            raise LaunchError(f"{path}: unknown key mesh.{key} (known: name and every node option)")
        if not (_is_scalar(value) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise LaunchError(f"{path}: mesh.{key} must be a string, a number, true or false, or a list of strings")
        value_text = ",".join(value) if isinstance(value, list) else _env_text(value)
        if "\0" in value_text:  # (else refused only as the processes start, naming no file)
            raise LaunchError(f"{path}: mesh.{key} holds a NUL character, which no environment variable can")
        base_env[f"ZMQMESH_{_MESH_KEYS[key]}"] = value_text
    entries = data.get("process")
    if not isinstance(entries, list) or not entries:
        raise LaunchError(f"{path}: no [[process]] entries")
    specs: list[ProcessSpec] = []
    for i, entry in enumerate(entries):
        where = f"{path}: process #{i + 1}"
        if not isinstance(entry, dict):
            raise LaunchError(f"{where}: must be a table")
        unknown = set(entry) - {"name", "command", "count", "restart", "env", "cwd", "store"}
        if unknown:
            raise LaunchError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        name = entry.get("name")
        command = entry.get("command")
        if not isinstance(name, str) or not name:
            raise LaunchError(f"{where}: 'name' must be a non-empty string")
        if not name.isprintable():  # (it prefixes every line of the output: an escape there drives the terminal)
            raise LaunchError(f"{where}: 'name' {name!r} holds a character that is not printable (a control one: "
                              "an escape, a newline; or one not seen: a format character, a space other than ' ')")
        if isinstance(command, str):
            try:
                command = shlex.split(command)
            except ValueError as exc:  # (a quote not closed, a lone backslash at the end)
                raise LaunchError(f"{where} ({name}): 'command' cannot be split as a shell would: {exc}") from None
        if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
            raise LaunchError(f"{where} ({name}): 'command' must be a string or a list of strings")
        if any("\0" in c for c in command):
            raise LaunchError(f"{where} ({name}): 'command' holds a NUL character, which no program argument can")
        count = entry.get("count", 1)
        restart = entry.get("restart", "never")
        env = entry.get("env", {})
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= _MOST_PROCESSES:
            raise LaunchError(f"{where} ({name}): 'count' must be an integer 1..{_MOST_PROCESSES}")
        if len(specs) + count > _MOST_PROCESSES:  # (checked before any is made: the file may name millions)
            raise LaunchError(f"{where} ({name}): more than {_MOST_PROCESSES} processes in all")
        if restart not in _RESTARTS:
            raise LaunchError(f"{where} ({name}): 'restart' must be one of {', '.join(_RESTARTS)}")
        if not isinstance(env, dict) or not all(_is_scalar(v) for v in env.values()):
            raise LaunchError(f"{where} ({name}): 'env' must be a table of strings, numbers, true or false")
        if (bad := next((k for k in env if not _is_env_name(k)), None)) is not None:
            raise LaunchError(f"{where} ({name}): 'env' name {bad!r} cannot name an environment variable"
                              " (empty, or holding '=' or NUL)")
        env_text = {k: _env_text(v) for k, v in env.items()}
        if (bad := next((k for k, v in env_text.items() if "\0" in v), None)) is not None:
            raise LaunchError(f"{where} ({name}): 'env' value of {bad!r} holds a NUL character, which no environment"
                              " variable can")
        cwd = entry.get("cwd", ".")
        if not isinstance(cwd, str) or "\0" in cwd or not _is_directory(path.parent / cwd):
            raise LaunchError(f"{where} ({name}): 'cwd' must name a directory, got {cwd!r}")
        cwd = str((path.parent / cwd).resolve())
        store = entry.get("store")
        if store is not None and (not isinstance(store, str) or not store or "\0" in store):
            raise LaunchError(f"{where} ({name}): 'store' must be a directory name")
        for k in range(count):
            stored: dict[str, str] = {}
            if store is not None:  # one store per process: each of count gets its own
                directory = path.parent / (store if count == 1 else f"{store}-{k + 1}")
                stored = {"ZMQMESH_STORE": str(directory.resolve())}
            specs.append(
                ProcessSpec(
                    name=name if count == 1 else f"{name}-{k + 1}",
                    command=[sys.executable if c in ("python", "python3") and j == 0 else c for j, c in enumerate(command)],
                    restart=restart,
                    env={**base_env, **stored, **env_text},
                    cwd=cwd,
                )
            )
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise LaunchError(f"{path}: process names must be unique")
    timeout = data.get("stop_timeout_s", 10.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= _LONGEST_STOP_S:
        # (inf or nan: a process that ignores SIGTERM would hold Ctrl-C up for ever)
        raise LaunchError(f"{path}: stop_timeout_s must be a number of seconds, more than 0, at most {_LONGEST_STOP_S}")
    return specs, float(timeout)


class _Output:
    """The launcher's output, written by a thread of its own, so that a reader that takes
    nothing (a full pipe nobody reads, a stopped terminal) holds up neither the launcher
    nor its stop: lines wait in a queue of `_QUEUED_CHARS` at most. While the processes
    run, a process's line waits for room in it (`put` with ``wait``); once `hurry` is
    called (a stop), no line waits and one with no room is dropped, counted; `close`
    waits for what is still queued while the reader takes some (for a bounded time at
    most, after a stop) and counts what is left. ``on_gone`` is
    called, from the writing thread, when the output's reader went away or it cannot be
    written (then `gone`, and `failed` but for a reader gone): nothing is written from
    then on, and nothing counted."""

    def __init__(self, out: TextIO | None, on_gone: Callable[[], None]) -> None:
        self.out = out
        self.gone = False
        self.failed: OSError | None = None
        self.dropped = 0
        self._on_gone = on_gone
        self._lines: deque[str] = deque()
        self._chars = 0  # (queued, with those being written)
        self._writing = 0  # (lines taken from the queue and not yet written)
        self._hurry = False
        self._closed = False
        self._written = 0  # (batches written so far: whether the reader takes any)
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._write_all, name="zmqmesh-launch-output", daemon=True)

    def start(self) -> None:
        """Start writing (what was put before is written first)."""
        self._thread.start()

    def put(self, text: str, wait: bool) -> None:
        """Queue ``text`` to be written; with ``wait`` (a process's line), wait for room
        until `hurry`. Without room, the line is dropped and counted. Raises nothing."""
        with self._ready:
            room = _QUEUED_CHARS if wait else 2 * _QUEUED_CHARS
            while wait and not (self._hurry or self.gone) and self._chars >= room:
                self._ready.wait()
            if self.gone:
                return
            if self._closed or self._chars >= room:
                self.dropped += 1
                return
            self._lines.append(text)
            self._chars += len(text)
            self._ready.notify_all()

    def hurry(self) -> None:
        """A stop has begun: no line waits for room from now on."""
        with self._ready:
            self._hurry = True
            self._ready.notify_all()

    def close(self, stalled_s: float, most_s: float | None = None) -> int:
        """Wait for what is queued to be written, while its reader takes some at least
        every ``stalled_s`` seconds (and for ``most_s`` at most), then write nothing more;
        how many lines were not written (dropped, or left). Idempotent: 0 after the first."""
        with self._ready:
            if self._closed:
                return 0
            self._hurry = True
            self._ready.notify_all()
            if self._thread.is_alive():
                self._wait_written(stalled_s, most_s)
            self._closed = True
            lost = 0 if self.gone else self.dropped + len(self._lines) + self._writing
            self._lines.clear()
            self._ready.notify_all()
            return lost

    def written_while_taken(self, stalled_s: float, running: Callable[[], bool]) -> None:
        """Wait while ``running()`` (checked every 0.1 s: those who put lines still run)
        and the reader takes some of the output at least every ``stalled_s`` seconds."""
        with self._ready:
            seen, since = self._written, time.monotonic()
            while running() and not self.gone:
                self._ready.wait(0.1)
                if self._written != seen:  # (not an empty queue: a pump held open, by what escaped, puts nothing)
                    seen, since = self._written, time.monotonic()
                elif time.monotonic() - since >= stalled_s:
                    return

    def _wait_written(self, stalled_s: float, most_s: float | None) -> None:
        end = None if most_s is None else time.monotonic() + most_s

        def done() -> bool:
            return self.gone or not (self._lines or self._writing)

        while not done():
            seen = self._written
            wait = stalled_s if end is None else min(stalled_s, end - time.monotonic())
            if wait <= 0 or not self._ready.wait_for(lambda: done() or self._written != seen, wait):  # noqa: B023
                return  # (its reader took nothing for ``stalled_s``, or the time is up)

    def _write_all(self) -> None:
        out = self.out
        if out is None:  # (sys.stdout of a command started with its standard output closed)
            self._fail(OSError(errno.EBADF, "no standard output"))
            return
        try:
            out.flush()  # (what was written to it before, first)
            fd: int | None = out.fileno()
        except (OSError, ValueError):  # (an ``out`` without a file of its own: written to as it is)
            fd = None
        encoding = getattr(out, "encoding", None) or "utf-8"
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._lines or self._closed)
                if not self._lines:
                    return
                batch = [self._lines.popleft()]
                size = len(batch[0])
                while self._lines and size + len(self._lines[0]) <= _WRITE_CHARS:
                    batch.append(self._lines.popleft())
                    size += len(batch[-1])
                self._writing = len(batch)
            text = "".join(batch)
            try:
                if fd is None:
                    out.write(text)
                    out.flush()
                else:  # (not through ``out``'s buffer: its lock, held in a write that never ends, would stall the exit)
                    data = memoryview(text.encode(encoding, "backslashreplace"))
                    while data:
                        data = data[os.write(fd, data):]
            except OSError as exc:
                self._fail(exc)
                return
            with self._ready:
                self._writing = 0
                self._chars -= size
                self._written += 1
                self._ready.notify_all()

    def _fail(self, exc: OSError) -> None:
        """The output's reader went away (`BrokenPipeError`), or it cannot be written."""
        with self._ready:
            self.gone = True
            if not isinstance(exc, BrokenPipeError):
                self.failed = exc
            self._lines.clear()
            self._writing = 0
            self._ready.notify_all()
        if self.out is not None:
            write_nowhere(self.out)
        self._on_gone()


class _Logged(logging.Handler):
    """The launcher's log records (`log`), formatted as the handler they would reach
    otherwise formats them, and queued on an `_Output` of their own for its stderr: a
    stderr nobody reads (or the output's own full pipe, ``2>&1``) holds up no stop."""

    def __init__(self, output: _Output, formatter: logging.Formatter | None) -> None:
        super().__init__()
        self.output = output
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.output.put(self.format(record) + "\n", wait=False)
        except Exception:  # (as every handler: a record that cannot be formatted)
            self.handleError(record)


class Launcher:
    """Runs the processes of a launch file and multiplexes their output."""

    def __init__(self, specs: list[ProcessSpec], stop_timeout_s: float = 10.0, out: TextIO = sys.stdout,
                 *, whole_program: bool = False) -> None:
        self.specs = specs
        self.whole_program = whole_program
        """The launcher is all its process runs (the ``zmqmesh launch`` command): every other
        child of the process is an orphan it adopted, whose status it collects once it ended,
        seen alive or not (`reap_ended`). Otherwise the children of the program around it are
        left alone, and an adopted orphan that ended before it was seen stays a zombie until
        the program exits."""
        self.stop_timeout_s = stop_timeout_s
        self.out = out
        self._output = _Output(out, self._stopping_for_output)
        # (its own lines, `_Logged`, when the process's stderr is its own: `whole_program`)
        self._errors = _Output(sys.stderr, lambda: None)
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.restarts: dict[str, int] = {s.name: 0 for s in specs}
        # (crashes and failed starts since a run of `_HEALTHY_RUN_S`: the restart delay's step)
        self._quick_ends: dict[str, int] = {s.name: 0 for s in specs}
        self._started: dict[str, float] = {}  # (when each process last started: monotonic)
        self._place = {s.name: i for i, s in enumerate(specs)}  # (a process's place in the file: `_tag`)
        self._stopping = StopFlag()  # (raised by a signal handler: no threading.Event, see StopFlag)
        self._width = max(len(s.name) for s in specs)
        self.killed = 0  # (processes SIGKILLed because they did not stop in time: groups, or pids outside them)
        # process groups whose leader ended while others of the group ran on (what it
        # started): group id -> (name, when to SIGKILL them if they are still there)
        self._leftovers: dict[int, tuple[str, float]] = {}
        # what left its group, adopted once the process that started it ended: pid -> when
        # to SIGKILL it if it is still there (see `orphans`; found by the mark its
        # environment carries from this launcher's processes)
        self._orphans: dict[int, float] = {}
        self._mark = f"{os.getpid()}.{secrets.token_hex(8)}"
        self._pumps: dict[str, threading.Thread] = {}  # (each process's output reader)
        self._watch: subprocess.Popen[bytes] | None = None  # (what stops them should the launcher be killed)

    @property
    def out_gone(self) -> bool:
        """Whether the reader of the output went away, or it could not be written (then
        nothing more is written, and every process stops)."""
        return self._output.gone

    @property
    def out_failed(self) -> OSError | None:
        """Why the output could not be written (a full disk, a closed terminal), if it could not."""
        return self._output.failed

    def _stopping_for_output(self) -> None:
        self._stopping.set()

    def say(self, name: str, line: str, *, wait: bool = False) -> None:
        """Write one line prefixed with the process name, by the thread that writes the
        output: a process's lines (``wait``) wait for room while the processes run; none
        waits during a stop, and one with no room is dropped, counted (`_Output`). When
        the reader of the output has gone, or the output cannot be written (a full disk,
        a terminal closed), nothing more is written and everything stops (children
        still have their output read, so that none blocks on a full pipe meanwhile)."""
        self._output.put(f"[{name:<{self._width}}] {line}\n", wait)

    def _tag(self, name: str) -> str:
        """Which start of which process the mark of what it starts ends with (``MARK=mark/tag``):
        its place in the file, and its restarts so far."""
        return f"{self._place[name]}.{self.restarts[name]}"

    def _start(self, spec: ProcessSpec) -> str | None:
        """Start one process and the thread copying its output; None, or why it could not
        be started (its command or its ``cwd`` gone, its environment refused)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env, MARK: f"{self._mark}/{self._tag(spec.name)}"}
        try:
            proc = subprocess.Popen(
                spec.command, cwd=spec.cwd, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="backslashreplace",
                start_new_session=True,
            )
        except OSError as exc:
            return f"cannot start {spec.command[0]!r}: {exc.strerror or exc}"
        except ValueError as exc:  # (a NUL in its command or environment, an environment name with '=')
            return f"cannot start {spec.command[0]!r}: {exc}"
        self.procs[spec.name] = proc
        self._started[spec.name] = time.monotonic()
        self.say(spec.name, f"started (pid {proc.pid})")  # (before its first line: said before it is read)
        self._pumps[spec.name] = pump = threading.Thread(target=self._pump, args=(spec.name, proc), daemon=True)
        pump.start()
        return None

    def _pump(self, name: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        while line := proc.stdout.readline(_LINE_CHARS):
            self.say(name, line.rstrip("\n"), wait=True)
        proc.stdout.close()

    def run(self) -> int:
        """Start everything and supervise until all ended or a stop is asked; returns the exit status."""
        signalled = SignalStop(self._stopping).take()
        adopting = adopt_orphans()
        status = 0
        self._output.start()
        propagates = log.propagate
        logged = self._log_on_stderr() if self.whole_program else None
        try:
            self._watch = _start_watch(f"{MARK}={self._mark}/", self.stop_timeout_s)
            for spec in self.specs:
                if self._stopping.is_set():  # (Ctrl-C while a thousand start: none more)
                    break
                if (failed := self._start(spec)) is not None:  # (the file names a command that cannot start)
                    raise LaunchError(f"{spec.name}: {failed}")
            by_name = {s.name: s for s in self.specs}
            pending_restart: dict[str, float] = {}
            draining: dict[str, float] = {}  # (ended; their last lines still being read: since when)
            while not self._stopping.is_set():
                now = time.monotonic()
                for name, proc in list(self.procs.items()):
                    code = proc.poll()
                    if code is None or name in pending_restart:
                        continue
                    if name not in draining:
                        draining[name] = now
                        self._stop_leftovers(name, proc, now)
                    # its output to the end first (what it left running may hold the pipe, until killed)
                    if self._pumps[name].is_alive() and now < draining[name] + self.stop_timeout_s + 1.0:
                        continue
                    ended = draining.pop(name)
                    spec = by_name[name]
                    if _wants_restart(spec.restart, code):
                        self.restarts[name] += 1
                        healthy = ended - self._started[name] >= _HEALTHY_RUN_S
                        self._quick_ends[name] = 1 if healthy else self._quick_ends[name] + 1
                        delay = _restart_delay(self._quick_ends[name])
                        self.say(name, f"exited with status {code}; restarting in {delay:g} s")
                        pending_restart[name] = now + delay
                    else:
                        self.say(name, f"exited with status {code}")
                        del self.procs[name]
                        if code != 0:
                            status = 1
                for name, when in list(pending_restart.items()):
                    if now >= when:
                        del pending_restart[name]
                        # one that cannot start again (its command deleted, its cwd gone) is a
                        # failed start: tried again as a crash would be, while the others run on
                        if (failed := self._start(by_name[name])) is not None:
                            self.restarts[name] += 1
                            self._quick_ends[name] += 1
                            delay = _restart_delay(self._quick_ends[name])
                            self.say(name, f"{failed}; trying again in {delay:g} s")
                            pending_restart[name] = now + delay
                self._sweep_leftovers(now)
                self._sweep_orphans(now, now + self.stop_timeout_s)
                if not self.procs and not self._leftovers and not self._orphans:
                    self._finish_output(stopping=False)
                    return status
                self._stopping.wait(0.1)
            self._output.hurry()  # (a stop is bounded, whatever the output's reader does)
            for name, proc in self.procs.items():  # ended by themselves, not told yet (or their last lines being read)
                code = proc.poll()
                if code is not None and name not in pending_restart:
                    self.say(name, f"exited with status {code}")
                    if code != 0 and not _wants_restart(by_name[name].restart, code):
                        status = 1
            clean = self._stop_all()
            self._finish_output()
            if signalled.interrupted:  # Ctrl-C: as every command
                return 130
            if self.out_failed is not None:
                log.error("cannot write the output (%s): every process stopped", self.out_failed.strerror)
                return 1
            if self.out_gone:
                return PIPE_CLOSED
            return status if clean else 1
        finally:
            self._stop_all()
            _end_watch(self._watch)
            self._finish_output()
            if adopting:
                adopt_orphans(False)
            signalled.give_back()
            if logged is not None:
                log.removeHandler(logged)
                log.propagate = propagates
                stalled_s = max(self.stop_timeout_s, 1.0)
                self._errors.close(stalled_s, stalled_s)  # (what its reader did not take: lost, with nobody to tell)

    def _log_on_stderr(self) -> _Logged:
        """Write what the launcher logs to stderr by a thread of its own (`_Logged`), in the
        format of the handler it would reach otherwise, until `run` ends."""
        handlers = [h for logger in (log, logging.getLogger("zmqmesh"), logging.getLogger()) for h in logger.handlers]
        logged = _Logged(self._errors, next((h.formatter for h in handlers), None))
        self._errors.start()
        log.addHandler(logged)
        log.propagate = False
        return logged

    def _finish_output(self, stopping: bool = True) -> None:
        """Write what is left of the output while its reader takes some at least every
        ``stop_timeout_s`` (1 s at least): after a stop, for that long at most; when every
        process ended by itself, all of it, each process's last lines too. Then say on
        stderr how many lines its reader did not take (dropped during a stop, or left)."""
        stalled_s = max(self.stop_timeout_s, 1.0)
        if not stopping:  # (a process's last lines may wait for room still)
            self._output.written_while_taken(stalled_s, lambda: any(p.is_alive() for p in self._pumps.values()))
        lost = self._output.close(stalled_s, None if not stopping else stalled_s)
        if lost:
            log.error("%d line%s of output not written: its reader did not take %s in time",
                      lost, "" if lost == 1 else "s", "it" if lost == 1 else "them")

    def _stop_leftovers(self, name: str, proc: subprocess.Popen[str], now: float) -> None:
        """``proc`` ended: SIGTERM what it left running in its group (its number stays
        that group's while any of it runs), and SIGKILL it ``stop_timeout_s`` later."""
        if _signal_group(proc.pid, signal.SIGTERM):
            self._leftovers[proc.pid] = (name, now + self.stop_timeout_s)

    def _sweep_leftovers(self, now: float) -> None:
        for group, (name, kill_at) in list(self._leftovers.items()):
            if not _group_alive(group):
                del self._leftovers[group]
            elif now >= kill_at:
                del self._leftovers[group]
                if _signal_group(group, signal.SIGKILL):
                    self.say(name, _LEFT_KILLED)
                    self.killed += 1

    def _sweep_orphans(self, now: float, kill_at: float, every: bool = False) -> None:
        """SIGTERM what a process left running outside its group, adopted by this launcher,
        once that process has ended (or at once, ``every``: a stop), and SIGKILL it at
        ``kill_at`` (a stop's deadline, or ``stop_timeout_s`` later); collect the status of
        those that ended. (What a process daemonized, its intermediate ended, runs on while
        that process runs, as it did before it was adopted. One that ended before it was
        ever seen has no mark left to read: collected here only when the launcher is the
        whole program, `whole_program`.)"""
        # (what one left outside its group waits for its end)
        running = {self._tag(name) for name, proc in self.procs.items() if proc.poll() is None}
        own = {proc.pid for proc in self.procs.values()} | ({self._watch.pid} if self._watch else set())
        adopted = children()
        for pid, tag in orphans(self._mark, own, adopted).items():
            if pid not in self._orphans and (every or tag not in running) and _signal(pid, signal.SIGTERM):
                self._orphans[pid] = kill_at
                self.say("launcher", f"stopping pid {pid}: a process that ended left it running outside its group")
        for pid, when in list(self._orphans.items()):
            if reaped(pid):
                del self._orphans[pid]
            elif now >= when:
                self._orphans[pid] = float("inf")  # (SIGKILLed once: collected when it has ended)
                if _signal(pid, signal.SIGKILL):
                    self.say("launcher", f"killed pid {pid}: it did not stop in time")
                    self.killed += 1
        if self.whole_program:  # (not those tracked: each stays a zombie, its number held, until the look above forgets it)
            reap_ended(own | self._orphans.keys(), adopted)

    def _stop_all(self) -> bool:
        """Stop every process and what they left running; True if each stopped cleanly
        (exit status 0, or ended by the SIGTERM sent) and nothing had to be killed."""
        clean, killed = True, self.killed
        live = {n: p for n, p in self.procs.items() if p.poll() is None}
        groups = {p.pid: n for n, p in live.items()} | {g: n for g, (n, _) in self._leftovers.items()}
        self._leftovers.clear()
        for name in live:
            self.say(name, "stopping")
        for group in groups:
            _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for name, proc in live.items():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
                self.say(name, _ended(proc.returncode))
                clean = clean and proc.returncode in _STOPPED_CLEANLY
            except subprocess.TimeoutExpired:
                pass
        # what the processes started, in their groups or left outside them: it stops by the
        # same deadline
        while True:
            self._sweep_orphans(time.monotonic(), deadline, every=True)
            if time.monotonic() >= deadline or not (self._orphans or any(_group_alive(g) for g in groups)):
                break
            time.sleep(0.05)
        for group, name in groups.items():  # (each group killed once, whatever of it is left)
            leader = live.get(name)
            stuck = leader is not None and leader.pid == group and leader.poll() is None
            if _signal_group(group, signal.SIGKILL):
                self.say(name, "killed: it did not stop in time" if stuck else _LEFT_KILLED)
                self.killed += 1
            if stuck:
                try:
                    leader.wait(5)  # type: ignore[union-attr]
                except subprocess.TimeoutExpired:  # (stuck in the kernel: nothing more to do)
                    pass
        # what those left outside their groups as they were killed: killed now too
        ends = time.monotonic() + 1.0
        while True:
            now = time.monotonic()
            self._sweep_orphans(now, now, every=True)
            if not self._orphans or now >= ends:
                break
            time.sleep(0.02)
        # the last lines of each (its pipe closed now: they are all there, to be written)
        for pump in self._pumps.values():
            pump.join(max(0.0, deadline - time.monotonic()) + 5.0)
        self._pumps.clear()
        self.procs.clear()
        return clean and self.killed == killed


_LEFT_KILLED = "killed what it left running: it did not stop in time"


def _start_watch(token: str, stop_timeout_s: float) -> subprocess.Popen[bytes] | None:
    """Start the process that stops what carries ``token`` should the launcher be killed
    (`_launch_watch`; Linux only, where ``/proc`` shows each process's environment):
    started, not forked from a process that runs threads, and in a session of its own, so
    that no signal to the launcher's group reaches it. None where it cannot run."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return subprocess.Popen([sys.executable, "-I", str(Path(__file__).with_name("_launch_watch.py")), token,
                                 repr(stop_timeout_s)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError as exc:
        log.error("cannot start the watch that stops the processes should the launcher be killed: %s", exc)
        return None


def _end_watch(watch: subprocess.Popen[bytes] | None) -> None:
    """Tell the watch the launcher stopped its processes itself, and collect it."""
    if watch is None or watch.returncode is not None:
        return
    try:
        assert watch.stdin is not None
        watch.stdin.write(b"done\n")
        watch.stdin.close()
        watch.wait(5)
    except (OSError, subprocess.TimeoutExpired):  # (it ended, or hangs: nothing of ours runs by now)
        watch.kill()
        watch.wait()


def _restart_delay(quick_ends: int) -> float:
    """Seconds before the start after ``quick_ends`` crashes or failed starts in a row (since
    a run of `_HEALTHY_RUN_S` at least): 0.5, doubling, `_LONGEST_RESTART_DELAY_S` at most."""
    return min(0.5 * 2.0 ** min(quick_ends - 1, 5), _LONGEST_RESTART_DELAY_S)


_LONGEST_RESTART_DELAY_S = 10.0
_HEALTHY_RUN_S = _LONGEST_RESTART_DELAY_S
"""How long a process must have run, when it ends, for its restart to wait the first delay
(0.5 s) again, its crashes before forgotten (one that crashes once a day is not held up
for the longest delay). As long as the longest delay: a process that ends after such runs
is restarted no more often than one that ends at once and waits the longest delay."""


def _wants_restart(restart: str, code: int) -> bool:
    """Whether a process that ended by itself with status ``code`` is to be started again,
    by its ``restart`` setting (``always``, ``on-failure``, ``never``); one that is not,
    with another status than 0, makes the launcher's status 1."""
    return restart == "always" or (restart == "on-failure" and code != 0)


_STOPPED_CLEANLY = (0, -signal.SIGTERM, 128 + signal.SIGTERM)
"""How a process told to stop may end for a clean stop: status 0, the SIGTERM sent, or
status 143 (128 + SIGTERM, as a shell or a JVM reports it)."""


def _signal_group(group: int, sig: int) -> bool:
    """Send ``sig`` to a process group; whether it had anyone to send it to."""
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):  # (gone; or the number another user's now)
        return False
    return True


def _signal(pid: int, sig: int) -> bool:
    """Send ``sig`` to one process; whether it was there to take it."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _group_alive(group: int) -> bool:
    """Whether anyone of a process group still runs."""
    return _signal_group(group, 0)


def _ended(code: int) -> str:
    """How a stopped process ended, in words."""
    if code == 0:
        return "stopped cleanly"
    if code < 0:
        try:
            return f"stopped by {signal.Signals(-code).name}"
        except ValueError:
            return f"stopped by signal {-code}"
    return f"stopped with status {code}"


def launch(path: str, out: TextIO = sys.stdout) -> int:
    """Run a launch file; returns the exit status. Raises `LaunchError`."""
    specs, timeout = load_launch_file(path)
    return Launcher(specs, timeout, out, whole_program=True).run()
