"""What a command does when the reader of its output goes away (``zmqmesh ... | head -1``):
it writes nowhere from then on, and ends with the status of a command that SIGPIPE ends."""

from __future__ import annotations

import os
from typing import TextIO

__all__ = ["PIPE_CLOSED", "write_nowhere"]

PIPE_CLOSED = 141
"""The exit status of a command whose output's reader went away (128 + SIGPIPE)."""


def write_nowhere(out: TextIO) -> None:
    """Point ``out``'s file at /dev/null: what is still buffered for a reader that went
    away then fails neither a later flush nor the interpreter's exit. Raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, out.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):  # (an ``out`` without a file of its own)
        pass
