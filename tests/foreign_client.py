"""A foreign program written from docs/protocol.md alone: the standard library, pyzmq
and msgpack, no zmqmesh. Run by test_foreign_client.py as

    python foreign_client.py MESH BEACON_PORT

It finds a node by its beacon, becomes a ZRE peer (and so a zmqmesh node of MESH), reads
the node's HELLO, answers its PINGs, calls its service "double" (once with a request
id that is too long, once in the one-frame form, three times in a batch), subscribes to
"news.", pushes to "work", answers "echo", and pulls "jobs" at least once. It prints what it sees, one line each, and ends on the node's bye.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

import msgpack
import zmq

MESH, BEACON_PORT = sys.argv[1], int(sys.argv[2])
HELLO, WHISPER, SHOUT, JOIN, LEAVE, PING, PING_OK = 1, 2, 3, 4, 5, 6, 7
CONTROL = b"\x00zmqmesh-control"


def say(*words: object) -> None:
    print(*words, flush=True)


# -- ZRE, as RFC 36 and protocol.md write it ----------------------------------------------

def string(text: str) -> bytes:
    data = text.encode()
    return bytes((len(data),)) + data


def longstr(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!I", len(data)) + data


def command(cmd: int, sequence: int, body: bytes = b"") -> bytes:
    return b"\xaa\xa1" + bytes((cmd, 2)) + struct.pack("!H", sequence) + body


def hello_body(endpoint: str, groups: list[str], status: int, name: str, headers: dict[str, str]) -> bytes:
    return (string(endpoint) + struct.pack("!I", len(groups)) + b"".join(longstr(g) for g in groups)
            + bytes((status,)) + string(name) + struct.pack("!I", len(headers))
            + b"".join(string(k) + longstr(v) for k, v in headers.items()))


def parse_hello(data: bytes) -> tuple[str, list[str], str, dict[str, str]]:
    pos = 6

    def take(n: int) -> bytes:
        nonlocal pos
        pos += n
        return data[pos - n:pos]

    def short() -> str:
        return take(take(1)[0]).decode()

    def long() -> str:
        return take(struct.unpack("!I", take(4))[0]).decode()

    endpoint = short()
    groups = [long() for _ in range(struct.unpack("!I", take(4))[0])]
    take(1)  # status
    name = short()
    headers = {}
    for _ in range(struct.unpack("!I", take(4))[0]):
        key = short()
        headers[key] = long()
    return endpoint, groups, name, headers


def find_mailbox() -> str:
    """The mailbox of the first node whose beacon comes to the beacon port (broadcast on
    loopback here)."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    udp.bind(("", BEACON_PORT))
    udp.settimeout(10)
    try:
        while True:
            data, (address, _) = udp.recvfrom(64)
            if len(data) == 22 and data[:4] == b"ZRE\x01" and struct.unpack("!H", data[20:])[0]:
                return f"tcp://{address}:{struct.unpack('!H', data[20:])[0]}"
    finally:
        udp.close()


def become_peer(ctx: zmq.Context, mailbox: str, groups: list[str], protocol: str,
                name: str) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket]:
    """Become a ZRE peer of MESH (and so a zmqmesh node announcing ``protocol``): a mailbox
    of our own, a service socket, and a DEALER to the node's ``mailbox``, on which our HELLO
    (sequence 1) goes first; ``(inbox, service, link)``."""
    inbox = ctx.socket(zmq.ROUTER)
    inbox_port = inbox.bind_to_random_port("tcp://127.0.0.1")
    service = ctx.socket(zmq.ROUTER)
    service_port = service.bind_to_random_port("tcp://127.0.0.1")
    link = ctx.socket(zmq.DEALER)
    link.setsockopt(zmq.ROUTING_ID, b"\x01" + os.urandom(16))
    link.connect(mailbox)
    link.send(command(HELLO, 1, hello_body(
        f"tcp://127.0.0.1:{inbox_port}", groups, 2, name,
        {"X-ZMQMESH-MESH": MESH, "X-ZMQMESH-PROTOCOL": protocol,
         "X-ZMQMESH-SERVICE": f"tcp://127.0.0.1:{service_port}"})))
    return inbox, service, link


class PingAnswers:
    """Answers the node's PINGs on the ``link`` of a peer made by `become_peer` with
    PING_OK, numbered on from its HELLO (sequence 1)."""

    def __init__(self, link: zmq.Socket) -> None:
        self.link = link
        self.sequence = 1

    def answer(self) -> None:
        """Send the next PING_OK."""
        self.sequence = (self.sequence + 1) % 65536
        self.link.send(command(PING_OK, self.sequence))


def poller_of(*sockets: zmq.Socket) -> zmq.Poller:
    """A poller of ``sockets``' input."""
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
    return poller


