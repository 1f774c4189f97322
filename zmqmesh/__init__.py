"""zmqmesh: brokerless peer-to-peer messaging on ZeroMQ.

Every process runs a `Node` (or an `AsyncNode` in asyncio programs). Nodes find each other
(ZRE discovery), watch each other (heartbeats), and compose pub/sub, push/pull and
request/reply into one mesh with plain callbacks as handlers.
"""

from __future__ import annotations

import importlib as _importlib
import typing

from ._version import __version__
from .errors import (
    ArgumentTypeError,
    ConfigError,
    DecodeError,
    EncodeError,
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

if typing.TYPE_CHECKING:
    from ._io.curve import (
        generate_keypair,
        read_public_key,
        read_secret_key,
        write_keypair,
    )
    from ._io.stop_flag import StopFlag
    from ._observe.prometheus import metrics_text
    from ._store.tools import (
        drop_dead_letters,
        durable_subscriptions,
        forget_durable_subscription,
        inspect_store,
        retry_dead_letters,
    )
    from .asyncnode import AsyncNode
    from .config import NodeConfig
    from .message import Message, Peer
    from .node import Node

__all__ = [
    "__version__",
    "Node",
    "AsyncNode",
    "NodeConfig",
    "Message",
    "Peer",
    "ZmqMeshError",
    "ConfigError",
    "ArgumentTypeError",
    "EncodeError",
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
    "durable_subscriptions",
    "forget_durable_subscription",
    "metrics_text",
    "StopFlag",
]

_LAZY = {
    "Node": ".node",
    "AsyncNode": ".asyncnode",
    "NodeConfig": ".config",
    "Message": ".message",
    "Peer": ".message",
    "StopFlag": "._io.stop_flag",
    "generate_keypair": "._io.curve",
    "write_keypair": "._io.curve",
    "read_public_key": "._io.curve",
    "read_secret_key": "._io.curve",
    "inspect_store": "._store.tools",
    "retry_dead_letters": "._store.tools",
    "drop_dead_letters": "._store.tools",
    "durable_subscriptions": "._store.tools",
    "forget_durable_subscription": "._store.tools",
    "metrics_text": "._observe.prometheus",
}
"""Where each public name lives. They are imported on first use (PEP 562): ``import
zmqmesh`` costs only the errors, and a process loads what it uses: a sync `Node`'s
machinery (pyzmq, msgpack, the mesh) at its first mention, never asyncio unless it runs
an `AsyncNode`, never the store unless it opens one."""


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str) -> typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zmqmesh' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
