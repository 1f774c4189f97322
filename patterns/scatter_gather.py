"""Scatter-gather: ask every provider of a service at once, keep the replies that arrive
within a deadline.

Four estimator processes answer "estimate" (one of them is too slow). The client sends
the question to each provider by id (request(..., peer=p)) concurrently with asyncio
and gathers what came back in time. Run: python patterns/scatter_gather.py
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time

import zmqmesh

MESH = f"pattern-scatter-{os.getpid()}"
DEADLINE_S = 1.0


def estimator(name: str, delay: float, mesh: str, stop: mp.synchronize.Event) -> None:
    node = zmqmesh.Node(name, mesh=mesh)

    @node.service("estimate")
    def estimate(msg: zmqmesh.Message) -> dict:
        time.sleep(delay)
        return {"by": name, "value": len(msg.data) * 10 + delay}

    with node:
        stop.wait(30)


async def gather(node: zmqmesh.AsyncNode, question: str) -> list[dict]:
    providers = node.providers("estimate")
    tasks = [asyncio.ensure_future(node.request("estimate", question, timeout=DEADLINE_S, peer=p)) for p in providers]
    done, late = await asyncio.wait(tasks, timeout=DEADLINE_S)
    for task in late:
        task.cancel()
    replies = [t.result() for t in done if t.exception() is None]
    print(f"client: asked {len(providers)} providers, {len(replies)} answered within {DEADLINE_S} s")
    return replies


async def client() -> None:
    async with zmqmesh.AsyncNode("client", mesh=MESH) as node:
        await node.wait_for_service("estimate", 4, timeout=20)
        replies = await gather(node, "how long?")
        for reply in sorted(replies, key=lambda r: r["by"]):
            print(f"client: {reply['by']} estimates {reply['value']}")
        assert sorted(r["by"] for r in replies) == ["est-0", "est-1", "est-2"]


def main() -> None:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs = [ctx.Process(target=estimator, args=(f"est-{i}", d, MESH, stop)) for i, d in enumerate((0.0, 0.1, 0.2, 3.0))]
    for p in procs:
        p.start()
    try:
        asyncio.run(client())
    finally:
        stop.set()
        for p in procs:
            p.join(10)
    print("scatter_gather: OK")


if __name__ == "__main__":
    main()
