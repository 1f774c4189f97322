"""A provider's CPU per request, measured without wall time (a shared machine).

A sync `Node` with an echo ``@node.service`` (the handler runs in place on the inbox
thread) serves a client `Node` in another process: ``sync`` (a `Node.request` loop: the
round trip) or ``many`` (`Node.request_many`, ``--window`` in flight). Reported: the
inbox thread's user and system CPU per request (``/proc/<pid>/task/<tid>/stat``) and its
CPU time (``schedstat``, in ns), per round, over ``--n`` requests; or, with
``--callgrind``, the provider runs under ``valgrind --tool=callgrind`` (instructions
collected only while the measured requests run, per thread): the inbox thread's
instructions per request, repeatable whatever the machine's load; with
``PROVIDER_CPU_KEEP=<dir>``, callgrind's dumps are kept there (for ``callgrind_annotate``). ``--provider
async_provider`` measures an `AsyncNode` with an ``async def`` handler instead (its
loop's thread), ``--provider async_sync_provider`` one with a ``def`` handler (run on its
worker thread: callgrind counts the busiest thread, the loop's). With ``PROVIDER_CPU_PROFILE=<file>`` set, yappi's profile (CPU clock) of
the inbox thread over the measured requests is written there.

    PYTHONPATH=. python3 benchmarks/provider_cpu.py --mode sync --n 20000 --rounds 3
    PYTHONPATH=. python3 benchmarks/provider_cpu.py --mode many --n 2000 --callgrind
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from _cpu_harness import (
    callgrind_control,
    callgrind_counts,
    end_callgrind_round,
    end_pair,
    expect,
    free_udp_port,
    measure_client,
    print_rounds,
    say,
)

SERVICE = "echo"
PAYLOAD = "x" * 45  # {"id": i, "payload": PAYLOAD} packs to 62-64 bytes, as in bench.py


def provider(beacon_port: int, mesh: str) -> None:
    """The echo provider: says ``ready <pid> <inbox tid>``, serves until stdin closes."""
    import zmqmesh

    node = zmqmesh.Node("cpu-provider", beacon_port=beacon_port, mesh=mesh)

    @node.service(SERVICE)
    def echo(msg: Any) -> Any:
        return msg.data

    profile_to = os.environ.get("PROVIDER_CPU_PROFILE")  # (a file: yappi's calls of the inbox thread, from SIGUSR1)
    if profile_to:
        import yappi

        yappi.set_clock_type("cpu")
        signal.signal(signal.SIGUSR1, lambda *_: yappi.start(builtins=True))
    with node:
        inbox = next(t for t in threading.enumerate() if t.name.startswith("zmqmesh-inbox-"))
        say(f"ready {os.getpid()} {inbox.native_id}")
        sys.stdin.read()
        if profile_to:
            yappi.stop()
            thread = next(t for t in yappi.get_thread_stats() if t.name.startswith("ThreadInbox") or t.tid == inbox.ident)
            with open(profile_to, "w") as f:
                yappi.get_func_stats(ctx_id=thread.id).sort("tsub").print_all(
                    out=f, columns={0: ("name", 60), 1: ("ncall", 10), 2: ("tsub", 8), 3: ("ttot", 8)})


def async_provider(beacon_port: int, mesh: str, sync_handler: bool = False) -> None:
    """The echo provider on an `AsyncNode` (an ``async def`` handler, awaited on the loop,
    whose thread owns the sockets: the main thread's CPU is measured; or, ``sync_handler``,
    a ``def`` one, run on the node's worker thread); as `provider`. With
    ``PROVIDER_CPU_PROFILE`` set, cProfile's profile of the loop's thread is written there."""
    import asyncio

    import zmqmesh

    profile_to = os.environ.get("PROVIDER_CPU_PROFILE")
    if profile_to:
        import cProfile

        profiler = cProfile.Profile()
        signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())

    async def main() -> None:
        node = zmqmesh.AsyncNode("cpu-provider", beacon_port=beacon_port, mesh=mesh)

        if sync_handler:
            @node.service(SERVICE)
            def echo(msg: Any) -> Any:
                return msg.data
        else:
            @node.service(SERVICE)
            async def echo(msg: Any) -> Any:
                return msg.data

        async with node:
            say(f"ready {os.getpid()} {threading.main_thread().native_id}")
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
            if profile_to:
                profiler.disable()
                profiler.dump_stats(profile_to)

    asyncio.run(main())


def client(beacon_port: int, mesh: str, mode: str, n: int, window: int, warm: int, timeout: float) -> None:
    """Waits for the provider, warms up, says ``warm``; on a line, runs ``n`` requests
    and says ``done``; on another, leaves."""
    import zmqmesh

    with zmqmesh.Node("cpu-client", beacon_port=beacon_port, mesh=mesh) as node:
        node.wait_for_service(SERVICE, timeout=60)
        for i in range(warm):
            node.request(SERVICE, {"id": i, "payload": PAYLOAD}, timeout=timeout)
        node.request_many(SERVICE, [{"id": i, "payload": PAYLOAD} for i in range(warm)], timeout=timeout,
                          window=window)
        say("warm")
        sys.stdin.readline()
        items = [{"id": i, "payload": PAYLOAD} for i in range(n)]
        if mode == "sync":
            request = node.request
            for item in items:
                reply = request(SERVICE, item, timeout=timeout)
        else:
            reply = node.request_many(SERVICE, items, timeout=timeout, window=window)[-1]
        assert reply == items[-1], reply
        say("done")
        sys.stdin.readline()




def one_round(args: argparse.Namespace) -> dict[str, float]:
    """Start a provider and a client, measure the provider over ``args.n`` requests."""
    beacon_port, mesh = free_udp_port(), f"cpu-{os.getpid()}-{time.monotonic_ns()}"
    me = os.path.abspath(__file__)
    out_dir = tempfile.mkdtemp(prefix="provider-cpu-")
    prefix: list[str] = []
    if args.callgrind:
        prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                  f"--callgrind-out-file={out_dir}/cg.out"]
    prov = subprocess.Popen([*prefix, sys.executable, me, "--role", args.provider, "--beacon-port", str(beacon_port),
                             "--mesh", mesh], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.DEVNULL if args.callgrind else None)
    cli = None
    try:
        _, pid_s, tid_s = expect(prov, "ready")
        pid, tid = int(pid_s), int(tid_s)
        timeout = 120.0 if args.callgrind else 20.0
        cli = subprocess.Popen([sys.executable, me, "--role", "client", "--beacon-port", str(beacon_port),
                                "--mesh", mesh, "--mode", args.mode, "--n", str(args.n), "--window", str(args.window),
                                "--warm", str(args.warm), "--timeout", str(timeout)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        expect(cli, "warm")
        if args.callgrind:
            callgrind_control("-i", "on", pid)  # (instruments from here: the run so far cost no counts)
        if os.environ.get("PROVIDER_CPU_PROFILE"):
            os.kill(pid, signal.SIGUSR1)
            time.sleep(0.2)
        result, _ = measure_client(cli, pid, tid, args.n, args.callgrind)
    finally:
        end_pair(cli, prov)
    if args.callgrind:
        result["instr"] = _inbox_instructions(out_dir) / args.n
    end_callgrind_round(out_dir, "PROVIDER_CPU_KEEP", args.callgrind)
    return result



def _inbox_instructions(out_dir: str) -> int:
    """The instructions callgrind counted on the inbox thread while the requests ran (the
    dump names threads by number: the inbox is the busiest of them)."""
    return max(callgrind_counts(f"{out_dir}/cg.out.1-*").values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["orchestrator", "provider", "async_provider", "async_sync_provider", "client"],
                        default="orchestrator")
    parser.add_argument("--provider", choices=["provider", "async_provider", "async_sync_provider"],
                        default="provider", help="the provider's role: a sync Node (the default), or an "
                        "AsyncNode with an async def handler or a def one")
    parser.add_argument("--beacon-port", type=int, default=0)
    parser.add_argument("--mesh", default="")
    parser.add_argument("--mode", choices=["sync", "many"], default="sync")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--warm", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--callgrind", action="store_true")
    args = parser.parse_args()
    if args.role == "provider":
        provider(args.beacon_port, args.mesh)
    elif args.role in ("async_provider", "async_sync_provider"):
        async_provider(args.beacon_port, args.mesh, sync_handler=args.role == "async_sync_provider")
    elif args.role == "client":
        client(args.beacon_port, args.mesh, args.mode, args.n, args.window, args.warm, args.timeout)
    else:
        print_rounds(args.rounds, one_round, args)


if __name__ == "__main__":
    main()
