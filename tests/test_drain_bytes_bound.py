"""A receiving node takes from ZeroMQ's pipes only so many bytes before its handlers run:
an `AsyncNode` that falls behind a pusher of large messages stays within the pipe's
bound and a few messages more."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import zmqmesh

MIB = 1 << 20

_PULLER = textwrap.dedent("""
    import asyncio, json, os, sys
    import zmqmesh

    def resident_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // (1 << 20)

    async def main(options, count):
        seen = {"count": 0, "peak": 0}
        done = asyncio.Event()

        async def handle(message):
            seen["count"] += 1
            if seen["count"] == 1:
                await asyncio.sleep(2)  # (behind: the pusher fills the pipe meanwhile)
            seen["peak"] = max(seen["peak"], resident_mib())
            if seen["count"] == count:
                done.set()

        node = zmqmesh.AsyncNode("slow-puller", **options)
        node.pull("large", handle)
        async with node:
            print(json.dumps({"ready": True, "base": resident_mib()}), flush=True)
            await asyncio.wait_for(done.wait(), 60)
            print(json.dumps({"peak": seen["peak"]}), flush=True)

    asyncio.run(main(json.loads(sys.argv[1]), int(sys.argv[2])))
""")


@pytest.mark.timeout(90)
def test_an_async_puller_behind_a_pusher_of_large_messages_holds_few_beyond_its_pipe(mesh: dict[str, Any]) -> None:
    """An `AsyncNode` took up to 256 frames at a time out of its PULL socket before
    their handlers ran, and each one taken let ZeroMQ read one more into the pipe: behind a
    pusher of 1 MiB messages it grew by 291 MiB, where the pipe (``queue_hwm`` 50) holds
    50 MiB. It now takes 4 MiB at a time, and grows by 54 MiB."""
    count = 400
    options = {**mesh, "queue_hwm": 50}
    puller = subprocess.Popen([sys.executable, "-c", _PULLER, json.dumps(options), str(count)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert puller.stdout is not None
        base = json.loads(puller.stdout.readline())["base"]
        payload = os.urandom(MIB)
        with zmqmesh.Node("pusher", **options) as node:
            node.wait_for_pullers("large", timeout=15)
            for _ in range(count):
                node.push("large", payload, timeout=30)
            peak = json.loads(puller.stdout.readline())["peak"]
        assert puller.wait(timeout=20) == 0
        assert peak - base < 160, f"the puller grew by {peak - base} MiB"
    finally:
        if puller.poll() is None:
            puller.kill()
            puller.wait()


@contextlib.contextmanager
def _zero_copy_pull(mesh: dict[str, Any]) -> Iterator[tuple[list[weakref.ref[Any]], Callable[[bytes], None]]]:
    """A puller of "q" (``zero_copy``) and a pusher: yields weak references to the
    `zmq.Frame` of each payload handled as a view, and how to push a payload and wait
    until it is handled."""
    from helpers import wait_until

    frames: list[weakref.ref[Any]] = []
    handled: list[Any] = []

    def take(message: Any) -> None:
        if isinstance(message.data, memoryview):
            frames.append(weakref.ref(message.data.obj))  # (the zmq.Frame the view shows)
        handled.append(len(message.data))

    puller = zmqmesh.Node("puller", **mesh)
    puller.pull("q", take, zero_copy=True)
    with puller, zmqmesh.Node("pusher", **mesh) as node:
        node.wait_for_pullers("q", timeout=10)

        def push_and_wait(payload: bytes) -> None:
            count = len(handled)
            node.push("q", payload)
            wait_until(lambda: len(handled) > count, 10, "the message to be handled")

        yield frames, push_and_wait


@pytest.mark.timeout(60)
def test_the_four_newest_large_frames_are_held_until_newer_ones_come_and_no_longer(mesh: dict[str, Any]) -> None:
    """The four newest payloads that came as views of ZeroMQ's buffers stay alive after
    their handlers until newer such payloads push them out (then they go): freed at once
    with those before them, they let glibc give the top of ZeroMQ's I/O thread's heap back
    to the system and the next buffers were faulted in afresh (pulling 1 MiB payloads,
    benchmarks/push_cpu.py: 52 page faults a message holding none, 39 holding the newest
    alone, about a quarter fewer again holding the four newest)."""
    large, small = os.urandom(MIB), b"x" * 64
    with _zero_copy_pull(mesh) as (frames, push_and_wait):
        for _ in range(4):
            push_and_wait(large)
            push_and_wait(small)  # (handled in a drain after the large one's: its call is gone)
            push_and_wait(small)
        gc.collect()
        assert all(frame() is not None for frame in frames), "one of the four newest large frames was let go"
        push_and_wait(large)
        push_and_wait(small)
        push_and_wait(small)
        gc.collect()
        assert frames[0]() is None, "the large frame before the four newest is still held"
        assert all(frame() is not None for frame in frames[1:])


@pytest.mark.timeout(60)
def test_the_large_frames_held_after_their_handlers_come_to_32_mib_at_most(mesh: dict[str, Any]) -> None:
    """Payloads of 12 MiB: the two newest are held (24 MiB), not a third (36 MiB, past the
    32 MiB that what is held after its handler may come to in all)."""
    with _zero_copy_pull({**mesh, "max_message_bytes": 16 * MIB}) as (frames, push_and_wait):
        for _ in range(3):
            push_and_wait(os.urandom(12 * MIB))
            push_and_wait(b"x" * 64)
            push_and_wait(b"x" * 64)
        gc.collect()
        assert [frame() is not None for frame in frames] == [False, True, True]


@pytest.mark.timeout(60)
def test_a_frame_larger_than_any_glibc_serves_from_its_heap_is_not_held_after_its_handler(
        mesh: dict[str, Any]) -> None:
    """A payload past glibc's highest mmap threshold (32 MiB) has a mapping of its own,
    unmapped as it is freed: held on as the newest view, it kept 48 MiB resident for
    good after its handler (a process pulling one 48 MiB payload, then small ones),
    saving nothing. It goes with its handler's call now, as it did before."""
    with _zero_copy_pull({**mesh, "max_message_bytes": 64 * MIB}) as (frames, push_and_wait):
        push_and_wait(os.urandom(40 * MIB))
        push_and_wait(b"x" * 64)
        push_and_wait(b"x" * 64)
        gc.collect()
        assert frames[0]() is None, "a 40 MiB frame is held after its handler"
