"""Requests sent and not answered yet, sans I/O: their ids, providers and deadlines, and
what waits for each of them.

One table serves every driver that keeps many requests in flight over one socket per
provider: `AsyncNode` (an asyncio future per request, woken by a timer on its loop) and
`Node.submit` (a `concurrent.futures.Future` per request, woken by a thread's poll). The
drivers only decide how they wait; which reply answers which request, which requests are
overdue and which ones a departed provider leaves unanswered is decided here.

Deadlines are kept in order, not in a timer per request: a driver wakes at
`next_deadline`. Calls with the same timeout fall due in the order they were made, so
deadlines that come in order join a queue (a deque of request ids, each one's deadline
read from its entry: no heap operation, nor a tuple, per request), and only one earlier
than the last queued (a shorter timeout) goes into a heap beside it. A
request answered in time (or forgotten, or lost with its provider) leaves its entry
behind, dropped when it reaches the front or when both are rebuilt (they never hold more
than twice the requests outstanding, plus `_SLACK` and `_CHECK_EVERY`).
"""

from __future__ import annotations

import heapq
import itertools
import math
import operator
import struct
from collections import deque
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from .._wire import frames as wire

__all__ = ["GivenUp", "Outstanding"]

Waiter = TypeVar("Waiter")

_SLACK = 1024
_request_id = struct.Struct(">Q").pack  # (a request's number as its 8-byte id: `int.to_bytes(8, "big")`, in one call)
_CHECK_EVERY = 64  # requests between two looks at the entries left behind
_id_of = operator.itemgetter(0)  # (of a request's ``(id, entry)``)


def _deadline_of(item: tuple[bytes, tuple[object, str, str, float]]) -> float:
    """The deadline of a request's ``(id, entry)``."""
    return item[1][3]


class GivenUp(dict[str, int]):
    """By provider id: how many requests on its socket were given up on (timed out, or
    forgotten: their callers stopped waiting) with no reply coming since; absent: none.
    At most that many may still wait in the socket, unread by the provider (what
    `failures.report_link_replaced` judges a refusing socket by)."""

    def add(self, provider_id: str, count: int = 1) -> None:
        """``count`` requests to ``provider_id`` were given up on."""
        self[provider_id] = self.get(provider_id, 0) + count

    def replied_late(self, provider_id: str, count: int = 1) -> None:
        """``count`` late replies came from ``provider_id``: it read as many of them."""
        left = self.get(provider_id, 0) - count
        if left > 0:
            self[provider_id] = left
        else:
            self.pop(provider_id, None)


