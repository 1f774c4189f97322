"""The ``zmqmesh`` console script's entry point (and ``python -m zmqmesh``'s).

Loading the command (pyzmq and most of ``zmqmesh``, a tenth of a second or more) under
Python's default SIGINT handling made a Ctrl-C meanwhile a ``KeyboardInterrupt``
traceback. This module is reached through the package's ``__init__`` alone, which loads
its modules on first use (well under a millisecond here), and imports nothing but
`signal`: it holds a Ctrl-C while the command loads, then either exits 130 quietly
(nothing was started) or runs the command, which handles its signals itself. Importing
it touches no signal handler; calling `main` does.
"""

from __future__ import annotations

import signal
from types import FrameType

__all__ = ["main"]


def main() -> None:
    """Load the ``zmqmesh`` command and run it (`zmqmesh.tools.cli.main`); a Ctrl-C while it
    loads exits with status 130, no traceback. Raises ``SystemExit`` (the command's status)."""
    interrupted: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        interrupted.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        from zmqmesh.tools.cli import main as run_command
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise SystemExit(130)
    run_command()
