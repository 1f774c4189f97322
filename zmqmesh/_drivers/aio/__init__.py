"""The asyncio driver of `AsyncNode`: awaited waits, requests from coroutines, the inbox on
the caller's loop.

The twin of `_drivers.thread` (module for module, but for its `waits`: here the waits for
a condition or for room are in `runner`), and like it only a way of waiting: the logic
lives below. Kept apart so that a process using only the sync `Node` never imports
asyncio.

* `runner`: `AsyncRunner` carries out a plan's steps by awaiting them, and a request the
  quick way while all goes well (`request`); waits for a condition or room.
* `requests`: `LoopRequester`, DEALERs owned by the event loop, a future per request.
* `wakes`: `ReplyFuture`, the future of a request's reply, whose awaiting task is woken
  by `Wakes` together with those of the other replies read in a pass of the loop.
* `inbox`: `LoopInbox`, ``async def`` handlers awaited in place; ``def`` handlers run on a
  worker thread, a burst at a time, so they never block the loop.
* `stop`: `stop_async`, the stop plan's steps awaited.
"""

from .inbox import LoopInbox
from .requests import LoopRequester
from .runner import AsyncRunner, LoopCommits, check_loop, wait_for_room, wait_until
from .stop import stop_async

__all__ = ["AsyncRunner", "check_loop", "LoopCommits", "LoopInbox", "LoopRequester", "wait_until", "wait_for_room",
           "stop_async"]
