"""Requests gathered into batches, one frame per provider (protocol 4), sans I/O.

A driver that keeps many requests in flight sends a request at once, alone, when none is
in flight to its provider; the requests to a provider that is busy with others are
gathered until the driver's next pause (a pass of its event loop, a poll of its thread),
and go out together in one frame then. Every ZeroMQ message, however small, costs a send,
a wake-up and a receive on each side, so a window of requests costs a few messages
instead of one each, while a lone request waits for nothing. (Sending the first request
of every pass alone cut a busy pipeline into two frames per pass: about six requests a
frame, with 64 in flight.)

A batch that reaches `EARLY_ITEMS` requests is ready at once (`ready`), and the driver
sends it without waiting for its pause: the provider starts on it while the next ones are
made, instead of the two sides taking turns with a whole window each.

`AsyncNode` and `Node.request_many` / `Node.submit` use this one logic; they differ only
in when they pause.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Container
from typing import Generic, TypeVar

from .._wire import frames as wire
from .reqrep import Exchange

__all__ = ["RequestBatches", "Batch", "EARLY_ITEMS"]

EARLY_ITEMS = 32
"""Requests a batch holds when it goes before the pause (of 8, 16, 32 and 64, 32 carried
the most requests per second with 64 in flight to one provider, in benchmarks/bench.py)."""
assert EARLY_ITEMS <= wire.MAX_BATCH_ITEMS

_ITEM_BYTES, _BATCH_BYTES = wire.REQUEST_ITEM_BYTES, wire.BATCH_BYTES  # (read on the path of every request)
_id_of_item = operator.itemgetter(1)  # (an item's request id)

Key = TypeVar("Key")
Waiter = TypeVar("Waiter")


class Batch(Generic[Key, Waiter]):
    """Requests to send in one frame on ``key``'s socket: their items and waiters (in step),
    and the frame."""

    __slots__ = ("key", "items", "waiters", "size")

    def __init__(self, key: Key) -> None:
        self.key = key
        self.items: list[tuple[bytes, bytes, bytes]] = []  # (service, request id, body)
        self.waiters: list[Waiter] = []
        self.size = 1

    @property
    def ids(self) -> list[bytes]:
        """The ids of its requests, in order (taken from the items without a bytecode each)."""
        return list(map(_id_of_item, self.items))

    def keep(self, waiting: Container[bytes], gave_up: Callable[[Waiter], bool] | None = None
             ) -> list[tuple[bytes, bytes, bytes]]:
        """Keep only the requests still ``waiting`` (by id) whose waiter has not ``gave_up``;
        the items of those left out: ``(service, request id, body)``, as bytes."""
        # (the common case, every one kept, looked at without a bytecode per request)
        if all(map(waiting.__contains__, map(_id_of_item, self.items))) and \
                (gave_up is None or not any(map(gave_up, self.waiters))):
            return []
        kept = [k for k, (item, waiter) in enumerate(zip(self.items, self.waiters))
                if item[1] in waiting and (gave_up is None or not gave_up(waiter))]
        return [item for item, _waiter in self.keep_at(kept)]

    def keep_at(self, kept: list[int]) -> list[tuple[tuple[bytes, bytes, bytes], Waiter]]:
        """Keep the requests at the indices ``kept`` (in order); the item and the waiter of
        each of the others."""
        keeping = set(kept)
        left_out = [(item, self.waiters[k]) for k, item in enumerate(self.items) if k not in keeping]
        self.items = [self.items[k] for k in kept]
        self.waiters = [self.waiters[k] for k in kept]
        return left_out

    def frame(self) -> bytes:
        """The frame that carries the batch (one request: its one-frame form)."""
        if len(self.items) == 1:
            service, request_id, body = self.items[0]
            return wire.request_frames(service, request_id, body, None, True)[0]
        return wire.request_batch(self.items)


class RequestBatches(Generic[Key, Waiter]):
    """The batches a driver gathers between two pauses (one owner: not thread-safe)."""

    def __init__(self) -> None:
        self._open: dict[Key, Batch[Key, Waiter]] = {}
        self._full: list[Batch[Key, Waiter]] = []

    def __bool__(self) -> bool:
        return bool(self._open or self._full)

    def add(self, key: Key, request_id: bytes, waiter: Waiter, step: Exchange, busy: bool) -> bool:
        """Gather a request to send on ``key`` at the next pause, or before it once its
        batch is full (`ready`) (True); or say to send it at once, alone (False): one to a
        provider that is not ``busy`` with others, one that a batch cannot carry (headers,
        a large body), or one to a provider older than protocol 4."""
        if not busy or not step.compact or step.provider.protocol < wire.BATCH_PROTOCOL:
            return False
        self.gather(key, request_id, waiter, step.service_b, step.body)
        return True

    def gather(self, key: Key, request_id: bytes, waiter: Waiter, service_b: bytes, body: bytes) -> bool:
        """Gather a request that a batch can carry (`add` says which; `QuickRequest.pick`
        gives only those) to send on ``key`` at the next pause, or before it once its batch
        is full; whether a batch is full now (`ready`)."""
        size = len(service_b) + len(request_id) + len(body) + _ITEM_BYTES
        batch = self._open.get(key)
        if batch is not None and batch.size + size > _BATCH_BYTES:  # (it holds fewer than EARLY_ITEMS: never
            self._full.append(batch)                                    # too many, `wire.batch_full`'s other limit)
            batch = None
        if batch is None:
            batch = self._open[key] = Batch(key)
        batch.items.append((service_b, request_id, body))
        batch.waiters.append(waiter)
        batch.size += size
        if len(batch.items) >= EARLY_ITEMS:
            self._full.append(self._open.pop(key))
        return bool(self._full)

    def remove_where(self, remove: Callable[[Waiter], bool] | None = None) -> list[tuple[bytes, Waiter, bytes]]:
        """Take out of the batches gathered the requests whose waiter ``remove`` says yes
        to (every one: None); they will not go. Their ids, waiters and services (as bytes)."""
        removed: list[tuple[bytes, Waiter, bytes]] = []
        for batch in [*self._full, *self._open.values()]:
            kept = [k for k, waiter in enumerate(batch.waiters) if remove is not None and not remove(waiter)]
            if len(kept) < len(batch.waiters):
                removed.extend((item[1], waiter, item[0]) for item, waiter in batch.keep_at(kept))
        return removed

    def waiters(self) -> set[Waiter]:
        """The waiters of the requests gathered (those not sent yet)."""
        return {waiter for batch in (*self._full, *self._open.values()) for waiter in batch.waiters}

    @property
    def ready(self) -> bool:
        """Whether a batch is full: to send now, before the pause (`take` with ``full_only``)."""
        return bool(self._full)

    def take(self, full_only: bool = False) -> list[Batch[Key, Waiter]]:
        """The batches to send now, in the order they were gathered; a new pass begins.
        ``full_only``: only those that are full; the pass goes on."""
        if full_only:
            batches, self._full = self._full, []
            return batches
        batches = self._full
        batches.extend(self._open.values())
        self._full, self._open = [], {}
        return batches
