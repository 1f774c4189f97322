"""A caller's CPU per request, measured without wall time (a shared machine): the
twin of `provider_cpu.py` for the side that asks.

A sync `Node` with an echo ``@node.service`` (`provider_cpu.provider`) serves an
`AsyncNode` client in another process: ``inflight`` (``--window`` coroutines, each
``await node.request(...)`` in a loop: bench.py's ``req_inflight``), ``amany`` (one
``await node.request_many(...)`` with ``--window`` in flight) or ``single`` (one
coroutine's round trips: ``req_async``). Reported: the client loop thread's user and
system CPU per request and its CPU time (``schedstat``) over ``--n`` requests; or, with
``--client sync``: a sync `Node` client instead, its calling thread measured: ``single``
(a `Node.request` loop: bench.py's ``req_sync``) or ``many`` (one `Node.request_many`
with ``--window`` in flight). With
``--callgrind``, the client runs under ``valgrind --tool=callgrind`` (instructions
collected only while the measured requests run, per thread): the loop thread's
instructions per request. With ``CALLER_CPU_PROFILE=<file>`` set, cProfile's profile of
the measured requests is written there. ``--opcodes`` counts the Python bytecodes run a
request on the loop's thread instead (a trace function: repeatable too); with ``CALLER_CPU_KEEP=<dir>``, callgrind's
dumps are kept there (for ``callgrind_annotate``).

    PYTHONPATH=. python3 benchmarks/caller_cpu.py --mode inflight --n 2000 --callgrind --rounds 3
    PYTHONPATH=. python3 benchmarks/caller_cpu.py --client sync --mode single --n 2000 --callgrind
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from types import FrameType
from typing import Any

from _cpu_harness import (
    callgrind_control,
    end_callgrind_round,
    end_pair,
    expect,
    free_udp_port,
    measure_client,
    print_rounds,
    say,
)
from provider_cpu import PAYLOAD, SERVICE, _inbox_instructions


def _opcode_counter(opcodes: Counter[str]) -> Callable[..., Any]:
    """A trace function (this thread's) that counts the bytecodes run, per function."""

    def trace(frame: FrameType, event: str, _arg: Any) -> Callable[..., Any]:
        if event == "call":
            frame.f_trace_opcodes = True
        elif event == "opcode":
            code = frame.f_code
            opcodes[f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}"] += 1
        return trace

    return trace


def sync_client(beacon_port: int, mesh: str, mode: str, n: int, window: int, warm: int, timeout: float,
                count_opcodes: bool = False) -> None:
    """`client`'s twin for a sync `Node` (``single``: a `Node.request` loop; ``many``: one
    `Node.request_many`), the calling thread (the main one) measured: the same lines."""
    import zmqmesh

    def run(node: zmqmesh.Node, count: int) -> Any:
        items = [{"id": i, "payload": PAYLOAD} for i in range(count)]
        if mode == "many":
            return node.request_many(SERVICE, items, timeout=timeout, window=window)[-1]
        request, last = node.request, None
        for item in items:
            last = request(SERVICE, item, timeout=timeout)
        return last

    with zmqmesh.Node("cpu-client", beacon_port=beacon_port, mesh=mesh) as node:
        node.wait_for_service(SERVICE, timeout=60)
        run(node, warm)
        say(f"warm {os.getpid()} {threading.get_native_id()}")
        sys.stdin.readline()
        opcodes: Counter[str] = Counter()
        if count_opcodes:
            sys.settrace(_opcode_counter(opcodes))
        reply = run(node, n)
        sys.settrace(None)
        assert isinstance(reply, dict) and reply["payload"] == PAYLOAD, reply
        say(f"done {sum(opcodes.values()) / n:.1f}")
        for name, count in opcodes.most_common(int(os.environ.get("CALLER_CPU_OPCODES_TOP", "0"))):
            sys.stderr.write(f"# {count / n:7.1f} {name}\n")
        sys.stdin.readline()


def client(beacon_port: int, mesh: str, mode: str, n: int, window: int, warm: int, timeout: float,
           count_opcodes: bool = False) -> None:
    """Waits for the provider, warms up, says ``warm <pid> <loop tid>``; on a line, runs
    ``n`` requests and says ``done`` (with the Python bytecodes run a request on the loop's
    thread, when ``count_opcodes``); on another, leaves."""
    import zmqmesh

    profile_to = os.environ.get("CALLER_CPU_PROFILE")

    async def run(node: zmqmesh.AsyncNode, count: int) -> Any:
        items = iter([{"id": i, "payload": PAYLOAD} for i in range(count)])
        if mode == "amany":
            return (await node.request_many(SERVICE, list(items), timeout=timeout, window=window))[-1]
        last: list[Any] = [None]
        request = node.request

        async def worker() -> None:
            for item in items:
                last[0] = await request(SERVICE, item, timeout=timeout)

        await asyncio.gather(*(worker() for _ in range(1 if mode == "single" else window)))
        return last[0]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with zmqmesh.AsyncNode("cpu-client", beacon_port=beacon_port, mesh=mesh) as node:
            await node.wait_for_service(SERVICE, timeout=60)
            await run(node, warm)
            say(f"warm {os.getpid()} {threading.get_native_id()}")
            await loop.run_in_executor(None, sys.stdin.readline)
            opcodes: Counter[str] = Counter()
            if count_opcodes:
                sys.settrace(_opcode_counter(opcodes))
            profiler = None
            if profile_to:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            reply = await run(node, n)
            sys.settrace(None)
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(profile_to)
            assert isinstance(reply, dict) and reply["payload"] == PAYLOAD, reply
            say(f"done {sum(opcodes.values()) / n:.1f}")
            for name, count in opcodes.most_common(int(os.environ.get("CALLER_CPU_OPCODES_TOP", "0"))):
                sys.stderr.write(f"# {count / n:7.1f} {name}\n")
            await loop.run_in_executor(None, sys.stdin.readline)

    asyncio.run(main())


def one_round(args: argparse.Namespace) -> dict[str, float]:
    """Start a provider and a client, measure the client's loop over ``args.n`` requests."""
    beacon_port, mesh = free_udp_port(), f"ccpu-{os.getpid()}-{time.monotonic_ns()}"
    here = os.path.dirname(os.path.abspath(__file__))
    out_dir = tempfile.mkdtemp(prefix="caller-cpu-")
    prefix: list[str] = []
    if args.callgrind:
        prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                  f"--callgrind-out-file={out_dir}/cg.out"]
    prov = subprocess.Popen([sys.executable, os.path.join(here, "provider_cpu.py"), "--role", "provider",
                             "--beacon-port", str(beacon_port), "--mesh", mesh],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    cli = None
    try:
        expect(prov, "ready")
        timeout = 120.0 if args.callgrind else 20.0
        cli = subprocess.Popen([*prefix, sys.executable, os.path.abspath(__file__), "--role", "client",
                                "--beacon-port", str(beacon_port), "--mesh", mesh, "--mode", args.mode, "--client", args.client,
                                "--n", str(args.n), "--window", str(args.window), "--warm", str(args.warm),
                                "--timeout", str(timeout), *(["--opcodes"] if args.opcodes else [])],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               stderr=subprocess.DEVNULL if args.callgrind else None)
        _, pid_s, tid_s = expect(cli, "warm")
        pid, tid = int(pid_s), int(tid_s)
        if args.callgrind:
            callgrind_control("-i", "on", pid)
        result, done = measure_client(cli, pid, tid, args.n, args.callgrind)
    finally:
        end_pair(cli, prov)
    if args.callgrind:
        result["instr"] = _inbox_instructions(out_dir) / args.n  # (the busiest thread: the loop's)
    if args.opcodes:
        result["opcodes"] = float(done[1])
    end_callgrind_round(out_dir, "CALLER_CPU_KEEP", args.callgrind)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["orchestrator", "client"], default="orchestrator")
    parser.add_argument("--beacon-port", type=int, default=0)
    parser.add_argument("--mesh", default="")
    parser.add_argument("--mode", choices=["inflight", "amany", "single", "many"], default="inflight",
                        help="async: inflight, amany, single; sync: single, many")
    parser.add_argument("--client", choices=["async", "sync"], default="async",
                        help="the client: an AsyncNode (the default) or a sync Node")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--warm", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--opcodes", action="store_true", help="count the Python bytecodes run a request on the "
                        "client loop's thread (sys.settrace; CALLER_CPU_OPCODES_TOP=k: the k functions that run most)")
    args = parser.parse_args()
    if args.mode not in (("single", "many") if args.client == "sync" else ("inflight", "amany", "single")):
        parser.error(f"--mode {args.mode} is not one of the {args.client} client's")
    if args.role == "client" and args.client == "sync":
        sync_client(args.beacon_port, args.mesh, args.mode, args.n, args.window, args.warm, args.timeout, args.opcodes)
    elif args.role == "client":
        client(args.beacon_port, args.mesh, args.mode, args.n, args.window, args.warm, args.timeout, args.opcodes)
    else:
        print_rounds(args.rounds, one_round, args)


if __name__ == "__main__":
    main()
