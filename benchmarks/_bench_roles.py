"""The processes of the benchmark: each function here is one role, run in its own process.

Every role takes a `Ctl` (its pipe to the orchestrator) and keyword arguments, reports
``("ready" | "warm" | "result", {...})`` messages, and ends after the orchestrator's
``"stop"``. Raw pyzmq roles and zmqmesh roles do the same job, message for message, so
their figures can be compared:

* push/pull: the sender sends ``warm`` messages, waits until the receiver has seen them
  (relayed by the orchestrator), notes ``t0 = time.monotonic()`` and sends ``n`` more.
  The receiver notes ``t_done`` when the last of them has been handled. Throughput is
  ``n / (t_done - t0)``: both clocks are CLOCK_MONOTONIC, shared by every process on the
  host, so this is the sender's first timed send to the receiver's last delivery.
* request/reply: the client times each call (``time.perf_counter`` around it) or the
  whole window of calls.
* pub/sub: the publisher notes ``t0`` before its first message, then sends an end marker
  on another topic until told to stop; each subscriber notes when the first end marker
  arrives (after every data message it will get, since order per publisher is kept).
"""

from __future__ import annotations

import asyncio
import functools
import os
import statistics
import tempfile
import threading
import time
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from _bench_proc import Ctl, rss_now_kb, rss_peak_kb

PAYLOAD = "x" * 45  # {"id": i, "payload": PAYLOAD} packs to 62-64 bytes
BARE = b"x" * 64
QUEUE = "jobs"
TASKS = 64  # concurrent pushing tasks of the "durable_tasks" and "alo_tasks" flavors
TOPIC = "prices.x"
END_TOPIC = "end.x"
SERVICE = "echo"
SUB_PREFIXES = (b"prices.", b"end.")  # what subscribers subscribe to (zmqmesh: same prefixes)
HWM = 10_000  # zmqmesh's default high-water marks (send_hwm, recv_hwm); raw sockets that queue a lot get the same


def _rss() -> dict[str, int]:
    return {"rss_peak_kb": rss_peak_kb(), "rss_now_kb": rss_now_kb()}


def _mesh_node(cls: Any, name: str, beacon_port: int, mesh: str, **options: Any) -> Any:
    import zmqmesh

    return getattr(zmqmesh, cls)(name, beacon_port=beacon_port, mesh=mesh, **options)


def _large(size: int) -> bytes:
    return os.urandom(size)


def _describe(item: Any) -> Any:
    """What a receiver saw last, for the orchestrator's sanity check: the id, or the size."""
    if isinstance(item, dict):
        return {"id": item.get("id")}
    if isinstance(item, (bytes, bytearray, memoryview)):
        return {"len": len(item)}
    return {"type": type(item).__name__}


# =========================================================================== push / pull ==


