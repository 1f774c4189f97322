"""Interop scenario: one zmqmesh `Node` and pyre (the Python ZRE implementation) in one process.

Run ONLY inside a private network namespace, as ``test_pyre_interop.py`` does::

    unshare -n -- python3 -u tests/pyre_interop_scenario.py

It refuses to run (exit code 3) when the namespace holds any interface but ``lo``,
``zre0`` and ``zre0p``: beacons are UDP broadcasts and must never reach a real network.
In a fresh namespace (only ``lo``) it creates the veth pair zre0<->zre0p itself, with
zre0 = 10.77.0.1/24 (broadcast 10.77.0.255); exit code 4 means that failed.

Steps (each wait bounded, every line of the log flushed):

1. discovery both ways: zmqmesh sees the pyre node (its name, ``is_zmqmesh`` False) and
   pyre reports ENTER with the zmqmesh node's UUID;
2. both join "CHAT" and each sees the other's JOIN;
3. WHISPER and SHOUT both ways, multi-frame, contents compared exactly;
3b. idle for longer than either side's expiry, they stay peers (heartbeats interoperate);
4. zmqmesh leaves "CHAT": pyre reports LEAVE (pyre asserts on a wrong status byte, which
   would kill its node thread) and stops sending the group's shouts to us;
5. pyre stops: zmqmesh's ``on_leave`` fires within 2 s; a second pyre node is discovered;
   zmqmesh stops: pyre reports EXIT within 2 s. zmqmesh must have rejected nothing from pyre.

Prints "INTEROP OK" and exits 0, or prints the reason and exits 1.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from netns import LabError, add_veth_here  # tests/netns.py, next to this script

ALLOWED_IFACES = {"lo", "zre0", "zre0p"}
IFACE = "zre0"
ADDRESS = "10.77.0.1"
BEACON_PORT = 5670
GROUP = "CHAT"
DEPARTURE_LIMIT_S = 2.0
WATCHDOG_S = 80.0
EXIT_REFUSED = 3
EXIT_NO_VETH = 4

# pyre's expiry, shortened so that step 3b checks both sides' failure detection in seconds
# (zmqmesh: peer_timeout_s=3). Both stay longer than DEPARTURE_LIMIT_S, so a departure seen
# within that limit comes from the goodbye (or, at zmqmesh, the dropped TCP link), never
# from expiry.
PYRE_EVASIVE_S = 1  # ints: pyre also derives a socket option (SNDHWM) from PEER_EXPIRED
PYRE_EXPIRED_S = 4
PYRE_REAP_INTERVAL_S = 0.25
STEADY_WINDOW_S = 4.5

T0 = time.monotonic()
_LOG_LOCK = threading.Lock()


def log(*parts: object) -> None:
    line = " ".join([f"{time.monotonic() - T0:7.3f}s", *map(str, parts)]) + "\n"
    with _LOG_LOCK:  # callbacks log from the node's thread: one write per line
        sys.stdout.write(line)
        sys.stdout.flush()


def short(frames: list[bytes], limit: int = 60) -> str:
    """Frames for the log, long ones abbreviated."""
    return "[" + ", ".join(repr(f) if len(f) <= limit else f"{f[:limit]!r}...({len(f)} bytes)" for f in frames) + "]"


def finish(code: int) -> None:
    """Leave at once: pyre's threads are not daemons and must not keep the process alive."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# -- namespace safety -------------------------------------------------------------------------


def interface_names() -> set[str]:
    return {name for _index, name in socket.if_nameindex()}


def require_private_netns() -> None:
    """Exit 3 unless this namespace only holds lo/zre0/zre0p; create the veth if it is missing."""
    names = interface_names()
    if not names <= ALLOWED_IFACES:
        print(
            f"REFUSED: foreign interfaces visible {sorted(names - ALLOWED_IFACES)}; this scenario "
            "broadcasts beacons and must run in a private namespace: unshare -n -- python3 -u "
            f"{Path(__file__).name}",
            flush=True,
        )
        finish(EXIT_REFUSED)
    if IFACE in names:
        return
    try:
        add_veth_here(ADDRESS, IFACE)
    except LabError as exc:
        print(f"NO VETH: {exc}", flush=True)
        finish(EXIT_NO_VETH)
    names = interface_names()
    if not names <= ALLOWED_IFACES or IFACE not in names:
        print(f"REFUSED: unexpected interfaces after setup: {sorted(names)}", flush=True)
        finish(EXIT_REFUSED)
    log("namespace ready: interfaces", sorted(names))


