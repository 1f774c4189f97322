"""JSON views of mesh data, shared by the command line and the HTTP gateway."""

from __future__ import annotations

import json
from typing import Any

from zmqmesh import Peer

__all__ = ["dumps", "peer_dict"]


def _default(value: Any) -> Any:
    if isinstance(value, bytes):  # msgpack bin has no JSON form: show it as text
        return value.decode("utf-8", "replace")
    return str(value)


def dumps(value: Any, **options: Any) -> str:
    """``value`` as JSON; bytes become text, anything else JSON lacks becomes its ``str``."""
    return json.dumps(value, default=_default, ensure_ascii=False, **options)


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
