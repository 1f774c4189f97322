"""CURVE security: key pairs, key files, and the ZAP handler that enforces an allow-list.

When a node is given a secret key, every socket it binds is a CURVE server and every
connection it makes is a CURVE client that knows the peer's public key. Its ZAP handler
admits only clients whose public key is in the node's allow-list (its own key is always
allowed). A node whose key is not allowed cannot complete a handshake with any socket of
the mesh: it learns nothing and delivers nothing. Secure and plain nodes never mix:
secure nodes send and hear only version-3 beacons, which carry the public key.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import sys
from typing import TYPE_CHECKING, Any, NamedTuple

import zmq
from zmq.utils import z85

from .._stats import LogThrottle
from ..errors import ArgumentTypeError, ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    from .._stats import Stats
    from .reactor import EventLoop

__all__ = [
    "KeyPair",
    "generate_keypair",
    "write_keypair",
    "read_secret_key",
    "read_public_key",
    "check_key",
    "make_server",
    "make_client",
    "connect",
    "ZapHandler",
    "ZAP_DOMAIN",
]

log = logging.getLogger("zmqmesh.security")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = "zmqmesh"
KEY_LENGTH = 40  # a Z85-encoded 32-byte key
REFUSAL_LOG_S = 10.0
"""At most one log line about refused handshakes this often (each is counted, as
``curve_denied``): a stranger can retry a handshake as fast as the network lets it."""
_HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
"""The handshakes `ZapHandler.watch` counts: those a CURVE server fails before it asks the
ZAP handler (a plain client's, one that does not know the server's key; libzmq reports
a plain client's as a protocol error, or without detail when the client hung up first,
having seen the mismatch too), and those cut in the middle."""
KEY_FILE_MAX = 64 << 10
"""The most a key file is read of (a few lines, written by `write_keypair`): a larger
one, or a device such as ``/dev/zero``, is refused, not read whole."""


class KeyPair(NamedTuple):
    """A CURVE key pair, both keys Z85-encoded (40 characters)."""

    public: str
    secret: str

    @classmethod
    def from_secret(cls, secret: str) -> KeyPair:
        """The key pair of a Z85 secret key. Raises `ConfigError` if it is not one."""
        check_key(secret, "secret key")
        return cls(zmq.curve_public(secret.encode()).decode(), secret)

    def public_bytes(self) -> bytes:
        """The public key as 32 raw bytes (as beacons carry it)."""
        return z85.decode(self.public)

    def __repr__(self) -> str:
        # (the secret shown as <hidden>, as NodeConfig's: a log line or a traceback's locals)
        return f"KeyPair(public={self.public!r}, secret=<hidden>)"


def check_key(key: str, what: str = "key") -> str:
    """Return ``key`` if it is a Z85-encoded 32-byte key, else raise `ConfigError`."""
    if not isinstance(key, str) or len(key) != KEY_LENGTH:
        raise ConfigError(f"a CURVE {what} must be 40 Z85 characters")
    try:
        z85.decode(key)
    except (ValueError, KeyError, TypeError, struct.error) as exc:  # (struct: a group of five past 2**32)
        raise ConfigError(f"a CURVE {what} must be Z85-encoded") from exc
    return key


def generate_keypair() -> KeyPair:
    """A new random CURVE key pair."""
    public, secret = zmq.curve_keypair()
    return KeyPair(public.decode(), secret.decode())


def write_keypair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (secret, mode 600) into ``directory``.

    Returns both paths. Refuses to overwrite existing files or to write through a link
    (raises `FileExistsError`, having written neither), and a ``name`` that is empty,
    blank, starts with a dot or holds a path separator or a NUL (raises `ConfigError`, a
    ``ValueError``: it named hidden files such as ``.key``, or files outside
    ``directory``), or is no ``str`` (`ArgumentTypeError`, a ``TypeError``). Raises
    `OSError` when the directory cannot be made or written to, leaving no half of the pair
    behind.
    """
    from pathlib import Path  # (here: only writing key files needs it, not a node)

    if not isinstance(name, str):
        raise ArgumentTypeError(f"a key pair's name must be a str, got {type(name).__name__}")
    if not name.strip():
        raise ConfigError(f"a key pair's name must not be empty, got {name!r}")
    if name.startswith(".") or "/" in name or (os.altsep is not None and os.altsep in name) or os.sep in name \
            or "\x00" in name:
        raise ConfigError(f"a key pair's name is a file name in the directory given, without a path, a NUL "
                          f"or a leading dot, got {name!r}")
    keys = generate_keypair()
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public_path = folder / f"{name}.key"
    secret_path = folder / f"{name}.key_secret"
    for path in (public_path, secret_path):
        if os.path.lexists(path):  # (a dangling link too: `exists` follows it)
            raise FileExistsError(f"{path} already exists")
    written: list[Path] = []
    try:
        for path, mode, text in (
                (secret_path, stat.S_IRUSR | stat.S_IWUSR,
                 f"# zmqmesh CURVE secret key: keep private\npublic-key = \"{keys.public}\"\nsecret-key = \"{keys.secret}\"\n"),
                (public_path, 0o644, f"# zmqmesh CURVE public key\npublic-key = \"{keys.public}\"\n")):
            # (O_EXCL: never an existing file, nor through a link, even one made meanwhile)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            written.append(path)
            with os.fdopen(fd, "w") as file:
                file.write(text)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return public_path, secret_path


