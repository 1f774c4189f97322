"""The ``zmqmesh`` console script's entry point: a module of its own, outside the package.

Loading the command (``zmqmesh`` and pyzmq, a tenth of a second or more) took place under
Python's default SIGINT handling: a Ctrl-C meanwhile was a ``KeyboardInterrupt``
traceback. A module inside the package could not help: importing it imports ``zmqmesh``
first, and a library touches no signal handler on import. This one imports nothing but
`signal`, holds a Ctrl-C while the command loads, then either exits 130 quietly (nothing
was started) or runs the command, which handles its signals itself.
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
