"""The SIGINT and SIGTERM handlers a serving node (`Node.run_forever`,
`AsyncNode.serve_forever`) puts in place for the time it serves, taken back in a child
forked meanwhile; none for a signal the process ignores (`not_ignored`).

A forked child inherits its parent's signal handlers, and those of a serving node only ask
the parent's node to stop: the child would ignore SIGINT and SIGTERM (``Process.terminate()``
would not end it). An asyncio loop's handlers also leave a wake-up descriptor shared with
the parent, through which the child's signals would reach the parent's loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["not_ignored", "serving", "served"]

# signal number -> (the handler a serving node put in place, the handler it replaced), while
# it serves
_IN_PLACE: dict[int, tuple[Any, Any]] = {}
_WAKEUP_FD = [False]  # whether asyncio set a wake-up descriptor for them
_SERVING = [0]  # how many nodes serve (AsyncNodes on one loop may serve together)


def not_ignored(signals: Iterable[int]) -> tuple[int, ...]:
    """Of ``signals``, those the process does not ignore: a serving node handles only
    these. One ignored (``SIG_IGN``, inherited from a parent that ignored it: a shell
    script's background job ignores SIGINT) stays ignored, as the one who started the
    process asked. Call from the main thread. Never raises."""
    import signal  # (already loaded by the caller, which handles the others with it)

    return tuple(sig for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN)


def serving(handlers: Mapping[int, tuple[Any, Any]], wakeup_fd: bool = False) -> None:
    """Record ``handlers`` (signal number -> (the handler put in place, the handler it
    replaced)) as a serving node's, to be put back in a child forked while they are in
    place (of nodes serving together, the first one's replaced handlers); ``wakeup_fd``:
    asyncio set a wake-up descriptor for them. Call `served` once for each. Never raises."""
    _SERVING[0] += 1
    for sig, pair in handlers.items():
        _IN_PLACE.setdefault(sig, pair)
    _WAKEUP_FD[0] = _WAKEUP_FD[0] or wakeup_fd


def served() -> None:
    """A node of `serving` ended its serving (and put the replaced handlers back): once
    none serves, forget them. Never raises."""
    _SERVING[0] = max(_SERVING[0] - 1, 0)
    if not _SERVING[0]:
        _forget()


def _forget() -> None:
    _IN_PLACE.clear()
    _WAKEUP_FD[0] = False
    _SERVING[0] = 0


def _take_back_in_child() -> None:
    if not _IN_PLACE:
        return
    import signal  # (already loaded: a node that served put its handlers in place with it)

    in_place = dict(_IN_PLACE)
    wakeup_fd = _WAKEUP_FD[0]
    _forget()
    for sig, (ours, replaced) in in_place.items():
        try:
            if signal.getsignal(sig) is ours:
                signal.signal(sig, signal.SIG_DFL if replaced is None else replaced)
        except (OSError, TypeError, ValueError):  # (a fork hook must not raise)
            pass
    if wakeup_fd:
        try:
            signal.set_wakeup_fd(-1)
        except (OSError, ValueError):
            pass


os.register_at_fork(after_in_child=_take_back_in_child)
