"""A provider's large replies (`LARGE_FRAME` bytes or more): sent uncopied and tracked,
within the bytes `UnsentReplies` lets one caller, and all callers together, hold not yet
written out; one past them is refused, and its caller told why at once.
"""

from __future__ import annotations

from typing import Any

import zmq

from ..._io.sockets import send_tracked
from ..._stats import Stats
from ..._wire import frames as wire
from ..._wire.codec import Codec
from ...config import NodeConfig
from ...errors import ZmqMeshError
from ..unsent import MAX_CALLERS, UnsentReplies
from .reply_bodies import error_body

__all__ = ["LargeReplies"]

_UNSENT_PER_CALLER = 4  # (times ``send_queue_max_bytes``: see `_UNSENT_IN_ALL`)
_UNSENT_IN_ALL = 16
"""Large replies a provider holds not yet written out (`UnsentReplies`): this many times
``send_queue_max_bytes`` for one caller (256 MiB by default), and in all (1 GiB). Generous:
a caller that reads its replies has them written out at once, but the provider cannot
tell it from one that does not, and a caller with as much in flight on a loaded machine
(where the trackers are told late) was refused at 64 MiB."""


class LargeReplies:
    """Sends the large replies of the service ROUTER ``router`` (its owner thread only),
    counting in ``stats`` those refused and those that cannot go."""

    def __init__(self, router: zmq.Socket[Any], config: NodeConfig, codec: Codec, stats: Stats) -> None:
        self.router = router
        self.codec = codec
        self.stats = stats
        self.unsent = UnsentReplies(_UNSENT_PER_CALLER * config.send_queue_max_bytes,
                                    _UNSENT_IN_ALL * config.send_queue_max_bytes)

    def send_if_room(self, route: tuple[bytes, bytes], status: bytes, body: bytes, answer: bool) -> bool:
        """Send a reply of `LARGE_FRAME` bytes or more uncopied and tracked (`UnsentReplies`)
        if its caller has room for it; False, counted in ``service.reply_refused``, if not
        (send `refused_body` instead). One that cannot go is counted as dropped (and no
        longer as sent, if an ``answer``). Never raises a ZeroMQ error."""
        caller = bytes(route[0])
        if not self.unsent.room(caller, len(body)):
            self.stats.add("service", "reply_refused")
            return False
        try:
            tracker = send_tracked(self.router, wire.reply_frames(route, status, body))
        except zmq.ZMQError:
            self.stats.pattern["service"]["dropped"] += 1
            self.stats.pattern["service"]["sent"] -= answer
            return True
        self.unsent.sent(caller, tracker, len(body))
        return True

    def refused_body(self, size: int) -> bytes:
        """The body of the error reply sent in place of a large reply of ``size`` bytes
        its caller had no room for: what holds it back, and the option that bounds it."""
        return error_body(self.codec, ZmqMeshError(
            f"the reply ({size} bytes) was not sent: its provider holds {self.unsent.held} bytes "
            f"of large replies not yet written out (at most {self.unsent.per_caller} for one caller, "
            f"{self.unsent.total} in all: the provider's send_queue_max_bytes times {_UNSENT_PER_CALLER} "
            f"and {_UNSENT_IN_ALL}, or {MAX_CALLERS} callers); a caller "
            f"with more than that in flight can be refused even while it reads"))
