"""The ``zmqmesh`` console script's entry point (and ``python -m zmqmesh``'s).

Loading the command (pyzmq and most of ``zmqmesh``, a tenth of a second or more) under
Python's default SIGINT handling made a Ctrl-C meanwhile a ``KeyboardInterrupt``
traceback. This module is reached through the package's ``__init__`` alone, which loads
its modules on first use (well under a millisecond here), and imports nothing but
`signal`: it holds a Ctrl-C, SIGTERM or SIGHUP while the command loads, then either exits
quietly with 128 plus the signal's number (130 for a Ctrl-C: nothing was started) or runs
the command, which handles its signals itself. Importing it touches no signal handler;
calling `main` does.
"""

from __future__ import annotations

import signal
from types import FrameType

__all__ = ["main"]


def main() -> None:
    """Load the ``zmqmesh`` command and run it (`zmqmesh.tools.cli.main`); a Ctrl-C, SIGTERM
    or SIGHUP while it loads exits with status 128 plus the first one's number (130, 143,
    129), no traceback. Raises ``SystemExit`` (the command's status)."""
    came: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        came.append(signum)

    held = [sig for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None))
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN]  # (ignored, as by nohup: left so)
    previous = [signal.signal(sig, hold) for sig in held]
    try:
        from zmqmesh.tools.cli import main as run_command
    finally:
        for sig, handler in zip(held, previous):
            signal.signal(sig, handler)
    if came:
        raise SystemExit(128 + came[0])
    run_command()
