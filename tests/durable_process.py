"""A durable pusher or puller in its own process, for the durability tests (killed at will).

    python durable_process.py pusher STORE MESH PORT QUEUE FIRST LAST PROGRESS [BATCH]
        push FIRST..LAST-1 durably (with push_many, BATCH at a time, if given), appending
        each pushed number to PROGRESS once committed
    python durable_process.py puller MESH PORT QUEUE OUT [STORE [CONCURRENCY]]
        pull at-least-once (dedupe when a STORE is given), CONCURRENCY handlers at once (1);
        append "id number" per message to OUT
    python durable_process.py stuck MESH PORT QUEUE OUT
        pull at-least-once; append "id number" for the first message to OUT, then never return
        from its handler (nothing is acknowledged until the process is killed)

Both print "ready" once started and run until killed or their stdin closes.
"""

from __future__ import annotations

import os
import sys
import threading

import zmqmesh


def wait_for_stdin_close() -> None:
    sys.stdin.read()


def pusher(store: str, mesh: str, port: int, queue: str, first: int, last: int, progress: str,
           batch: int = 0) -> None:
    fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with zmqmesh.Node("pusher", mesh=mesh, beacon_port=port, store=store) as node:
        print("ready", flush=True)
        if batch:
            for start in range(first, last, batch):
                numbers = range(start, min(start + batch, last))
                node.push_many(queue, [{"n": i} for i in numbers], durable=True)
                os.write(fd, b"".join(b"%d\n" % i for i in numbers))
        for i in range(first, last) if not batch else ():
            node.push(queue, {"n": i}, durable=True)
            os.write(fd, b"%d\n" % i)
        print("pushed", flush=True)
        wait_for_stdin_close()


def puller(mesh: str, port: int, queue: str, out: str, store: str | None, concurrency: int = 1) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    lock = threading.Lock()
    node = zmqmesh.Node("puller", mesh=mesh, beacon_port=port, store=store, handler_concurrency=concurrency)

    @node.pull(queue, at_least_once=True, dedupe=store is not None)
    def handle(msg: zmqmesh.Message) -> None:
        with lock:
            os.write(fd, f"{msg.id} {msg.data['n']}\n".encode())

    with node:
        print("ready", flush=True)
        wait_for_stdin_close()


def stuck(mesh: str, port: int, queue: str, out: str) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    never = threading.Event()
    node = zmqmesh.Node("stuck", mesh=mesh, beacon_port=port)

    @node.pull(queue, at_least_once=True)
    def handle(msg: zmqmesh.Message) -> None:
        os.write(fd, f"{msg.id} {msg.data['n']}\n".encode())
        never.wait()

    node.start()  # (never stopped: its handler never returns)
    print("ready", flush=True)
    wait_for_stdin_close()
    os._exit(0)


if __name__ == "__main__":
    role, args = sys.argv[1], sys.argv[2:]
    if role == "pusher":
        pusher(args[0], args[1], int(args[2]), args[3], int(args[4]), int(args[5]), args[6],
               int(args[7]) if len(args) > 7 else 0)
    elif role == "stuck":
        stuck(args[0], int(args[1]), args[2], args[3])
    else:
        puller(args[0], int(args[1]), args[2], args[3], args[4] if len(args) > 4 else None,
               int(args[5]) if len(args) > 5 else 1)
