"""A hostile provider of the service "slow", written from docs/protocol.md (reusing the ZRE
helpers of foreign_client.py). Run as

    python hostile_provider.py MESH BEACON_PORT

It becomes a zmqmesh peer offering "slow" and answers PINGs, but never answers a request:
it prints "REQUEST" at the first one of each caller, and from then on sends that caller,
every few milliseconds, a reply to a request id it never sent, whatever the node says (its
bye too). It ends after 40 s, or killed.
"""

from __future__ import annotations

import sys
import time

import msgpack
import zmq
from foreign_client import PING, PingAnswers, become_peer, find_mailbox, poller_of, say

MESH, BEACON_PORT = sys.argv[1], int(sys.argv[2])
NEVER_SENT = b"never-sent"


def main() -> None:
    ctx = zmq.Context()
    inbox, service, link = become_peer(ctx, find_mailbox(), ["zmqmesh/svc/slow"], "7", "hostile")
    pings = PingAnswers(link)
    callers: list[bytes] = []
    poller = poller_of(inbox, service)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        for sock, _ in poller.poll(5):
            if sock is inbox:
                frames = inbox.recv_multipart()
                if frames[1][2] == PING:
                    pings.answer()
            else:
                caller = service.recv_multipart()[0]
                if caller not in callers:
                    callers.append(caller)
                    say("REQUEST")
        for caller in callers:
            try:
                service.send_multipart([caller, NEVER_SENT, b"\x00", msgpack.packb(None)], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # (the caller's pipe is full, or it left)
    ctx.destroy(linger=0)


if __name__ == "__main__":
    main()