def raw_pull(ctl: Ctl, mode: str, n: int, warm: int, size: int = 0, hwm: int | None = None, **_: Any) -> None:
    """Raw PULL: ``msgpack`` (unpackb each), ``bare`` (bytes), ``large`` (recv copy=False)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 20_000)  # a stall raises zmq.Again instead of hanging
    if hwm:
        sock.setsockopt(zmq.RCVHWM, hwm)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    rss_base = rss_now_kb()
    ctl.send("ready", endpoint=f"tcp://127.0.0.1:{port}")
    recv = sock.recv
    unpackb = msgpack.unpackb

    def take(count: int) -> Any:
        item: Any = None
        if mode == "msgpack":
            for _ in range(count):
                item = unpackb(recv())
        elif mode == "bare":
            for _ in range(count):
                item = recv()
        else:
            for _ in range(count):
                item = recv(copy=False).buffer  # zero-copy view, as a raw user would
        return item

    take(warm)
    ctl.send("warm")
    last = take(n)
    t_done = time.monotonic()
    ctl.send("check", last=_describe(last))
    ctl.send("result", t_done=t_done, rss_base_kb=rss_base, **_rss())
    ctl.wait("stop")
    sock.close(0)
    ctx.term()


def raw_push(ctl: Ctl, mode: str, n: int, warm: int, size: int = 0, hwm: int | None = None, **_: Any) -> None:
    """Raw PUSH: packb per message (``msgpack``), 64 bare bytes, or a large buffer copy=False."""
    go = ctl.wait("go")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    if hwm:
        sock.setsockopt(zmq.SNDHWM, hwm)
    sock.connect(go["endpoint"])
    send = sock.send
    packb = msgpack.packb
    blob = _large(size) if mode == "large" else b""
    rss_base = rss_now_kb()

    def give(lo: int, hi: int) -> None:
        if mode == "msgpack":
            for i in range(lo, hi):
                send(packb({"id": i, "payload": PAYLOAD}))
        elif mode == "bare":
            for _ in range(lo, hi):
                send(BARE)
        else:
            for _ in range(lo, hi):
                send(blob, copy=False)

    give(0, warm)
    ctl.wait("warm")
    t0 = time.monotonic()
    give(warm, warm + n)
    t_sent = time.monotonic()
    ctl.send("result", t0=t0, t_sent=t_sent, rss_base_kb=rss_base, **_rss())
    ctl.wait("stop")
    sock.close(0)
    ctx.term()


def _counting_handler(warm: int, n: int, is_async: bool) -> tuple[Any, threading.Event, threading.Event, dict[str, float]]:
    """A pull handler that counts, and marks when ``warm`` and then ``warm + n`` arrived."""
    warmed = threading.Event()
    done = threading.Event()
    times: dict[str, float] = {}
    count = 0
    nxt = warm

    def mark(msg: Any) -> None:
        nonlocal nxt
        if count >= warm + n:
            times["done"] = time.monotonic()
            times["last"] = _describe(msg.data)  # type: ignore[assignment]
            nxt = 1 << 62
            warmed.set()
            done.set()
        elif count >= warm:
            times["warm"] = time.monotonic()
            nxt = warm + n
            warmed.set()

    if is_async:

        async def handler(msg: Any) -> None:
            nonlocal count
            count += 1
            if count >= nxt:
                mark(msg)

    else:

        def handler(msg: Any) -> None:  # type: ignore[misc]
            nonlocal count
            count += 1
            if count >= nxt:
                mark(msg)

    return handler, warmed, done, times


def zm_pull(ctl: Ctl, n: int, warm: int, beacon_port: int, mesh: str, use_async: bool = False,
            flavor: str = "plain", mode: str = "msgpack", **_: Any) -> None:
    """zmqmesh puller: sync `Node` with a ``def`` handler, or `AsyncNode` with ``async def``;
    at-least-once unless ``flavor`` is ``plain`` or ``many``; large payloads taken as views
    (``zero_copy=True``), as the raw puller takes them, but at least once (they come
    encoded, in batches)."""
    handler, warmed, done, times = _counting_handler(warm, n, use_async)
    at_least_once = flavor not in ("plain", "many")
    options = {"at_least_once": at_least_once, "zero_copy": mode == "large" and not at_least_once}

    def finish(stats: dict[str, Any], rss_base: int) -> None:
        ctl.send("check", last=times["last"])
        ctl.send("result", t_done=times["done"], rss_base_kb=rss_base, stats=stats["pipeline"], **_rss())

    if not use_async:
        node = _mesh_node("Node", "bench-pull", beacon_port, mesh)
        node.pull(QUEUE, handler, **options)
        with node:
            rss_base = rss_now_kb()
            ctl.send("ready")
            if not warmed.wait(ctl.remaining()):
                raise TimeoutError("warm-up messages did not arrive")
            ctl.send("warm")
            if not done.wait(ctl.remaining()):
                raise TimeoutError(f"only part of the {n} messages arrived: {node.stats()['pipeline']}")
            finish(node.stats(), rss_base)
            ctl.wait("stop")
        return

    async def main() -> None:
        loop = asyncio.get_running_loop()
        node = _mesh_node("AsyncNode", "bench-apull", beacon_port, mesh)
        node.pull(QUEUE, handler, **options)
        async with node:
            rss_base = rss_now_kb()
            ctl.send("ready")
            if not await loop.run_in_executor(None, warmed.wait, ctl.remaining()):
                raise TimeoutError("warm-up messages did not arrive")
            ctl.send("warm")
            if not await loop.run_in_executor(None, done.wait, ctl.remaining()):
                raise TimeoutError(f"only part of the {n} messages arrived: {node.stats()['pipeline']}")
            finish(node.stats(), rss_base)
            await loop.run_in_executor(None, ctl.wait, "stop")

    asyncio.run(main())


def zm_push(
    ctl: Ctl, mode: str, n: int, warm: int, beacon_port: int, mesh: str, size: int = 0, use_async: bool = False,
    flavor: str = "plain", **_: Any
) -> None:
    """zmqmesh pusher: ``Node.push`` in a loop, or ``await AsyncNode.push`` in a loop;
    ``flavor == "durable"``: ``push(..., durable=True)`` with a store in a temporary directory;
    ``"durable_batch"``: ``push_many(..., durable=True)`` of 256 messages at a time;
    ``"many"``: ``push_many`` (in memory) of 256 messages at a time;
    ``"durable_tasks"`` (async): `TASKS` tasks each awaiting ``push(..., durable=True)``;
    ``"alo_tasks"``: the same tasks pushing in memory to an at-least-once puller."""
    blob = _large(size) if mode == "large" else b""

    if not use_async:
        durable = flavor in ("durable", "durable_batch")
        store = tempfile.TemporaryDirectory(prefix="zmqmesh-bench-store-") if durable else None
        options = {"store": store.name} if store is not None else {}
        node = _mesh_node("Node", "bench-push", beacon_port, mesh, **options)
        with node:
            node.wait_for_pullers(QUEUE, 1, timeout=min(20.0, ctl.remaining()))
            ctl.wait("go")
            push = functools.partial(node.push, durable=True) if store is not None else node.push
            rss_base = rss_now_kb()

            def give(lo: int, hi: int) -> None:
                if mode == "large":
                    for _ in range(lo, hi):
                        push(QUEUE, blob)
                elif mode == "bare" and flavor == "many":
                    for start in range(lo, hi, 256):
                        node.push_many(QUEUE, [BARE] * (min(start + 256, hi) - start))
                elif mode == "bare":
                    for _ in range(lo, hi):
                        push(QUEUE, BARE)
                elif flavor in ("durable_batch", "many"):  # (durable: one transaction per 256 messages)
                    for start in range(lo, hi, 256):
                        node.push_many(QUEUE, [{"id": i, "payload": PAYLOAD} for i in range(start, min(start + 256, hi))],
                                       durable=flavor == "durable_batch")
                else:
                    for i in range(lo, hi):
                        push(QUEUE, {"id": i, "payload": PAYLOAD})

            give(0, warm)
            ctl.wait("warm")
            t0 = time.monotonic()
            give(warm, warm + n)
            t_sent = time.monotonic()
            ctl.send("result", t0=t0, t_sent=t_sent, rss_base_kb=rss_base, stats=node.stats()["pipeline"], **_rss())
            ctl.wait("stop")
        if store is not None:
            store.cleanup()
        return

    async def main() -> None:
        loop = asyncio.get_running_loop()
        store = tempfile.TemporaryDirectory(prefix="zmqmesh-bench-store-") if flavor == "durable_tasks" else None
        options = {"store": store.name} if store is not None else {}
        node = _mesh_node("AsyncNode", "bench-apush", beacon_port, mesh, **options)
        async with node:
            await node.wait_for_pullers(QUEUE, 1, timeout=min(20.0, ctl.remaining()))
            await loop.run_in_executor(None, ctl.wait, "go")
            push = node.push
            rss_base = rss_now_kb()

            durable = flavor == "durable_tasks"

            async def pusher_task(first: int, hi: int) -> None:
                for i in range(first, hi, TASKS):
                    await push(QUEUE, {"id": i, "payload": PAYLOAD}, durable=durable)

            async def give(lo: int, hi: int) -> None:
                if mode == "large":
                    for _ in range(lo, hi):
                        await push(QUEUE, blob)
                elif mode == "bare":
                    for _ in range(lo, hi):
                        await push(QUEUE, BARE)
                elif flavor in ("durable_tasks", "alo_tasks"):
                    # TASKS tasks in lockstep (the loop resumes them in order): the puller still
                    # sees the ids in order, and each pass of the loop is one group commit
                    await asyncio.gather(*(pusher_task(lo + k, hi) for k in range(TASKS)))
                else:
                    for i in range(lo, hi):
                        await push(QUEUE, {"id": i, "payload": PAYLOAD})

            await give(0, warm)
            await loop.run_in_executor(None, ctl.wait, "warm")
            t0 = time.monotonic()
            await give(warm, warm + n)
            t_sent = time.monotonic()
            ctl.send("result", t0=t0, t_sent=t_sent, rss_base_kb=rss_base, stats=node.stats()["pipeline"], **_rss())
            await loop.run_in_executor(None, ctl.wait, "stop")

    asyncio.run(main())


# ========================================================================= request / reply ==


def _echo_data(i: int) -> dict[str, Any]:
    return {"id": i, "payload": PAYLOAD}


def raw_router(ctl: Ctl, slow_first_s: float = 0.0, slow_at: int = 0, **_: Any) -> None:
    """Raw blocking ROUTER echo service: unpackb the request, packb the reply.

    With ``slow_first_s``, request number ``slow_at`` (0-based, i.e. the first one after a
    warm-up of ``slow_at``) sleeps that long, so everything sent meanwhile piles up."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.RCVTIMEO, 100)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    rss_base = rss_now_kb()
    ctl.send("ready", endpoint=f"tcp://127.0.0.1:{port}")
    # one recv/send per frame: in pyzmq this is about twice as fast as recv_multipart/send_multipart
    recv, send = sock.recv, sock.send
    more = zmq.SNDMORE
    packb, unpackb = msgpack.packb, msgpack.unpackb
    served = 0
    slow = slow_first_s > 0
    while True:
        try:
            ident = recv()
        except zmq.Again:
            if ctl.poll(0):
                break
            continue
        body = recv()
        if slow and served == slow_at:
            slow = False
            time.sleep(slow_first_s)
        send(ident, more)
        send(packb(unpackb(body)))
        served += 1
    # "stop" is waiting in the pipe: report before leaving
    ctl.conn.recv()
    ctl.send("result", served=served, rss_base_kb=rss_base, **_rss())
    sock.close(0)
    ctx.term()


