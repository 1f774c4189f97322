"""`zmqmesh demo`: a live mesh of five processes on loopback, narrated as it runs.

The conductor (this process) starts four node processes with no configuration beyond a
mesh name of their own, so two demos on one machine never meet:

* ``pricer`` publishes prices on ``prices.<pair>`` several times a second;
* ``quoter`` subscribes to prices and answers the ``quote`` service with the last price;
* ``worker-a`` and ``worker-b`` pull ``orders``, ask ``quote`` for each, and push the
  filled order to ``fills``, which the conductor pulls.

The conductor subscribes to the prices too and narrates them. Then it pushes orders,
shows which worker filled each, stops the processes one by one and shows the mesh
noticing. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from zmqmesh import Message, Node, Peer, RemoteError, StopFlag

from ._stopping import SignalStop, Stopped, sliced, until

__all__ = ["run_demo", "run_role"]

PAIRS = ("EURUSD", "GBPUSD", "USDJPY")
ROLES = ("pricer", "quoter", "worker-a", "worker-b")
_T0 = [time.time()]


def _say(who: str, text: str) -> None:
    sys.stdout.write(f"{time.time() - _T0[0]:6.2f}s  {who:<10} {text}\n")
    sys.stdout.flush()


def _stop_processes(procs: list[subprocess.Popen[bytes]], at_once: bool) -> bool:
    """SIGTERM each process and wait for it (10 s, then SIGKILL): one by one, the last
    started first, or ``at_once``. Returns whether every one stopped without SIGKILL."""
    if at_once:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
    clean = True
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
                clean = False
    return clean


def run_role(role: str, mesh: str, beacon_port: int) -> None:
    """Body of one demo process (``python -m zmqmesh.tools.demo ROLE``)."""
    stop = SignalStop().take().flag  # (for the whole process: it ends with the role)
    node = Node(role, mesh=mesh, beacon_port=beacon_port)
    prices: dict[str, float] = {}

    if role == "quoter":
        node.subscribe("prices.", lambda msg: prices.__setitem__(msg.topic.split(".", 1)[1], msg.data["bid"]))

        @node.service("quote")
        def quote(msg: Message) -> dict[str, Any]:
            pair = msg.data["pair"]
            if pair not in prices:
                raise LookupError(f"no price for {pair} yet")
            return {"pair": pair, "price": prices[pair], "total": round(prices[pair] * msg.data["qty"], 2)}

    elif role.startswith("worker"):

        @node.pull("orders")
        def fill(msg: Message) -> None:
            order = msg.data
            quote = node.request("quote", {"pair": order["pair"], "qty": order["qty"]}, timeout=5)
            node.push("fills", {**order, **quote, "filled_by": role}, timeout=5)

    with node:
        _say(role, f"up, mailbox {node.endpoints['mailbox']}")
        tick = 0
        while not stop.wait(0.1 if role == "pricer" else 0.2):
            if role == "pricer":
                for i, pair in enumerate(PAIRS):
                    base = (1.08, 1.27, 151.2)[i]
                    node.publish(f"prices.{pair}", {"bid": round(base + 0.001 * ((tick * (i + 3)) % 17), 4)})
                tick += 1
    _say(role, "stopped cleanly")


def run_demo(beacon_port: int = 5670, orders: int = 8) -> int:
    """Run the whole demo; returns the process exit code (0 when everything worked, 130
    when a signal stopped it).

    Run from the main thread, SIGINT, SIGTERM and SIGHUP raise a flag that every wait of
    the conductor looks at (none is longer than `LOOK_S`): whenever one comes, the demo
    stops its processes and returns. A flag, not an exception raised by the handler: one
    raised while a finalizer runs (a ZeroMQ frame's, a garbage collection's) is printed
    and lost, and the demo went on."""
    with SignalStop() as signalled:
        code = _conduct(signalled.flag, beacon_port, orders)
    stop = signalled.flag
    if stop.is_set():
        _say("conductor", "demo stopped, every process stopped" if code == 0 else "demo stopped, FAILED to stop cleanly")
        return 130
    _say("conductor", "demo finished, every process stopped" if code == 0 else "demo FAILED")
    return code


def _conduct(stop: StopFlag, beacon_port: int, orders: int) -> int:
    """The demo itself, until its end or ``stop`` is raised; 0 when every order was filled
    (or it was told to stop) and every process stopped cleanly, 1 otherwise."""
    mesh = f"demo-{os.getpid()}"
    _say("conductor", f"starting a mesh named {mesh!r} on loopback (beacon port {beacon_port})")
    node = Node("conductor", mesh=mesh, beacon_port=beacon_port)
    fills: list[dict[str, Any]] = []
    done = threading.Event()
    everyone = threading.Event()
    joins: list[str] = []
    prices: dict[str, float] = {}
    updates = [0]

    @node.on_join
    def joined(peer: Peer) -> None:
        offers = ", ".join(
            [f"service {s}" for s in sorted(peer.services)]
            + [f"queue {q}" for q in sorted(peer.queues)]
            + [f"subscription {t}*" for t in sorted(peer.topics)]
        )
        _say("conductor", f"+ {peer.name} joined from {peer.endpoint}" + (f" ({offers})" if offers else ""))
        joins.append(peer.name)
        if len(set(joins) & set(ROLES)) == len(ROLES):
            everyone.set()

    @node.subscribe("prices.")
    def priced(msg: Message) -> None:
        pair = msg.topic.split(".", 1)[1]
        updates[0] += 1
        if pair not in prices:
            sender = msg.sender.name if msg.sender else "?"
            _say("conductor", f"pub/sub: first {msg.topic} from {sender}: {msg.data}")
        prices[pair] = msg.data["bid"]

    @node.on_leave
    def left(peer: Peer) -> None:
        _say("conductor", f"- {peer.name} left")

    @node.pull("fills")
    def filled(msg: Message) -> None:
        f = msg.data
        _say("conductor", f"order {f['id']}: {f['qty']} {f['pair']} at {f['price']} = {f['total']}  (by {f['filled_by']})")
        fills.append(f)
        if len(fills) == orders:
            done.set()

    procs: list[subprocess.Popen[bytes]] = []
    code = 1
    with node:
        try:
            for role in ROLES:
                if stop.is_set():
                    break
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "zmqmesh.tools.demo", role, "--mesh", mesh, "--beacon-port", str(beacon_port),
                         "--t0", repr(_T0[0])]
                    )
                )
            started = time.monotonic()
            sliced(stop, lambda s: node.wait_for_peers(len(ROLES), timeout=s), 20)
            until(stop, everyone.is_set, 5)  # (join callbacks run on the handler thread: let the last one speak first)
            _say("conductor", f"full mesh of {len(ROLES) + 1} nodes formed {time.monotonic() - started:.2f}s after spawning")
            sliced(stop, lambda s: node.wait_for_pullers("orders", 2, timeout=s), 10)
            sliced(stop, lambda s: node.wait_for_service("quote", timeout=s), 10)
            # give the quoter its first prices, then trade
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not stop.is_set():
                try:
                    quote = node.request("quote", {"pair": PAIRS[-1], "qty": 1}, timeout=2)
                    _say("conductor", f"request quote -> {quote}")
                    break
                except RemoteError as exc:  # the quoter has no price yet: expected, not a failure
                    _say("conductor", f"request quote -> not ready yet ({exc.remote_message}); asking again")
                    stop.wait(0.2)
            for i in range(orders):
                if stop.is_set():
                    raise Stopped
                node.push("orders", {"id": i + 1, "pair": PAIRS[i % len(PAIRS)], "qty": 100 * (i + 1)})
            if not until(stop, done.is_set, 20):
                _say("conductor", f"only {len(fills)} of {orders} orders filled")
            else:
                by = {w: sum(1 for f in fills if f["filled_by"] == w) for w in ("worker-a", "worker-b")}
                _say("conductor", f"all {orders} orders filled; load balanced as {by}")
                _say("conductor", f"pub/sub: {updates[0]} price updates received so far, latest {prices}")
                stats = node.stats()
                _say("conductor", f"my counters: pipeline {stats['pipeline']}, requests {stats['request']}")
                code = 0
        except Stopped:
            code = 0
        finally:
            if not _stop_processes(procs, at_once=stop.is_set()):
                code = 1
            if not stop.is_set():  # (the mesh noticing them leave, shown)
                deadline = time.monotonic() + 3
                while node.peers() and time.monotonic() < deadline:
                    time.sleep(0.05)
    return code


def main(argv: list[str] | None = None) -> None:
    """Entry point of the demo's child processes."""
    parser = argparse.ArgumentParser(prog="python -m zmqmesh.tools.demo")
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--mesh", required=True)
    parser.add_argument("--beacon-port", type=int, default=5670)
    parser.add_argument("--t0", type=float, default=None, help="the conductor's start time, for aligned clocks")
    args = parser.parse_args(argv)
    if args.t0 is not None:
        _T0[0] = args.t0
    run_role(args.role, args.mesh, args.beacon_port)


if __name__ == "__main__":
    main()
