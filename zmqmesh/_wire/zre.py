"""The ZRE wire format (ZeroMQ RFC 36, version 2): UDP beacons and mailbox commands.

Pure functions and small value types, no sockets: encoding what we send and parsing,
strictly, what we receive. Every parse failure raises `ZreError`, so the caller can log,
count and drop it.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "ZreError",
    "Beacon",
    "Command",
    "ZreMessage",
    "BEACON_SIZE",
    "SEQUENCE_MODULUS",
    "encode_beacon",
    "decode_beacon",
    "encode_command",
    "decode_command",
    "next_sequence",
]

SIGNATURE = b"\xaa\xa1"
PROTOCOL_VERSION = 2
BEACON_PREFIX = b"ZRE\x01"
BEACON_SIZE = 22
SECURE_BEACON_PREFIX = b"ZRE\x03"
SECURE_BEACON_SIZE = 54
SEQUENCE_MODULUS = 1 << 16
_BEACON = struct.Struct("!4s16sH")


class ZreError(ValueError):
    """A beacon or mailbox message that does not follow the ZRE grammar."""


class Command:
    """ZRE command identifiers."""

    HELLO = 1
    WHISPER = 2
    SHOUT = 3
    JOIN = 4
    LEAVE = 5
    PING = 6
    PING_OK = 7
    GOODBYE = 10  # not in RFC 36 v2: Zyre's "I am leaving", a header and nothing else

    NAMES = {1: "HELLO", 2: "WHISPER", 3: "SHOUT", 4: "JOIN", 5: "LEAVE", 6: "PING", 7: "PING-OK",
             10: "GOODBYE"}


class Beacon(NamedTuple):
    """A decoded ZRE beacon; ``port == 0`` means the sender is leaving.

    ``key`` is the sender's 32-byte CURVE public key in a version-3 (secure) beacon,
    ``None`` in a plain version-1 beacon.
    """

    uuid: bytes
    port: int
    key: bytes | None = None


def encode_beacon(uuid: bytes, port: int, key: bytes | None = None) -> bytes:
    """The beacon announcing ``uuid``'s mailbox ``port`` (0 to say goodbye).

    22 bytes (version 1) or, with a CURVE public ``key``, 54 bytes (version 3).
    """
    if key is None:
        return _BEACON.pack(BEACON_PREFIX, uuid, port)
    return _BEACON.pack(SECURE_BEACON_PREFIX, uuid, port) + key


def decode_beacon(data: bytes) -> Beacon:
    """Parse a beacon; raises `ZreError` unless it is a well-formed version-1 or -3 beacon."""
    if len(data) == BEACON_SIZE:
        prefix, uuid, port = _BEACON.unpack(data)
        if prefix == BEACON_PREFIX:
            return Beacon(uuid, port)
    elif len(data) == SECURE_BEACON_SIZE:
        prefix, uuid, port = _BEACON.unpack(data[:BEACON_SIZE])
        if prefix == SECURE_BEACON_PREFIX:
            return Beacon(uuid, port, data[BEACON_SIZE:])
    raise ZreError(f"not a ZRE beacon ({len(data)} bytes)")


def next_sequence(sequence: int) -> int:
    """The sequence number after ``sequence`` (uint16, wrapping at 65536)."""
    return (sequence + 1) % SEQUENCE_MODULUS


class ZreMessage:
    """One mailbox command; fields beyond ``command`` and ``sequence`` depend on the command."""

    __slots__ = ("command", "sequence", "endpoint", "groups", "status", "name", "headers", "group", "content")

    def __init__(self, command: int, sequence: int, endpoint: str = "", groups: list[str] | None = None,
                 status: int = 0, name: str = "", headers: dict[str, str] | None = None, group: str = "",
                 content: list[bytes] | None = None) -> None:
        self.command = command
        self.sequence = sequence
        self.endpoint = endpoint
        self.groups: list[str] = [] if groups is None else groups
        self.status = status
        self.name = name
        self.headers: dict[str, str] = {} if headers is None else headers
        self.group = group
        self.content: list[bytes] = [] if content is None else content

    def __repr__(self) -> str:
        return (f"ZreMessage({Command.NAMES.get(self.command, self.command)}, sequence={self.sequence}, "
                f"name={self.name!r}, group={self.group!r}, frames={len(self.content)})")


# -- encoding ---------------------------------------------------------------------------


def _string(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 255:
        raise ValueError(f"ZRE string longer than 255 bytes: {value[:40]!r}...")
    return bytes((len(raw),)) + raw


def _longstr(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack("!I", len(raw)) + raw


def _strings(values: list[str]) -> bytes:
    return struct.pack("!I", len(values)) + b"".join(_longstr(v) for v in values)


def _dictionary(values: dict[str, str]) -> bytes:
    parts = [struct.pack("!I", len(values))]
    for key, value in values.items():
        parts.append(_string(key))
        parts.append(_longstr(value))
    return b"".join(parts)


def encode_command(msg: ZreMessage) -> list[bytes]:
    """Encode ``msg`` as the frames a DEALER sends (command frame, then any content frames)."""
    head = SIGNATURE + struct.pack("!BBH", msg.command, PROTOCOL_VERSION, msg.sequence)
    cmd = msg.command
    if cmd == Command.HELLO:
        body = (
            _string(msg.endpoint)
            + _strings(msg.groups)
            + bytes((msg.status & 0xFF,))
            + _string(msg.name)
            + _dictionary(msg.headers)
        )
        return [head + body]
    if cmd == Command.WHISPER:
        return [head, *msg.content]
    if cmd == Command.SHOUT:
        return [head + _string(msg.group), *msg.content]
    if cmd in (Command.JOIN, Command.LEAVE):
        return [head + _string(msg.group) + bytes((msg.status & 0xFF,))]
    if cmd in (Command.PING, Command.PING_OK, Command.GOODBYE):
        return [head]
    raise ValueError(f"unknown ZRE command {cmd}")


# -- decoding ---------------------------------------------------------------------------


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise ZreError("truncated ZRE message")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def number1(self) -> int:
        return self.take(1)[0]

    def number4(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def string(self) -> str:
        return self.take(self.number1()).decode("utf-8", "replace")

    def longstr(self) -> str:
        return self.take(self.number4()).decode("utf-8", "replace")

    def count(self, max_items: int) -> int:
        n = self.number4()
        # each item takes at least 4 bytes, so a count beyond what is left is a lie
        if n > max_items or n * 4 > len(self.data) - self.pos:
            raise ZreError("ZRE list count exceeds the message")
        return n

    def done(self) -> None:
        if self.pos != len(self.data):
            raise ZreError("trailing bytes after a ZRE command")


def decode_command(frames: list[bytes], max_items: int = 10_000) -> ZreMessage:
    """Parse a mailbox message (the frames after the ROUTER's identity frame).

    A command this module does not know comes back with only its number and sequence
    (its body unread). Raises `ZreError` for a bad signature, version or malformed field.
    """
    if not frames:
        raise ZreError("empty ZRE message")
    reader = _Reader(frames[0])
    if reader.take(2) != SIGNATURE:
        raise ZreError("bad ZRE signature")
    command = reader.number1()
    version = reader.number1()
    if version != PROTOCOL_VERSION:
        raise ZreError(f"unsupported ZRE version {version}")
    sequence = int.from_bytes(reader.take(2), "big")
    msg = ZreMessage(command, sequence)
    if command == Command.HELLO:
        msg.endpoint = reader.string()
        msg.groups = [reader.longstr() for _ in range(reader.count(max_items))]
        msg.status = reader.number1()
        msg.name = reader.string()
        n = reader.count(max_items)
        for _ in range(n):
            key = reader.string()
            msg.headers[key] = reader.longstr()
        reader.done()
    elif command == Command.WHISPER:
        reader.done()
        msg.content = list(frames[1:])
    elif command == Command.SHOUT:
        msg.group = reader.string()
        reader.done()
        msg.content = list(frames[1:])
    elif command in (Command.JOIN, Command.LEAVE):
        msg.group = reader.string()
        msg.status = reader.number1()
        reader.done()
    elif command in (Command.PING, Command.PING_OK):
        reader.done()
    else:  # GOODBYE (whatever a later Zyre adds to it), or a command of a later ZRE (Zyre's
        # ELECT, LEADER): the caller acts on it or counts it, and keeps the sequence
        return msg
    if command not in (Command.WHISPER, Command.SHOUT) and len(frames) > 1:
        raise ZreError(f"{Command.NAMES[command]} with unexpected extra frames")
    return msg