def zm_service(ctl: Ctl, beacon_port: int, mesh: str, slow_first_s: float = 0.0, slow_at: int = 0, **_: Any) -> None:
    """zmqmesh echo service on a sync `Node` (the handler runs on the inbox thread); see
    `raw_router` for ``slow_first_s`` and ``slow_at``."""
    node = _mesh_node("Node", "bench-service", beacon_port, mesh)
    served = [0]

    @node.service(SERVICE)
    def echo(msg: Any) -> Any:
        if slow_first_s > 0 and served[0] == slow_at:
            time.sleep(slow_first_s)
        served[0] += 1
        return msg.data

    with node:
        rss_base = rss_now_kb()
        ctl.send("ready")
        ctl.wait("stop")
        ctl.send("result", served=node.stats()["service"]["sent"], rss_base_kb=rss_base, **_rss())


def _check_reply(reply: Any, want_id: int) -> None:
    if not isinstance(reply, dict) or reply.get("id") != want_id or reply.get("payload") != PAYLOAD:
        raise AssertionError(f"wrong echo reply: {reply!r:.80}, expected id {want_id}")


def _lat_summary(lats: list[float]) -> dict[str, float]:
    lats = sorted(lats)
    p99 = lats[min(len(lats) - 1, round(0.99 * len(lats)) - 1)]
    return {"median_us": statistics.median(lats) * 1e6, "p99_us": p99 * 1e6, "mean_us": statistics.fmean(lats) * 1e6}


