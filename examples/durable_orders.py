"""Durable orders: nothing lost and nothing charged twice, whichever process is killed.

Roles (each its own process, each a zmqmesh node with a store of its own):
  frontdesk  takes N orders and pushes them durably to "orders"
  payments   pulls "orders" (at-least-once, dedupe), charges each order in its ledger,
             then pushes it durably to "shipping"
  shipping   pulls "shipping" (at-least-once, dedupe) and books a parcel per order

Run it:   python examples/durable_orders.py [N]
It starts the three roles, kills each of them once with SIGKILL at a random moment,
starts it again on the same store, and checks at the end that every order was charged
once and shipped once. The ledger uses the order id as an idempotency key (as payment
providers do): with dedupe, a redelivery is rarely handled twice; with the key, a charge
never is. A single role:  python examples/durable_orders.py ROLE DIR [N]
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid

import zmqmesh

ROLES = ("frontdesk", "payments", "shipping")


def _ledger(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE IF NOT EXISTS done (order_id INTEGER PRIMARY KEY, at REAL)")
    db.execute("CREATE TABLE IF NOT EXISTS repeats (order_id INTEGER)")
    return db


def run_role(role: str, directory: str, count: int) -> None:
    """Serve one role until SIGTERM; every role keeps its state under ``directory``."""
    node = zmqmesh.Node(role, store=os.path.join(directory, f"{role}-store"))
    if role == "frontdesk":
        progress = os.path.join(directory, "frontdesk-progress")
        node.start()
        first = int(open(progress).read() or 0) if os.path.exists(progress) else 0
        for order in range(first, count):  # (killed in here, it goes on from its progress file)
            node.push("orders", {"order": order, "item": "book", "amount": 12.5}, durable=True)
            with open(progress, "w") as f:
                f.write(str(order + 1))
        print("frontdesk: all orders taken", flush=True)
        node.run_forever()  # until SIGTERM or Ctrl-C, then a clean stop
        return
    ledger = _ledger(os.path.join(directory, f"{role}-ledger.db"))

    def record(order: int) -> bool:
        """Do the role's work once per order (the id is the idempotency key)."""
        if ledger.execute("INSERT OR IGNORE INTO done VALUES (?, ?)", (order, time.time())).rowcount:
            return True
        ledger.execute("INSERT INTO repeats VALUES (?)", (order,))
        return False

    if role == "payments":
        @node.pull("orders", at_least_once=True, dedupe=True)
        def charge(msg: zmqmesh.Message) -> None:
            record(msg.data["order"])  # charged now, or already charged before a crash
            node.push("shipping", msg.data, durable=True)
    else:
        @node.pull("shipping", at_least_once=True, dedupe=True)
        def ship(msg: zmqmesh.Message) -> None:
            record(msg.data["order"])

    node.run_forever()


def _count(path: str, table: str) -> int:
    if not os.path.exists(path):
        return 0
    with sqlite3.connect(path) as db:
        try:
            return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def main(count: int) -> int:
    directory = tempfile.mkdtemp(prefix="zmqmesh-durable-orders-")
    env = {**os.environ, "ZMQMESH_MESH": f"durable-orders-{uuid.uuid4().hex[:8]}", "PYTHONUNBUFFERED": "1"}
    if "ZMQMESH_BEACON_PORT" not in env:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            env["ZMQMESH_BEACON_PORT"] = str(s.getsockname()[1])
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(role: str) -> None:
        procs[role] = subprocess.Popen([sys.executable, __file__, role, directory, str(count)], env=env)

    shipped = os.path.join(directory, "shipping-ledger.db")
    charged = os.path.join(directory, "payments-ledger.db")
    rng = random.Random(os.getpid())
    try:
        for role in ("shipping", "payments", "frontdesk"):
            start(role)
        for victim in rng.sample(ROLES, len(ROLES)):  # each role killed once, mid-stream
            time.sleep(rng.uniform(0.2, 0.6))
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait()
            print(f"killed {victim} (SIGKILL) at {_count(shipped, 'done')} shipped; starting it again", flush=True)
            start(victim)
        deadline = time.monotonic() + 90
        while _count(shipped, "done") < count and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    done_charged, done_shipped = _count(charged, "done"), _count(shipped, "done")
    repeats = _count(charged, "repeats") + _count(shipped, "repeats")
    print(f"{done_charged} of {count} orders charged once, {done_shipped} shipped once; "
          f"{repeats} redelivery(ies) absorbed by the idempotency keys")
    if done_charged == done_shipped == count:
        print("nothing lost, nothing charged twice")
        shutil.rmtree(directory, ignore_errors=True)
        return 0
    print(f"state kept in {directory}")
    return 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] in ROLES:
        run_role(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2000)
    else:
        sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
