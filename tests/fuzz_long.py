#!/usr/bin/env python3
"""Long-running fuzzer for a zmqmesh node: hostile input at every socket and the beacon port.

Not a pytest module (pytest collects only ``test_*.py``). `test_fuzz.py` imports the
generators and the `Driver` from here and runs them under hypothesis; this script runs the
same generators from a seeded `random.Random` (no shrinking) against a node in a child
process, so a crash shows up as the process dying.

    python3 tests/fuzz_long.py                      # 100,000 inputs, seed 1
    python3 tests/fuzz_long.py --inputs 500000 --seed 7
    python3 tests/fuzz_long.py --link-rate 0        # do not pace link-creating inputs

Every ``--check-every`` inputs (1,000) it checks that the node process is alive and that
a ``ping`` request answers within ``--timeout`` seconds, and prints a progress line. At
the end it asks a fresh, well-behaved node to discover the target and call ``ping``,
stops the target with SIGTERM (the target prints its final stats), and prints a summary
ending in ``FUZZ OK`` or ``FUZZ FAILED: <why>``; the exit status is 0 or 1.

The inputs of a run depend only on ``--seed``; input N of a failing run is reproduced by
running the same seed with ``--inputs N+1``.

Inputs that make the node open a ZRE link (a valid beacon from a new UUID, a HELLO naming
a reachable endpoint, gossip entries) are paced to ``--link-rate`` per second: each link
holds three ZeroMQ sockets until the fake peer times out, and an unpaced stream of them
exhausts the node's socket limit (test_fuzz.py::test_beacon_flood_leaves_the_node_intact).

``--only beacon,sub`` restricts the run to some generators (all by default).

``python3 tests/fuzz_long.py --serve CONFIG_JSON`` is the target process itself.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid as uuid_module
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import zmq
from helpers import free_udp_port

from zmqmesh import StopFlag

T = TypeVar("T")

BROADCAST = "127.255.255.255"  # beacons go to loopback broadcast only, never anywhere else
CONTROL_MAGIC = b"\x00zmqmesh-control"
ZRE_SIGNATURE = b"\xaa\xa1"
HELLO, WHISPER, SHOUT, JOIN, LEAVE, PING, PING_OK = range(1, 8)
SERVICES = ("ping", "nope", "\x00queue/aq", "\x00queue/q", "\x00queue/", "\x00stats", "")
QUEUES = ("q", "aq", "nope", "")
TOPICS = (b"t", b"t.x", b"tt", b"t\x00\xff")

# ---------------------------------------------------------------------------------------
# Where generators get their choices: a seeded random.Random, or a hypothesis `draw`.
# ---------------------------------------------------------------------------------------


class Source:
    """The choices a generator makes. `RandomSource` and test_fuzz's `DrawSource` implement it."""

    def integer(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def chance(self, p: float) -> bool:
        raise NotImplementedError

    def pick(self, options: Sequence[T]) -> T:
        raise NotImplementedError

    def blob(self, lo: int, hi: int) -> bytes:
        raise NotImplementedError

    def text(self, hi: int) -> str:
        raise NotImplementedError

    def weighted(self, options: Sequence[tuple[int, T]]) -> T:
        """One of ``options`` (``(weight, value)`` pairs); the first ones are what shrinking tends to."""
        total = sum(w for w, _ in options)
        n = self.integer(0, total - 1)
        for w, value in options:
            if n < w:
                return value
            n -= w
        return options[-1][1]


_TEXT_POOLS = (
    "abcdefghijklmnopqrstuvwxyz0123456789",
    "ABCXYZ_-./:@ *?%",
    "\x00\x01\x1f\x7f\t\n\r",
    "éüßñ\u00ff\u0100",
    "ж中文日本語한국어",
    "\U0001f600\U0001f4a9\u200b\ufeff\uffff",
)


class RandomSource(Source):
    """Choices from a seeded `random.Random`, with sizes biased toward the small."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def pick(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def blob(self, lo: int, hi: int) -> bytes:
        r = self.rng.random()
        if r < 0.5:
            n = self.rng.randint(lo, min(hi, lo + 16))
        elif r < 0.85:
            n = self.rng.randint(lo, max(lo, min(hi, 256)))
        else:
            n = self.rng.randint(lo, hi)
        return self.rng.randbytes(n)

    def text(self, hi: int) -> str:
        n = self.rng.randint(0, min(hi, 8)) if self.rng.random() < 0.6 else self.rng.randint(0, hi)
        pool = self.rng.choice(_TEXT_POOLS) if self.rng.random() < 0.7 else "".join(_TEXT_POOLS)
        return "".join(self.rng.choice(pool) for _ in range(n))


# ---------------------------------------------------------------------------------------
# What the generators know about the target, and what they produce.
# ---------------------------------------------------------------------------------------


@dataclass
class Env:
    """The target under fuzz, and the harmless endpoints a fake peer may point it at."""

    mesh: str
    target_id: str  # 32 hex characters
    endpoints: dict[str, str]  # mailbox, pub, sub, pull, service
    beacon_port: int
    max_message_bytes: int
    sinks: list[str] = field(default_factory=list)  # ROUTERs the driver binds and drains
    closed: list[str] = field(default_factory=list)  # loopback ports nobody listens on

    @property
    def max_frame(self) -> int:
        """The largest frame that reaches the node (libzmq MAXMSGSIZE)."""
        return self.max_message_bytes + 4096

    def reachable(self) -> list[str]:
        """Endpoints a node may connect to during the fuzz: ours, or the target's own."""
        return [*self.sinks, *self.closed, *(self.endpoints[k] for k in ("mailbox", "service", "pull", "sub", "pub"))]


@dataclass
class Input:
    """One fuzz input: multipart messages to one socket (or one datagram to the beacon port).

    ``identity`` picks the sending socket for the mailbox and the service ROUTER:
    ``("slot", i)`` a pooled DEALER with a valid ZRE identity that the driver renews now
    and then, ``("fresh", id)``/``("raw", id)`` a DEALER with exactly that routing id,
    ``("self", id)`` the target's own ZRE identity, ``("anon",)`` libzmq's generated one.
    ``via`` names the socket an oversized input goes to. ``links`` is how many ZRE links
    the input may make the node open (for pacing).
    """

    target: str
    messages: list[list[bytes]]
    identity: tuple[Any, ...] = ("anon",)
    via: str = ""
    links: int = 0
    note: str = ""

    def __repr__(self) -> str:
        def frame(f: bytes) -> str:
            return f"{len(f)}B:{f[:24].hex()}{'..' if len(f) > 24 else ''}"

        ident = "/".join(x.hex()[:16] if isinstance(x, bytes) else str(x) for x in self.identity)
        msgs = " | ".join("[" + ", ".join(frame(f) for f in m[:5]) + (", ..." if len(m) > 5 else "") + "]" for m in self.messages[:6])
        more = f" (+{len(self.messages) - 6} more)" if len(self.messages) > 6 else ""
        via = f" via {self.via}" if self.via else ""
        return f"<{self.target}{via} {self.note} from {ident}: {msgs}{more}>"


# ---------------------------------------------------------------------------------------
# msgpack: values, bodies, and every way a body can lie.
# ---------------------------------------------------------------------------------------

_INTS = (0, 1, -1, 127, 128, -32, -33, 255, 256, 65535, 65536, 2**31 - 1, -(2**31), 2**32, 2**63 - 1, -(2**63), 2**64 - 1)
_FLOATS = (0.0, -0.0, 1.5, 1e308, -1e-308, math.inf, -math.inf, math.nan)


def gen_value(src: Source, depth: int = 0) -> Any:
    """A value msgpack can encode (what a well-behaved peer might send)."""
    leaf_only = depth >= 3
    kind = src.weighted(
        [(3, "none"), (2, "bool"), (5, "int"), (2, "float"), (5, "str"), (4, "bin")]
        + ([] if leaf_only else [(3, "list"), (3, "map")])
    )
    if kind == "none":
        return None
    if kind == "bool":
        return src.chance(0.5)
    if kind == "int":
        return src.pick(_INTS) if src.chance(0.6) else src.integer(-(2**63), 2**64 - 1)
    if kind == "float":
        return src.pick(_FLOATS) if src.chance(0.5) else src.integer(-(10**6), 10**6) / 7.0
    if kind == "str":
        return src.text(40)
    if kind == "bin":
        return src.blob(0, 64)
    if kind == "list":
        return [gen_value(src, depth + 1) for _ in range(src.integer(0, 4))]
    out: dict[Any, Any] = {}
    for _ in range(src.integer(0, 4)):
        key = src.text(12) if src.chance(0.7) else src.integer(-1000, 1000)
        out[key] = gen_value(src, depth + 1)
    return out


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


# (header byte, bytes of the length that follows it) for every sized msgpack type
_SIZED = (
    (b"\xd9", 1), (b"\xda", 2), (b"\xdb", 4),  # str 8/16/32
    (b"\xc4", 1), (b"\xc5", 2), (b"\xc6", 4),  # bin 8/16/32
    (b"\xdc", 2), (b"\xdd", 4),  # array 16/32
    (b"\xde", 2), (b"\xdf", 4),  # map 16/32
    (b"\xc7", 1), (b"\xc8", 2), (b"\xc9", 4),  # ext 8/16/32 (type byte after the length)
)
_NESTERS = (b"\x91", b"\xdc\x00\x01", b"\xdd\x00\x00\x00\x01", b"\x81\xa1k", b"\x81\x00", b"\xc7\x01\x05")


def lying_sized(src: Source, env: Env) -> bytes:
    """A sized type whose length prefix does not match what follows."""
    head, width = src.pick(_SIZED)
    tail = src.blob(0, 48)
    limit = (1 << (8 * width)) - 1
    size = src.pick([0, 1, len(tail) + 1, len(tail) + 1000, limit, env.max_message_bytes + 1, src.integer(0, limit)])
    out = head + min(size, limit).to_bytes(width, "big")
    if head in (b"\xc7", b"\xc8", b"\xc9"):
        out += bytes([src.integer(0, 255)])
    return out + tail


def gen_body(src: Source, env: Env) -> bytes:
    """A frame body: msgpack, a batch of it, or any of the ways msgpack goes wrong.

    Never longer than ``env.max_frame`` (longer frames are the oversize generator's).
    """
    kind = src.weighted(
        [
            (14, "value"), (8, "batch"), (8, "truncated"), (7, "lying"), (6, "deep"), (6, "mutated"),
            (5, "invalid_byte"), (5, "ext"), (3, "unhashable"), (8, "random"), (2, "empty"),
            (2, "near_limit"), (3, "bad_utf8"),
        ]
    )
    if kind == "value":
        body = pack(gen_value(src))
    elif kind == "batch":
        body = b"".join(pack(gen_value(src)) for _ in range(src.integer(2, 6)))
        if src.chance(0.3):
            body += src.pick([b"\x92\x01", b"\xa5ab", b"\xcd\x01", b"\xc1", lying_sized(src, env)])
    elif kind == "truncated":
        whole = pack(gen_value(src))
        if len(whole) < 2:
            whole = pack([gen_value(src), "padding"])
        body = whole[: src.integer(1, len(whole) - 1)]
    elif kind == "lying":
        body = lying_sized(src, env)
        if src.chance(0.3):
            body = pack(gen_value(src)) + body  # a batch whose last object lies
    elif kind == "deep":
        nester = src.pick(_NESTERS)
        depth = src.pick([10, 512, 1023, 1024, 1025, 4096, 60_000, src.integer(1, 100_000)])
        leaf = src.pick([b"\x00", b"", b"\xc1", b"\xa3abc"])
        body = nester * min(depth, (env.max_frame - 8) // len(nester)) + leaf
    elif kind == "mutated":
        damaged = bytearray(pack(gen_value(src)))
        for _ in range(src.integer(1, 4)):
            damaged[src.integer(0, len(damaged) - 1)] = src.integer(0, 255)
        body = bytes(damaged)
    elif kind == "invalid_byte":
        packed = pack(gen_value(src))
        at = src.integer(0, len(packed))
        body = packed[:at] + b"\xc1" + packed[at:]
    elif kind == "ext":
        code = src.pick([-1, 0, 1, 127, -128, src.integer(-128, 127)]) & 0xFF
        size = src.pick([1, 2, 4, 8, 16, 3, 12, 0, 5])
        payload = src.blob(size, size) if src.chance(0.8) else src.blob(0, 20)
        fixed = {1: b"\xd4", 2: b"\xd5", 4: b"\xd6", 8: b"\xd7", 16: b"\xd8"}
        if size in fixed and src.chance(0.6):
            body = fixed[size] + bytes([code]) + payload
        else:  # ext 8 (timestamp-96 lives here: nanoseconds may be out of range)
            body = b"\xc7" + bytes([size, code]) + payload
    elif kind == "unhashable":
        body = src.pick([b"\x81\x90\x00", b"\x81\x80\x00", b"\x81\x91\x01\x02", b"\x82\x00\x00\x00\x01", b"\x81\xc4\x01x\x00"])
    elif kind == "random":
        body = src.blob(0, 512)
    elif kind == "empty":
        body = b""
    elif kind == "near_limit":
        size = env.max_message_bytes + src.pick([-16, -5, 0, 1, 100, 4000])
        body = b"\xc6" + struct.pack("!I", size) + bytes([src.integer(0, 255)]) * min(size, env.max_frame - 5)
    else:  # a str that is not UTF-8
        raw = src.pick([b"\xff\xfe", b"\xed\xa0\x80", b"\xc0\xaf", b"abc\x80"])
        body = (bytes([0xA0 | len(raw)]) + raw) if src.chance(0.5) else pack({"k": 1})[:1] + bytes([0xA0 | len(raw)]) + raw + b"\x01"
    return body[: env.max_frame]


# ---------------------------------------------------------------------------------------
# ZRE: endpoints, headers, commands (valid, mutated, lying), and conversations.
# ---------------------------------------------------------------------------------------

_BAD_ENDPOINTS = (
    "", "tcp://", "tcp://127.0.0.1", "tcp://127.0.0.1:0", "tcp://127.0.0.1:65536", "tcp://127.0.0.1:99999",
    "tcp://127.0.0.1:-1", "tcp://localhost:5670", "tcp://*:5670", "tcp://[::1]:5670",
    "ipc:///tmp/zmqmesh-fuzz", "inproc://zmqmesh", "udp://127.0.0.1:5670", "tcp://127.0.0.1:5670/x",
    "tcp://127.0.0.1:05670x", "TCP://127.0.0.1:5670", " tcp://127.0.0.1:5670", "tcp://127.0.0.1:5670\n",
)
# Every endpoint here is refused by the node or is a loopback address: a fake peer's HELLO headers
# are connected to without a loopback check, and a name that is not an IPv4 address would make
# libzmq ask DNS about it.


def gen_endpoint(src: Source, env: Env) -> tuple[str, bool]:
    """A mailbox endpoint for a HELLO or a gossip entry, and whether the node may connect to it."""
    kind = src.weighted([(4, "bad"), (1, "sink"), (1, "closed"), (1, "own"), (2, "text")])
    if kind == "sink" and env.sinks:
        return src.pick(env.sinks), True
    if kind == "closed" and env.closed:
        return src.pick(env.closed), True
    if kind == "own":
        return env.endpoints[src.pick(["mailbox", "service", "pull", "sub", "pub"])], True
    if kind == "text":
        return src.text(60), False
    return src.pick(_BAD_ENDPOINTS), False


def short(value: str, limit: int = 255) -> str:
    """``value`` cut to at most ``limit`` bytes of UTF-8 (a ZRE short string)."""
    return value.encode()[:limit].decode("utf-8", "ignore")


def gen_headers(src: Source, env: Env, mesh: str | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    if mesh is not None:
        headers["X-ZMQMESH-MESH"] = mesh
    for key in ("X-ZMQMESH-PUB", "X-ZMQMESH-SUB", "X-ZMQMESH-PULL", "X-ZMQMESH-SERVICE"):
        if src.chance(0.3):
            headers[key] = gen_endpoint(src, env)[0]
    for key in ("X-ZMQMESH-VERSION", "X-ZMQMESH-HOST", "X-ZMQMESH-PID", "X-ZMQMESH-KEY"):
        if src.chance(0.15):
            headers[key] = src.text(50)
    for _ in range(src.integer(0, 3)):
        headers[short(src.text(30))] = src.text(80)
    return headers


def gen_group(src: Source) -> str:
    prefix = src.pick(["", "", "zmqmesh/svc/", "zmqmesh/queue/", "zmqmesh/sub/", "zmqmesh/ackqueue/", "zmqmesh/idem/", "zmqmesh/"])
    name = src.pick(["ping", "q", "aq", "t", "x", ""]) if prefix and src.chance(0.6) else src.text(20)
    return short(prefix + name)


def _s1(raw: bytes, size: int | None = None) -> bytes:
    return bytes([(len(raw) if size is None else size) & 0xFF]) + raw


def _s4(raw: bytes, size: int | None = None) -> bytes:
    return struct.pack("!I", (len(raw) if size is None else size) & 0xFFFFFFFF) + raw


def zre_head(command: int, sequence: int, version: int = 2, signature: bytes = ZRE_SIGNATURE) -> bytes:
    return signature + bytes([command & 0xFF, version & 0xFF]) + struct.pack("!H", sequence & 0xFFFF)


def encode_hello(sequence: int, endpoint: str, groups: list[str], status: int, name: str, headers: dict[str, str]) -> bytes:
    body = _s1(endpoint.encode()) + _s4(b"", len(groups)) + b"".join(_s4(g.encode()) for g in groups)
    body += bytes([status & 0xFF]) + _s1(name.encode()) + _s4(b"", len(headers))
    body += b"".join(_s1(k.encode()) + _s4(v.encode()) for k, v in headers.items())
    return zre_head(HELLO, sequence) + body


def gen_hello(src: Source, env: Env, sequence: int, mesh: str | None, links: list[int]) -> bytes:
    endpoint, connectable = gen_endpoint(src, env)
    if connectable:
        links[0] += 1
    groups = [gen_group(src) for _ in range(src.integer(0, 4))]
    name = short(src.pick(["fake", "target", "", src.text(30)]))
    return encode_hello(sequence, short(endpoint), groups, src.integer(0, 255), name, gen_headers(src, env, mesh))


def gen_control(src: Source, env: Env, links: list[int]) -> list[bytes]:
    """The frames of a zmqmesh control WHISPER (after the command frame), valid or not."""
    kind = src.weighted([(3, "peers"), (1, "bye"), (2, "odd_map"), (2, "not_map"), (1, "frames")])
    if kind == "bye":
        return [CONTROL_MAGIC, pack({"t": "bye"})]
    if kind == "peers":
        entries: list[Any] = []
        for _ in range(src.integer(0, 4)):
            shape = src.weighted([(4, "good"), (1, "short_hex"), (1, "bad_hex"), (1, "types"), (1, "self")])
            endpoint, connectable = gen_endpoint(src, env)
            if shape == "good":
                entry: Any = [src.blob(16, 16).hex(), endpoint]
                if src.chance(0.3):
                    entry.append(src.pick(["", "x" * 40, src.text(40)]))
                links[0] += int(connectable)
            elif shape == "short_hex":
                entry = ["ab" * 15, endpoint]
            elif shape == "bad_hex":
                entry = ["zz" * 16, endpoint]
            elif shape == "self":
                entry = [env.target_id, endpoint]
            else:
                entry = src.pick([[1, 2], "x", None, [env.target_id], [env.target_id, endpoint, "", "extra"], [b"\x00" * 16, endpoint]])
            entries.append(entry)
        return [CONTROL_MAGIC, pack({"t": "peers", "peers": entries if src.chance(0.9) else src.pick([None, 5, "x", {}])})]
    if kind == "odd_map":
        return [CONTROL_MAGIC, pack({"t": src.pick(["", "bye ", "peers", "hello", None, 1]), "peers": gen_value(src)})]
    if kind == "not_map":
        return [CONTROL_MAGIC, gen_body(src, env)]
    return [CONTROL_MAGIC] + [gen_body(src, env) for _ in range(src.pick([0, 2, 3]))]


def gen_zre_message(src: Source, env: Env, sequence: int, status: int, mesh: str | None, links: list[int]) -> list[bytes]:
    """One well-formed ZRE command (any command, the given sequence and status)."""
    command = src.weighted([(3, WHISPER), (2, SHOUT), (3, JOIN), (2, LEAVE), (2, PING), (1, PING_OK), (1, HELLO), (2, -1)])
    if command == HELLO:
        return [gen_hello(src, env, sequence, mesh, links)]
    if command == -1:  # a zmqmesh control message
        return [zre_head(WHISPER, sequence)] + gen_control(src, env, links)
    if command == WHISPER:
        return [zre_head(WHISPER, sequence)] + [src.blob(0, 64) for _ in range(src.integer(0, 3))]
    if command == SHOUT:
        return [zre_head(SHOUT, sequence) + _s1(gen_group(src).encode())] + [src.blob(0, 64) for _ in range(src.integer(0, 3))]
    if command in (JOIN, LEAVE):
        return [zre_head(command, sequence) + _s1(gen_group(src).encode()) + bytes([status & 0xFF])]
    return [zre_head(command, sequence)]


def gen_lying_zre(src: Source, env: Env) -> list[bytes]:
    """A ZRE command built by hand with lying lengths and counts, maybe truncated or padded."""
    command = src.pick([HELLO, HELLO, SHOUT, JOIN, LEAVE])
    sequence = src.integer(0, 65535)

    def lie(actual: int, width: int) -> int:
        if not src.chance(0.4):
            return actual
        return src.pick([actual + 1, max(actual - 1, 0), (1 << (8 * width)) - 1, 0, actual * 4 + 3])

    if command == HELLO:
        endpoint = short(gen_endpoint(src, env)[0]).encode()
        groups = [gen_group(src).encode() for _ in range(src.integer(0, 3))]
        headers = [(short(src.text(10)).encode(), src.text(20).encode()) for _ in range(src.integer(0, 3))]
        body = _s1(endpoint, lie(len(endpoint), 1)) + _s4(b"", lie(len(groups), 4))
        body += b"".join(_s4(g, lie(len(g), 4)) for g in groups)
        body += bytes([src.integer(0, 255)]) + _s1(b"fake", lie(4, 1)) + _s4(b"", lie(len(headers), 4))
        body += b"".join(_s1(k, lie(len(k), 1)) + _s4(v, lie(len(v), 4)) for k, v in headers)
    else:
        group = gen_group(src).encode()
        body = _s1(group, lie(len(group), 1))
        if command != SHOUT:
            body += bytes([src.integer(0, 255)])
    frame = zre_head(command, sequence) + body
    cut = src.weighted([(3, "none"), (2, "truncate"), (1, "pad")])
    if cut == "truncate":
        frame = frame[: src.integer(0, len(frame))]
    elif cut == "pad":
        frame += src.blob(1, 16)
    return [frame]


def gen_mutated_zre(src: Source, env: Env) -> list[bytes]:
    """A well-formed command with its head or body damaged, or with extra frames."""
    frames = gen_zre_message(src, env, src.integer(0, 65535), src.integer(0, 255), src.pick([None, env.mesh]), [0])
    head = bytearray(frames[0])
    how = src.weighted([(2, "signature"), (2, "version"), (2, "command"), (2, "truncate"), (2, "flip"), (1, "append"), (2, "extra_frames")])
    if how == "signature":
        head[src.integer(0, 1)] = src.integer(0, 255)
    elif how == "version":
        head[3] = src.pick([0, 1, 3, 255, src.integer(0, 255)])
    elif how == "command":
        head[2] = src.pick([0, 8, 9, 100, 255, src.integer(8, 255)])
    elif how == "truncate":
        del head[src.integer(0, len(head) - 1):]
    elif how == "flip":
        for _ in range(src.integer(1, 3)):
            head[src.integer(0, len(head) - 1)] = src.integer(0, 255)
    elif how == "append":
        head += src.blob(1, 8)
    else:
        frames += [src.blob(0, 32) for _ in range(src.integer(1, 3))]
    frames[0] = bytes(head)
    return frames


def gen_zre_frames(src: Source, env: Env) -> list[bytes]:
    """Any mailbox message: valid, mutated, lying, or random frames."""
    kind = src.weighted([(3, "valid"), (4, "mutated"), (3, "lying"), (3, "random")])
    if kind == "valid":
        return gen_zre_message(src, env, src.integer(0, 65535), src.integer(0, 255), src.pick([None, env.mesh, "other"]), [0])
    if kind == "mutated":
        return gen_mutated_zre(src, env)
    if kind == "lying":
        return gen_lying_zre(src, env)
    frames = [src.blob(0, 128) for _ in range(src.integer(1, 4))]
    if src.chance(0.5):
        frames[0] = ZRE_SIGNATURE + frames[0]
    return frames


def gen_identity(src: Source, env: Env) -> tuple[Any, ...]:
    kind = src.weighted([(6, "slot"), (3, "fresh"), (1, "anon"), (1, "raw"), (1, "self")])
    if kind == "slot":
        return ("slot", src.integer(0, 7))
    if kind == "fresh":
        return ("fresh", b"\x01" + src.blob(16, 16))
    if kind == "raw":  # not a ZRE identity: wrong length or wrong first byte
        raw = src.blob(1, 40)
        return ("raw", raw if not (len(raw) == 17 and raw[0] == 1) else raw + b"x")
    if kind == "self":
        return ("self", b"\x01" + bytes.fromhex(env.target_id))
    return ("anon",)


def gen_mailbox(src: Source, env: Env) -> Input:
    """One to four malformed-or-not messages from one DEALER to the ZRE mailbox."""
    return Input("mailbox", [gen_zre_frames(src, env) for _ in range(src.integer(1, 4))], gen_identity(src, env), note="zre")


def gen_conversation(src: Source, env: Env) -> Input:
    """A fake peer's conversation: HELLO, then commands whose sequence and status mostly follow."""
    identity = gen_identity(src, env)
    links = [0]
    mesh = src.weighted([(4, env.mesh), (3, None), (1, "other-mesh"), (1, "")])
    sequence = src.weighted([(6, 1), (1, 0), (1, 65533), (1, 65534), (1, 65535), (1, src.integer(0, 65535))])
    status = src.integer(0, 255)
    messages: list[list[bytes]] = []
    if src.chance(0.9):
        endpoint, connectable = gen_endpoint(src, env)
        links[0] += int(connectable)
        groups = [gen_group(src) for _ in range(src.integer(0, 4))]
        messages.append([encode_hello(sequence, short(endpoint), groups, status, short(src.pick(["fake", src.text(20)])), gen_headers(src, env, mesh))])
    for _ in range(src.integer(0, 10)):
        step = src.weighted([(20, "next"), (1, "repeat"), (1, "skip"), (1, "random"), (1, "pyre_wrap")])
        if step == "next":
            sequence = (sequence + 1) % 65536
        elif step == "skip":
            sequence = (sequence + src.integer(2, 100)) % 65536
        elif step == "random":
            sequence = src.integer(0, 65535)
        elif step == "pyre_wrap":
            sequence = 0
        if src.chance(0.85):
            status = (status + 1) % 256
        else:
            status = src.integer(0, 255)
        if src.chance(0.08):
            messages.append(gen_zre_frames(src, env))  # garbage mid-conversation
        else:
            if src.chance(0.1):  # the peer re-greets, maybe from another mesh
                mesh = src.pick([mesh, env.mesh, None, "other-mesh"])
            messages.append(gen_zre_message(src, env, sequence, status, mesh, links))
    if not messages:
        messages.append([zre_head(PING, sequence)])
    return Input("mailbox", messages, identity, links=links[0], note="conversation")


def gen_beacon(src: Source, env: Env) -> Input:
    """A UDP datagram to the beacon port: garbage, near-misses, and valid beacons that lie."""
    uuid = src.blob(16, 16)
    links = 0
    kind = src.weighted(
        [(4, "random"), (4, "near_miss"), (3, "mutated"), (2, "goodbye_unknown"), (1, "self"), (2, "secure"), (2, "greet"), (1, "big")]
    )
    if kind == "random":
        data = src.blob(0, 80)
    elif kind == "near_miss":
        prefix = src.pick([b"ZRE", b"ZRX", b"zre", b"ZR", b"", b"ZRE\x00"])
        version = bytes([src.pick([0, 1, 2, 3, 255, src.integer(0, 255)])])
        data = prefix + version + uuid + struct.pack("!H", src.integer(0, 65535))
        data = data[: src.pick([len(data), 21, 22, 23, 53, 54, 55])]
        data += src.blob(0, 40) if src.chance(0.3) else b""
    elif kind == "mutated":
        damaged = bytearray(b"ZRE\x01" + uuid + struct.pack("!H", src.integer(1, 65535)))
        damaged[src.integer(0, 3)] = src.integer(0, 255)
        data = bytes(damaged)
    elif kind == "goodbye_unknown":
        data = b"ZRE\x01" + uuid + b"\x00\x00"
    elif kind == "self":
        data = b"ZRE\x01" + bytes.fromhex(env.target_id) + struct.pack("!H", src.integer(0, 65535))
    elif kind == "secure":  # a version-3 beacon: a plain node counts and ignores it
        data = b"ZRE\x03" + uuid + struct.pack("!H", src.integer(0, 65535)) + src.blob(32, 32)
        data = data[: src.pick([54, 54, 53, 55])] if src.chance(0.3) else data
    elif kind == "greet":  # a valid beacon from a new node, at a port of ours or the target's: it greets it
        port = int(src.pick(env.reachable()).rsplit(":", 1)[1])
        data = b"ZRE\x01" + uuid + struct.pack("!H", port)
        links = 1
    else:  # longer than the node reads (512 bytes)
        data = bytes([src.integer(0, 255)]) * src.pick([511, 512, 513, 1500, 8000])
    return Input("beacon", [[data]], links=links, note="beacon")


def gen_sender(src: Source) -> bytes:
    """frame 1 of a pub/sub or pipeline message: empty, a UUID, UUID + sequence, or anything."""
    kind = src.weighted([(3, "empty"), (3, "uuid"), (3, "uuid_seq"), (2, "odd")])
    if kind == "empty":
        return b""
    if kind == "uuid":
        return src.blob(16, 16)
    if kind == "uuid_seq":
        seq = src.pick([0, 1, 2**63, 2**64 - 1, src.integer(0, 2**64 - 1)])
        return src.pick([b"\x11" * 16, src.blob(16, 16)]) + seq.to_bytes(8, "big")
    return src.blob(0, 40)


def _stream(src: Source, env: Env, names: Sequence[bytes]) -> list[bytes]:
    name = src.pick(names) if src.chance(0.8) else src.blob(0, 300)
    frames = [name, gen_sender(src), gen_body(src, env)]
    if src.chance(0.15):  # wrong frame count
        n = src.pick([1, 2, 4, 5])
        frames = (frames + [gen_body(src, env) for _ in range(2)])[:n]
    return frames


def gen_pull(src: Source, env: Env) -> Input:
    frames = _stream(src, env, [q.encode() for q in QUEUES])
    if src.chance(0.1):  # a payload in a frame of its own (protocol 5): [queue, sender, b"", payload]
        frames = [frames[0], frames[1] if len(frames) > 1 else b"", b"", src.blob(0, 2048)]
    return Input("pull", [frames], note="push")


def gen_sub(src: Source, env: Env) -> Input:
    frames = _stream(src, env, TOPICS)
    if not frames[0].startswith(b"t"):
        frames[0] = b"t" + frames[0]  # the node only subscribes to "t"; others never reach it
    return Input("sub", [frames], note="publish")


def gen_service(src: Source, env: Env) -> Input:
    """A request to the service ROUTER: right or wrong frame count, id, name and body."""
    service = src.pick(SERVICES).encode() if src.chance(0.8) else src.blob(0, 300)
    id_size = src.weighted([(6, (1, 8)), (1, (0, 0)), (1, (64, 64)), (1, (65, 80))])
    request_id = src.blob(*id_size)
    frames = [service, request_id, gen_body(src, env)]
    if service.startswith(b"\x00queue/") and src.chance(0.5):
        items = [pack([src.chance(0.5), gen_value(src)]) if src.chance(0.8) else pack(gen_value(src)) for _ in range(src.integer(1, 4))]
        frames[2] = b"".join(items)  # an at-least-once batch, mostly well-formed
    if src.chance(0.15):
        n = src.pick([1, 2, 4, 5])
        frames = (frames + [src.blob(0, 16) for _ in range(2)])[:n]
    elif len(frames) == 3 and len(service) < 256 and len(request_id) < 256 and src.chance(0.3):
        # the one-frame form (protocol 3), its lengths mostly right
        service_len = len(service) if src.chance(0.85) else src.integer(0, 255)
        id_len = len(request_id) if src.chance(0.85) else src.integer(0, 255)
        frames = [bytes((service_len,)) + service + bytes((id_len,)) + request_id + frames[2]]
    if len(frames) == 3 and len(service) < 256 and 0 < len(request_id) < 256 and src.chance(0.15):
        # a batch (protocol 4): 0x00, then per request [S] service [I] id [B, 4 bytes] body; mostly right
        items = [(service, request_id, frames[2])]
        items += [(src.pick(SERVICES).encode(), src.blob(1, 8), gen_body(src, env)) for _ in range(src.integer(0, 3))]
        frame = b"\x00" + b"".join(bytes((len(s),)) + s + bytes((len(i),)) + i + len(b).to_bytes(4, "big") + b
                                   for s, i, b in items)
        if src.chance(0.1):
            frame = frame[:src.integer(1, len(frame))]  # cut short
        elif src.chance(0.05):
            frame = b"\x00" + (b"\x01s\x01i\x00\x00\x00\x00" * 257)  # one request too many
        frames = [frame]
    identity = ("fresh", src.blob(20, 20)) if src.chance(0.3) else ("anon",)  # 16+4 bytes: a zmqmesh caller
    return Input("service", [frames], identity, note="request")


def gen_xpub(src: Source, env: Env) -> Input:
    """What an XSUB may send upstream to the node's XPUB: (un)subscriptions and user messages."""
    messages = []
    for _ in range(src.integer(1, 3)):
        kind = src.weighted([(3, "subscribe"), (3, "unsubscribe"), (2, "user"), (1, "multi")])
        prefix = src.pick([b"", b"t", b"t.", b"zz"]) if src.chance(0.5) else src.blob(0, 64)
        if kind == "subscribe":
            messages.append([b"\x01" + prefix])
        elif kind == "unsubscribe":
            messages.append([b"\x00" + prefix])
        elif kind == "user":
            messages.append([src.blob(0, 64)])
        else:
            messages.append([src.pick([b"\x01", b"\x00", b"\x02"]) + prefix, b"\x01" + prefix, src.blob(0, 16)])
    return Input("xpub", messages, note="xsub")


def gen_oversize(src: Source, env: Env) -> Input:
    """Frames around the limits: up to max_message_bytes + 4096 are counted, larger ones close the connection."""
    via = src.pick(["mailbox", "service", "pull", "sub"])
    size = env.max_message_bytes + src.pick([-1, 0, 1, 4095, 4096, 4097, 5000, env.max_message_bytes])
    big = bytes([src.integer(0, 255)]) * size
    if via == "mailbox":
        frames = src.pick([[ZRE_SIGNATURE + big], [zre_head(WHISPER, 1), big], [big]])
    elif via == "service":
        frames = src.pick([[b"ping", b"id", big], [big, b"id", b"\xc0"], [b"ping", big, b"\xc0"]])
    else:
        frames = src.pick([[b"t" if via == "sub" else b"q", b"", big], [b"t" + big if via == "sub" else big, b"", b"\xc0"]])
    return Input("oversize", [frames], ("fresh", b"\x01" + src.blob(16, 16)), via=via, note=f"{size}B")


GENERATORS: dict[str, Callable[[Source, Env], Input]] = {
    "beacon": gen_beacon,
    "mailbox": gen_mailbox,
    "conversation": gen_conversation,
    "service": gen_service,
    "pull": gen_pull,
    "sub": gen_sub,
    "xpub": gen_xpub,
    "oversize": gen_oversize,
}
WEIGHTS = {"beacon": 16, "mailbox": 16, "conversation": 12, "service": 16, "pull": 14, "sub": 14, "xpub": 6, "oversize": 1}


def gen_any(src: Source, env: Env, only: Sequence[str] = ()) -> Input:
    """An input for any target (or one of ``only``), in the proportions of `WEIGHTS`."""
    return GENERATORS[src.weighted([(w, k) for k, w in WEIGHTS.items() if not only or k in only])](src, env)


# ---------------------------------------------------------------------------------------
# The driver: the sockets that deliver inputs, liveness checks, and conformance checks.
# ---------------------------------------------------------------------------------------



def closed_tcp_endpoint() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


class Pacer:
    """Sleeps so that at most ``rate`` link-creating inputs go out per second (0: no pacing)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.next_at = 0.0

    def spend(self, links: int) -> None:
        if self.rate <= 0 or links <= 0:
            return
        now = time.monotonic()
        if self.next_at > now:
            time.sleep(self.next_at - now)
        self.next_at = max(self.next_at, now) + links / self.rate


class Driver:
    """Owns the fuzzing sockets and delivers `Input`s; checks what the node answers."""

    SLOT_USES = 64  # a pooled ZRE identity is renewed after this many inputs

    def __init__(self, env: Env, ctx: zmq.Context[Any], rng: random.Random, link_rate: float = 80.0) -> None:
        self.env = env
        self.ctx = ctx
        self.rng = rng
        self.pacer = Pacer(link_rate)
        self.sent: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []
        self.pings = 0
        self.ping_max_s = 0.0
        self._rid = 0
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        ep = env.endpoints
        self.checker = self._socket(zmq.DEALER, ep["service"])
        self.requesters: dict[bytes | None, zmq.Socket[Any]] = {None: self._socket(zmq.DEALER, ep["service"])}
        self.push = self._socket(zmq.PUSH, ep["pull"])
        self.publisher = self._publisher()
        self.xsub = self._socket(zmq.XSUB, ep["pub"])
        self.slots: list[tuple[zmq.Socket[Any], int] | None] = [None] * 8
        self.dealers: collections.OrderedDict[bytes | None, zmq.Socket[Any]] = collections.OrderedDict()

    # sockets -------------------------------------------------------------------------------

    def _socket(self, kind: int, endpoint: str, identity: bytes | None = None) -> zmq.Socket[Any]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        if identity is not None:
            sock.setsockopt(zmq.ROUTING_ID, identity)
        sock.connect(endpoint)
        return sock

    def _publisher(self) -> zmq.Socket[Any]:
        """An XPUB connected to the node's SUB, returned once the node's subscription to "t" arrived."""
        pub = self._socket(zmq.XPUB, self.env.endpoints["sub"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if pub.poll(100) and pub.recv() == b"\x01t":
                return pub
        raise AssertionError("the node's SUB never subscribed to 't'")

    def _mailbox_dealer(self, identity: tuple[Any, ...]) -> zmq.Socket[Any]:
        kind = identity[0]
        if kind == "slot":
            i = identity[1]
            entry = self.slots[i]
            if entry is None or entry[1] >= self.SLOT_USES:
                if entry is not None:
                    entry[0].close()
                ident = b"\x01" + self.rng.randbytes(16)
                entry = (self._socket(zmq.DEALER, self.env.endpoints["mailbox"], ident), 0)
            self.slots[i] = (entry[0], entry[1] + 1)
            return entry[0]
        key = identity[1] if len(identity) > 1 else None
        sock = self.dealers.get(key)
        if sock is None:
            sock = self.dealers[key] = self._socket(zmq.DEALER, self.env.endpoints["mailbox"], key)
            while len(self.dealers) > 16:
                self.dealers.popitem(last=False)[1].close()
        else:
            self.dealers.move_to_end(key)
        return sock

    def _requester(self, identity: tuple[Any, ...]) -> zmq.Socket[Any]:
        key = identity[1] if identity[0] != "anon" else None
        sock = self.requesters.get(key)
        if sock is None:
            sock = self.requesters[key] = self._socket(zmq.DEALER, self.env.endpoints["service"], key)
            while len(self.requesters) > 8:
                oldest = next(k for k in self.requesters if k is not None)
                self._drain_replies(self.requesters.pop(oldest), close=True)
        return sock

    # delivering ----------------------------------------------------------------------------

    def send(self, inp: Input) -> None:
        """Deliver one input (never blocks for long: a full queue drops, as a real sender would)."""
        self.pacer.spend(inp.links)
        self.sent[inp.target] += 1
        if inp.target == "beacon":
            self.udp.sendto(inp.messages[0][0], (BROADCAST, self.env.beacon_port))
            return
        if inp.target == "oversize":
            self._send_oversize(inp)
            return
        if inp.target == "mailbox":
            sock = self._mailbox_dealer(inp.identity)
        elif inp.target == "service":
            sock = self._requester(inp.identity)
        else:
            sock = {"pull": self.push, "sub": self.publisher, "xpub": self.xsub}[inp.target]
        for frames in inp.messages:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                self.sent["dropped_by_driver"] += 1

    def _send_oversize(self, inp: Input) -> None:
        """A throwaway socket: the node may close its connection, which is the point."""
        via = inp.via
        ep = self.env.endpoints
        if via == "sub":
            sock = self._socket(zmq.XPUB, ep["sub"])
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and not (sock.poll(50) and sock.recv() == b"\x01t"):
                pass
        else:
            kind = zmq.PUSH if via == "pull" else zmq.DEALER
            identity = inp.identity[1] if via == "mailbox" else None
            sock = self._socket(kind, ep["pull" if via == "pull" else via], identity)
        try:
            sock.send_multipart(inp.messages[0], zmq.NOBLOCK)
        except zmq.Again:
            self.sent["dropped_by_driver"] += 1
        sock.close(linger=1000)

    # checking ------------------------------------------------------------------------------

    def ping(self, timeout: float) -> float:
        """Call the node's ``ping`` service as a bare DEALER; returns the round trip in seconds."""
        self._rid += 1
        rid = b"chk" + self._rid.to_bytes(8, "big")
        start = time.monotonic()
        self.checker.send_multipart([b"ping", rid, pack(None)])
        deadline = start + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.checker.poll(int(remaining * 1000) + 1):
                raise AssertionError(f"ping unanswered within {timeout} s")
            frames = self.checker.recv_multipart()
            if frames[0] == rid:
                break
        elapsed = time.monotonic() - start
        if frames != [rid, b"\x00", pack("pong")]:
            raise AssertionError(f"bad ping reply: {frames!r}")
        self.pings += 1
        self.ping_max_s = max(self.ping_max_s, elapsed)
        return elapsed

    def drain(self) -> list[str]:
        """Read everything the node sent back and check it follows the protocol; returns new problems."""
        before = len(self.problems)
        for sock in list(self.requesters.values()):
            self._drain_replies(sock)
        for sock in (self.xsub, self.publisher):
            while sock.poll(0):
                sock.recv_multipart()
        for entry in [*self.slots, *((s, 0) for s in self.dealers.values())]:
            if entry is not None:
                while entry[0].poll(0):
                    frames = entry[0].recv_multipart()
                    self.problems.append(f"the mailbox ROUTER sent something to a DEALER: {frames!r:.200}")
        return self.problems[before:]

    def _drain_replies(self, sock: zmq.Socket[Any], close: bool = False) -> None:
        while sock.poll(0):
            frames = sock.recv_multipart()
            problem = reply_problem(frames)
            if problem:
                self.problems.append(f"reply {frames!r:.200}: {problem}")
        if close:
            sock.close()

    def close(self) -> None:
        """Close the UDP socket (the ZeroMQ sockets go with the caller's context)."""
        self.udp.close()


def reply_batch(frame: bytes) -> list[list[bytes]] | None:
    """The replies of a reply batch (protocol 4), or None if ``frame`` is not one."""
    replies, at = [], 1
    while at < len(frame):
        status_at = at + 1 + frame[at]
        body_at = status_at + 5
        end = body_at + int.from_bytes(frame[status_at + 1:body_at], "big")
        if body_at > len(frame) or end > len(frame):
            return None
        replies.append([frame[at + 1:status_at], frame[status_at:status_at + 1], frame[body_at:end]])
        at = end
    return replies or None


def reply_problem(frames: list[bytes]) -> str | None:
    """Why a service reply breaks the protocol (docs/protocol.md), or None."""
    if len(frames) == 1 and frames[0][:1] == b"\x00":
        replies = reply_batch(frames[0])  # (else: the one-frame reply to an empty request id)
        if replies is not None:
            if len(replies) > 256:
                return f"a batch of {len(replies)} replies"
            return next((p for p in map(reply_problem, replies) if p), None)
    if len(frames) == 1:  # the one-frame form (protocol 3): [len(id)] id status body
        reply = frames[0]
        if not reply or len(reply) < reply[0] + 2:
            return "a one-frame reply shorter than its request id and status"
        frames = [reply[1:1 + reply[0]], reply[1 + reply[0]:2 + reply[0]], reply[2 + reply[0]:]]
    if len(frames) != 3:
        return f"{len(frames)} frames, expected 3 (or 1)"
    rid, status, body = frames
    if len(rid) > 64 and status != b"\x03":  # (a request id too long is answered 0x03)
        return "request id longer than 64 bytes, not answered 0x03"
    if status not in (b"\x00", b"\x01", b"\x02", b"\x03"):
        return "unknown status"
    if status in (b"\x02", b"\x03") and body:
        return "status 2/3 with a body"
    if status == b"\x01":
        try:
            info = msgpack.unpackb(body, raw=False)
        except Exception as exc:
            return f"undecodable error body: {exc}"
        if not isinstance(info, dict) or not {"type", "message", "traceback"} <= set(info):
            return "error body is not {type, message, traceback}"
    if status == b"\x00" and body:  # empty: the acknowledgement of an at-least-once batch
        try:
            msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception as exc:
            return f"undecodable ok body: {exc}"
    return None


class Sink:
    """A ROUTER fake peers name as their mailbox: drains what the node says and checks it parses as ZRE."""

    def __init__(self, ctx: zmq.Context[Any], handover: bool) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if handover:
            self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.received = 0

    def drain(self) -> list[str]:
        from zmqmesh._wire import zre  # the library's own strict parser

        problems = []
        while self.sock.poll(0):
            frames = self.sock.recv_multipart()
            self.received += 1  # frames[0] is the link's identity (libzmq's own when two links share one)
            try:
                zre.decode_command(frames[1:])
            except Exception as exc:
                problems.append(f"the node sent a ZRE message its own parser rejects ({exc}): {frames[1:]!r:.200}")
        return problems

    def close(self) -> None:
        self.sock.close(0)


def make_env(mesh: str, target_id: str, endpoints: dict[str, str], beacon_port: int, max_message_bytes: int, sinks: list[Sink]) -> Env:
    return Env(
        mesh=mesh,
        target_id=target_id,
        endpoints=endpoints,
        beacon_port=beacon_port,
        max_message_bytes=max_message_bytes,
        sinks=[s.endpoint for s in sinks],
        closed=[closed_tcp_endpoint() for _ in range(2)],
    )


# ---------------------------------------------------------------------------------------
# The target process (--serve).
# ---------------------------------------------------------------------------------------


class ErrorLog(logging.Handler):
    """Counts log records at WARNING and above; keeps the first few errors (an error means an internal failure)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.warnings = 0
        self.errors = 0
        self.first_errors: list[str] = []
        self.last_errors: collections.deque[str] = collections.deque(maxlen=5)
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock2:
            if record.levelno >= logging.ERROR:
                self.errors += 1
                text = record.getMessage()
                if record.exc_info and record.exc_info[1] is not None:
                    text += f" [{type(record.exc_info[1]).__name__}: {record.exc_info[1]}]"
                text = f"{record.name}: {text}"[:400]
                if len(self.first_errors) < 5:
                    self.first_errors.append(text)
                self.last_errors.append(text)
            else:
                self.warnings += 1


def node_internals(node: Any) -> dict[str, Any]:
    """Sizes of the node's internal tables (best effort: the library may change under us)."""
    out: dict[str, Any] = {}
    core: Any = getattr(node, "_engine", None)
    probes: dict[str, Callable[[], Any]] = {
        "ready_peers": lambda: len(core.membership.ready_peers()),
        "zre_peers": lambda: len(core.membership.peers),
        "foreign_remembered": lambda: core.membership.foreign_count(),
        "zmq_sockets": lambda: sum(1 for s in list(core.ctx._sockets) if not s.closed),
        "pub_sequences": lambda: len(core.inbox.gaps),
        "peer_received": lambda: len(core.stats.peer_received),
        "sub_counts": lambda: core.publisher.subscription_count(),
    }
    for key, probe in probes.items():
        try:
            out[key] = probe()
        except Exception:
            out[key] = None
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            out["rss_kb"] = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        out["fds"] = len(os.listdir(f"/proc/{os.getpid()}/fd"))
    except Exception:
        pass
    return out


def serve(config_json: str) -> int:
    """Run the target node until SIGTERM; print READY first and STATS (JSON) last."""
    import zmqmesh

    cfg = json.loads(config_json)
    log = ErrorLog()
    logging.getLogger().addHandler(log)
    node = zmqmesh.Node("fuzz-target", **cfg)

    def report(_msg: Any = None) -> dict[str, Any]:
        stats = node.stats()
        stats["peers"] = len(stats.get("peers", {}))  # one entry per sender id ever seen: may be huge
        return {"stats": stats, "log_errors": log.errors, "log_warnings": log.warnings, "first_errors": log.first_errors,
                "internals": node_internals(node)}

    node.service("ping", lambda msg: "pong")
    node.service("stats", lambda msg: json.dumps(report()))
    node.pull("q", lambda msg: None)
    node.pull("aq", lambda msg: None, at_least_once=True)
    node.subscribe("t", lambda msg: None)
    stop = StopFlag()  # (a signal handler raises it: a threading.Event set there can deadlock)
    signal.signal(signal.SIGTERM, stop.set)
    node.start()
    print("READY " + json.dumps({"id": node.id, "endpoints": node.endpoints, "internals": node_internals(node)}), flush=True)
    stop.wait()
    final = report()
    started = time.monotonic()
    node.stop()
    final["stop_s"] = round(time.monotonic() - started, 3)
    print("STATS " + json.dumps(final), flush=True)
    return 0


# ---------------------------------------------------------------------------------------
# The fuzz run.
# ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import zmqmesh

    started = time.monotonic()
    mesh = f"fuzz-{uuid_module.uuid4().hex[:10]}"
    beacon_port = free_udp_port()
    config = {"beacon_port": beacon_port, "mesh": mesh, "max_message_bytes": args.max_message_bytes,
              "heartbeat_interval_s": 0.5, "peer_timeout_s": 2.0}
    proc = subprocess.Popen(
        [sys.executable, "-u", os.path.abspath(__file__), "--serve", json.dumps(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: collections.deque[str] = collections.deque()
    err_lines: collections.deque[str] = collections.deque(maxlen=60)
    threading.Thread(target=pump, args=(proc.stdout, lines), daemon=True).start()
    threading.Thread(target=pump, args=(proc.stderr, err_lines), daemon=True).start()
    ready = wait_line(lines, "READY ", proc, 30)
    if ready is None:
        print("FUZZ FAILED: the target never became ready\n" + "\n".join(err_lines))
        return 1
    info = json.loads(ready[len("READY "):])
    print(f"target pid {proc.pid}, node {info['id'][:8]}, mesh {mesh}, beacon port {beacon_port}, "
          f"max_message_bytes {args.max_message_bytes}, seed {args.seed}, inputs {args.inputs}, "
          f"link rate {args.link_rate}/s", flush=True)

    ctx = zmq.Context()
    sinks = [Sink(ctx, handover=False), Sink(ctx, handover=True)]
    env = make_env(mesh, info["id"], info["endpoints"], beacon_port, args.max_message_bytes, sinks)
    src = RandomSource(random.Random(args.seed))
    driver = Driver(env, ctx, random.Random(args.seed + 1), link_rate=args.link_rate)
    recent: collections.deque[str] = collections.deque(maxlen=20)
    failures: list[str] = []  # the run goes on after a failure, unless the target died or hung
    answered = 0
    builtin = "not asked"
    sent = 0
    at_end: dict[str, Any] = {}
    try:
        for i in range(1, args.inputs + 1):
            inp = gen_any(src, env, args.only)
            recent.append(f"#{i} {inp!r}"[:600])
            driver.send(inp)
            sent = i
            if i % args.check_every and i != args.inputs:
                continue
            if proc.poll() is not None:
                failures.append(f"the target process died (exit code {proc.returncode}) within inputs "
                                f"{i - args.check_every + 1}..{i}")
                break
            try:
                latency = driver.ping(args.timeout)
                answered += 1
            except AssertionError as exc:
                failures.append(f"{exc} after input {i}" + (" (the target died)" if proc.poll() is not None else ""))
                break
            problems = driver.drain() + [p for s in sinks for p in s.drain()]
            if problems and not any(f.startswith("protocol") for f in failures):
                failures.append(f"protocol violations (first after input {i}): " + "; ".join(problems[:3]))
            if i % (args.check_every * 10) == 0 or i == args.inputs:
                print(f"[{i:>7}/{args.inputs}] {time.monotonic() - started:6.1f} s  ping {latency * 1000:6.1f} ms  "
                      f"target rss {proc_status(proc.pid, 'VmRSS')} fds {proc_fds(proc.pid)}", flush=True)
        alive = not failures
        if alive:
            try:
                report = json.loads(call_service(ctx, env, "stats", args.timeout))
                answered += 1
                rejected = report["stats"]["rejected"]
                if report["log_errors"]:
                    failures.append(f"{report['log_errors']} internal error(s) logged by the target, e.g. "
                                    f"{report['first_errors'][:2]}")
                if rejected.get("zre_handler_error"):
                    failures.append(f"the ZRE handler raised on {rejected['zre_handler_error']} input(s) (zre_handler_error)")
                if not sum(rejected.values()) and set(args.only) != {"xpub"}:  # xpub input is all legal
                    failures.append("no input was counted as rejected")
                membership = report["stats"]["membership"]
                ready = report["internals"].get("ready_peers")
                vanished = membership.get("joined", 0) - membership.get("left", 0) - (ready or 0)
                if ready is not None and vanished:
                    failures.append(f"{vanished} peer(s) joined and vanished without a leave (joined "
                                    f"{membership.get('joined', 0)}, left {membership.get('left', 0)}, ready now {ready})")
                at_end = report["internals"]
                huge = {p: c for p in ("pubsub", "pipeline", "request", "service", "zre")
                        for f, c in report["stats"].get(p, {}).items() if c >= 2**63}
                if huge:
                    failures.append(f"counters beyond int64, msgpack cannot carry them: {huge}")
            except AssertionError as exc:
                failures.append(f"the stats service did not answer: {exc}")
            try:
                call_service(ctx, env, "\x00stats", min(args.timeout, 3))
                builtin = "answered"
                answered += 1
            except AssertionError as exc:
                builtin = f"UNANSWERED ({exc})"
                failures.append("the built-in \\x00stats service (node_stats) no longer answers")
            # a fresh, well-behaved node can still discover the target and call it
            client = zmqmesh.Node("fuzz-client", beacon_port=beacon_port, mesh=mesh, max_message_bytes=args.max_message_bytes)
            client.start()
            try:
                client.wait_for_service("ping", timeout=args.timeout)
                reply = client.request("ping", None, timeout=args.timeout)
                if reply != "pong":
                    failures.append(f"the fresh client got {reply!r}")
                answered += 1
            except Exception as exc:
                failures.append(f"a fresh node could not call ping through discovery: {type(exc).__name__}: {exc}")
            finally:
                client.stop()
    finally:
        driver.close()
        for sink in sinks:
            sink.close()
        ctx.destroy(linger=0)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
                failures.append("the target did not stop within 15 s of SIGTERM")
    time.sleep(0.2)
    stats_line = next((line for line in lines if line.startswith("STATS ")), None)
    final = json.loads(stats_line[len("STATS "):]) if stats_line else None
    if proc.returncode != 0 and not any("died" in f for f in failures):
        failures.append(f"the target exited with code {proc.returncode}")
    if final is None:
        failures.append("the target printed no final stats")
    elapsed = time.monotonic() - started

    print()
    print("=" * 78)
    print(f"zmqmesh fuzz summary: seed {args.seed}, {sent} inputs, {elapsed:.1f} s")
    print("inputs sent per target:")
    for target in ("beacon", "mailbox", "service", "pull", "sub", "xpub", "oversize"):
        print(f"  {target:<10} {driver.sent.get(target, 0):>8}")
    if driver.sent.get("dropped_by_driver"):
        print(f"  (messages the driver could not queue: {driver.sent['dropped_by_driver']})")
    print(f"requests answered: {answered} ({driver.pings} liveness pings, slowest {driver.ping_max_s * 1000:.1f} ms; "
          f"built-in \\x00stats {builtin})")
    if final is not None:
        stats = final["stats"]
        print("node rejected counters:")
        for reason, count in sorted(stats["rejected"].items()):
            print(f"  {reason:<26} {count:>8}")
        print(f"  {'total':<26} {sum(stats['rejected'].values()):>8}")
        for pattern in ("pubsub", "pipeline", "service", "zre"):
            print(f"node {pattern:<8} {stats[pattern]}")
        print(f"node membership {stats['membership']}")
        print(f"target log: {final['log_warnings']} warning(s), {final['log_errors']} error(s); "
              f"stop took {final.get('stop_s')} s")
        start_int = info.get("internals", {})
        print("target internals (start -> after the last input): "
              + ", ".join(f"{k} {v} -> {at_end.get(k)}" for k, v in start_int.items()))
        print(f"ZRE messages the target sent to fake peers, all parsed: {sum(s.received for s in sinks)}")
    if failures:
        if err_lines:
            print("target stderr (tail):\n  " + "\n  ".join(list(err_lines)[-15:]))
        if not alive:
            print("last inputs:")
            for line in list(recent)[-8:]:
                print("  " + line)
        print("FUZZ FAILED: " + " | ".join(failures))
        return 1
    print("FUZZ OK")
    return 0


def pump(stream: Any, into: collections.deque[str]) -> None:
    """Read a child's output line by line into a deque (a reader thread)."""
    for line in stream:
        into.append(line.rstrip("\n"))


def proc_status(pid: int, field_name: str) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(" ".join(line.split()[1:]) for line in f if line.startswith(field_name + ":"))
    except (OSError, StopIteration):
        return "?"


def proc_fds(pid: int) -> str:
    try:
        return str(len(os.listdir(f"/proc/{pid}/fd")))
    except OSError:
        return "?"


def wait_line(lines: collections.deque[str], prefix: str, proc: subprocess.Popen[str], timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            if line.startswith(prefix):
                return line
        if proc.poll() is not None:
            return None
        time.sleep(0.02)
    return None


def call_service(ctx: zmq.Context[Any], env: Env, service: str, timeout: float) -> Any:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(env.endpoints["service"])
    try:
        sock.send_multipart([service.encode(), b"1", pack(None)])
        if not sock.poll(timeout * 1000):
            raise AssertionError(f"{service!r} unanswered within {timeout} s")
        rid, status, body = sock.recv_multipart()
        if status != b"\x00":
            raise AssertionError(f"{service!r} answered status {status!r}: {body[:200]!r}")
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs to send (default 100000)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the input stream (default 1)")
    parser.add_argument("--check-every", type=int, default=1000, help="inputs between liveness checks (default 1000)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds a ping may take (default 10)")
    parser.add_argument("--max-message-bytes", type=int, default=64 * 1024, help="the target's max_message_bytes (default 65536)")
    parser.add_argument("--link-rate", type=float, default=80.0, help="link-creating inputs per second, 0 = unpaced (default 80)")
    parser.add_argument("--only", type=lambda v: [g for g in v.split(",") if g], default=[],
                        help=f"comma-separated generators to use (default all: {','.join(GENERATORS)})")
    parser.add_argument("--serve", metavar="CONFIG_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(GENERATORS)
    if unknown:
        parser.error(f"unknown generators: {', '.join(sorted(unknown))}")
    if args.serve is not None:
        return serve(args.serve)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