# -- waiting ----------------------------------------------------------------------------------


class Failure(Exception):
    """A check of the scenario failed."""


def check(condition: object, reason: str) -> None:
    if not condition:
        raise Failure(reason)


def poll_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy; `Failure` at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise Failure(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


class ZmqmeshEvents:
    """What the zmqmesh node's callbacks saw (they run on the node's inbox thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.joins: list[Any] = []
        self.leaves: list[Any] = []
        self.whispers: list[Any] = []
        self.shouts: list[Any] = []
        self.leave_times: dict[str, float] = {}

    def attach(self, node: Any) -> None:
        @node.on_join
        def _join(peer: Any) -> None:
            with self.lock:
                self.joins.append(peer)
            log(f"  [zmqmesh] on_join {peer} is_zmqmesh={peer.is_zmqmesh} groups={sorted(peer.groups)}")

        @node.on_leave
        def _leave(peer: Any) -> None:
            with self.lock:
                self.leaves.append(peer)
                self.leave_times.setdefault(peer.id, time.monotonic())
            log(f"  [zmqmesh] on_leave {peer}")

        @node.on_whisper
        def _whisper(msg: Any) -> None:
            with self.lock:
                self.whispers.append(msg)
            log(f"  [zmqmesh] on_whisper from {msg.sender_id} data={short(msg.data)}")

        @node.on_shout
        def _shout(msg: Any) -> None:
            with self.lock:
                self.shouts.append(msg)
            log(f"  [zmqmesh] on_shout {msg.group!r} from {msg.sender_id} data={short(msg.data)}")

    def find(self, kind: str, predicate: Callable[[Any], bool]) -> Any:
        with self.lock:
            items = list(getattr(self, kind))
        return next((item for item in items if predicate(item)), None)


class PyreEvents:
    """Reads one pyre node's event socket (from the main thread only) and keeps every event."""

    def __init__(self, node: Any, label: str) -> None:
        import zmq

        self.node = node
        self.label = label
        self.events: list[tuple[float, list[bytes]]] = []
        self.poller = zmq.Poller()
        self.poller.register(node.socket(), zmq.POLLIN)

    def drain(self, wait_ms: float) -> None:
        import zmq

        sock = self.node.socket()
        if not self.poller.poll(wait_ms):
            return
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.events.append((time.monotonic(), frames))
            log(f"  [{self.label}] event {short(frames)}")

    def find(self, predicate: Callable[[list[bytes]], bool]) -> tuple[float, list[bytes]] | None:
        return next(((t, f) for t, f in self.events if predicate(f)), None)

    def wait(self, predicate: Callable[[list[bytes]], bool], timeout: float, what: str) -> tuple[float, list[bytes]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(predicate)
            if found is not None:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"timed out after {timeout} s waiting for pyre {self.label}: {what}")
            self.drain(min(left, 0.1) * 1000)


def event(kind: bytes, peer: bytes, *rest: bytes) -> Callable[[list[bytes]], bool]:
    """Matches a pyre event of ``kind`` from ``peer`` (16-byte UUID), with exact further frames."""

    def match(frames: list[bytes]) -> bool:
        if len(frames) < 3 or frames[0] != kind or frames[1] != peer:
            return False
        return not rest or frames[3:] == list(rest)

    return match


def stop_bounded(label: str, stop: Callable[[], None], timeout: float = 5.0) -> float:
    """Run ``stop`` in a helper thread; a pyre node whose thread died would block forever."""
    started = time.monotonic()
    worker = threading.Thread(target=stop, name=f"stop-{label}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise Failure(f"{label}.stop() did not return within {timeout} s")
    return time.monotonic() - started


# -- the scenario -----------------------------------------------------------------------------


def shorten_pyre_timers() -> None:
    """pyre reads these at run time; set them before any pyre node starts."""
    import pyre.pyre_node
    import pyre.pyre_peer

    pyre.pyre_peer.PyrePeer.PEER_EVASIVE = PYRE_EVASIVE_S
    pyre.pyre_peer.PyrePeer.PEER_EXPIRED = PYRE_EXPIRED_S
    pyre.pyre_node.REAP_INTERVAL = PYRE_REAP_INTERVAL_S


def make_pyre(name: str) -> Any:
    import pyre

    node = pyre.Pyre(name)
    node.set_header("X-IMPL", "pyre")
    node.set_port(str(BEACON_PORT).encode())  # must be bytes
    node.set_interface(IFACE)
    node.start()
    log(f"  pyre {name} started: uuid {node.uuid().hex} endpoint {node.endpoint()}")
    return node


def scenario(cleanup: list[tuple[str, Callable[[], None]]]) -> dict[str, float]:
    import zmqmesh

    timings: dict[str, float] = {}

    log("STEP 0: start the zmqmesh node and a pyre node on zre0")
    shorten_pyre_timers()
    node = zmqmesh.Node(
        "zm",
        interface=IFACE,
        beacon_port=BEACON_PORT,
        mesh="interop",
        heartbeat_interval_s=0.5,
        peer_timeout_s=3.0,
    )
    zm = ZmqmeshEvents()
    zm.attach(node)
    node.start()
    cleanup.append(("zmqmesh", node.stop))
    zm_uuid = bytes.fromhex(node.id)
    log(f"  zmqmesh node started: id {node.id} mailbox {node.endpoints['mailbox']}")
    check(node.endpoints["mailbox"].startswith(f"tcp://{ADDRESS}:"), "zmqmesh mailbox is not on zre0")

    t = time.monotonic()
    p1 = make_pyre("pyre-1")
    cleanup.append(("pyre-1", p1.stop))
    p1_id = p1.uuid().hex
    p1_events = PyreEvents(p1, "pyre-1")

    log("STEP 1: discovery both ways")
    joined = poll_until(lambda: zm.find("joins", lambda p: p.id == p1_id), 10, "zmqmesh on_join for pyre-1")
    check(joined.name == "pyre-1", f"zmqmesh saw the pyre peer named {joined.name!r}")
    check(joined.is_zmqmesh is False, "zmqmesh marked the pyre peer as a zmqmesh node")
    check(joined.headers.get("X-IMPL") == "pyre", f"pyre's header missing: {dict(joined.headers)}")
    check(joined.address == ADDRESS, f"pyre peer address {joined.address!r}")
    peers = node.wait_for_peers(1, timeout=10)
    check([p.id for p in peers] == [p1_id], f"zmqmesh peers: {peers}")
    _, enter = p1_events.wait(event(b"ENTER", zm_uuid), 10, "ENTER of the zmqmesh node")
    check(enter[2] == b"zm", f"pyre saw the zmqmesh node named {enter[2]!r}")
    check(enter[4].decode() == node.endpoints["mailbox"], f"pyre ENTER endpoint {enter[4]!r}")
    check(uuid.UUID(bytes=zm_uuid) in p1.peers(), "zmqmesh node missing from pyre.peers()")
    timings["discovery"] = time.monotonic() - t
    log(f"  discovered both ways {timings['discovery']:.3f}s after pyre-1 began to start")

    log(f"STEP 2: both join {GROUP!r}")
    t = time.monotonic()
    node.join(GROUP)
    p1.join(GROUP)
    poll_until(
        lambda: any(p.id == p1_id and GROUP in p.groups for p in node.peers()),
        5,
        f"zmqmesh to see pyre-1 in {GROUP}",
    )
    p1_events.wait(event(b"JOIN", zm_uuid, GROUP.encode()), 5, f"JOIN {GROUP} of the zmqmesh node")
    check(uuid.UUID(bytes=zm_uuid) in p1.peers_by_group(GROUP), "pyre's group lacks the zmqmesh node")
    timings["join"] = time.monotonic() - t
    log(f"  JOINs seen both ways in {timings['join']:.3f}s")

    log("STEP 3: WHISPER and SHOUT both ways (multi-frame)")
    t = time.monotonic()
    zm_whisper = [b"whisper from zmqmesh", b"\x00\x01\xfe\xff binary", b""]
    node.whisper(p1_id, *zm_whisper)
    p1_events.wait(event(b"WHISPER", zm_uuid, *zm_whisper), 5, "the zmqmesh whisper, frames intact")

    zm_shout = [b"shout from zmqmesh", b"second frame", b"\xff" * 300]
    sent = node.shout(GROUP, *zm_shout)
    check(sent == 1, f"node.shout reached {sent} peers, expected 1")
    p1_events.wait(event(b"SHOUT", zm_uuid, GROUP.encode(), *zm_shout), 5, "the zmqmesh shout, frames intact")

    pyre_whisper = [b"whisper from pyre", b"\x00zero-led frame", b""]
    p1.whisper(uuid.UUID(bytes=zm_uuid), list(pyre_whisper))
    msg = poll_until(lambda: zm.find("whispers", lambda m: m.sender_id == p1_id), 5, "pyre's whisper at zmqmesh")
    check(msg.data == pyre_whisper, f"zmqmesh got whisper frames {msg.data!r}, sent {pyre_whisper!r}")
    check(msg.sender is not None and msg.sender.name == "pyre-1", f"whisper sender {msg.sender!r}")

    pyre_shout = [b"shout from pyre", b"part 2", b"\x01" * 1000]
    p1.shout(GROUP, list(pyre_shout))
    msg = poll_until(lambda: zm.find("shouts", lambda m: m.sender_id == p1_id), 5, "pyre's shout at zmqmesh")
    check(msg.group == GROUP, f"zmqmesh got the shout in group {msg.group!r}")
    check(msg.data == pyre_shout, f"zmqmesh got shout frames {msg.data!r}, sent {pyre_shout!r}")
    with zm.lock:
        check(len(zm.whispers) == 1 and len(zm.shouts) == 1, "zmqmesh got duplicate whispers or shouts")
    timings["messages"] = time.monotonic() - t
    log(f"  4 messages checked in {timings['messages']:.3f}s")

    log(f"STEP 3b: the link stays up for {STEADY_WINDOW_S} s, longer than both sides' expiry")
    # Nothing is sent by the applications now. zmqmesh PINGs a peer silent for
    # heartbeat_interval_s and drops it after peer_timeout_s (3 s) unless pyre's PING-OK
    # counts as life; pyre (patched) sends EXIT for a peer silent for 4 s, so zmqmesh's PINGs
    # must count as life there (pyre PINGs a peer silent for 1 s, zmqmesh must answer).
    t = time.monotonic()
    seen_before = next(p.last_seen for p in node.peers() if p.id == p1_id)
    deadline = t + STEADY_WINDOW_S
    while time.monotonic() < deadline:
        with zm.lock:
            check(not zm.leaves, f"zmqmesh dropped the idle pyre peer: {zm.leaves}")
        p1_events.drain(50)
        check(p1_events.find(lambda f: f[0] == b"EXIT") is None, "pyre dropped the idle zmqmesh node (EXIT)")
    check(p1.actor.thread.is_alive(), "pyre's node thread died while idle")
    seen_after = next((p.last_seen for p in node.peers() if p.id == p1_id), None)
    check(seen_after is not None and seen_after > seen_before, "no traffic from pyre while idle (no PING-OK?)")
    log(f"  still peers after {time.monotonic() - t:.3f}s idle; pyre last seen {time.time() - seen_after:.3f}s ago")

    log(f"STEP 4: zmqmesh leaves {GROUP!r}")
    t = time.monotonic()
    node.leave(GROUP)
    p1_events.wait(event(b"LEAVE", zm_uuid, GROUP.encode()), 5, f"LEAVE {GROUP} of the zmqmesh node")
    check(p1.actor.thread.is_alive(), "pyre's node thread died (its status assertion failed?)")
    # pyre keeps answering, and its shouts to the group no longer reach zmqmesh: a whisper
    # sent after the shout on the same link marks the point where the shout would be in.
    p1.shout(GROUP, [b"after leave"])
    p1.whisper(uuid.UUID(bytes=zm_uuid), [b"marker after leave"])
    poll_until(
        lambda: zm.find("whispers", lambda m: m.data == [b"marker after leave"]) or not p1.actor.thread.is_alive(),
        5,
        "the marker whisper",
    )
    check(p1.actor.thread.is_alive(), "pyre's node thread died after our LEAVE (status byte rejected by its assert?)")
    with zm.lock:
        late = [m for m in zm.shouts if m.data == [b"after leave"]]
    check(not late, "zmqmesh delivered a shout to a group it had left")
    check(uuid.UUID(bytes=zm_uuid) not in p1.peers_by_group(GROUP), "pyre still lists zmqmesh in the group")
    timings["leave"] = time.monotonic() - t
    log(f"  LEAVE seen by pyre in {timings['leave']:.3f}s")

    with zm.lock:
        check(not zm.leaves, f"spurious on_leave before any departure: {zm.leaves}")
    check(p1_events.find(lambda f: f[0] == b"EXIT") is None, "pyre saw an EXIT before any departure")

    log("STEP 5a: pyre-1 stops; zmqmesh must report it gone within 2 s")
    t = time.monotonic()
    stop_s = stop_bounded("pyre-1", p1.stop)
    cleanup.remove(("pyre-1", p1.stop))
    poll_until(lambda: p1_id in zm.leave_times, DEPARTURE_LIMIT_S, "zmqmesh on_leave for pyre-1")
    timings["pyre_departure"] = zm.leave_times[p1_id] - t
    gone = zm.find("leaves", lambda p: p.id == p1_id)
    check(gone.name == "pyre-1", f"on_leave for {gone!r}")
    check(all(p.id != p1_id for p in node.peers()), "pyre-1 still in node.peers()")
    log(f"  pyre-1.stop() took {stop_s:.3f}s; on_leave {timings['pyre_departure']:.3f}s after stop began")

    log("STEP 5b: a second pyre node; then zmqmesh stops and pyre must see EXIT within 2 s")
    t = time.monotonic()
    p2 = make_pyre("pyre-2")
    cleanup.append(("pyre-2", p2.stop))
    p2_id = p2.uuid().hex
    p2_events = PyreEvents(p2, "pyre-2")
    joined = poll_until(lambda: zm.find("joins", lambda p: p.id == p2_id), 10, "zmqmesh on_join for pyre-2")
    check(joined.name == "pyre-2" and joined.is_zmqmesh is False, f"zmqmesh saw {joined!r}")
    p2_events.wait(event(b"ENTER", zm_uuid), 10, "ENTER of the zmqmesh node")
    timings["rediscovery"] = time.monotonic() - t
    log(f"  pyre-2 discovered both ways in {timings['rediscovery']:.3f}s")

    stats = node.stats()
    log(f"  zmqmesh stats: zre={stats['zre']} rejected={stats['rejected']} membership={stats['membership']}")
    check(not stats["rejected"], f"zmqmesh rejected input from pyre: {stats['rejected']}")

    t = time.monotonic()
    stop_s = stop_bounded("zmqmesh", node.stop, timeout=10)
    cleanup.remove(("zmqmesh", node.stop))
    left = max(DEPARTURE_LIMIT_S - (time.monotonic() - t), 0.01)
    exit_at, _ = p2_events.wait(event(b"EXIT", zm_uuid), left, "EXIT of the zmqmesh node")
    timings["zmqmesh_departure"] = exit_at - t
    log(f"  node.stop() took {stop_s:.3f}s; pyre EXIT {timings['zmqmesh_departure']:.3f}s after stop began")
    check(timings["zmqmesh_departure"] <= DEPARTURE_LIMIT_S, "pyre saw EXIT too late")
    check(p2.actor.thread.is_alive(), "pyre-2's node thread died")

    stop_bounded("pyre-2", p2.stop)
    cleanup.remove(("pyre-2", p2.stop))
    return timings


def main() -> None:
    require_private_netns()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's zmqmesh
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(relativeCreated)8.0fms %(name)s %(levelname)s %(message)s"
    )

    def watchdog() -> None:
        log(f"FAIL: scenario watchdog: not finished after {WATCHDOG_S} s")
        for thread in threading.enumerate():
            log(f"  thread alive: {thread.name} daemon={thread.daemon}")
        finish(1)

    timer = threading.Timer(WATCHDOG_S, watchdog)
    timer.daemon = True
    timer.start()

    cleanup: list[tuple[str, Callable[[], None]]] = []
    try:
        timings = scenario(cleanup)
    except BaseException as exc:  # report any failure, then leave without hanging
        reason = str(exc) if isinstance(exc, Failure) else f"{type(exc).__name__}: {exc}"
        log(f"FAIL: {reason}")
        traceback.print_exc(file=sys.stdout)
        for label, stop in reversed(cleanup):
            try:
                stop_bounded(label, stop)
            except BaseException as cleanup_exc:
                log(f"  cleanup of {label} failed: {cleanup_exc}")
        finish(1)
    log("timings: " + ", ".join(f"{k}={v:.3f}s" for k, v in timings.items()))
    log("INTEROP OK")
    finish(0)


if __name__ == "__main__":
    main()
