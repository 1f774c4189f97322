"""The Python bytecodes of a sync round trip's critical path, split at the send, on each
side of bench.py's ``req_sync`` (a `Node.request` loop to a ``def`` ``@service`` on a sync
`Node`): repeatable counts (``sys.settrace`` with ``f_trace_opcodes``; Python 3.11).

``--side caller``: this process is the caller (a `Node.request` loop on its main thread,
`provider_cpu.py`'s provider in another process); ``crit`` counts from the reply's
arrival (the blocking receive returned) to the next request's send, ``off`` from that
send to the next blocking receive (what runs while the request travels).

``--side provider``: this process is the provider (the echo service of `provider_cpu.py`;
its inbox thread traced) and another process calls it once every ``--gap-ms`` (so the
provider sleeps between requests, as it does untraced, and serves each as a lone request);
``crit`` counts from the inbox's poll returning to the reply's send, ``off`` from that
send to the next poll.

Printed: each segment's bytecodes per request, then the functions that ran most in it
(``--top``), and with ``--lines`` every line that ran at least half a bytecode a request.

    PYTHONPATH=. python3 benchmarks/rtt_opcodes.py --side caller --n 2000
    PYTHONPATH=. python3 benchmarks/rtt_opcodes.py --side provider --n 1000 --lines
"""

from __future__ import annotations

import argparse
import linecache
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

from _cpu_harness import expect, free_udp_port, say
from provider_cpu import PAYLOAD, SERVICE

# (file, a piece of the line): the lines where a segment begins or ends
_CALLER_START = ("sockets.py", "frames = [frame.buffer if views_from")  # (the blocking receive just returned)
_CALLER_SEND = ("sockets.py", "_send(sock, frames[0], _NOBLOCK, True)")  # (a request in one frame)
_PROVIDER_POLL = ("inbox.py", "found = poller.poll(_IDLE_LOOK_MS)")  # (crit from the line after it)
_PROVIDER_SEND = ("sockets.py", "_send(sock, frames[1], _NOBLOCK, True)")  # (a routed reply's last frame)


class SplitCounter:
    """A trace function that counts the bytecodes run per line, in the segment (``crit`` or
    ``off``) the last marker line began; counted only while `on`."""

    def __init__(self, side: str, only_thread: str | None = None) -> None:
        self.counts: dict[str, Counter[str]] = {"crit": Counter(), "off": Counter()}
        self.on = False
        self._phase = "off"
        self._pending: str | None = None  # (the segment that begins at the next line)
        self._only_thread = only_thread
        self._side = side
        self._marks: dict[tuple[CodeType, int], str | None] = {}

    def _mark(self, code: CodeType, line: int) -> str | None:
        key = (code, line)
        if key not in self._marks:
            text = linecache.getline(code.co_filename, line)
            found = None
            marks = ((_CALLER_START, "start"), (_CALLER_SEND, "send")) if self._side == "caller" else \
                ((_PROVIDER_POLL, "poll"), (_PROVIDER_SEND, "send"))
            for (name, piece), kind in marks:
                if code.co_filename.endswith(name) and piece in text:
                    found = kind
            self._marks[key] = found
        return self._marks[key]

    def trace(self, frame: FrameType, event: str, _arg: Any) -> Callable[..., Any] | None:
        """The trace function (install with `sys.settrace` or `threading.settrace`)."""
        if event == "call":
            if self._only_thread is not None and not threading.current_thread().name.startswith(self._only_thread):
                return None
            frame.f_trace_opcodes = True
        elif event == "line":
            if self._pending is not None:
                self._phase, self._pending = self._pending, None
            mark = self._mark(frame.f_code, frame.f_lineno)
            if mark == "start":
                self._phase = "crit"
            elif mark == "poll":
                self._pending = "crit"  # (a multi-line test after it may report its first line again)
            elif mark == "send":
                self._pending = "off"
        elif event == "opcode" and self.on:
            code = frame.f_code
            self.counts[self._phase][f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}:{frame.f_lineno}"] += 1
        return self.trace

    def report(self, n: int, top: int, lines: bool) -> None:
        """Print each segment's bytecodes per request, its busiest functions and lines."""
        for phase in ("crit", "off"):
            counts = self.counts[phase]
            print(f"{phase}: {sum(counts.values()) / n:.1f} bytecodes a request")
            functions: Counter[str] = Counter()
            for where, count in counts.items():
                functions[where.rsplit(":", 1)[0]] += count
            for name, count in functions.most_common(top):
                print(f"  {count / n:7.1f} {name}")
        if lines:
            for phase in ("crit", "off"):
                print(f"{phase}, by line:")
                for where, count in sorted(self.counts[phase].items()):
                    if count / n >= 0.5:
                        print(f"  {count / n:7.1f} {where}")


