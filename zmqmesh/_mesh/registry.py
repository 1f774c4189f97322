"""The handlers registered on one node, and what they make the node offer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .._wire.frames import dead_letter_queue
from ..errors import ConfigError

__all__ = ["Registry", "PullOptions", "SubscribeOptions", "EVENTS", "MAX_OFFERS"]

EVENTS = ("join", "leave", "whisper", "shout")
MAX_OFFERS = 2000
"""Topics, queues and services one node may offer: each is one to three ZRE groups, and a
peer takes at most 10,000 groups in a HELLO."""


class PullOptions(NamedTuple):
    """How a node pulls one queue (see `Node.pull`)."""

    at_least_once: bool = False
    ack_timeout_s: float | None = None
    max_deliveries: int = 5
    dead_letter: str | None = None
    dedupe: bool = False
    dedupe_window: int = 100_000

    def dead_letter_queue(self, queue: str) -> str:
        """Where messages of ``queue`` that used up their deliveries go."""
        return dead_letter_queue(queue, self.dead_letter)


class SubscribeOptions(NamedTuple):
    """How one handler subscribes to one prefix (see `Node.subscribe`)."""

    replay: str | float = "new"
    durable_name: str | None = None

    @property
    def replays(self) -> bool:
        """Whether the subscription is sequenced against publishers' histories (it replays,
        or resumes where it was)."""
        return self.replay != "new" or self.durable_name is not None


class Registry:
    """Topic, queue and service handlers and event callbacks of one node.

    Every table is replaced, never changed in place, so a thread reading one (the inbox,
    the loop) always sees a whole table; `version` counts the replacements. Writers must
    take turns: `NodeBase` makes every change holding its ``_stop_lock``.
    """

    def __init__(self) -> None:
        self.topics: dict[str, list[Callable[..., Any]]] = {}
        self.queues: dict[str, Callable[..., Any]] = {}
        self.services: dict[str, Callable[..., Any]] = {}
        self.callbacks: dict[str, tuple[Callable[..., Any], ...]] = dict.fromkeys(EVENTS, ())
        self.ack_queues: frozenset[str] = frozenset()
        self.pull_options: dict[str, PullOptions] = {}
        self.zero_copy_queues: frozenset[str] = frozenset()  # plain pulls whose handlers take views
        self.idempotent: frozenset[str] = frozenset()
        self.keeps: frozenset[str] = frozenset()
        self.kept_topics: frozenset[str] = frozenset()  # prefixes this node keeps (``history=``)
        # (prefix, handler) -> options, for the subscriptions that replay
        self.replays: dict[tuple[str, Callable[..., Any]], SubscribeOptions] = {}
        self.version = 0
        self.on_topic_removed: Callable[[], None] | None = None
        """Called, on the thread that removed it, once a topic's handler was removed (`remove`):
        the dispatcher then looks at the calls it gathered before (`Dispatcher.unsubscribed`)."""

    def offers(self) -> dict[str, frozenset[str]]:
        """What this node offers, by kind (the kinds of `OFFER_KINDS`)."""
        return {
            "services": frozenset(self.services),
            "queues": frozenset(self.queues),
            "topics": frozenset(self.topics),
            "ackqueues": frozenset(self.queues) & self.ack_queues,
            "idempotent": frozenset(self.services) & self.idempotent,
            "acktimeouts": frozenset(
                f"{round(o.ack_timeout_s * 1000)}/{q}" for q, o in self.pull_options.items()
                if o.ack_timeout_s is not None and q in self.queues and q in self.ack_queues),
            "keepers": self.keeps,
            "history": self.kept_topics,
        }

    def _check_room(self) -> None:
        """Raise `ConfigError` if this node offers `MAX_OFFERS` names already (topics, queues,
        services and the queues it keeps)."""
        if len(self.topics) + len(self.queues) + len(self.services) + len(self.keeps) >= MAX_OFFERS:
            raise ConfigError(f"a node offers at most {MAX_OFFERS} topics, queues, services and kept queues in "
                              "all (each is a ZRE group its peers must take in one HELLO)")

    def add(self, kind: str, name: str, handler: Callable[..., Any],
            options: Callable[[], None] | None = None) -> None:
        """Register ``handler`` for a topic prefix, queue or service; ``options``, if given,
        records what is said of it (at-least-once, idempotent, replay) once the checks
        passed and before the name is in its table: a reader on another thread (the loop
        announcing this node's offers) never finds it there without them. Raises
        `ConfigError` (a ``ValueError``) on a clash, or past `MAX_OFFERS` names (peers could
        not take the HELLO); nothing is recorded then."""
        if name not in getattr(self, kind):
            self._check_room()
        if kind == "topics":
            topics = dict(self.topics)
            topics[name] = [*topics.get(name, []), handler]
        else:
            table = dict(getattr(self, kind))
            if name in table and table[name] is not handler:
                what = "queue" if kind == "queues" else "service"
                raise ConfigError(f"this node already has a handler for the {what} {name!r}")
            table[name] = handler
        if options is not None:
            options()
        setattr(self, kind, topics if kind == "topics" else table)
        self.version += 1

    def check_durable_name(self, prefix: str, handler: Callable[..., Any], options: SubscribeOptions) -> None:
        """Raise `ConfigError` if another subscription of this node (not ``handler`` on
        ``prefix``) has the durable name of ``options`` and a prefix that shares topics with
        ``prefix``: a name keeps one place per publisher stream and topic, and two
        subscriptions moving it skipped, after a restart, what the slower one had not
        handled yet."""
        name = options.durable_name
        if name is None:
            return
        for (other, other_handler), other_options in self.replays.items():
            if other_options.durable_name == name and (other, other_handler) != (prefix, handler) and \
                    (other.startswith(prefix) or prefix.startswith(other)):
                raise ConfigError(f"the durable_name {name!r} is taken by this node's subscription to {other!r}, "
                                  f"whose topics {prefix!r} shares: give each subscription a name of its own")

    def set_subscribe_options(self, prefix: str, handler: Callable[..., Any], options: SubscribeOptions) -> None:
        """How ``handler`` subscribes to ``prefix`` (only replaying subscriptions are listed)."""
        replays = {k: v for k, v in self.replays.items() if k != (prefix, handler)}
        if options.replays:
            replays[(prefix, handler)] = options
        self.replays = replays
        self.version += 1

    def mark_at_least_once(self, queue: str) -> None:
        """Pull ``queue`` at-least-once (acknowledged batches)."""
        self.ack_queues = self.ack_queues | {queue}

    def set_pull_options(self, queue: str, options: PullOptions) -> None:
        """How ``queue`` is pulled (at-least-once and its delivery limits)."""
        self.pull_options = {**self.pull_options, queue: options}
        if options.at_least_once:
            self.mark_at_least_once(queue)

    def set_zero_copy(self, queue: str, zero_copy: bool) -> None:
        """Whether ``queue``'s handler takes a large raw payload as a view (see `Node.pull`)."""
        self.zero_copy_queues = self.zero_copy_queues | {queue} if zero_copy else self.zero_copy_queues - {queue}

    def keep(self, queue: str) -> None:
        """Keep the durable messages of ``queue`` that stopping pushers hand over. Raises
        `ConfigError` past `MAX_OFFERS` names, as `add` does."""
        if queue not in self.keeps:
            self._check_room()
        self.keeps = self.keeps | {queue}
        self.version += 1

    def mark_idempotent(self, service: str) -> None:
        """Declare ``service`` safe to retry on another provider."""
        self.idempotent = self.idempotent | {service}

    def add_callback(self, event: str, handler: Callable[..., Any]) -> None:
        """Call ``handler`` on ``event`` (one of `EVENTS`)."""
        callbacks = dict(self.callbacks)
        callbacks[event] = (*callbacks[event], handler)
        self.callbacks = callbacks

    def remove(self, kind: str, name: str, handler: Callable[..., Any] | None = None) -> bool:
        """Remove the handler(s) of a name; True if anything was removed."""
        table = dict(getattr(self, kind))
        if name not in table:
            return False
        if kind == "topics" and handler is not None:
            left = [h for h in table[name] if h is not handler]
            if len(left) == len(table[name]):
                return False
            if left:
                table[name] = left
            else:
                del table[name]
        elif handler is not None and kind != "topics" and table[name] is not handler:
            return False
        else:
            del table[name]
        setattr(self, kind, table)
        if kind == "topics":
            self.replays = {(p, h): o for (p, h), o in self.replays.items() if h in table.get(p, ())}
        elif name not in table:  # what was said of the name goes with it
            if kind == "queues":
                self.ack_queues = self.ack_queues - {name}
                self.pull_options = {q: o for q, o in self.pull_options.items() if q != name}
                self.zero_copy_queues = self.zero_copy_queues - {name}
            else:
                self.idempotent = self.idempotent - {name}
        self.version += 1
        if kind == "topics" and self.on_topic_removed is not None:
            self.on_topic_removed()
        return True

    def remove_handler(self, handler: Callable[..., Any]) -> bool:
        """Remove ``handler`` wherever it is registered; True if it was."""
        found = False
        for kind in ("services", "queues", "topics"):
            for name, entry in list(getattr(self, kind).items()):
                if entry is handler or (isinstance(entry, list) and handler in entry):
                    found |= self.remove(kind, name, handler)
        callbacks = {event: tuple(cb for cb in cbs if cb is not handler) for event, cbs in self.callbacks.items()}
        if callbacks != self.callbacks:
            self.callbacks = callbacks
            found = True
        return found
