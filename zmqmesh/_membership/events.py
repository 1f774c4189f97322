"""What membership tells the layer above it; every hook runs on the event loop."""

from __future__ import annotations

from typing import Protocol

from .peer import PeerState

__all__ = ["MembershipEvents"]


class MembershipEvents(Protocol):
    """The listener a `Membership` reports to (the engine implements it)."""

    def peer_ready(self, peer: PeerState) -> None:
        """A peer completed its greeting."""

    def peer_gone(self, peer: PeerState, reason: str) -> None:
        """A ready peer left, crashed, or was dropped."""

    def peer_groups_changed(self, peer: PeerState) -> None:
        """A ready peer joined or left a group, or greeted again."""

    def zre_message(self, kind: str, peer: PeerState, group: str, frames: list[bytes]) -> None:
        """A user WHISPER (``kind == "whisper"``) or SHOUT arrived."""
