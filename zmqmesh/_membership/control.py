"""The control WHISPERs zmqmesh nodes exchange: ``bye`` and the gossip of known peers. Pure."""

from __future__ import annotations

from collections.abc import Container
from typing import Any

from .._wire.codec import Codec
from .._wire.frames import CONTROL_MAGIC
from ..errors import MessageTooLargeError

__all__ = ["bye", "gossip", "parse", "is_control", "MAX_GOSSIP_ENTRIES"]

MAX_GOSSIP_ENTRIES = 10_000


def is_control(content: list[bytes]) -> bool:
    """True for the content of a control WHISPER."""
    return bool(content) and content[0] == CONTROL_MAGIC


def bye(codec: Codec) -> list[bytes]:
    """The content of a goodbye."""
    return [CONTROL_MAGIC, codec.encode({"t": "bye"})]


def gossip(codec: Codec, known: list[list[str]]) -> list[list[bytes]]:
    """The contents telling a peer of others (``[id, endpoint, key or ""]`` each): one, or
    as many as it takes for each to fit ``codec``'s `max_message_bytes`; none for none."""
    parts: list[list[bytes]] = []
    step = len(known)
    at = 0
    while at < len(known):
        chunk = known[at:at + step]
        try:
            parts.append([CONTROL_MAGIC, codec.encode({"t": "peers", "peers": chunk})])
        except MessageTooLargeError:
            if step == 1:  # (one entry past the bound: a limit of a few hundred bytes)
                at += 1
                continue
            step = (step + 1) // 2
            continue
        at += len(chunk)
    return parts


def parse(codec: Codec, content: list[bytes], known: Container[str] = ()
          ) -> tuple[str, list[tuple[bytes, str, str | None]]] | None:
    """``("bye", [])``, ``("peers", [(uuid, endpoint, key), ...])``, ``("unknown", [])``,
    or None when malformed. Gossip entries that are not well-formed are skipped, and so
    are those of the peer ids (hex) in ``known``, before anything else is checked: in a
    launch, a node hears of each peer from every other, and knows it already."""
    try:
        body: Any = codec.decode(content[1]) if len(content) == 2 else None
    except Exception:
        body = None
    if not isinstance(body, dict):
        return None
    kind = body.get("t")
    if kind == "bye":
        return "bye", []
    if kind != "peers":
        return "unknown", []
    entries = body.get("peers")
    if not isinstance(entries, list):
        return None
    found: list[tuple[bytes, str, str | None]] = []
    for entry in entries[:MAX_GOSSIP_ENTRIES]:
        if (
            isinstance(entry, list)
            and len(entry) in (2, 3)
            and isinstance(entry[0], str)
            and entry[0] not in known
            and all(isinstance(e, str) for e in entry)
            and len(entry[0]) == 32
        ):
            try:
                uuid = bytes.fromhex(entry[0])
            except ValueError:
                continue
            found.append((uuid, entry[1], (entry[2] or None) if len(entry) == 3 else None))
    return "peers", found