def main() -> None:
    # 1. Find the node: its beacon, on the beacon port.
    mailbox = find_mailbox()
    say("BEACON", mailbox)

    # 2. Become a ZRE peer: a mailbox of our own, a DEALER to theirs, HELLO first.
    ctx = zmq.Context()
    inbox, service, link = become_peer(ctx, mailbox, ["zmqmesh/ackqueue/jobs", "zmqmesh/svc/echo"], "2", "foreign")
    pings = PingAnswers(link)
    poller = poller_of(inbox, service)
    headers: dict[str, str] = {}
    caller = sub = None
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        for sock, _ in poller.poll(100):
            if sock is inbox:
                frames = inbox.recv_multipart()
                cmd, sequence = frames[1][2], struct.unpack("!H", frames[1][4:6])[0]
                if cmd == HELLO:
                    _, groups, name, headers = parse_hello(frames[1])
                    say("HELLO", sequence, name, json.dumps(headers, sort_keys=True))
                    caller, sub = use_the_node(ctx, headers, poller)
                elif cmd == PING:
                    pings.answer()
                elif cmd == WHISPER and frames[2] == CONTROL:
                    if msgpack.unpackb(frames[3]).get("t") == "bye":
                        say("BYE")
                        ctx.destroy(linger=0)
                        return
            elif sock is service:
                answer(service, service.recv_multipart())
            elif sock is caller:
                reply = caller.recv_multipart()
                if len(reply) == 3:
                    replies = [reply]
                elif reply[0][:1] == b"\x00":  # a batch (protocol 4): [len(id)] id status [len(body), 4] body ...
                    replies, frame, at = [], reply[0], 1
                    while at < len(frame):
                        size = frame[at]
                        body_at = at + 1 + size + 1 + 4
                        end = body_at + struct.unpack("!I", frame[body_at - 4:body_at])[0]
                        replies.append([frame[at + 1:at + 1 + size], frame[at + 1 + size:at + 2 + size], frame[body_at:end]])
                        at = end
                else:  # the one-frame form: [len(id)] id status body
                    size = reply[0][0]
                    replies = [[reply[0][1:1 + size], reply[0][1 + size:2 + size], reply[0][2 + size:]]]
                for request_id, status, body in replies:
                    value = msgpack.unpackb(body) if body else None
                    say("REPLY", request_id[:8].decode(), len(request_id), status.hex(), json.dumps(value))
            elif sock is sub:
                topic, sender, body = sub.recv_multipart()[:3]
                sequence = struct.unpack("!Q", sender[16:24])[0] if len(sender) == 24 else None
                unpacker = msgpack.Unpacker()
                unpacker.feed(body)
                for index, value in enumerate(unpacker):  # the sender numbers the batch's first
                    say("NEWS", topic.decode(), None if sequence is None else sequence + index, json.dumps(value))
    say("TIMEOUT")
    ctx.destroy(linger=0)


def use_the_node(ctx: zmq.Context, headers: dict[str, str], poller: zmq.Poller) -> tuple[zmq.Socket, zmq.Socket]:
    """Call, subscribe and push, at the endpoints the node's HELLO announced."""
    caller = ctx.socket(zmq.DEALER)
    caller.connect(headers["X-ZMQMESH-SERVICE"])
    caller.send_multipart([b"double", b"call-one", msgpack.packb(21)])
    caller.send_multipart([b"double", b"too-long" + b"x" * 92, msgpack.packb(1)])
    # the one-frame form (protocol 3): [len(service)] service [len(id)] id body
    caller.send(bytes([6]) + b"double" + bytes([8]) + b"call-two" + msgpack.packb(50))
    # a batch (protocol 4): 0x00, then per request [len(service)] service [len(id)] id [len(body), 4] body
    batch = [(b"double", b"batch-a", msgpack.packb(1)), (b"nothing", b"batch-b", msgpack.packb(2)),
             (b"double", b"batch-c", msgpack.packb(3))]
    caller.send(b"\x00" + b"".join(bytes([len(s)]) + s + bytes([len(i)]) + i + struct.pack("!I", len(b)) + b
                                   for s, i, b in batch))
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"news.")
    sub.connect(headers["X-ZMQMESH-PUB"])
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(headers["X-ZMQMESH-PULL"])
    push.send_multipart([b"work", b"", msgpack.packb("from foreign") + msgpack.packb({"n": 2})])
    push.close()
    poller.register(caller, zmq.POLLIN)
    poller.register(sub, zmq.POLLIN)
    return caller, sub


def answer(service: zmq.Socket, frames: list[bytes]) -> None:
    """A request to our service ROUTER: "echo", or an at-least-once batch of "jobs"."""
    routing_id, name, request_id, body = frames[:4]
    if name == b"echo":
        service.send_multipart([routing_id, request_id, b"\x00", body])
    elif name == b"\x00queue/jobs":
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(body)
        for item in unpacker:
            say("JOB", json.dumps(item[1]), "redelivered" if item[0] else "first", len(item))
        service.send_multipart([routing_id, request_id, b"\x00", b""])  # the acknowledgement
    else:
        service.send_multipart([routing_id, request_id, b"\x02", b""])


if __name__ == "__main__":
    main()
