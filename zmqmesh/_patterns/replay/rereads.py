"""When each followed stream's history is to be read again (`Rereads`): the looks after a
catch-up or a quiet spell (`TAIL_LOOKS_S`, `QUIET_LOOK_S`) and the reads that failed
(`FETCH_RETRIES_S`, `AWAY_HOLD_S`). One entry of each kind per stream followed: bounded
as the cursors are."""

from __future__ import annotations

from .cursor import Fetch, Key

__all__ = ["Rereads"]

_NEVER = float("inf")

Place = tuple[Key, str]  # a cursor's: its subscription and stream


class Rereads:
    """The reads of histories planned for later, per cursor place (the inbox's thread only)."""

    def __init__(self) -> None:
        self._looks: dict[Place, tuple[float, bool]] = {}  # place -> (when, whether for its numbers alone)
        self._looks_due = _NEVER  # none is due before this (a later frame may have put the first off)
        self._retries: dict[Place, tuple[float, Fetch]] = {}  # place -> (when, the read to try again)

    def __bool__(self) -> bool:
        return bool(self._looks or self._retries)

    def look_at(self, place: Place, due: float, numbers_only: bool) -> None:
        """Read the history of the stream at ``place`` again at ``due``, instead of when
        planned before; for its numbers alone if ``numbers_only``."""
        self._looks[place] = (due, numbers_only)
        if due < self._looks_due:
            self._looks_due = due

    def looks_due(self, now: float) -> list[tuple[Place, bool]]:
        """Take out the looks due at ``now``: (place, numbers alone). Cheap until the first
        may be due (not a walk of every stream on every drain)."""
        if now < self._looks_due:
            return []
        due = [(place, numbers_only) for place, (when, numbers_only) in self._looks.items() if when <= now]
        for place, _numbers_only in due:
            del self._looks[place]
        self._looks_due = min([when for when, _numbers_only in self._looks.values()], default=_NEVER)
        return due

    def retry_at(self, place: Place, due: float, fetch: Fetch) -> None:
        """Try the read ``fetch`` of the stream at ``place`` again at ``due``."""
        self._retries[place] = (due, fetch)

    def retries_due(self, now: float) -> list[tuple[Place, Fetch]]:
        """Take out the reads to try again at ``now``: (place, read)."""
        due = [(place, fetch) for place, (when, fetch) in self._retries.items() if when <= now]
        for place, _fetch in due:
            del self._retries[place]
        return due

    def forget(self, place: Place) -> None:
        """Plan nothing more for the stream at ``place``."""
        self._looks.pop(place, None)
        self._retries.pop(place, None)
