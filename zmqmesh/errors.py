"""The exception tree of zmqmesh: everything the library raises derives from `ZmqMeshError`.

Raw `zmq.ZMQError`s never reach users; they are wrapped in one of these (chained with
``raise ... from``) so callers can catch one family.
"""

from __future__ import annotations

__all__ = [
    "ZmqMeshError",
    "ConfigError",
    "ArgumentTypeError",
    "EncodeError",
    "NodeClosedError",
    "MeshTimeoutError",
    "NoProviderError",
    "PeerLostError",
    "RemoteError",
    "DecodeError",
    "MessageTooLargeError",
    "StoreError",
    "StoreFullError",
    "StoreLockedError",
]


class ZmqMeshError(Exception):
    """Base class of every error zmqmesh raises on purpose."""


class ConfigError(ZmqMeshError, ValueError):
    """An option or argument has a value zmqmesh cannot use (out of range, unknown interface,
    a name no topic, queue, service or group can have, a second handler for one name)."""


class ArgumentTypeError(ZmqMeshError, TypeError):
    """An argument of a type zmqmesh cannot use: a handler or callback that cannot be
    called, a peer that is neither a `Peer` nor a node id, items that are not iterable, a
    directory or timeout of the wrong type."""


class EncodeError(ZmqMeshError, TypeError):
    """Data, headers or frames that cannot be encoded (msgpack has no form for an object,
    an int past 64 bits, nesting past its limit; a header that is not text). Nothing of
    the call was sent; the message says what failed and where."""


class NodeClosedError(ZmqMeshError):
    """The node is not running: it was never started, or it has been stopped."""


class MeshTimeoutError(ZmqMeshError, TimeoutError):
    """An operation did not complete within its timeout (a request, a wait, a blocked push)."""


class NoProviderError(ZmqMeshError):
    """No node in the mesh offers the service or pulls the queue, even after waiting the timeout."""


class PeerLostError(ZmqMeshError):
    """The peer serving a request left the mesh (crashed, stopped or went silent) before replying."""

    def __init__(self, message: str, peer_id: str | None = None) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class RemoteError(ZmqMeshError):
    """A remote handler raised: carries the remote exception's type name, message and traceback text.

    The remote exception is never re-created locally (that would mean executing what a
    stranger sent); only its description travels.
    """

    def __init__(self, remote_type: str, remote_message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{remote_type}: {remote_message}")
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback


class DecodeError(ZmqMeshError, ValueError):
    """Bytes received could not be decoded (malformed msgpack, a size limit, a bad frame layout)."""


class MessageTooLargeError(ZmqMeshError, ValueError):
    """A payload exceeds the configured ``max_message_bytes`` and was not sent."""


class StoreError(ZmqMeshError):
    """The node's durable store cannot be used: a foreign or damaged file, a failed write."""


class StoreFullError(StoreError):
    """The store reached ``store_max_bytes``; the message was not stored, and nothing stored was lost."""


class StoreLockedError(StoreError, ConfigError):
    """Another running node holds the store directory (one store, one node)."""
