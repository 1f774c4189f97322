"""Round robins by name: whose turn it is among the candidates of a queue or a service."""

from __future__ import annotations

import itertools

__all__ = ["Turns", "TURNS_KEPT"]

TURNS_KEPT = 1024
"""Names whose turn `Turns` remembers at most: past it, all are forgotten at once, and each
starts again from the turn given to names not remembered (`Turns.__missing__`): nothing
lost, and a round of more names than this spread as evenly as by one counter for all."""


class Turns(dict[str, int]):
    """For each name, the index among its candidates whose turn it is: the one after the
    candidate last chosen for that name (``turns[name]``, taken modulo how many
    candidates there are now). Only a choice moves a name's turn (neither a look that
    chose nothing nor another name's choice), so a name chosen for now and then, among
    other work, still goes to each of its candidates in turn. A name not remembered (new,
    or forgotten past `TURNS_KEPT`) has the turn of a counter moved by each such look:
    ``turns[name]``. (A dict: the look, on every request and flush, is one C call.)"""

    def __init__(self) -> None:
        super().__init__()
        self._unknown = itertools.count()

    def __missing__(self, name: str) -> int:
        # (a fixed start, 0, sent every name of a round past TURNS_KEPT to its first candidate)
        return next(self._unknown)

    def chosen(self, name: str, index: int) -> None:
        """The candidate at ``index`` (below their number) was chosen for ``name``: the next
        one has the turn."""
        if len(self) >= TURNS_KEPT and name not in self:
            self.clear()
        self[name] = index + 1
