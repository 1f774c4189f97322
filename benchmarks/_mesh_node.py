"""One mesh node in its own process, for ``mesh_bench.py``. Not a benchmark by itself.

Usage (the benchmark starts it; each line it prints is flushed at once)::

    python3 _mesh_node.py zmqmesh NAME EXPECTED_PEERS BEACON_PORT MESH [OPTIONS_JSON]
    python3 _mesh_node.py pyre    NAME EXPECTED_PEERS BEACON_PORT IFACE   # private netns only

Lines printed (times are wall-clock ``time.time()``, this host's shared clock)::

    BOOT <t>            interpreter up, before importing the mesh library
    STARTED <t>         start() returned
    JOIN <name> <t>     a peer appeared (count in the parent)
    FULL <t>            EXPECTED_PEERS peers seen (printed once)
    LEFT <name> <t>     a peer departed (goodbye, crash, expiry)
    ERROR <text>        the node could not run

The process stops its node and exits when its stdin closes (the parent's request, or the
parent's death). Only the mesh library under test is imported, to keep the process lean.
"""

import os
import sys
import threading
import time

_BOOT = time.time()
_OUT_LOCK = threading.Lock()


def out(*parts):
    line = " ".join(str(p) for p in parts) + "\n"
    with _OUT_LOCK:  # callbacks print from the node's threads: one write per line
        sys.stdout.write(line)
        sys.stdout.flush()


class Tracker:
    """Peers present, and the first moment EXPECTED of them were."""

    def __init__(self, expected):
        self.expected = expected
        self.peers = {}
        self.full = False
        self.lock = threading.Lock()

    def join(self, pid, name):
        t = time.time()
        with self.lock:
            self.peers[pid] = name
            now_full = not self.full and len(self.peers) >= self.expected
            if now_full:
                self.full = True
        out("JOIN", name, repr(t))
        if now_full:
            out("FULL", repr(t))

    def leave(self, pid, name):
        t = time.time()
        with self.lock:
            self.peers.pop(pid, None)
        out("LEFT", name, repr(t))


def run_zmqmesh(name, expected, port, mesh, options):
    import zmqmesh

    tracker = Tracker(expected)
    node = zmqmesh.Node(name, beacon_port=port, mesh=mesh, **options)  # loopback by default
    node.on_join(lambda peer: tracker.join(peer.id, peer.name))
    node.on_leave(lambda peer: tracker.leave(peer.id, peer.name))
    node.start()
    out("STARTED", repr(time.time()))
    try:
        while os.read(0, 4096):  # until the parent closes our stdin
            pass
    except (OSError, KeyboardInterrupt):
        pass
    finally:
        _bounded(node.stop, 3.0)
        _exit(0)


ALLOWED_IFACES = {"lo", "zre0", "zre0p"}


def run_pyre(name, expected, port, iface):
    import socket

    names = {n for _, n in socket.if_nameindex()}
    if not names <= ALLOWED_IFACES or iface not in names:
        # pyre beacons are UDP broadcasts: never outside the private namespace we built.
        out("ERROR", "refusing: not in the benchmark's private netns; interfaces", sorted(names))
        _exit(3)

    import zmq
    import pyre

    tracker = Tracker(expected)
    node = pyre.Pyre(name)
    node.set_port(str(port).encode())  # pyre wants bytes here
    node.set_interface(iface)
    node.start()
    out("STARTED", repr(time.time()))
    try:
        sock = node.socket()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(0, zmq.POLLIN)
        while True:
            ready = dict(poller.poll(1000))
            if 0 in ready and not os.read(0, 4096):
                break
            if sock in ready:
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    kind = frames[0]
                    if kind == b"ENTER":
                        tracker.join(frames[1], frames[2].decode("utf-8", "replace"))
                    elif kind == b"EXIT":
                        tracker.leave(frames[1], frames[2].decode("utf-8", "replace"))
    except KeyboardInterrupt:
        pass
    finally:
        _bounded(node.stop, 3.0)
        _exit(0)  # pyre's threads are not daemons


def _bounded(fn, timeout):
    """Run ``fn`` but give up after ``timeout`` seconds (we exit right after anyway)."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout)


def _exit(code):
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def main():
    impl, name, expected, port, where = sys.argv[1:6]
    options = {}
    if len(sys.argv) > 6:  # extra NodeConfig options as JSON (zmqmesh only)
        import json

        options = json.loads(sys.argv[6])
    out("BOOT", repr(_BOOT))
    try:
        if impl == "zmqmesh":
            run_zmqmesh(name, int(expected), int(port), where, options)
        elif impl == "pyre":
            run_pyre(name, int(expected), int(port), where)
        else:
            out("ERROR", "unknown implementation", impl)
            _exit(2)
    except BaseException as exc:  # report, never linger
        out("ERROR", type(exc).__name__, str(exc).replace("\n", " "))
        _exit(1)


if __name__ == "__main__":
    main()