def raw_req_client(ctl: Ctl, mode: str, n: int, warm: int, window: int = 1, **_: Any) -> None:
    """Raw DEALER client: ``sync_lat`` (blocking), ``async_lat`` (zmq.asyncio),
    ``inflight`` (blocking, ``window`` outstanding), ``coroutines`` (zmq.asyncio, ``window``
    coroutines each awaiting its own reply, as callers of a request API do),
    ``outstanding`` (asyncio, all ``n`` at once)."""
    go = ctl.wait("go")
    endpoint = go["endpoint"]
    packb, unpackb = msgpack.packb, msgpack.unpackb
    if mode in ("sync_lat", "inflight"):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(endpoint)
        send, recv = sock.send, sock.recv
        for i in range(warm):
            send(packb(_echo_data(i)))
            unpackb(recv())
        if mode == "sync_lat":
            pc = time.perf_counter
            lats = []
            reply = None
            for i in range(n):
                t = pc()
                send(packb({"id": i, "payload": PAYLOAD}))
                reply = unpackb(recv())
                lats.append(pc() - t)
            _check_reply(reply, n - 1)
            ctl.send("result", **_lat_summary(lats), **_rss())
        else:
            t_start = time.monotonic()  # (the system's clock: comparable between processes)
            t0 = time.perf_counter()
            sent = 0
            for _ in range(min(window, n)):
                send(packb({"id": sent, "payload": PAYLOAD}))
                sent += 1
            for _ in range(n):
                unpackb(recv())
                if sent < n:
                    send(packb({"id": sent, "payload": PAYLOAD}))
                    sent += 1
            elapsed = time.perf_counter() - t0
            ctl.send("result", per_s=n / elapsed, elapsed_s=elapsed, t_start=t_start, t_end=time.monotonic(), **_rss())
        ctl.wait("stop")
        sock.close(0)
        ctx.term()
        return

    async def main() -> None:
        loop = asyncio.get_running_loop()
        actx = zmq.asyncio.Context()
        sock = actx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        sock.connect(endpoint)
        async def read_replies(waiting: dict[int, asyncio.Future[Any]]) -> None:
            """Complete the future of each reply's request (by its echoed id)."""
            while True:
                reply = unpackb(await sock.recv())
                fut = waiting.pop(reply["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)

        try:
            for i in range(warm):
                await sock.send(packb(_echo_data(i)))
                unpackb(await asyncio.wait_for(sock.recv(), 10))
            if mode == "async_lat":
                pc = time.perf_counter
                lats = []
                reply = None
                for i in range(n):
                    t = pc()
                    await sock.send(packb({"id": i, "payload": PAYLOAD}))
                    reply = unpackb(await sock.recv())
                    lats.append(pc() - t)
                _check_reply(reply, n - 1)
                ctl.send("result", **_lat_summary(lats), **_rss())
            elif mode == "coroutines":  # `window` callers in a loop, a future per request
                waiting: dict[int, asyncio.Future[Any]] = {}
                ids = iter(range(n))

                async def caller() -> None:
                    for i in ids:
                        fut = loop.create_future()
                        waiting[i] = fut
                        await sock.send(packb({"id": i, "payload": PAYLOAD}))
                        _check_reply(await fut, i)

                t_start = time.monotonic()
                t0 = time.perf_counter()
                read_task = asyncio.ensure_future(read_replies(waiting))
                callers = asyncio.ensure_future(asyncio.gather(*(caller() for _ in range(window))))
                await asyncio.wait([callers, read_task], timeout=ctl.remaining(), return_when=asyncio.FIRST_COMPLETED)
                if not callers.done():  # the reader failed, or the time ran out
                    callers.cancel()
                    if read_task.done():
                        read_task.result()  # (raises the reader's error)
                    raise TimeoutError("the coroutines' requests did not finish in time")
                callers.result()
                elapsed = time.perf_counter() - t0
                read_task.cancel()
                ctl.send("result", per_s=n / elapsed, elapsed_s=elapsed, t_start=t_start, t_end=time.monotonic(),
                         **_rss())
            else:  # outstanding: n requests at once, one future each, like a request API would
                rss_base = rss_now_kb()
                pending: dict[int, asyncio.Future[Any]] = {}
                state = {"in_flight": 0, "max_in_flight": 0}

                async def call(i: int) -> Any:
                    fut = loop.create_future()
                    pending[i] = fut
                    state["in_flight"] += 1
                    state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
                    await sock.send(packb({"id": i, "payload": PAYLOAD}))
                    try:
                        return await fut
                    finally:
                        state["in_flight"] -= 1

                t0 = time.perf_counter()
                read_task = asyncio.ensure_future(read_replies(pending))
                await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(n))), ctl.remaining())
                elapsed = time.perf_counter() - t0
                read_task.cancel()
                ctl.send(
                    "result", elapsed_s=elapsed, max_in_flight=state["max_in_flight"], rss_base_kb=rss_base, **_rss()
                )
            await loop.run_in_executor(None, ctl.wait, "stop")
        finally:
            sock.close(0)
            actx.term()

    asyncio.run(main())


