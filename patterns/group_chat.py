"""Group chat over ZRE groups: shout to a group, whisper to one peer.

This is plain ZRE (RFC 36), so the same calls talk to Zyre and pyre nodes too.
Alice, Bob and Carol join "lobby"; Dave does not. A shout reaches the group members
only; a whisper reaches exactly one peer. Run: python patterns/group_chat.py
"""

from __future__ import annotations

import os
import time

import zmqmesh

MESH = f"pattern-chat-{os.getpid()}"


def main() -> None:
    heard: dict[str, list[str]] = {}
    nodes = {}
    for name in ("alice", "bob", "carol", "dave"):
        node = zmqmesh.Node(name, mesh=MESH)
        heard[name] = []
        node.on_shout(lambda msg, me=name: heard[me].append(f"[{msg.group}] {msg.sender.name}: {msg.data[0].decode()}"))
        node.on_whisper(lambda msg, me=name: heard[me].append(f"(whisper) {msg.sender.name}: {msg.data[0].decode()}"))
        nodes[name] = node.start()
    try:
        for name in ("alice", "bob", "carol"):
            nodes[name].join("lobby")
        alice = nodes["alice"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            in_lobby = [p.name for p in alice.peers() if "lobby" in p.groups]
            if sorted(in_lobby) == ["bob", "carol"]:
                break
            time.sleep(0.01)
        print("alice: lobby members besides me:", sorted(in_lobby))
        print("alice: shouting to lobby ->", alice.shout("lobby", "hello lobby"), "peers")
        bob_id = next(p.id for p in alice.peers() if p.name == "bob")
        alice.whisper(bob_id, "psst, bob")
        deadline = time.monotonic() + 5
        while (len(heard["bob"]) < 2 or not heard["carol"]) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        for node in nodes.values():
            node.stop()
    for name, lines in heard.items():
        print(f"{name:>6} heard: {lines}")
    assert heard["bob"] == ["[lobby] alice: hello lobby", "(whisper) alice: psst, bob"]
    assert heard["carol"] == ["[lobby] alice: hello lobby"]
    assert heard["dave"] == [] and heard["alice"] == []
    print("group_chat: OK")


if __name__ == "__main__":
    main()
