"""zmqmesh: brokerless peer-to-peer messaging on ZeroMQ.

Every process runs a `Node` (or an `AsyncNode` in asyncio programs). Nodes find each other
(ZRE discovery), watch each other (heartbeats), and compose pub/sub, push/pull and
request/reply into one mesh with plain callbacks as handlers.
"""

from __future__ import annotations

import typing

from ._io.curve import generate_keypair, read_public_key, read_secret_key, write_keypair
from ._io.stop_flag import StopFlag
from ._observe.prometheus import metrics_text
from ._store.sqlite import drop_dead_letters, inspect_store, retry_dead_letters
from ._version import __version__
from .config import NodeConfig
from .errors import (
    ConfigError,
    DecodeError,
    MeshTimeoutError,
    MessageTooLargeError,
    NodeClosedError,
    NoProviderError,
    PeerLostError,
    RemoteError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    ZmqMeshError,
)
from .message import Message, Peer
from .node import Node

if typing.TYPE_CHECKING:
    from .asyncnode import AsyncNode

__all__ = [
    "__version__",
    "Node",
    "AsyncNode",
    "NodeConfig",
    "Message",
    "Peer",
    "ZmqMeshError",
    "ConfigError",
    "DecodeError",
    "MeshTimeoutError",
    "MessageTooLargeError",
    "NodeClosedError",
    "NoProviderError",
    "PeerLostError",
    "RemoteError",
    "StoreError",
    "StoreFullError",
    "StoreLockedError",
    "generate_keypair",
    "write_keypair",
    "read_public_key",
    "read_secret_key",
    "inspect_store",
    "retry_dead_letters",
    "drop_dead_letters",
    "metrics_text",
    "StopFlag",
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str) -> typing.Any:
    # AsyncNode is imported on first use: a process that only runs a sync Node never
    # loads asyncio (and ssl with it), which keeps every node process smaller.
    if name == "AsyncNode":
        from .asyncnode import AsyncNode

        globals()["AsyncNode"] = AsyncNode
        return AsyncNode
    raise AttributeError(f"module 'zmqmesh' has no attribute {name!r}")