def zm_req_client(ctl: Ctl, mode: str, n: int, warm: int, beacon_port: int, mesh: str, window: int = 1, **_: Any) -> None:
    """zmqmesh client: ``sync_lat`` (`Node.request`), ``async_lat`` (`AsyncNode.request`),
    ``inflight`` (``window`` coroutines calling in a loop), ``many`` (`Node.request_many`
    with ``window`` in flight), ``amany`` (`AsyncNode.request_many`, the same),
    ``outstanding`` (``n`` at once)."""
    if mode == "many":
        node = _mesh_node("Node", "bench-client", beacon_port, mesh)
        with node:
            node.wait_for_service(SERVICE, timeout=min(20.0, ctl.remaining()))
            ctl.wait("go")
            node.request_many(SERVICE, [_echo_data(i) for i in range(warm)], timeout=10, window=window)
            items = [{"id": i, "payload": PAYLOAD} for i in range(n)]
            t_start = time.monotonic()  # (the system's clock: comparable between processes)
            t0 = time.perf_counter()
            replies = node.request_many(SERVICE, items, timeout=20, window=window)
            elapsed = time.perf_counter() - t0
            t_end = time.monotonic()
            _check_reply(replies[-1], n - 1)
            ctl.send("result", per_s=n / elapsed, elapsed_s=elapsed, t_start=t_start, t_end=t_end,
                     stats=node.stats()["request"], **_rss())
            ctl.wait("stop")
        return
    if mode == "sync_lat":
        node = _mesh_node("Node", "bench-client", beacon_port, mesh)
        with node:
            node.wait_for_service(SERVICE, timeout=min(20.0, ctl.remaining()))
            ctl.wait("go")
            request = node.request
            for i in range(warm):
                request(SERVICE, _echo_data(i), timeout=10)
            pc = time.perf_counter
            lats = []
            reply = None
            for i in range(n):
                t = pc()
                reply = request(SERVICE, {"id": i, "payload": PAYLOAD}, timeout=10)
                lats.append(pc() - t)
            _check_reply(reply, n - 1)
            ctl.send("result", **_lat_summary(lats), stats=node.stats()["request"], **_rss())
            ctl.wait("stop")
        return

    async def main() -> None:
        loop = asyncio.get_running_loop()
        node = _mesh_node("AsyncNode", "bench-aclient", beacon_port, mesh)
        async with node:
            await node.wait_for_service(SERVICE, timeout=min(20.0, ctl.remaining()))
            await loop.run_in_executor(None, ctl.wait, "go")
            request = node.request
            for i in range(warm):
                await request(SERVICE, _echo_data(i), timeout=10)
            if mode == "async_lat":
                pc = time.perf_counter
                lats = []
                reply = None
                for i in range(n):
                    t = pc()
                    reply = await request(SERVICE, {"id": i, "payload": PAYLOAD}, timeout=10)
                    lats.append(pc() - t)
                _check_reply(reply, n - 1)
                ctl.send("result", **_lat_summary(lats), stats=node.stats()["request"], **_rss())
            elif mode == "amany":
                await node.request_many(SERVICE, [_echo_data(i) for i in range(warm)], timeout=10, window=window)
                items = [{"id": i, "payload": PAYLOAD} for i in range(n)]
                t0 = time.perf_counter()
                replies = await asyncio.wait_for(node.request_many(SERVICE, items, timeout=20, window=window),
                                                 ctl.remaining())
                elapsed = time.perf_counter() - t0
                _check_reply(replies[-1], n - 1)
                ctl.send("result", per_s=n / elapsed, elapsed_s=elapsed, stats=node.stats()["request"], **_rss())
            elif mode == "inflight":
                ids = iter(range(n))

                async def worker() -> None:
                    for i in ids:
                        await request(SERVICE, {"id": i, "payload": PAYLOAD}, timeout=20)

                t0 = time.perf_counter()
                await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(window))), ctl.remaining())
                elapsed = time.perf_counter() - t0
                ctl.send("result", per_s=n / elapsed, elapsed_s=elapsed, stats=node.stats()["request"], **_rss())
            else:  # outstanding
                rss_base = rss_now_kb()
                state = {"in_flight": 0, "max_in_flight": 0}

                async def call(i: int) -> Any:
                    state["in_flight"] += 1
                    state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
                    try:
                        return await request(SERVICE, {"id": i, "payload": PAYLOAD}, timeout=60)
                    finally:
                        state["in_flight"] -= 1

                t0 = time.perf_counter()
                await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(n))), ctl.remaining())
                elapsed = time.perf_counter() - t0
                ctl.send(
                    "result",
                    elapsed_s=elapsed,
                    max_in_flight=state["max_in_flight"],
                    rss_base_kb=rss_base,
                    stats=node.stats()["request"],
                    **_rss(),
                )
            await loop.run_in_executor(None, ctl.wait, "stop")

    asyncio.run(main())