def _shown(path: str | os.PathLike[str]) -> str:
    """``path`` for an error message: quoted and escaped (a path may hold any byte but NUL)."""
    try:
        return repr(os.fspath(path))
    except TypeError:  # (no path at all)
        return repr(path)


def _read_field(path: str | os.PathLike[str], field: str) -> str:
    """The value of ``field = "..."`` in the key file at ``path``. Raises `ConfigError`
    when the file cannot be read, is larger than `KEY_FILE_MAX` bytes, or has no such
    field (a binary file has none: bytes that are not UTF-8 count as no text)."""
    try:
        with open(path, "rb") as file:
            data = file.read(KEY_FILE_MAX + 1)
    except (OSError, ValueError, TypeError) as exc:  # (ValueError: a NUL in the path; TypeError: no path)
        raise ConfigError(f"cannot read key file {_shown(path)}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(data) > KEY_FILE_MAX:
        raise ConfigError(f"{_shown(path)} is no key file: larger than {KEY_FILE_MAX} bytes")
    for line in data.decode("utf-8", errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == field:
            return value.strip().strip('"')
    raise ConfigError(f"{_shown(path)} has no {field}")


def _has_field(path: str | os.PathLike[str], field: str) -> bool:
    """Whether the key file at ``path`` can be read and has ``field``."""
    try:
        _read_field(path, field)
    except ConfigError:
        return False
    return True


def read_secret_key(path: str | os.PathLike[str]) -> str:
    """The secret key stored in a ``.key_secret`` file. Raises `ConfigError`.

    A secret key file readable by group or others is refused; a file with no secret key
    (the public ``.key`` file, say) is named as such first, whatever its mode.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError, TypeError) as exc:  # (as `_read_field`)
        raise ConfigError(f"cannot read key file {_shown(path)}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        secret = _read_field(path, "secret-key")
    except ConfigError as exc:
        if not _has_field(path, "public-key"):
            raise
        raise ConfigError(f"{_shown(path)} has no secret-key: it is a public key file (give NAME.key_secret, "
                          "its pair)") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{_shown(path)} is readable by others: chmod 600 it")
    return check_key(secret, "secret key")


def read_public_key(path: str | os.PathLike[str]) -> str:
    """The public key stored in a ``.key`` (or ``.key_secret``) file. Raises `ConfigError`."""
    return check_key(_read_field(path, "public-key"), "public key")


def make_server(sock: zmq.Socket[Any], keys: KeyPair) -> None:
    """Make ``sock``'s next bind a CURVE server checked by the ZAP handler.

    Without a ZAP handler bound, libzmq's CURVE server admits any client key; with
    ``ZAP_ENFORCE_DOMAIN`` it refuses every one instead (where libzmq takes the option:
    a build without its draft options does not, and there the node keeps its ZAP
    handler bound as long as its sockets, `ZapHandler.pause`).
    """
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret.encode())
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    try:
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    except (zmq.ZMQError, AttributeError):
        pass


def make_client(sock: zmq.Socket[Any], keys: KeyPair, server_public: str) -> None:
    """Make ``sock``'s next connect a CURVE client of the server with key ``server_public``."""
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret.encode())
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public.encode())