class Outstanding(Generic[Waiter]):
    """The requests of one requester that wait for a reply (not thread-safe: one owner)."""

    def __init__(self) -> None:
        self._pending: dict[bytes, tuple[Waiter, str, str, float]] = {}
        self._queued: deque[bytes] = deque()  # the requests whose deadlines came in order
        self._last_queued = -math.inf  # (the deadline of the last one queued)
        self._heap: list[tuple[float, bytes]] = []  # the others, with their deadlines
        self._ids = itertools.count(1)
        self.busy_with: dict[str, int] = {}
        """By provider id: how many requests to it wait for their reply (none: absent). Read
        only, for a driver that asks `busy` on the path of every request without a call."""
        self._given_up = GivenUp()  # (see `given_up_on`)

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, request_id: bytes) -> bool:
        return request_id in self._pending

    @property
    def ids(self) -> Mapping[bytes, object]:
        """The ids of the requests waiting, for membership tests (``in``): the table itself,
        read only (not a keys view of it, whose ``__contains__`` map() calls through a slot
        wrapper: `Batch.keep` asks it of every request of a batch)."""
        return self._pending

    def waiting_on(self, provider_id: str) -> int:
        """How many requests to ``provider_id`` wait for their reply."""
        return self.busy_with.get(provider_id, 0)

    def given_up_on(self, provider_id: str) -> int:
        """How many requests to ``provider_id`` were given up on (timed out, or forgotten:
        their callers stopped waiting) without a reply coming since (a late one takes one
        off), since its connection was made (`renewed`): at most that many may still wait,
        unread by the provider, in the connection (those gathered, or kept aside for room, and
        never sent count too)."""
        return self._given_up.get(provider_id, 0)

    def renewed(self, provider_id: str) -> None:
        """``provider_id``'s connection was replaced: what was given up on went with the old one."""
        self._given_up.pop(provider_id, None)

    def _gave_up(self, provider_id: str, count: int) -> None:
        """``count`` requests to ``provider_id`` no longer wait, given up on."""
        self._answered(provider_id, count)
        self._given_up.add(provider_id, count)

    def busy(self, provider_id: str) -> bool:
        """Whether a request to ``provider_id`` waits for its reply."""
        return provider_id in self.busy_with

    def add(self, waiter: Waiter, provider_id: str, service: str, deadline: float) -> bytes:
        """Register a request about to be sent; its id (the frame that the reply echoes)."""
        number = next(self._ids)
        request_id = _request_id(number)
        self._pending[request_id] = (waiter, provider_id, service, deadline)
        per_provider = self.busy_with
        per_provider[provider_id] = per_provider.get(provider_id, 0) + 1
        if deadline >= self._last_queued or not self._queued:
            self._queued.append(request_id)
            self._last_queued = deadline
        else:
            heapq.heappush(self._heap, (deadline, request_id))
        if not number % _CHECK_EVERY:
            self._tidy()
        return request_id

    def _tidy(self) -> None:
        """Rebuild the deadlines from the requests still waiting once the entries that others
        left behind are too many (more than twice those waiting, plus `_SLACK`)."""
        if len(self._queued) + len(self._heap) > 2 * len(self._pending) + _SLACK:
            in_order = sorted(self._pending.items(), key=_deadline_of)
            self._queued = deque(map(_id_of, in_order))
            self._last_queued = in_order[-1][1][3] if in_order else -math.inf
            self._heap = []

    def withdraw(self, request_id: bytes) -> bool:
        """Forget a request that could not be sent; whether it still waited."""
        entry = self._pending.pop(request_id, None)
        if entry is None:
            return False
        self._answered(entry[1], 1)
        return True

    def _answered(self, provider_id: str, count: int) -> None:
        """``count`` requests to ``provider_id`` no longer wait."""
        left = self.busy_with[provider_id] - count
        if left:
            self.busy_with[provider_id] = left
        else:
            del self.busy_with[provider_id]

    def answer_all(self, frames: list[bytes], provider_id: str) -> tuple[list[tuple[Waiter, bytes, bytes]], int]:
        """What a message from ``provider_id`` answers, one reply or a batch of them
        (protocol 4): the waiters with their replies' status and body, and how many of its
        replies answered nothing: malformed (a malformed batch counts as one), late (nobody
        waits for them any more), or naming a request sent to another provider."""
        if len(frames) == 1 and wire.is_batch(frames[0]):
            replies = wire.parse_reply_batch(frames[0])
        else:
            reply = wire.parse_reply(frames)
            replies = [reply] if reply is not None else None
        if replies is None:
            return [], 1
        found = []
        pending = self._pending
        for request_id, status, body in replies:
            entry = pending.get(request_id)
            if entry is not None and entry[1] == provider_id:
                del pending[request_id]
                found.append((entry[0], status, body))
        if found:
            self._answered(provider_id, len(found))
            if len(self._queued) + len(self._heap) > 2 * len(pending) + _SLACK:  # (`_tidy`'s test, per frame)
                self._tidy()
        late = len(replies) - len(found)
        if late and provider_id in self._given_up:  # (the provider read those: they no longer clog its connection)
            self._given_up.replied_late(provider_id, late)
        return found, late

    def next_deadline(self) -> float | None:
        """The earliest deadline of a request still waiting; None when none waits."""
        queued, heap, pending = self._queued, self._heap, self._pending
        while queued and queued[0] not in pending:
            queued.popleft()
        while heap and heap[0][1] not in pending:
            heapq.heappop(heap)
        if not heap:
            return pending[queued[0]][3] if queued else None
        return min(heap[0][0], pending[queued[0]][3]) if queued else heap[0][0]

    def expired(self, now: float) -> list[tuple[Waiter, str]]:
        """Take the requests whose deadline has passed: ``(waiter, service)`` each."""
        queued, heap, pending = self._queued, self._heap, self._pending
        due = []
        while queued:
            entry = pending.get(queued[0])
            if entry is None:  # (no longer waiting: dropped on the way)
                queued.popleft()
            elif entry[3] > now:
                break
            else:
                due.append(queued.popleft())
        while heap and heap[0][0] <= now:
            due.append(heapq.heappop(heap)[1])
        overdue = []
        for request_id in due:
            entry = pending.pop(request_id, None)
            if entry is not None:
                overdue.append((entry[0], entry[2]))
                self._gave_up(entry[1], 1)
        return overdue

    def forget_where(self, given_up: Callable[[Waiter], bool]) -> int:
        """Forget the requests whose waiter ``given_up`` says yes to (their callers gave
        up); how many. One pass for any number of them."""
        gone = [rid for rid, entry in self._pending.items() if given_up(entry[0])]
        for request_id in gone:
            self._gave_up(self._pending.pop(request_id)[1], 1)
        if gone:
            self._tidy()
        return len(gone)

    def lost(self, provider_id: str) -> list[tuple[Waiter, str]]:
        """Take the requests that ``provider_id`` was to answer: ``(waiter, service)`` each."""
        gone = [rid for rid, entry in self._pending.items() if entry[1] == provider_id]
        self.busy_with.pop(provider_id, None)
        self._given_up.pop(provider_id, None)
        taken = [(entry[0], entry[2]) for entry in (self._pending.pop(rid) for rid in gone)]
        if taken:
            self._tidy()
        return taken

    def take_all(self) -> list[Waiter]:
        """Take every waiting request's waiter (the requester is closing)."""
        waiters = [entry[0] for entry in self._pending.values()]
        self._pending.clear()
        self._queued.clear()
        self._last_queued = -math.inf
        self._heap.clear()
        self.busy_with.clear()
        self._given_up.clear()
        return waiters
