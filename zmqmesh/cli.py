"""The ``zmqmesh`` command: ``demo``, ``peers``, and ``--version``.

Every error is a one-line message on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from . import __version__
from .errors import ZmqMeshError
from .node import Node

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zmqmesh", description="Brokerless peer-to-peer messaging on ZeroMQ.")
    parser.add_argument("--version", action="version", version=f"zmqmesh {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the node does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="run a live multi-process mesh on loopback")
    demo.add_argument("--beacon-port", type=int, default=5670, help="UDP beacon port (default 5670)")
    demo.add_argument("--orders", type=int, default=8, help="orders to push through the mesh")

    peers = sub.add_parser("peers", help="join the mesh briefly and list its nodes")
    peers.add_argument("--mesh", default="zmqmesh", help="mesh name (default zmqmesh)")
    peers.add_argument("--beacon-port", type=int, default=5670)
    peers.add_argument("--interface", default=None, help="network interface (default: loopback)")
    peers.add_argument("--seed", action="append", default=[], help="mailbox endpoint to greet (repeatable)")
    peers.add_argument("--wait", type=float, default=1.5, help="seconds to listen before printing")
    peers.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _peers(args: argparse.Namespace) -> int:
    options = {"mesh": args.mesh, "beacon_port": args.beacon_port, "interface": args.interface, "seeds": tuple(args.seed)}
    with Node("zmqmesh-cli", **options) as node:
        time.sleep(args.wait)  # listening for beacons is the point of this command
        peers = sorted(node.peers(), key=lambda p: p.name)
    if args.json:
        print(json.dumps([
            {
                "id": p.id, "name": p.name, "address": p.address, "endpoint": p.endpoint,
                "services": sorted(p.services), "queues": sorted(p.queues), "topics": sorted(p.topics),
                "groups": sorted(p.groups), "headers": dict(p.headers), "last_seen": p.last_seen,
            }
            for p in peers
        ], indent=2))
        return 0
    if not peers:
        print(f"no peers found in mesh {args.mesh!r} within {args.wait} s")
        return 1
    rows = [("NAME", "ADDRESS", "SERVICES", "QUEUES", "TOPICS", "LAST SEEN")]
    now = time.time()
    for p in peers:
        rows.append((p.name, p.endpoint, ",".join(sorted(p.services)) or "-", ",".join(sorted(p.queues)) or "-",
                     ",".join(sorted(p.topics)) or "-", f"{now - p.last_seen:.1f}s ago"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line; exits with the command's status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        if args.command == "demo":
            from .demo import run_demo

            code = run_demo(beacon_port=args.beacon_port, orders=args.orders)
        elif args.command == "peers":
            code = _peers(args)
        else:
            parser.print_help()
            code = 2
    except KeyboardInterrupt:
        code = 130
    except (ZmqMeshError, OSError, ValueError) as exc:
        print(f"zmqmesh: error: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)
