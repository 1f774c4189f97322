"""Request/reply: a calculator service in another process, and every outcome a caller meets.

The reply is the handler's return value. A remote exception comes back as RemoteError
(type, message, traceback text), a missing service as NoProviderError, a slow one as
MeshTimeoutError. Run: python patterns/request_reply.py
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import zmqmesh

MESH = f"pattern-reqrep-{os.getpid()}"


def calculator(mesh: str, stop: mp.synchronize.Event) -> None:
    node = zmqmesh.Node("calculator", mesh=mesh)

    @node.service("divide")
    def divide(msg: zmqmesh.Message) -> float:
        return msg.data["a"] / msg.data["b"]

    @node.service("slow")
    def slow(msg: zmqmesh.Message) -> str:
        time.sleep(2)
        return "finally"

    with node:
        stop.wait(30)


def main() -> None:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    proc = ctx.Process(target=calculator, args=(MESH, stop))
    proc.start()
    with zmqmesh.Node("client", mesh=MESH) as node:
        node.wait_for_service("divide", timeout=20)
        print("client: divide(7, 2) ->", node.request("divide", {"a": 7, "b": 2}, timeout=5))
        try:
            node.request("divide", {"a": 1, "b": 0}, timeout=5)
        except zmqmesh.RemoteError as err:
            print(f"client: divide(1, 0) -> RemoteError {err.remote_type}: {err.remote_message}")
            print("client: remote traceback ends with:", err.remote_traceback.strip().splitlines()[-1])
        try:
            node.request("multiply", {"a": 1}, timeout=0.5)
        except zmqmesh.NoProviderError as err:
            print("client: multiply -> NoProviderError:", err)
        try:
            node.request("slow", None, timeout=0.5)
        except zmqmesh.MeshTimeoutError as err:
            print("client: slow with a 0.5 s timeout -> MeshTimeoutError:", err)
    stop.set()
    proc.join(10)
    print("request_reply: OK")


if __name__ == "__main__":
    main()
