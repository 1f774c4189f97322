"""The thread driver of `Node`: blocking waits, requests from threads, and the inbox thread.

Everything here only waits; the logic it waits for lives below (plans in `_engine.api`
and `_patterns.reqrep`, decoding in `_patterns.inbound`, the stop plan in
`_engine.stop`). Its asyncio twin is `_drivers.aio`, module for module but for `waits`
(there, in its `runner`):

* `runner`: `BlockingRunner` carries out a plan's steps by blocking the calling thread;
  `waits`: the waits it blocks in (for a condition, for room, any other step).
* `requests`: `ThreadRequester`, one per calling thread, each with its own DEALER per
  provider, so a blocking call waits on its own socket with no hand-off to another thread.
* `inbox`: `ThreadInbox`, a dedicated thread owns the inbound sockets and calls ``def``
  handlers in place; ``async def`` handlers run on a `HandlerLoop` started on first use
  (so a node without them never loads asyncio).
* `stop`: `stop_blocking`, the stop plan's steps carried out from the calling thread.
"""

from .inbox import ThreadInbox
from .requests import ThreadRequester, ThreadRequesters
from .runner import BlockingRunner
from .stop import stop_blocking
from .waits import wait_for_room, wait_until

__all__ = ["BlockingRunner", "ThreadRequester", "ThreadRequesters", "ThreadInbox", "stop_blocking", "wait_until",
           "wait_for_room"]
