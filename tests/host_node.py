"""One zmqmesh node on a virtual host of the multi-host tests (see netns.py). Not a test module.

Usage (inside a lab namespace): ``ip netns exec NS python3 -u host_node.py SPEC_JSON``

SPEC: {"name": str, "options": {Node options}, "allowed_interfaces": [names],
       "subscribe": [prefix...], "pull": [queue...], "service": [name...],
       "log_level": "debug" | "info" | ... (optional: library logs as "log ..." lines)}

Options not given may come from ZMQMESH_* environment variables, as with `zmqmesh launch`.

It refuses to start (exit code 3) when it sees an interface outside ``allowed_interfaces``:
it broadcasts beacons and must only ever run inside a lab namespace, never on a real
network.

Output, one JSON object per line, flushed at once; ``t`` is ``time.monotonic()``:
  {"ev": "ready", "id", "endpoints"}           the node runs
  {"ev": "join" | "leave", "peer": {...}}      on_join / on_leave
  {"ev": "sub", "topic", "data", "from"}       a publication arrived
  {"ev": "pull", "queue", "data", "from"}      a work item arrived
  {"ev": "served", "service", "data"}          a request was answered
  {"re": N, "ok": true, "value": ...} | {"re": N, "ok": false, "error": "Type: text"}

Input, one JSON command per line: {"id": N, "op": OP, ...arguments}; OP is one of
peers, publish, push, request, wait_for_peers, wait_for_subscribers, wait_for_pullers,
wait_for_service, stats, sockets, stop. Commands run one at a time, in order. The node
stops cleanly on "stop", when stdin closes, or on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from zmqmesh import StopFlag
from zmqmesh.tools.jsonview import peer_dict  # imports nothing that touches the network

EXIT_REFUSED = 3
_OUT = threading.Lock()


def emit(obj: dict[str, Any]) -> None:
    line = json.dumps(obj, default=_default, separators=(",", ":")) + "\n"
    with _OUT:
        sys.stdout.write(line)
        sys.stdout.flush()


def _default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return value.decode("latin-1")
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def refuse_outside_lab(allowed: list[str]) -> None:
    names = {name for _index, name in socket.if_nameindex()}
    if not allowed or not names <= set(allowed):
        emit({"ev": "refused", "t": time.monotonic(), "interfaces": sorted(names), "allowed": allowed})
        sys.stderr.write(f"REFUSED: interfaces {sorted(names)} not all in {allowed}: run only inside a lab namespace\n")
        sys.exit(EXIT_REFUSED)


def own_sockets() -> list[dict[str, Any]]:
    """This process's IPv4 TCP/UDP sockets (local and remote address, state), from /proc (this namespace's view)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for proto in ("tcp", "udp"):
        with open(f"/proc/self/net/{proto}") as f:
            next(f)
            for line in f:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                if inode not in inodes:
                    continue
                ip, port = _address(local)
                remote_ip, remote_port = _address(remote)
                out.append({"proto": proto, "address": ip, "port": port, "remote": remote_ip,
                            "remote_port": remote_port, "listening": proto == "tcp" and state == "0A",
                            "established": proto == "tcp" and state == "01"})
    return out


def setup_logging(level: str) -> None:
    """Library logs as ``log <time.monotonic()> ...`` lines on stdout, under the same lock as
    the JSON lines (long lines from two streams sharing one pipe could interleave)."""
    import logging

    class LineHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                line = f"log {time.monotonic():.3f} {self.format(record)}\n"
            except Exception:
                return
            with _OUT:
                sys.stdout.write(line)
                sys.stdout.flush()

    handler = LineHandler()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def _address(field: str) -> tuple[str, int]:
    hex_ip, hex_port = field.split(":")
    return socket.inet_ntoa(bytes.fromhex(hex_ip)[::-1]), int(hex_port, 16)


def main() -> None:
    spec = json.loads(sys.argv[1])
    refuse_outside_lab(spec.get("allowed_interfaces", []))
    if spec.get("log_level"):
        setup_logging(spec["log_level"])
    import zmqmesh

    options = dict(spec.get("options", {}))
    if "seeds" in options:
        options["seeds"] = tuple(options["seeds"])
    node = zmqmesh.Node(spec["name"], **options)

    def sender(msg: Any) -> str | None:
        return msg.sender.name if msg.sender is not None else msg.sender_id

    for prefix in spec.get("subscribe", []):
        node.subscribe(prefix, lambda m: emit({"ev": "sub", "t": time.monotonic(), "topic": m.topic,
                                              "data": m.data, "from": sender(m)}))
    for queue in spec.get("pull", []):
        node.pull(queue, lambda m: emit({"ev": "pull", "t": time.monotonic(), "queue": m.topic,
                                        "data": m.data, "from": sender(m)}))
    for name in spec.get("service", []):
        def serve(m: Any, name: str = name) -> Any:
            emit({"ev": "served", "t": time.monotonic(), "service": name, "data": m.data})
            return {"echo": m.data, "by": node.name, "host": os.uname().nodename}
        node.service(name, serve)
    node.on_join(lambda p: emit({"ev": "join", "t": time.monotonic(), "peer": peer_dict(p)}))
    node.on_leave(lambda p: emit({"ev": "leave", "t": time.monotonic(), "peer": peer_dict(p)}))

    stop = StopFlag()  # (a signal handler raises it: a threading.Event set there can deadlock)
    signal.signal(signal.SIGTERM, stop.set)
    node.start()
    emit({"ev": "ready", "t": time.monotonic(), "id": node.id, "endpoints": node.endpoints})

    def commands() -> None:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                cmd = json.loads(line)
                serial = cmd.pop("id")
                op = cmd.pop("op")
            except (ValueError, KeyError, AttributeError) as exc:
                emit({"re": None, "ok": False, "error": f"bad command: {exc}"})
                continue
            if op == "stop":
                emit({"re": serial, "ok": True, "value": None})
                break
            try:
                value = run(node, op, cmd)
            except Exception as exc:  # reported to the test, which decides
                emit({"re": serial, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            else:
                emit({"re": serial, "ok": True, "value": value})
        stop.set()

    threading.Thread(target=commands, name="commands", daemon=True).start()
    stop.wait()
    node.stop()
    emit({"ev": "stopped", "t": time.monotonic()})


def run(node: Any, op: str, args: dict[str, Any]) -> Any:
    if op == "peers":
        return [peer_dict(p) for p in node.peers()]
    if op == "self":
        return {"id": node.id, "endpoints": node.endpoints}
    if op == "publish":
        return node.publish(args["topic"], args["data"])
    if op == "push":
        return node.push(args["queue"], args["data"], timeout=args.get("timeout"))
    if op == "request":
        return node.request(args["service"], args.get("data"), timeout=args.get("timeout"))
    if op == "wait_for_peers":
        return [peer_dict(p) for p in node.wait_for_peers(args["n"], timeout=args["timeout"])]
    if op == "wait_for_subscribers":
        return node.wait_for_subscribers(args["topic"], args["n"], timeout=args["timeout"])
    if op == "wait_for_pullers":
        return node.wait_for_pullers(args["queue"], args["n"], timeout=args["timeout"])
    if op == "wait_for_service":
        return node.wait_for_service(args["name"], args["n"], timeout=args["timeout"])
    if op == "stats":
        return node.stats()
    if op == "sockets":
        return own_sockets()
    raise ValueError(f"unknown op {op!r}")


if __name__ == "__main__":
    main()
