"""zmqmesh beside NATS and RabbitMQ (and raw pyzmq), same workloads, same run.

    python3 benchmarks/peers.py [--quick] [--repeats N] [--only queue,rtt,...] [--json PATH]

Workloads (64-byte msgpack dicts, one process per role, loopback only):

  queue      one producer -> one consumer, messages delivered per second
  alo        the same, at least once: the consumer acknowledges every message
  fanout4    one publisher -> 4 subscriber processes, deliveries per second (sum)
  rtt        request/reply round trip, median (one at a time)
  inflight   64 requests in flight, requests per second
  cold       spawn a sender process -> first message delivered to a waiting receiver

Systems: raw pyzmq (the ceiling), zmqmesh, NATS (nats-server from Debian's packages,
nats-py) and RabbitMQ (rabbitmq-server from Debian's packages, pika). The brokers are
installed (apt-get, when run as root and missing), started on 127.0.0.1 on free ports
with their state in a temporary directory, and stopped at the end, whatever happens. A
broker that cannot be had is skipped, with the reason in the table.

What differs in the guarantees (the table compares speed, not promises):
  * raw pyzmq and NATS core keep messages in memory only, and drop on overload or loss;
  * zmqmesh keeps them in memory by default; ``alo`` is its in-memory at-least-once
    (redelivered if a consumer dies; `durable=True` stores them in SQLite first);
  * NATS ``alo`` is JetStream with a memory stream and explicit acks (publishes wait for
    the server's ack, in batches of 256); RabbitMQ ``alo`` is manual acks with prefetch
    256 on a non-persistent queue. Both brokers hold the messages in one server process;
    zmqmesh has no server (the sender holds them until acknowledged).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

PAYLOAD = "x" * 45  # {"id": i, "payload": PAYLOAD} packs to 62-64 bytes
WINDOW = 64
FAN = 4
WARM = 2_000  # messages sent before the clock starts (connections, buffers and caches warm)
MP = multiprocessing.get_context("spawn")


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _item(i: int) -> bytes:
    return msgpack.packb({"id": i, "payload": PAYLOAD})


# ================================================================================ brokers ==


@dataclass
class Broker:
    name: str
    url: str = ""
    skipped: str = ""
    stop: Callable[[], None] = lambda: None


def _have(package: str, binary: str) -> str:
    """'' if ``binary`` is there (installed with apt-get when root and missing), else why not."""
    if shutil.which(binary) or os.path.exists(f"/usr/sbin/{binary}"):
        return ""
    if os.geteuid() != 0:
        return f"{binary} is not installed (run as root to install Debian's {package})"
    # (policy-rc.d: the package must not start a service of its own, on every interface)
    policy = "/usr/sbin/policy-rc.d"
    made_policy = not os.path.exists(policy)
    if made_policy:
        with open(policy, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        done = subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            done = subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, capture_output=True, text=True, timeout=600)
    finally:
        if made_policy:
            os.remove(policy)
    if done.returncode != 0:
        return f"apt-get install {package} failed: {done.stderr.strip()[-200:]}"
    return ""


def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        time.sleep(0.2)
    return False


def start_nats(workdir: str) -> Broker:
    missing = _have("nats-server", "nats-server") or _python_lib("nats", "nats-py")
    if missing:
        return Broker("nats", skipped=missing)
    port = _free_port()
    proc = subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", os.path.join(workdir, "nats")],
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, "nats.log"), "w"))

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()

    if not _wait_port(port, 15):
        stop()
        return Broker("nats", skipped="nats-server did not listen within 15 s")
    return Broker("nats", f"nats://127.0.0.1:{port}", stop=stop)


def start_rabbitmq(workdir: str) -> Broker:
    missing = _have("rabbitmq-server", "rabbitmq-server") or _python_lib("pika", "pika")
    if missing:
        return Broker("rabbitmq", skipped=missing)
    base = os.path.join(workdir, "rabbitmq")
    os.makedirs(base)
    port, dist, epmd = _free_port(), _free_port(), _free_port()
    with open(os.path.join(base, "plugins"), "w") as f:
        f.write("[].\n")  # no management plugin: nothing listens beyond AMQP on 127.0.0.1
    with open(os.path.join(base, "rabbitmq.conf"), "w") as f:
        f.write("loopback_users = none\n")
    if os.geteuid() == 0:  # Debian's scripts run the server as the rabbitmq user
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", workdir], check=False)
        os.chmod(workdir, 0o755)
    node = f"zmqmesh-bench-{os.getpid()}@localhost"
    env = {**os.environ, "RABBITMQ_NODENAME": node, "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
           "RABBITMQ_NODE_PORT": str(port), "RABBITMQ_DIST_PORT": str(dist), "ERL_EPMD_ADDRESS": "127.0.0.1",
           "ERL_EPMD_PORT": str(epmd), "RABBITMQ_MNESIA_BASE": os.path.join(base, "mnesia"),
           "RABBITMQ_LOG_BASE": os.path.join(base, "log"), "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(base, "plugins"),
           "RABBITMQ_CONFIG_FILE": os.path.join(base, "rabbitmq"),
           "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}"}
    proc = subprocess.Popen(["rabbitmq-server"], env=env, stdout=open(os.path.join(workdir, "rabbitmq.log"), "w"),
                            stderr=subprocess.STDOUT)

    def stop() -> None:
        subprocess.run(["rabbitmqctl", "-q", "-n", node, "stop"], env=env, capture_output=True, timeout=60)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run(["epmd", "-kill"], env=env, capture_output=True, timeout=10)

    if not _wait_port(port, 90):
        stop()
        return Broker("rabbitmq", skipped="rabbitmq-server did not listen within 90 s")
    return Broker("rabbitmq", f"127.0.0.1:{port}", stop=stop)


def _python_lib(module: str, package: str) -> str:
    try:
        __import__(module)
    except ImportError:
        return f"the Python client {package} is not installed (pip install {package}, or the 'peers' extra)"
    return ""


# ================================================================================== roles ==
# Each role runs in its own process: ``role(conn, **params)``; it says "ready" (with what
# the others need) and then "result" on its pipe; the orchestrator waits with a deadline.


def _node(cls: str, name: str, mesh: dict[str, Any]) -> Any:
    import zmqmesh
    return getattr(zmqmesh, cls)(name, **mesh)


class Counter:
    """Counts deliveries; the rate between the end of the warm-up and the last."""

    def __init__(self, n: int, warm: int) -> None:
        self.n, self.warm, self.seen, self.first, self.last = n, warm, 0, 0.0, 0.0

    def hit(self) -> bool:
        now = time.perf_counter()
        self.seen += 1
        if self.seen == self.warm:
            self.first = now
        self.last = now
        return self.seen >= self.n + self.warm

    def result(self) -> dict[str, Any]:
        return {"first": self.first, "last": self.last, "seen": self.seen - self.warm}


def _rabbit(url: str) -> Any:
    """A blocking pika connection to the broker at ``host:port``."""
    import pika
    host, port = url.split(":")
    return pika.BlockingConnection(pika.ConnectionParameters(host=host, port=int(port)))


def consumer(conn: Any, system: str, n: int, url: str = "", mesh: dict[str, Any] | None = None,
             ack: bool = False, fan: bool = False, tag: str = "") -> None:
    """Receives ``WARM`` + ``n`` messages (queue, alo, or one of the fan-out subscribers)."""
    counter = Counter(n, WARM)
    if system == "raw":
        import zmq
        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB if fan else zmq.PULL)
        if fan:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(url)
        else:
            url = f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
        sock.setsockopt(zmq.RCVHWM, 0)
        conn.send(("ready", {"url": url}))
        while True:
            msgpack.unpackb(sock.recv())
            if counter.hit():
                break
        ctx.destroy(0)
    elif system == "zmqmesh":
        import threading
        done = threading.Event()
        node = _node("Node", f"consumer-{tag}", mesh or {})

        def handle(msg: Any) -> None:
            if counter.hit():
                done.set()

        if fan:
            node.subscribe("bench.", handle)
        else:
            node.pull("bench", handle, at_least_once=ack)
        with node:
            conn.send(("ready", {}))
            done.wait(120)
    elif system == "nats":
        async def main() -> None:
            import nats
            nc = await nats.connect(url)
            done = asyncio.Event()
            if ack:
                from nats.js.api import StorageType
                js = nc.jetstream()
                with contextlib.suppress(Exception):
                    await js.delete_stream("ALO")
                await js.add_stream(name="ALO", subjects=["alo"], storage=StorageType.MEMORY)
                psub = await js.pull_subscribe("alo", durable="w")
                conn.send(("ready", {}))
                while not done.is_set():
                    try:
                        msgs = await psub.fetch(256, timeout=5)
                    except nats.errors.TimeoutError:
                        continue
                    for m in msgs:
                        msgpack.unpackb(m.data)
                        await m.ack()
                        if counter.hit():
                            done.set()
            else:
                async def handle(m: Any) -> None:
                    msgpack.unpackb(m.data)
                    if counter.hit():
                        done.set()
                await nc.subscribe("bench.x" if fan else "bench", queue="" if fan else "workers", cb=handle,
                                   pending_msgs_limit=2_000_000, pending_bytes_limit=1 << 30)
                await nc.flush()
                conn.send(("ready", {}))
                await asyncio.wait_for(done.wait(), 120)
            await nc.close()
        asyncio.run(main())
    else:  # rabbitmq
        connection = _rabbit(url)
        ch = connection.channel()
        ch.basic_qos(prefetch_count=256 if ack else 2000)
        if fan:
            ch.exchange_declare("fan", "fanout")
            queue = ch.queue_declare("", exclusive=True).method.queue
            ch.queue_bind(queue, "fan")
        else:
            queue = "bench"
            ch.queue_declare(queue)

        def on_message(channel: Any, method: Any, _props: Any, body: bytes) -> None:
            msgpack.unpackb(body)
            if ack:
                channel.basic_ack(method.delivery_tag)
            if counter.hit():
                channel.stop_consuming()

        ch.basic_consume(queue, on_message, auto_ack=not ack)
        conn.send(("ready", {}))
        ch.start_consuming()
        connection.close()
    conn.send(("result", counter.result()))


def producer(conn: Any, system: str, n: int, url: str = "", mesh: dict[str, Any] | None = None,
             ack: bool = False, fan: bool = False, subscribers: int = 1) -> None:
    """Sends ``WARM`` + ``n`` messages as fast as the system takes them."""
    n += WARM
    if system == "raw":
        import zmq
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUB if fan else zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)
        if fan:
            url = f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
            conn.send(("bound", {"url": url}))
            conn.recv()  # the subscribers are connected
            time.sleep(0.5)  # (their subscriptions reach the publisher)
        else:
            sock.connect(url)
            conn.send(("bound", {}))
            conn.recv()
        for i in range(n):
            sock.send(_item(i))
        conn.send(("sent", {}))
        conn.recv()
        ctx.destroy(0)
        return
    if system == "zmqmesh":
        node = _node("Node", "producer", mesh or {})
        with node:
            conn.send(("bound", {}))
            conn.recv()
            if fan:
                node.wait_for_subscribers("bench.x", subscribers, timeout=30)
                for i in range(n):
                    node.publish("bench.x", {"id": i, "payload": PAYLOAD})
            else:
                node.wait_for_pullers("bench", timeout=30)
                for i in range(n):
                    node.push("bench", {"id": i, "payload": PAYLOAD}, timeout=60)
            conn.send(("sent", {}))
            conn.recv()
        return
    if system == "nats":
        async def main() -> None:
            import nats
            nc = await nats.connect(url)
            js = nc.jetstream()  # (the consumer made the stream)
            conn.send(("bound", {}))
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            if ack:
                for lo in range(0, n, 256):
                    await asyncio.gather(*(js.publish("alo", _item(i)) for i in range(lo, min(lo + 256, n))))
            else:
                subject = "bench.x" if fan else "bench"
                for i in range(n):
                    await nc.publish(subject, _item(i))
                await nc.flush()
            conn.send(("sent", {}))
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            await nc.close()
        asyncio.run(main())
        return
    connection = _rabbit(url)
    ch = connection.channel()
    if fan:
        ch.exchange_declare("fan", "fanout")
    else:
        ch.queue_declare("bench")
    conn.send(("bound", {}))
    conn.recv()
    exchange, key = ("fan", "") if fan else ("", "bench")
    for i in range(n):
        ch.basic_publish(exchange, key, _item(i))
    conn.send(("sent", {}))
    conn.recv()
    connection.close()


def server(conn: Any, system: str, url: str = "", mesh: dict[str, Any] | None = None) -> None:
    """An echo service until told to stop."""
    if system == "raw":
        import zmq
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        sock.setsockopt(zmq.RCVTIMEO, 100)
        conn.send(("ready", {"url": f"tcp://127.0.0.1:{port}"}))
        while not conn.poll(0):
            try:
                ident = sock.recv()
            except zmq.Again:
                continue
            body = sock.recv()
            sock.send(ident, zmq.SNDMORE)
            sock.send(msgpack.packb(msgpack.unpackb(body)))
        ctx.destroy(0)
    elif system == "zmqmesh":
        node = _node("Node", "server", mesh or {})
        node.service("echo", lambda msg: msg.data)
        with node:
            conn.send(("ready", {}))
            conn.recv()
    elif system == "nats":
        async def main() -> None:
            import nats
            nc = await nats.connect(url)

            async def echo(m: Any) -> None:
                await m.respond(msgpack.packb(msgpack.unpackb(m.data)))
            await nc.subscribe("echo", cb=echo)
            await nc.flush()
            conn.send(("ready", {}))
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            await nc.close()
        asyncio.run(main())
    else:
        import pika
        connection = _rabbit(url)
        ch = connection.channel()
        ch.queue_declare("rpc")
        ch.basic_qos(prefetch_count=256)

        def on_request(channel: Any, method: Any, props: Any, body: bytes) -> None:
            channel.basic_publish("", props.reply_to, msgpack.packb(msgpack.unpackb(body)),
                                  properties=pika.BasicProperties(correlation_id=props.correlation_id))
            channel.basic_ack(method.delivery_tag)

        ch.basic_consume("rpc", on_request)
        conn.send(("ready", {}))
        while not conn.poll(0):
            connection.process_data_events(time_limit=0.1)
        connection.close()
    conn.send(("result", {}))


def client(conn: Any, system: str, n: int, window: int, url: str = "", mesh: dict[str, Any] | None = None) -> None:
    """``window`` 1: round-trip latencies; above: requests per second with that many in flight."""
    lats: list[float] = []
    pc = time.perf_counter
    t0 = 0.0
    if system == "raw":
        import zmq
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(url)
        for i in range(100):
            sock.send(_item(i))
            sock.recv()
        t0 = pc()
        if window == 1:
            for i in range(n):
                t = pc()
                sock.send(_item(i))
                msgpack.unpackb(sock.recv())
                lats.append(pc() - t)
        else:
            sent = 0
            for _ in range(window):
                sock.send(_item(sent))
                sent += 1
            for _ in range(n):
                msgpack.unpackb(sock.recv())
                if sent < n:
                    sock.send(_item(sent))
                    sent += 1
        ctx.destroy(0)
    elif system == "zmqmesh":
        async def main() -> float:
            node = _node("AsyncNode", "client", mesh or {})
            async with node:
                await node.wait_for_service("echo", timeout=30)
                for i in range(100):
                    await node.request("echo", {"id": i, "payload": PAYLOAD})
                start = pc()
                if window == 1:
                    for i in range(n):
                        t = pc()
                        await node.request("echo", {"id": i, "payload": PAYLOAD}, timeout=10)
                        lats.append(pc() - t)
                else:
                    ids = iter(range(n))

                    async def worker() -> None:
                        for i in ids:
                            await node.request("echo", {"id": i, "payload": PAYLOAD}, timeout=30)
                    await asyncio.gather(*(worker() for _ in range(window)))
                return start
        t0 = asyncio.run(main())
    elif system == "nats":
        async def main() -> float:
            import nats
            nc = await nats.connect(url)
            for i in range(100):
                await nc.request("echo", _item(i), timeout=10)
            start = pc()
            if window == 1:
                for i in range(n):
                    t = pc()
                    msgpack.unpackb((await nc.request("echo", _item(i), timeout=10)).data)
                    lats.append(pc() - t)
            else:
                ids = iter(range(n))

                async def worker() -> None:
                    for i in ids:
                        msgpack.unpackb((await nc.request("echo", _item(i), timeout=30)).data)
                await asyncio.gather(*(worker() for _ in range(window)))
            await nc.close()
            return start
        t0 = asyncio.run(main())
    else:
        import pika
        connection = _rabbit(url)
        ch = connection.channel()
        replies: list[bytes] = []
        ch.basic_consume("amq.rabbitmq.reply-to", lambda _c, _m, _p, body: replies.append(body), auto_ack=True)
        props = pika.BasicProperties(reply_to="amq.rabbitmq.reply-to")

        def call_and_wait(i: int) -> None:
            ch.basic_publish("", "rpc", _item(i), properties=props)
            while not replies:
                connection.process_data_events(time_limit=None)
            msgpack.unpackb(replies.pop())

        for i in range(100):
            call_and_wait(i)
        t0 = pc()
        if window == 1:
            for i in range(n):
                t = pc()
                call_and_wait(i)
                lats.append(pc() - t)
        else:
            sent = got = 0
            for _ in range(window):
                ch.basic_publish("", "rpc", _item(sent), properties=props)
                sent += 1
            while got < n:
                connection.process_data_events(time_limit=None)
                while replies:
                    msgpack.unpackb(replies.pop())
                    got += 1
                    if sent < n:
                        ch.basic_publish("", "rpc", _item(sent), properties=props)
                        sent += 1
        connection.close()
    elapsed = pc() - t0
    conn.send(("result", {"median_us": statistics.median(lats) * 1e6 if lats else None, "per_s": n / elapsed}))


def cold_receiver(conn: Any, system: str, url: str = "", mesh: dict[str, Any] | None = None) -> None:
    """Waits for one message and says when (wall clock) it arrived."""
    got: list[float] = []
    if system == "raw":
        import zmq
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        conn.send(("ready", {"url": f"tcp://127.0.0.1:{port}"}))
        sock.recv()
        got.append(time.time())
        ctx.destroy(0)
    elif system == "zmqmesh":
        import threading
        done = threading.Event()
        node = _node("Node", "receiver", mesh or {})
        node.pull("cold", lambda msg: (got.append(time.time()), done.set()))
        with node:
            conn.send(("ready", {}))
            done.wait(60)
    elif system == "nats":
        async def main() -> None:
            import nats
            nc = await nats.connect(url)
            sub = await nc.subscribe("cold")
            await nc.flush()
            conn.send(("ready", {}))
            await sub.next_msg(timeout=60)
            got.append(time.time())
            await nc.close()
        asyncio.run(main())
    else:
        connection = _rabbit(url)
        ch = connection.channel()
        ch.queue_declare("cold")
        ch.queue_purge("cold")

        def on_message(channel: Any, _m: Any, _p: Any, _body: bytes) -> None:
            got.append(time.time())
            channel.stop_consuming()

        ch.basic_consume("cold", on_message, auto_ack=True)
        conn.send(("ready", {}))
        ch.start_consuming()
        connection.close()
    conn.send(("result", {"at": got[0]}))


_COLD_SENDERS = {
    "raw": "import sys, zmq\nctx = zmq.Context(); s = ctx.socket(zmq.PUSH); s.connect(sys.argv[1]); s.send(b'hi'); ctx.destroy(1000)",
    "zmqmesh": "import sys, json, zmqmesh\nwith zmqmesh.Node('sender', **json.loads(sys.argv[2])) as n:\n"
               "    n.wait_for_pullers('cold', timeout=30); n.push('cold', 'hi')",
    "nats": "import sys, asyncio, nats\nasync def m():\n    nc = await nats.connect(sys.argv[1]); await nc.publish('cold', b'hi'); await nc.close()\nasyncio.run(m())",
    "rabbitmq": "import sys, pika\nh, p = sys.argv[1].split(':')\nc = pika.BlockingConnection(pika.ConnectionParameters(host=h, port=int(p)))\n"
                "c.channel().basic_publish('', 'cold', b'hi'); c.close()",
}


# ============================================================================ orchestrator ==


class Roles:
    """The processes of one measurement; all stopped (then killed) on the way out."""

    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.procs: list[tuple[Any, Any]] = []

    def start(self, target: Callable[..., None], **kwargs: Any) -> Any:
        parent, child = MP.Pipe()
        proc = MP.Process(target=target, args=(child,), kwargs=kwargs, daemon=True)
        proc.start()
        child.close()  # (ours: a role that dies then reads as the end of its pipe, not a silence)
        self.procs.append((proc, parent))
        return parent

    def expect(self, conn: Any, tag: str) -> dict[str, Any]:
        while True:
            if not conn.poll(max(self.deadline - time.monotonic(), 0)):
                raise TimeoutError(f"no {tag!r} in time")
            got, data = conn.recv()
            if got == tag:
                return dict(data)

    def close(self) -> None:
        for _proc, conn in self.procs:
            with contextlib.suppress(Exception):
                conn.send(("stop", {}))
        for proc, _conn in self.procs:
            proc.join(3)
            if proc.is_alive():
                proc.kill()
                proc.join(2)


@contextlib.contextmanager
def roles(timeout: float) -> Iterator[Roles]:
    r = Roles(timeout)
    try:
        yield r
    finally:
        r.close()


def _mesh() -> dict[str, Any]:
    return {"mesh": f"peers-{uuid.uuid4().hex[:8]}", "beacon_port": _free_port(socket.SOCK_DGRAM)}


def measure(workload: str, system: str, url: str, p: dict[str, int]) -> float:
    """One run: msgs/s, requests/s, microseconds or milliseconds, by workload."""
    mesh = _mesh()
    with roles(120) as r:
        if workload in ("queue", "alo", "fanout4"):
            fan = workload == "fanout4"
            n = p["n_fan"] if fan else p["n"]
            ack = workload == "alo"
            if fan:
                prod = r.start(producer, system=system, n=n, url=url, mesh=mesh, fan=True, subscribers=FAN)
                bound = r.expect(prod, "bound")
                subs = [r.start(consumer, system=system, n=n, url=bound.get("url", url), mesh=mesh, fan=True, tag=str(k))
                        for k in range(FAN)]
                for s in subs:
                    r.expect(s, "ready")
            else:
                cons = r.start(consumer, system=system, n=n, url=url, mesh=mesh, ack=ack)
                ready = r.expect(cons, "ready")
                subs = [cons]
                prod = r.start(producer, system=system, n=n, url=ready.get("url", url), mesh=mesh, ack=ack)
                r.expect(prod, "bound")
            prod.send(("go", {}))
            results = [r.expect(s, "result") for s in subs]
            prod.send(("done", {}))
            first = min(x["first"] for x in results)
            last = max(x["last"] for x in results)
            return sum(x["seen"] for x in results) / (last - first)
        if workload in ("rtt", "inflight"):
            srv = r.start(server, system=system, url=url, mesh=mesh)
            ready = r.expect(srv, "ready")
            window = 1 if workload == "rtt" else WINDOW
            cli = r.start(client, system=system, n=p["n_rtt"] if window == 1 else p["n_inflight"], window=window,
                          url=ready.get("url", url), mesh=mesh)
            got = r.expect(cli, "result")
            return float(got["median_us"] if window == 1 else got["per_s"])
        # cold
        rec = r.start(cold_receiver, system=system, url=url, mesh=mesh)
        ready = r.expect(rec, "ready")
        t0 = time.time()
        sender = subprocess.run([sys.executable, "-c", _COLD_SENDERS[system], ready.get("url", url), json.dumps(mesh)],
                                capture_output=True, timeout=60)
        if sender.returncode != 0:
            raise RuntimeError(sender.stderr.decode()[-300:])
        return (r.expect(rec, "result")["at"] - t0) * 1000


WORKLOADS = {
    "queue": ("work queue, 1 -> 1", "msgs/s", True),
    "alo": ("at least once (acks), 1 -> 1", "msgs/s", True),
    "fanout4": ("fan-out to 4 subscribers (sum)", "msgs/s", True),
    "rtt": ("round trip, median", "us", False),
    "inflight": (f"{WINDOW} requests in flight", "req/s", True),
    "cold": ("spawn to first delivered message", "ms", False),
}
SYSTEMS = ["raw", "zmqmesh", "nats", "rabbitmq"]
FULL = {"n": 200_000, "n_fan": 100_000, "n_rtt": 5_000, "n_inflight": 50_000}
QUICK = {"n": 40_000, "n_fan": 20_000, "n_rtt": 1_000, "n_inflight": 5_000}


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    error: str = ""


def _fmt(v: float) -> str:
    return f"{v / 1e6:.2f} M" if v >= 1e6 else f"{v / 1e3:.1f} k" if v >= 1e4 else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts (a few minutes, brokers' start-up included)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell (median shown; default 3)")
    ap.add_argument("--only", default="", help="comma-separated workloads: " + ",".join(WORKLOADS))
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated systems (default all)")
    ap.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    args = ap.parse_args(argv)
    params = QUICK if args.quick else FULL
    workloads = [w for w in (args.only.split(",") if args.only else WORKLOADS) if w]
    systems = [s for s in args.systems.split(",") if s]
    unknown = [w for w in workloads if w not in WORKLOADS] + [s for s in systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"unknown: {', '.join(unknown)}")
    # bytecode caches written first, as an installed package has them (a stale cache would
    # charge compiling to the start-up figures)
    fresh = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-c", "import zmq, zmqmesh"], env=fresh, capture_output=True, timeout=60)
    workdir = tempfile.mkdtemp(prefix="zmqmesh-peers-")
    brokers: dict[str, Broker] = {}
    cells: dict[tuple[str, str], Cell] = {}
    try:
        for name, start in (("nats", start_nats), ("rabbitmq", start_rabbitmq)):
            if name in systems:
                began = time.monotonic()
                brokers[name] = start(workdir)
                print(f"{name}: {brokers[name].skipped or 'started on ' + brokers[name].url} "
                      f"({time.monotonic() - began:.1f} s)", flush=True)
        for workload in workloads:
            for system in systems:
                cell = cells[(workload, system)] = Cell()
                broker = brokers.get(system)
                if broker is not None and broker.skipped:
                    cell.error = "skipped"
                    continue
                for _ in range(args.repeats):
                    try:
                        cell.values.append(measure(workload, system, broker.url if broker else "", params))
                    except Exception as exc:
                        cell.error = f"{type(exc).__name__}: {exc}"[:120]
                        break
                shown = _fmt(statistics.median(cell.values)) if cell.values else cell.error
                print(f"  {workload:9} {system:9} {shown}", flush=True)
    finally:
        for broker in brokers.values():
            broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"| workload | unit | {' | '.join(systems)} |")
    print(f"|---|---|{'---|' * len(systems)}")
    rows = []
    for workload in workloads:
        what, unit, higher = WORKLOADS[workload]
        raw = cells.get((workload, "raw"))
        base = statistics.median(raw.values) if raw is not None and raw.values else None
        shown = []
        for system in systems:
            cell = cells[(workload, system)]
            if not cell.values:
                shown.append(cell.error or "-")
                continue
            med = statistics.median(cell.values)
            ratio = "" if base is None or system == "raw" else f" ({(med / base if higher else base / med):.2f}x)"
            shown.append(f"{_fmt(med)}{ratio}")
        rows.append({"workload": workload, "what": what, "unit": unit,
                     "values": {s: cells[(workload, s)].values for s in systems},
                     "errors": {s: cells[(workload, s)].error for s in systems if cells[(workload, s)].error}})
        print(f"| {what} | {unit} | {' | '.join(shown)} |")
    print("\n(x: throughput relative to raw pyzmq, or raw's time over the system's: above 1 is faster than raw)")
    for name, broker in brokers.items():
        if broker.skipped:
            print(f"{name} skipped: {broker.skipped}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": params, "repeats": args.repeats, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
