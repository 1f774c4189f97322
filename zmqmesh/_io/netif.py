"""Finding the addresses of network interfaces (Linux), for binding, advertising and beacons."""

from __future__ import annotations

import socket
import struct

from .._addresses import packed_ipv4
from ..errors import ConfigError

__all__ = ["LOOPBACK_ADDRESS", "LOOPBACK_BROADCAST", "interface_addresses", "is_loopback"]

LOOPBACK_ADDRESS = "127.0.0.1"
LOOPBACK_BROADCAST = "127.255.255.255"

_SIOCGIFADDR = 0x8915
_SIOCGIFBRDADDR = 0x8919
_SIOCGIFNETMASK = 0x891B


def _ioctl_address(sock: socket.socket, request: int, name: str) -> str:
    import fcntl  # (only a node given an interface asks for one: the others never load it)

    packed = struct.pack("256s", name.encode()[:15])
    result = fcntl.ioctl(sock.fileno(), request, packed)
    return socket.inet_ntoa(result[20:24])


def interface_addresses(name: str) -> tuple[str, str]:
    """The IPv4 address and broadcast address of interface ``name``.

    Raises `ConfigError` when the interface does not exist or has no IPv4 address.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            address = _ioctl_address(sock, _SIOCGIFADDR, name)
        except OSError as exc:
            raise ConfigError(f"interface {name!r} has no IPv4 address or does not exist") from exc
        try:
            broadcast = _ioctl_address(sock, _SIOCGIFBRDADDR, name)
        except OSError:
            broadcast = "0.0.0.0"
        if broadcast == "0.0.0.0":
            netmask = _ioctl_address(sock, _SIOCGIFNETMASK, name)
            import ipaddress  # (only for an interface without a broadcast address)

            network = ipaddress.IPv4Network(f"{address}/{netmask}", strict=False)
            broadcast = str(network.broadcast_address)
    return address, broadcast


def is_loopback(address: str) -> bool:
    """True for an IPv4 address in 127.0.0.0/8."""
    packed = packed_ipv4(address)
    return packed is not None and packed[0] == 127