def caller_side(args: argparse.Namespace) -> None:
    """This process calls `provider_cpu.py`'s provider, its requests traced."""
    import zmqmesh

    port, mesh = free_udp_port(), f"rttop-{os.getpid()}-{time.monotonic_ns()}"
    here = os.path.dirname(os.path.abspath(__file__))
    provider = subprocess.Popen([sys.executable, os.path.join(here, "provider_cpu.py"), "--role", "provider",
                                 "--beacon-port", str(port), "--mesh", mesh],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    counter = SplitCounter("caller")
    try:
        expect(provider, "ready")
        with zmqmesh.Node("rttop-caller", beacon_port=port, mesh=mesh) as node:
            node.wait_for_service(SERVICE, timeout=60)
            request = node.request
            for i in range(args.warm):
                request(SERVICE, {"id": i, "payload": PAYLOAD}, timeout=20)
            items = [{"id": i, "payload": PAYLOAD} for i in range(args.n)]
            sys.settrace(counter.trace)
            counter.on = True
            for item in items:
                request(SERVICE, item, timeout=20)
            counter.on = False
            sys.settrace(None)
    finally:
        assert provider.stdin is not None
        provider.stdin.close()
        provider.wait(60)
    counter.report(args.n, args.top, args.lines)


def slow_caller(port: int, mesh: str, n: int, warm: int, gap_s: float) -> None:
    """The provider side's caller: says ``warm`` after ``warm`` requests, then on a line
    makes ``n`` more, one every ``gap_s``, says ``done``, and leaves on another line."""
    import zmqmesh

    with zmqmesh.Node("rttop-slow-caller", beacon_port=port, mesh=mesh) as node:
        node.wait_for_service(SERVICE, timeout=60)
        for count, word in ((warm, "warm"), (n, "done")):
            if word == "done":
                sys.stdin.readline()
            for i in range(count):
                node.request(SERVICE, {"id": i, "payload": PAYLOAD}, timeout=30)
                time.sleep(gap_s)
            say(word)
        sys.stdin.readline()


def provider_side(args: argparse.Namespace) -> None:
    """This process provides the echo service, its inbox thread traced."""
    import zmqmesh

    port, mesh = free_udp_port(), f"rttop-{os.getpid()}-{time.monotonic_ns()}"
    counter = SplitCounter("provider", only_thread="zmqmesh-inbox")
    threading.settrace(counter.trace)  # (before the node starts its inbox thread)
    node = zmqmesh.Node("rttop-provider", beacon_port=port, mesh=mesh)

    @node.service(SERVICE)
    def echo(msg: Any) -> Any:
        return msg.data

    with node:
        caller = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--role", "slow_caller",
                                   "--beacon-port", str(port), "--mesh", mesh, "--n", str(args.n),
                                   "--warm", str(args.warm), "--gap-ms", str(args.gap_ms)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert caller.stdin is not None
        try:
            expect(caller, "warm")
            counter.on = True
            caller.stdin.write("go\n")
            caller.stdin.flush()
            expect(caller, "done")
            counter.on = False
        finally:
            caller.stdin.close()
            caller.wait(60)
    threading.settrace(None)  # type: ignore[arg-type]
    counter.report(args.n, args.top, args.lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["caller", "provider"], default="caller")
    parser.add_argument("--role", choices=["orchestrator", "slow_caller"], default="orchestrator")
    parser.add_argument("--beacon-port", type=int, default=0)
    parser.add_argument("--mesh", default="")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--warm", type=int, default=300)
    parser.add_argument("--gap-ms", type=float, default=3.0, help="provider side: the caller's pause between requests")
    parser.add_argument("--top", type=int, default=25, help="the functions that ran most, per segment")
    parser.add_argument("--lines", action="store_true", help="every line that ran, per segment")
    args = parser.parse_args()
    if args.role == "slow_caller":
        slow_caller(args.beacon_port, args.mesh, args.n, args.warm, args.gap_ms / 1000)
    elif args.side == "caller":
        caller_side(args)
    else:
        provider_side(args)


if __name__ == "__main__":
    main()