# ============================================================================== pub / sub ==


def raw_pub(ctl: Ctl, n: int, nsubs: int, **_: Any) -> None:
    """Raw XPUB publisher: waits for every subscriber's subscriptions (XPUB_VERBOSE), then
    sends ``[topic, packb(data)]`` ``n`` times, then end markers until told to stop."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.XPUB_VERBOSE, 1)
    sock.setsockopt(zmq.RCVTIMEO, 200)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    ctl.send("ready", endpoint=f"tcp://127.0.0.1:{port}")
    topic, end = TOPIC.encode(), END_TOPIC.encode()
    want = {b"\x01" + prefix: nsubs for prefix in SUB_PREFIXES}
    while any(v > 0 for v in want.values()):
        if ctl.remaining() <= 0:
            raise TimeoutError(f"subscriptions missing: {want}")
        try:
            event = sock.recv()
        except zmq.Again:
            continue
        if event in want:
            want[event] -= 1
    # [topic, body] sent frame by frame: in pyzmq about twice as fast as send_multipart
    send = sock.send
    more = zmq.SNDMORE
    packb = msgpack.packb
    t0 = time.monotonic()
    for i in range(n):
        send(topic, more)
        send(packb({"id": i, "payload": PAYLOAD}))
    t_sent = time.monotonic()
    ctl.send("result", t0=t0, t_sent=t_sent, **_rss())
    while not ctl.poll(0.001):
        send(end, more)
        send(b"\xc0")
    sock.close(0)
    ctx.term()


def raw_sub(ctl: Ctl, **_: Any) -> None:
    """Raw SUB: counts ``prices.`` messages (unpackb each) until the first ``end.`` marker."""
    go = ctl.wait("go")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.RCVTIMEO, 20_000)
    for prefix in SUB_PREFIXES:
        sock.setsockopt(zmq.SUBSCRIBE, prefix)
    sock.connect(go["endpoint"])
    ctl.send("ready")
    recv = sock.recv
    unpackb = msgpack.unpackb
    data_topic = TOPIC.encode()
    count = 0
    while True:
        topic = recv()
        body = recv()
        if topic != data_topic:
            break
        unpackb(body)
        count += 1
    t_end = time.monotonic()
    ctl.send("result", count=count, t_end=t_end, dropped=None, **_rss())
    ctl.wait("stop")
    sock.close(0)
    ctx.term()


def zm_pub(ctl: Ctl, n: int, nsubs: int, beacon_port: int, mesh: str, history: bool = False, **_: Any) -> None:
    """zmqmesh publisher: ``wait_for_subscribers`` then ``publish`` ``n`` times, then end markers;
    ``history``: keeping the ``prices.`` topics in a store (a temporary directory)."""
    store = tempfile.TemporaryDirectory(prefix="zmqmesh-bench-history-") if history else None
    options = {"store": store.name, "history": {"prices.": 10_000_000}} if store is not None else {}
    node = _mesh_node("Node", "bench-pub", beacon_port, mesh, **options)
    with node:
        ctl.send("ready")
        node.wait_for_subscribers(TOPIC, nsubs, timeout=min(20.0, ctl.remaining()))
        node.wait_for_subscribers(END_TOPIC, nsubs, timeout=min(20.0, ctl.remaining()))
        publish = node.publish
        t0 = time.monotonic()
        for i in range(n):
            publish(TOPIC, {"id": i, "payload": PAYLOAD})
        t_sent = time.monotonic()
        ctl.send("result", t0=t0, t_sent=t_sent, stats=node.stats()["pubsub"], **_rss())
        while not ctl.poll(0.001):
            publish(END_TOPIC, None)
    if store is not None:
        store.cleanup()


def zm_history_pub(ctl: Ctl, n: int, beacon_port: int, mesh: str, **_: Any) -> None:
    """zmqmesh publisher keeping ``prices.``: publishes ``n`` messages to nobody (they are
    kept), says "published" once all are in the history, then serves replays."""
    with tempfile.TemporaryDirectory(prefix="zmqmesh-bench-history-") as store:
        node = _mesh_node("Node", "bench-history", beacon_port, mesh, store=store, history={"prices.": 10_000_000})
        with node:
            for i in range(n):
                node.publish(TOPIC, {"id": i, "payload": PAYLOAD})
            while node.stats()["pubsub"].get("unrouted", 0) < n:  # flushed: kept before counted
                time.sleep(0.01)
            ctl.send("published")
            ctl.wait("stop")


def zm_replay_sub(ctl: Ctl, n: int, beacon_port: int, mesh: str, **_: Any) -> None:
    """zmqmesh late subscriber, ``replay="all"``: the time from the first replayed message to
    the ``n``-th."""
    node = _mesh_node("Node", "bench-replay", beacon_port, mesh)
    count = 0
    done = threading.Event()
    times: dict[str, float] = {}
    last: list[Any] = []

    def on_price(msg: Any) -> None:
        nonlocal count
        count += 1
        if count == 1:
            times["first"] = time.monotonic()
        if count == n:
            times["last"] = time.monotonic()
            last.append(msg.data["id"])
            done.set()

    node.subscribe("prices.", on_price, replay="all")
    t0 = time.monotonic()
    with node:
        if not done.wait(ctl.remaining()):
            raise TimeoutError(f"replayed {count} of {n}")
        ctl.send("result", t0=t0, t_first=times["first"], t_last=times["last"], last=last[0],
                 stats=node.stats()["pubsub"], **_rss())
        ctl.wait("stop")


def zm_sub(ctl: Ctl, beacon_port: int, mesh: str, name: str = "bench-sub", **_: Any) -> None:
    """zmqmesh subscriber (sync `Node`): counts ``prices.`` messages until the first ``end.``."""
    node = _mesh_node("Node", name, beacon_port, mesh)
    count = 0
    ended = threading.Event()
    times: dict[str, float] = {}

    @node.subscribe("prices.")
    def on_price(msg: Any) -> None:
        nonlocal count
        count += 1

    @node.subscribe("end.")
    def on_end(msg: Any) -> None:
        if not ended.is_set():
            times["end"] = time.monotonic()
            times["count"] = count
            ended.set()

    with node:
        ctl.wait("go")
        ctl.send("ready")
        if not ended.wait(ctl.remaining()):
            raise TimeoutError(f"no end marker; {count} messages so far")
        stats = node.stats()["pubsub"]
        ctl.send("result", count=times["count"], t_end=times["end"], dropped=stats["dropped"], stats=stats, **_rss())
        ctl.wait("stop")


# ============================================================================ cold start ==


def raw_cold_recv(ctl: Ctl, **_: Any) -> None:
    """A PULL waiting for the first message of a sender process not started yet; says when
    (wall clock) it arrived."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(ctl.remaining() * 1000))
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    ctl.send("ready", endpoint=f"tcp://127.0.0.1:{port}")
    sock.recv()
    ctl.send("result", at=time.time())
    ctl.wait("stop")
    sock.close(0)
    ctx.term()


