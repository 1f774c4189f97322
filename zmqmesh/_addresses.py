"""IPv4 addresses and ``tcp://a.b.c.d:port`` endpoints, as every layer reads them: the
configuration, the wire (a HELLO's endpoints) and the network interfaces alike."""

from __future__ import annotations

import socket

__all__ = ["packed_ipv4", "is_ipv4", "parse_tcp_endpoint"]


def packed_ipv4(address: object) -> bytes | None:
    """The four bytes of an IPv4 address written as four decimal numbers, or None
    (``socket.inet_pton``'s strict form: what ``ipaddress.IPv4Address`` accepts, without
    loading ``ipaddress``). Raises nothing."""
    try:
        return socket.inet_pton(socket.AF_INET, address)  # type: ignore[arg-type]
    except (OSError, TypeError, ValueError):  # (ValueError: a NUL in it)
        return None


def is_ipv4(address: object) -> bool:
    """True for an IPv4 address written as four decimal numbers."""
    return packed_ipv4(address) is not None


def parse_tcp_endpoint(endpoint: str) -> tuple[str, int] | None:
    """``(ip, port)`` of a ``tcp://a.b.c.d:port`` endpoint (the port 1..65535), or None
    if it is not one. Raises nothing."""
    if not endpoint.startswith("tcp://"):
        return None
    host, colon, port = endpoint[len("tcp://"):].rpartition(":")
    if not (colon and port.isascii() and port.isdigit() and is_ipv4(host)):
        return None
    number = int(port)
    return (host, number) if 0 < number < 65536 else None
