"""JSON and text views of mesh data, shared by the command line and the HTTP gateway."""

from __future__ import annotations

import json
import math
from typing import Any

from zmqmesh import Peer

__all__ = ["dumps", "peer_dict", "shown"]

_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_JSON_CONTROLS = {c: f"\\u{c:04x}" for c in range(0x7F, 0xA0)}
"""DEL and the C1 controls, which ``json.dumps`` leaves as they are when it writes non-ASCII
text as it is (U+009B, say, begins an escape sequence on terminals that read C1 controls)."""


def shown(text: str) -> str:
    """``text`` as a line of a terminal or a log shows it: its control characters (a newline
    that would begin a line of its own, an escape that would drive the terminal) written
    as ``\\xNN``. For what peers and providers name or say; raises nothing."""
    return text.translate(_CONTROLS)


def _default(value: Any) -> Any:
    if isinstance(value, bytes):  # msgpack bin has no JSON form: show it as text
        return value.decode("utf-8", "replace")
    return str(value)


def dumps(value: Any, **options: Any) -> str:
    """``value`` as strict JSON (what a browser's ``JSON.parse`` reads): bytes become text,
    map keys that are not text their JSON text (two keys that read the same then: the
    last one's value stays), ``NaN`` and infinities ``null``, anything else JSON lacks its
    ``str``; no control character written as it is (text stays as it is otherwise, not
    ``\\u`` escapes). Raises ``RecursionError`` for a value nested past what Python's JSON
    encoder recurses."""
    try:
        text = json.dumps(value, default=_default, ensure_ascii=False, allow_nan=False, **options)
    except (TypeError, ValueError):  # (a map key that is not text, a float JSON has no form for)
        text = json.dumps(_plain(value), default=_default, ensure_ascii=False, allow_nan=False, **options)
    # (outside its strings JSON is ASCII: any of these is in a string, where its escape means it)
    return text.translate(_JSON_CONTROLS)


def _plain(value: Any) -> Any:
    """``value`` with what strict JSON cannot hold made so: keys as text, ``NaN`` and
    infinities as None."""
    if isinstance(value, dict):
        return {_key(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        return key.decode("utf-8", "replace")
    return json.dumps(_plain(key), default=_default, ensure_ascii=False, allow_nan=False)  # (as JSON writes 1, true)


def peer_dict(peer: Peer) -> dict[str, Any]:
    """A peer as plain JSON-ready data (offers sorted, zmqmesh's own groups left out)."""
    return {
        "id": peer.id,
        "name": peer.name,
        "address": peer.address,
        "endpoint": peer.endpoint,
        "services": sorted(peer.services),
        "queues": sorted(peer.queues),
        "topics": sorted(peer.topics),
        "groups": sorted(g for g in peer.groups if not g.startswith("zmqmesh/")),
        "headers": dict(peer.headers),
        "last_seen": peer.last_seen,
        "zmqmesh": peer.is_zmqmesh,
    }
