"""The built-in services every node answers on its service ROUTER, beside its users'
services: ``\\x00stats`` (`StatsService`: the node's counters) and ``\\x00history``
(`HistoryPages`: pages of the topics a publisher keeps, for replaying subscribers). Each
sends its reply through the function it is given; neither ever leaves a caller to wait
out its timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..._mesh.directory import Directory
from ..._stats import LogThrottle, Stats
from ..._store.messages import INTEGER_MAX
from ..._wire import frames as wire
from ..._wire.codec import Codec
from ...errors import MessageTooLargeError
from .reply_bodies import callers_limit, error_body, within

if TYPE_CHECKING:
    from ..history import History

__all__ = ["HistoryPages", "StatsService"]

log = logging.getLogger("zmqmesh.inbox")

_INT64_MIN, _INT64_MAX = -INTEGER_MAX - 1, INTEGER_MAX  # (a history position SQLite can hold)
_TOO_LARGE_LOG_S = 10.0  # a page of history too large for its reader is logged at most this often

Reply = Callable[[tuple[bytes, bytes], bytes, bytes], None]
"""Sends a reply: ``(route, status, body)``."""


class StatsService:
    """Answers ``\\x00stats``: what ``describe`` gives (the node's id, name, counters and
    gauges), within the ``max_message_bytes`` its caller announced."""

    def __init__(self, *, describe: Callable[[], dict[str, Any]], codec: Codec, directory: Directory,
                 reply: Reply) -> None:
        self.describe = describe
        self.codec = codec
        self.directory = directory
        self.reply = reply

    def serve(self, route: tuple[bytes, bytes]) -> None:
        """Answer the stats request of ``route``. Its names are left out
        (``"names_omitted"``) when they take the reply past what a message (or the caller)
        holds; a failure is answered ``0x01``. Never raises."""
        limit = callers_limit(self.directory, route[0])
        try:
            described = self.describe()
            try:
                body = within(self.codec.encode(described), limit)
            except MessageTooLargeError:  # more names than a message (or the caller) holds: the rest still goes
                described["names"], described["names_omitted"] = {}, True
                body = within(self.codec.encode(described), limit)
            self.reply(route, wire.STATUS_OK, body)
        except Exception as exc:  # the caller must hear of it, never wait out its timeout
            self.reply(route, wire.STATUS_ERROR, error_body(self.codec, exc, "", limit))


class HistoryPages:
    """Answers ``\\x00history``: a page of this node's kept topics (`History.page`), or
    ``0x02`` if it keeps none (``history`` None)."""

    def __init__(self, *, history: History | None, codec: Codec, stats: Stats, reply: Reply) -> None:
        self.history = history
        self.codec = codec
        self.stats = stats
        self.reply = reply
        self._too_large_log = LogThrottle(_TOO_LARGE_LOG_S)  # (`_page_too_large`)

    def serve(self, route: tuple[bytes, bytes], body: bytes) -> None:
        """Answer a request for one page of a replay (every outcome is answered): ``{"p": prefix, "a": after position, "s": since (epoch
        seconds) or absent, "n": rows at most (0: ``next`` alone) or absent, "b": the bytes
        of rows the reader takes in a page (half its ``max_message_bytes``) or absent, "t":
        the topic from which ``next`` goes on, for a reader that takes it in pieces, or
        absent}``; see `History.page`. A page holds at most 1 MiB of rows, half this node's
        ``max_message_bytes``, and the reader's ``"b"``, and so does a piece of ``next``.
        A request whose fields are of the wrong types, or whose position SQLite cannot
        hold (past 64 bits, its position or time), is malformed: answered ``0x03`` and counted
        (``rejected["history_malformed"]``). A page too large to send, or one with the whole
        of ``next`` too large for the reader to take (past twice its ``"b"``: it would end
        the reader's connection), is answered ``0x01`` instead (`_page_too_large`); the rows
        of such a page go without ``next``, ``"more"`` set, so that only ``next`` is refused.
        (A frame past ``"b"`` still comes alone in a page, with a piece of ``next``.)"""
        if self.history is None:
            self.reply(route, wire.STATUS_NO_SERVICE, b"")
            return
        from ..history import PAGE_ROWS  # (loaded with the node's History)

        try:
            request = self.codec.decode(body)
            prefix, after, since = request["p"], request.get("a", 0), request.get("s")
            rows, budget, next_from = request.get("n", PAGE_ROWS), request.get("b", 1 << 20), request.get("t")
            if not isinstance(prefix, str) or type(after) is not int or not _INT64_MIN <= after <= _INT64_MAX or \
                    (since is not None and (not isinstance(since, (int, float)) or
                                            type(since) is int and not _INT64_MIN <= since <= _INT64_MAX)) or \
                    not isinstance(rows, int) or isinstance(rows, bool) or \
                    type(budget) is not int or budget <= 0 or (next_from is not None and type(next_from) is not str):
                raise ValueError("bad field types")
        except Exception:
            self.stats.reject("history_malformed")
            self.reply(route, wire.STATUS_BAD_REQUEST, b"")
            return
        page: dict[str, Any] = {}
        try:
            most = min(1 << 20, self.codec.max_message_bytes // 2, budget)
            page = self.history.page(prefix, after, since, most, rows, next_from)
            reply = self.codec.encode(page)
            if "b" in request and next_from is None and "next" in page and len(reply) > 2 * budget:
                if not page["rows"]:
                    raise MessageTooLargeError(f"a page of {len(reply)} bytes, past the reader's max_message_bytes")
                # (its rows still go, without the numbers: the reader asks again from the last,
                # and only the numbers are refused; refused with them, those rows never came)
                page = {key: value for key, value in page.items() if key != "next"}
                page["more"] = True
                reply = self.codec.encode(page)
        except MessageTooLargeError as exc:
            self._page_too_large(route, exc, next_from is None and "next" in page)
        except Exception as exc:
            log.error("cannot serve a page of history: %s", exc)
            self.reply(route, wire.STATUS_ERROR, error_body(self.codec, exc))
        else:
            self.reply(route, wire.STATUS_OK, reply)

    def _page_too_large(self, route: tuple[bytes, bytes], exc: MessageTooLargeError, whole_next: bool) -> None:
        """Answer ``0x01`` for a page of history too large for its reader (``exc``), which
        would end the reader's connection, and count it
        (``stats()["pubsub"]["history_page_too_large"]``); logged at most every
        `_TOO_LARGE_LOG_S`. ``whole_next``: the page carries the whole of ``next`` (the
        numbers of many kept topics), which a reader before pieces cannot take in fewer."""
        self.stats.add("pubsub", "history_page_too_large")
        why = (" with the numbers of every kept topic under its prefix (a subscriber of this version or later "
               "takes them in pieces)") if whole_next else ""
        if self._too_large_log.due():
            log.warning("a page of history too large for its reader%s: not sent (counted in "
                        "pubsub.history_page_too_large; said again at most every %g s): %s",
                        why, _TOO_LARGE_LOG_S, exc)
        self.reply(route, wire.STATUS_ERROR, error_body(self.codec, MessageTooLargeError(f"{exc}{why}")))
