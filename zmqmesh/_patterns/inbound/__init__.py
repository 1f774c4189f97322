"""What a node receives, sans threads: `Dispatcher` drains the SUB, PULL and service ROUTER
sockets, decodes each message once and hands it to its handler, and sends the replies and
acknowledgements; the drivers (`_drivers.thread`, `_drivers.aio`) decide only where and
when handlers run. The modules:

* `dispatch`: `Dispatcher`, the coordinator the drivers talk to, with the message loops;
* `service_intake`: requests received, decoded (one or a batch) and the built-in services
  served (`builtin_services`: the node's stats, pages of its history);
* `subscriptions`: the topics subscribed to, their handlers, and gaps in their numbers;
* `large_replies`, `reply_bodies`: replies too large to copy, and the bodies of error replies;
* `events`: the join/leave/whisper/shout callbacks waiting, bounded;
* `handler_times`: which service handlers are quick (replies held for a batch);
* `left_at_stop`: what a stop left unhandled, counted and reported.

At-least-once batches and the keeper's intake (`_patterns.intake`) and replaying
subscriptions (`_patterns.replay`) are the Dispatcher's collaborators from beside it.
"""

from .dispatch import HOLD_LIMIT_S, Dispatcher
from .subscriptions import PrefixIndex

__all__ = ["HOLD_LIMIT_S", "Dispatcher", "PrefixIndex"]