def zm_cold_recv(ctl: Ctl, beacon_port: int, mesh: str, **_: Any) -> None:
    """A node pulling ``QUEUE``, waiting for the first message of a sender node's process
    not started yet; says when (wall clock) it arrived."""
    node = _mesh_node("Node", "bench-cold-recv", beacon_port, mesh)
    arrived: list[float] = []
    got = threading.Event()

    @node.pull(QUEUE)
    def take(msg: Any) -> None:
        arrived.append(time.time())
        got.set()

    with node:
        ctl.send("ready")
        if not got.wait(ctl.remaining()):
            raise TimeoutError("the sender's message never came")
        ctl.send("result", at=arrived[0])
        ctl.wait("stop")


COLD_SENDERS = {
    "raw": "import sys, zmq\nctx = zmq.Context(); s = ctx.socket(zmq.PUSH); s.connect(sys.argv[1])\n"
           "s.send(b'hello'); s.close(5000); ctx.term()",
    "zm": "import sys, zmqmesh\nwith zmqmesh.Node('bench-cold-send', mesh=sys.argv[2], beacon_port=int(sys.argv[3])) as n:\n"
          "    n.wait_for_pullers(sys.argv[4], timeout=30); n.push(sys.argv[4], b'hello')",
}
"""What the sender process runs: connect (or join the mesh and find the puller), send one message."""
