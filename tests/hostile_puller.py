"""A hostile at-least-once puller of "jobs", written from docs/protocol.md (reusing the ZRE
helpers of foreign_client.py). Run as

    python hostile_puller.py MESH BEACON_PORT MODE

It becomes a zmqmesh peer announcing protocol 7 and pulling "jobs" at least once; for each
batch dealt to it (it prints "BATCH <id> <items>") it answers as MODE says:

- ``steal``: its own batch acknowledged, and every batch id below it too (batches dealt to
  other pullers: it was never dealt them);
- ``partial:<json body>``: its own batch answered 0x04 with that body (as msgpack).

It ends on the node's bye, or after 40 s.
"""

from __future__ import annotations

import json
import sys
import time

import msgpack
import zmq
from foreign_client import (
    CONTROL,
    HELLO,
    PING,
    WHISPER,
    PingAnswers,
    become_peer,
    find_mailbox,
    parse_hello,
    poller_of,
    say,
)

MESH, BEACON_PORT, MODE = sys.argv[1], int(sys.argv[2]), sys.argv[3]


def answer(service: zmq.Socket, frames: list[bytes]) -> None:
    routing_id, name, batch_id, body = frames[:4]
    if name != b"\x00queue/jobs":
        service.send_multipart([routing_id, batch_id, b"\x02", b""])
        return
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(body)
    items = list(unpacker)
    say("BATCH", int.from_bytes(batch_id, "big"), len(items))
    if MODE == "steal":
        for other in range(1, int.from_bytes(batch_id, "big") + 1):
            service.send_multipart([routing_id, other.to_bytes(8, "big"), b"\x00", b""])
    elif MODE.startswith("partial:"):
        service.send_multipart([routing_id, batch_id, b"\x04", msgpack.packb(json.loads(MODE[8:]))])


def main() -> None:
    ctx = zmq.Context()
    inbox, service, link = become_peer(ctx, find_mailbox(), ["zmqmesh/ackqueue/jobs"], "7", "hostile")
    pings = PingAnswers(link)
    poller = poller_of(inbox, service)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        for sock, _ in poller.poll(100):
            if sock is inbox:
                frames = inbox.recv_multipart()
                cmd = frames[1][2]
                if cmd == HELLO:
                    say("HELLO", parse_hello(frames[1])[1])
                elif cmd == PING:
                    pings.answer()
                elif cmd == WHISPER and frames[2] == CONTROL and msgpack.unpackb(frames[3]).get("t") == "bye":
                    say("BYE")
                    ctx.destroy(linger=0)
                    return
            else:
                answer(service, service.recv_multipart())
    ctx.destroy(linger=0)


if __name__ == "__main__":
    main()
