"""The bodies of a provider's replies that say something went wrong, and the bound a
caller sets on a reply's size: pure functions, no sockets.

A ``0x01`` reply carries ``{"type", "message", "traceback"}`` (protocol.md). It must reach
its caller whatever the failure was: a message whose ``str()`` raises, text UTF-8 cannot
encode, or text too long for a reply is described, escaped or cut, never raised
(`error_body`). A caller whose node announced a smaller ``max_message_bytes`` than this
node's would lose its connection to a larger reply (`callers_limit`, `within`).
"""

from __future__ import annotations

from ..._mesh.directory import Directory
from ..._wire import frames as wire
from ..._wire.codec import Codec
from ...errors import MessageTooLargeError, NodeClosedError
from ..calls import CutShort

__all__ = ["callers_limit", "error_body", "within"]


def within(body: bytes, limit: int | None) -> bytes:
    """``body``, if it is ``limit`` bytes at most (None: any size). Raises
    `MessageTooLargeError` otherwise: a reply past the ``max_message_bytes`` its caller
    announced ends the caller's connection, and the caller waits out its timeout."""
    if limit is not None and len(body) > limit:
        raise MessageTooLargeError(f"the reply is {len(body)} bytes; the caller's max_message_bytes is {limit}")
    return body


def callers_limit(directory: Directory, caller: bytes) -> int | None:
    """The ``max_message_bytes`` the node of ``caller`` (a routing id) announced, if below
    this node's (None otherwise: it takes what this node sends). A reply body past it
    would end the caller's connection: the caller would wait out its timeout, and the
    requests in flight beside it would be lost with it. Never raises."""
    if not directory.narrower:  # (callers that take less than this node sends: rarely any)
        return None
    sender = wire.sender_of_requester(caller)
    return directory.narrower.get(sender) if sender is not None else None


def _utf8_text(text: str) -> str:
    """``text`` as msgpack can carry it: a lone surrogate (from bytes decoded with
    ``surrogateescape``, say) escaped."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()


def error_body(codec: Codec, error: BaseException, traceback_text: str = "", limit: int | None = None) -> bytes:
    """The body of a ``0x01`` reply: what failed, as protocol.md says, encoded with
    ``codec`` within ``limit`` bytes if given (the caller's `callers_limit`; else the
    codec's ``max_message_bytes``). A `CutShort` is named `NodeClosedError`, its public
    name. Never raises: a message whose ``str()`` raises, text UTF-8 cannot encode (a lone
    surrogate) or text too long for a reply is described, escaped or cut instead (the
    caller must hear of the failure, never wait out its timeout)."""
    try:
        message = str(error)
    except Exception:
        message = f"<str() of the {type(error).__name__} raised>"
    kind = NodeClosedError if isinstance(error, CutShort) else type(error)  # (the public name)
    name, message, traceback_text = (_utf8_text(kind.__name__), _utf8_text(message),
                                     _utf8_text(traceback_text))
    most = codec.max_message_bytes if limit is None else limit
    try:
        body = codec.encode({"type": name, "message": message, "traceback": traceback_text})
        if len(body) <= most:
            return body
    except Exception:  # too large for this node (as below)
        pass
    # too large: cut to what a reply carries
    room = max(most // 16, 64)  # (characters: up to 4 bytes each, 2 texts)
    cut = " ...(cut)"
    message = message if len(message) <= room else message[:room] + cut
    traceback_text = traceback_text if len(traceback_text) <= room else traceback_text[-room:] + cut
    try:
        return codec.encode({"type": name[:200], "message": message, "traceback": traceback_text})
    except Exception:
        return codec.encode({"type": name[:200], "message": "", "traceback": ""})
