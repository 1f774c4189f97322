"""Order processing: an order flows through validate -> charge -> ship, with replies.

Roles (each its own process, each a zmqmesh node):
  validator  service "order.validate"  rejects bad orders (unknown item, bad quantity)
  payments   service "order.charge"    charges the card (declines card numbers ending in 0)
  shipping   service "order.ship"      books a parcel and returns a tracking id
  frontdesk  service "order.place"     runs the three steps in order and replies
  client     places orders, prints each outcome, exits

Run everything from one script:   python examples/order_processing.py
or with the launcher:             zmqmesh launch examples/shop.toml
A single role:                    python examples/order_processing.py ROLE
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from typing import Any

import zmqmesh

PRICES = {"book": 12.5, "lamp": 40.0, "mug": 8.0}
ROLES = ("validator", "payments", "shipping", "frontdesk")


class OrderRejected(Exception):
    """The order cannot be processed (the client sees it as a RemoteError)."""


def run_role(role: str) -> None:
    """Serve one role until SIGTERM or Ctrl-C."""
    node = zmqmesh.Node(role)  # mesh and beacon port come from ZMQMESH_* variables
    tracking = itertools.count(1001)

    if role == "validator":
        @node.service("order.validate")
        def validate(msg: zmqmesh.Message) -> dict[str, Any]:
            order = msg.data
            if order.get("item") not in PRICES:
                raise OrderRejected(f"unknown item {order.get('item')!r}")
            if not isinstance(order.get("qty"), int) or order["qty"] < 1:
                raise OrderRejected("quantity must be a positive integer")
            return {**order, "amount": PRICES[order["item"]] * order["qty"]}

    elif role == "payments":
        @node.service("order.charge")
        def charge(msg: zmqmesh.Message) -> dict[str, Any]:
            order = msg.data
            if order["card"].endswith("0"):
                raise OrderRejected(f"card ending {order['card'][-4:]} declined")
            return {**order, "charged": order["amount"]}

    elif role == "shipping":
        @node.service("order.ship")
        def ship(msg: zmqmesh.Message) -> dict[str, Any]:
            return {**msg.data, "tracking": f"TRK{next(tracking)}"}

    elif role == "frontdesk":
        @node.service("order.place")
        def place(msg: zmqmesh.Message) -> dict[str, Any]:
            order = node.request("order.validate", msg.data, timeout=5)
            order = node.request("order.charge", order, timeout=5)
            return node.request("order.ship", order, timeout=5)

    node.start()
    print(f"{role}: ready", flush=True)
    node.run_forever()  # until SIGTERM or Ctrl-C, then a clean stop


ORDERS = [
    {"id": 1, "item": "book", "qty": 2, "card": "4111-1111"},
    {"id": 2, "item": "piano", "qty": 1, "card": "4111-1111"},
    {"id": 3, "item": "lamp", "qty": 1, "card": "4111-1110"},
    {"id": 4, "item": "mug", "qty": 6, "card": "5500-0004"},
]


def run_client() -> int:
    """Place the sample orders and print what became of each; 0 when all went as expected."""
    outcomes = []
    with zmqmesh.Node("client") as node:
        node.wait_for_service("order.place", timeout=30)
        for order in ORDERS:
            try:
                done = node.request("order.place", order, timeout=10)
                outcomes.append("shipped")
                print(f"client: order {order['id']} shipped, charged {done['charged']:.2f}, tracking {done['tracking']}", flush=True)
            except zmqmesh.RemoteError as err:
                outcomes.append("rejected")
                print(f"client: order {order['id']} rejected: {err.remote_message}", flush=True)
    ok = outcomes == ["shipped", "rejected", "rejected", "shipped"]
    print("client: all orders processed" if ok else f"client: unexpected outcomes {outcomes}", flush=True)
    return 0 if ok else 1


def main() -> int:
    """Start the four services as processes, run the client here, stop everything."""
    env = {**os.environ, "ZMQMESH_MESH": os.environ.get("ZMQMESH_MESH", f"shop-{os.getpid()}")}
    os.environ.update(env)
    procs = [subprocess.Popen([sys.executable, __file__, role], env=env) for role in ROLES]
    try:
        return run_client()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ROLES:
        run_role(sys.argv[1])
    elif len(sys.argv) > 1 and sys.argv[1] == "client":
        sys.exit(run_client())
    else:
        sys.exit(main())