class ZapHandler:
    """Answers ZAP requests on the node's loop: CURVE clients whose key is allowed pass."""

    def __init__(self, ctx: zmq.Context[Any], loop: EventLoop, keys: KeyPair,
                 allowed: frozenset[str], stats: Stats) -> None:
        self.loop = loop
        self.allowed = allowed | {keys.public}
        self.stats = stats
        self._refusals_log = LogThrottle(REFUSAL_LOG_S)
        self._failures_log = LogThrottle(REFUSAL_LOG_S)
        self._monitors: list[zmq.Socket[Any]] = []
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        loop.add_reader(self.sock.FD, self._on_request)
        loop.call_soon(self._on_request)

    def _on_request(self) -> None:
        sock = self.sock
        while not sock.closed:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            # [routing id, empty, version, request id, domain, address, identity, mechanism, credentials...]
            if len(frames) < 8 or frames[2] != b"1.0":
                self.stats.reject("zap_malformed")
                continue
            routing, _empty, version, request_id, _domain, address, _identity, mechanism = frames[:8]
            user = b""
            if mechanism == b"CURVE" and len(frames) >= 9 and len(frames[8]) == 32:
                key = z85.encode(frames[8]).decode()
                ok = key in self.allowed
                user = key.encode()
            else:
                ok = False
            if not ok:
                self.stats.reject("curve_denied")
                refused = self._refusals_log.due()
                if refused:
                    log.warning("refused %d handshake(s) with a key not allowed since the last such line, the "
                                "latest %s from %s (each counted in rejected.curve_denied)", refused,
                                mechanism.decode(errors="replace"), address.decode(errors="replace"))
            reply = [routing, b"", version, request_id, b"200" if ok else b"400", b"OK" if ok else b"key not allowed", user, b""]
            try:
                sock.send_multipart(reply, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def watch(self, sock: zmq.Socket[Any]) -> None:
        """Count, as ``curve_handshake_failed``, and log at most every `REFUSAL_LOG_S`, the
        handshakes the CURVE server ``sock`` fails before asking this handler: clients that
        speak no CURVE (a plain node) or do not know this node's public key, and those that
        hang up in the middle (`_HANDSHAKE_FAILED`). On the loop, before another thread
        uses ``sock``. Raises `zmq.ZMQError` if it cannot be watched."""
        monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)
        self._monitors.append(monitor)
        self.loop.add_reader(monitor.FD, self._on_failures, monitor)
        self.loop.call_soon(self._on_failures, monitor)  # (the descriptor is edge-triggered)

    def _on_failures(self, monitor: zmq.Socket[Any]) -> None:
        failed = 0
        while not monitor.closed:
            try:
                frames = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                break
            # (a monitor's event: a 16-bit id and a 32-bit value in native byte order, then the endpoint)
            if len(frames) == 2 and int.from_bytes(frames[0][:2], sys.byteorder) & _HANDSHAKE_FAILED:
                failed += 1
        if failed:
            self.stats.reject("curve_handshake_failed", failed)
            said = self._failures_log.due(failed)
            if said:
                log.warning("%d handshake(s) failed in ZeroMQ (a client speaking no CURVE, not knowing this "
                            "node's key, or hanging up midway) since the last such line (each counted in "
                            "rejected.curve_handshake_failed)", said)

    def pause(self) -> None:
        """Stop answering and counting (on the loop), and keep the socket bound until the
        context ends: a handshake asked of it meanwhile waits unanswered, and never
        completes, where a server without a ZAP handler bound might admit any key
        (`make_server`)."""
        for sock in (self.sock, *self._monitors):
            try:
                self.loop.remove_reader(sock.FD)
            except Exception:  # not watched, or the loop is closed
                pass
        for monitor in self._monitors:
            monitor.close(0)
        self._monitors.clear()


def connect(sock: zmq.Socket[Any], endpoint: str, keys: KeyPair | None, peer_key: str | None) -> None:
    """Connect ``sock`` to ``endpoint``: as a CURVE client of ``peer_key`` when ``keys`` are given.

    In-process endpoints need no CURVE. Raises `zmq.ZMQError` if the endpoint is refused.
    """
    if keys is not None and not endpoint.startswith("inproc://"):
        make_client(sock, keys, peer_key or keys.public)
    sock.connect(endpoint)
