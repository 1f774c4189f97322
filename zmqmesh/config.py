"""Node configuration: one frozen record, every field named with its unit, sane defaults.

Defaults keep a node on loopback: it binds 127.0.0.1 and beacons to 127.255.255.255, so
nothing leaves the machine until the user names an interface or an address.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from ._addresses import is_ipv4, parse_tcp_endpoint
from ._record import fields_of, frozen_record, replaced
from .errors import ConfigError

__all__ = ["NodeConfig", "DEFAULT_BEACON_PORT", "HistoryPolicy", "LONGEST_WAIT_S", "check_switch", "parse_history"]

DEFAULT_BEACON_PORT = 5670
"""UDP port of ZRE discovery (ZRE-DISC, assigned by IANA)."""


class HistoryPolicy(NamedTuple):
    """What is kept of the topics under ``prefix``: the last ``max_messages`` of each topic,
    and (if given) nothing older than ``max_age_s``."""

    prefix: str
    max_messages: int
    max_age_s: float | None = None


def parse_history(value: Any) -> tuple[HistoryPolicy, ...]:
    """``history=`` as given (``{prefix: max_messages}``, ``{prefix: {"max_messages": n,
    "max_age_s": s}}``, or ``"prefix=n,prefix=n"`` from the environment) as policies.
    Raises `ConfigError` for anything else."""
    if value is None or value == ():
        return ()
    if isinstance(value, tuple) and all(isinstance(p, HistoryPolicy) for p in value):
        return value
    if isinstance(value, tuple) and all(isinstance(p, str) for p in value):  # from the environment
        value = ",".join(value)
    if isinstance(value, str):
        try:
            value = {k.strip(): int(v) for k, v in (part.rsplit("=", 1) for part in value.split(",") if part.strip())}
        except ValueError:
            raise ConfigError(f"history must look like 'prefix=max_messages,...', got {value!r}") from None
    if not isinstance(value, Mapping):
        raise ConfigError(f"history must map topic prefixes to what is kept, got {value!r}")
    policies = []
    for prefix, kept in value.items():
        if not isinstance(prefix, str) or len(prefix.encode()) > 200:
            raise ConfigError(f"history: a topic prefix must be a string of at most 200 bytes, got {prefix!r}")
        if isinstance(kept, Mapping):
            unknown = set(kept) - {"max_messages", "max_age_s"}
            if unknown:
                raise ConfigError(f"history[{prefix!r}]: unknown key(s) {sorted(unknown)}")
            max_messages, max_age_s = kept.get("max_messages", 100_000), kept.get("max_age_s")
        else:
            max_messages, max_age_s = kept, None
        if not isinstance(max_messages, int) or isinstance(max_messages, bool) or max_messages < 1:
            raise ConfigError(f"history[{prefix!r}]: max_messages must be a whole number >= 1, got {max_messages!r}")
        if max_age_s is not None and (not isinstance(max_age_s, (int, float)) or isinstance(max_age_s, bool)
                                      or not max_age_s > 0):  # (NaN fails it too: it expired nothing)
            raise ConfigError(f"history[{prefix!r}]: max_age_s must be a positive number, got {max_age_s!r}")
        policies.append(HistoryPolicy(prefix, max_messages, None if max_age_s is None else float(max_age_s)))
    # the longest prefix decides for a topic under several
    return tuple(sorted(policies, key=lambda p: len(p.prefix), reverse=True))



@frozen_record
class NodeConfig:
    """Every option of a node. Pass fields as keyword arguments to `Node` / `AsyncNode`.

    A config is immutable; ``config.replace(**options)`` makes a changed copy, and
    ``NodeConfig.fields()`` names the fields. Building one raises `ConfigError` for a
    value out of range, `ArgumentTypeError` (a ``TypeError``) for an unknown field.

    Discovery and membership:
        mesh: name of the mesh; nodes of different meshes ignore each other even on one
            network. Plain ZRE peers (pyre, zyre) carry no mesh name and are accepted
            when ``accept_plain_zre`` is true.
        interface: network interface to join (e.g. ``"eth0"``); ``None`` stays on loopback.
        bind_address: IPv4 address to bind sockets to; derived from ``interface`` by default.
        advertise_address: address peers should use to reach this node; by default the
            bound address (never 0.0.0.0).
        beacon_address: where UDP beacons go; by default the interface's broadcast
            address (127.255.255.255 on loopback).
        beacon_port: UDP port of beacons (ZRE uses 5670).
        mailbox_port: fixed TCP port of the ZRE mailbox (0: a random port in
            49152-65535); a fixed port lets seeds be written down ahead of time.
        beacon_interval_s: seconds between beacons (the first goes out at once).
        discovery: send and listen to UDP beacons; turn off to rely on ``seeds`` only.
        seeds: mailbox endpoints (``tcp://ip:port``) to greet directly where broadcast
            does not reach; a node met through a seed tells us the rest of the mesh.
        heartbeat_interval_s: a peer silent this long is sent a PING.
        peer_timeout_s: a peer silent this long (no traffic, no PING-OK) is declared gone.
            While this node's own event loop runs late (a starved host, a stopped
            process), the time it was late is not counted as silence, and peers get up
            to 8 more timeouts (given back as it runs on time; see docs/multihost.md).
        disconnect_grace_s: after the TCP link to a peer drops (or is refused before it
            ever came up), how long it may take to get through before the peer is declared
            gone (a crashed process on this host is seen this fast).
        accept_plain_zre: accept ZRE peers that are not zmqmesh nodes (pyre, zyre).

    Security (CURVE; see docs/security.md):
        curve_secret_key: this node's Z85 secret key; with it every socket is encrypted
            and authenticated, and only peers in ``curve_allow`` are admitted.
        curve_key_file: path of a ``.key_secret`` file (``zmqmesh keygen``), instead of
            ``curve_secret_key``.
        curve_allow: Z85 public keys of the peers admitted (this node's own is implied);
            only with a key of this node's own (`ConfigError` otherwise: the node would
            be plain). A secure node's seeds are written ``PUBLICKEY@tcp://ip:port``,
            and only a secure node's.

    Messaging:
        max_message_bytes: largest payload or frame accepted or sent (bytes).
        send_hwm / recv_hwm: ZeroMQ high-water marks, in frames per connection (a frame
            carries one message, or a batch of small ones within 64 KiB), of the request
            sockets, of the subscribing socket (``recv_hwm``: how far a subscriber's own
            socket reads ahead of its handlers, 10,000 frames: up to 625 MiB of small
            messages; 10 GiB of messages of 1 MiB) and of the publishing one unless
            ``pub_hwm`` is given. Lower them for messages of 64 KiB or more, which travel
            a frame each.
        pub_hwm: the same for the publishing socket, per subscriber: what a subscriber
            that falls behind can cost its publisher before what it misses is dropped (and
            counted at the subscriber). ``None`` (the default): ``send_hwm``, 10,000
            frames, up to 625 MiB of small messages batched within 64 KiB a frame, and
            10 GiB of messages of 1 MiB. Lower it for large messages: with 1,000, a
            subscriber that stopped reading made a publisher of 64 KiB messages grow to
            162-234 MiB, against 774 MiB with 10,000; but consecutive messages of
            different topics travel a frame each, so a burst of more than 1,000 of them
            may then be dropped at a subscriber that lags behind it.
        queue_hwm: the same for the sockets of push/pull queues (a pusher's, a puller's),
            where a puller that falls behind holds its pushers back instead: 100 frames
            each way, up to 6.25 MiB of small messages (25,600 at most), before a push
            waits. (1,000, ZeroMQ's default, pushed as fast here and held ten times as
            much.) Lower it for messages of 64 KiB or more, which travel a frame each.
        send_queue_max: messages queued inside the node before ``push`` / ``publish``
            callers are held back (back-pressure).
        send_queue_total_max: messages the send queues of every queue pushed to hold
            together (each holds ``send_queue_max`` at most); ``None``: ten times
            ``send_queue_max`` (100,000 by default). When they hold that many, a ``push``
            to any queue waits for room as it does for a full queue, and raises
            `MeshTimeoutError` at its timeout (counted in ``stats()["pipeline"]
            ["refused_node_full"]``; ``refused_queue_full`` counts a full queue). Without
            it, pushes to many queues whose pullers do not keep up held every queue's
            share (50 queues of 16,384 messages of 64 B: +95 MiB; 512 queues could hold
            5 million). At least ``send_queue_max``.
        send_queue_max_bytes: bytes (payloads and their headers) the send queues of every
            queue pushed to hold together (64 MiB): while they hold that many, a ``push``
            waits for room the same way (counted in ``refused_node_full`` too), so one
            message larger than the bound still goes when they hold less. Without it,
            pushes of 1 MiB to a puller that fell behind held up to ``send_queue_max`` of
            them (10 GiB) in the pusher. The publish queue holds as many bytes at most,
            apart: a ``publish`` waits the same way (``pubsub.refused_queue_full``); it
            fills only while callers publish faster than the node sends (publishers of
            64 KiB messages queued 625 MiB). And a provider holds four times as many bytes
            of large replies (64 KiB or more) that ZeroMQ has not written out for one
            caller (256 MiB), and sixteen times as many in all (1 GiB): past it, a large
            reply is replaced by an error reply (a caller that never read made its provider
            hold 1 GiB of 1 MiB replies, 10 GiB at ``send_hwm``). The provider cannot tell
            a caller that reads from one that does not: a caller with more large replies
            in flight than that may be refused while it reads, when its provider answers
            faster than ZeroMQ writes out (at a quarter of these bounds, ``request_many``'s
            window of 64 with replies of 2 MiB was, on a loaded machine); raise it on the
            provider for such callers (which raises its push and publish bounds with it). Replies under 64 KiB are not counted: ``send_hwm`` of them
            for each connection (625 MiB).
        push_timeout_s: how long ``push`` waits for a puller or for room, and ``publish`` for room.
        request_timeout_s: default timeout of ``request``.
        handler_concurrency: 1 runs handlers one at a time in arrival order; N > 1 runs up
            to N at once (order no longer kept).
        linger_s: how long ``stop`` lets queued outgoing messages drain before dropping them
            (durable ones stay stored; with a keeper of their queue there, the second half
            of it hands them over).
        store: directory of this node's durable store (an SQLite database, created on first
            use); needed by durable pushes, dedupe pullers and keepers. ``None``: no store.
        store_max_bytes: the most the store may hold (bytes, at least 1 MiB); a durable
            call past it raises `StoreFullError`.
        durable_buffer_max_bytes: the most the durable queues of this node hold in memory
            together, ready to deal (bytes: payloads, headers and about 200 B per message;
            each queue holds 8 MiB or 16,384 messages at most of it). Past it, durable
            pushes are still committed and return as usual, but wait in the store only
            (counted in ``stats()["pipeline"]["durable_spilled"]``), read back as the
            buffers empty, for queues with a puller; what is pushed to a queue with no
            puller goes to the store only. Without it, pushes to many queues that nobody
            pulls held every queue's share in memory (50 queues, 430 MiB).
        store_synchronous: ``"normal"`` (a commit survives the process being killed) or
            ``"full"`` (it survives a power cut too; each commit waits for the disk).
        ack_window: at-least-once queues: messages a puller may hold unacknowledged; also
            the most that can be handled twice when a puller dies.
        history: topics this node keeps in its store as it publishes them, for subscribers
            that replay: ``{prefix: max_messages}`` or ``{prefix: {"max_messages": n,
            "max_age_s": s}}`` (``ZMQMESH_HISTORY``: ``"prefix=n,prefix=n"``); needs a
            store. Empty: nothing kept. Of the topics whose messages all expired
            (``max_age_s``), the numbering of the last 65,536 emptied is kept; past them it
            is forgotten, so topics that come and go (one per order id) cost a bounded
            amount; one published again is numbered past every number the store gave
            before (see docs/durability.md).

    Operations:
        metrics_port: serve Prometheus metrics (``/metrics``) on this TCP port (0: one the
            system picks, see ``Node.metrics_endpoint``); ``None``: no metrics server.
            Needs ``prometheus_client`` (``pip install "zmqmesh[metrics]"``).
        metrics_address: the address the metrics server listens on.
    """

    __record_hidden__ = ("curve_secret_key",)  # (its repr, in a log or a traceback, shows no secret)

    mesh: str = "zmqmesh"
    interface: str | None = None
    bind_address: str | None = None
    advertise_address: str | None = None
    beacon_address: str | None = None
    beacon_port: int = DEFAULT_BEACON_PORT
    mailbox_port: int = 0
    beacon_interval_s: float = 1.0
    discovery: bool = True
    seeds: tuple[str, ...] = ()
    heartbeat_interval_s: float = 1.0
    peer_timeout_s: float = 3.0
    disconnect_grace_s: float = 0.3
    accept_plain_zre: bool = True
    curve_secret_key: str | None = None
    curve_key_file: str | None = None
    curve_allow: tuple[str, ...] = ()
    max_message_bytes: int = 16 * 1024 * 1024
    send_hwm: int = 10_000
    recv_hwm: int = 10_000
    pub_hwm: int | None = None
    queue_hwm: int = 100
    send_queue_max: int = 10_000
    send_queue_total_max: int | None = None
    send_queue_max_bytes: int = 64 << 20
    push_timeout_s: float = 10.0
    request_timeout_s: float = 10.0
    handler_concurrency: int = 1
    linger_s: float = 1.0
    ack_window: int = 1000
    store: str | None = None
    store_max_bytes: int = 1 << 30
    durable_buffer_max_bytes: int = 64 << 20
    store_synchronous: str = "normal"
    history: Any = ()
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        object.__setattr__(self, "history", parse_history(self.history))
        metrics_port = self.metrics_port  # (as given: the error names it, not what it was read as)
        if isinstance(self.metrics_port, str):  # (from the environment)
            port = self.metrics_port.strip()  # (as ``int`` takes the other options' values: spaces around)
            object.__setattr__(self, "metrics_port", int(port) if port.isascii() and port.isdigit() else -1)
        if self.metrics_port is not None and (not isinstance(self.metrics_port, int) or isinstance(
                self.metrics_port, bool) or not 0 <= self.metrics_port <= 65535):
            raise ConfigError(f"metrics_port must be 0..65535 or None, got {metrics_port!r}")
        if self.metrics_port is not None and (not isinstance(self.metrics_address, str)
                                              or not self.metrics_address.strip()):
            # (None or "" listened on every interface, where the default keeps to loopback)
            raise ConfigError(f"metrics_address must name the address to listen on ('0.0.0.0' for every "
                              f"interface), got {self.metrics_address!r}")
        for name in ("discovery", "accept_plain_zre"):  # (a truth test took "no" for yes)
            object.__setattr__(self, name, check_switch(getattr(self, name), name))
        for name in ("seeds", "curve_allow"):
            value = getattr(self, name)
            if isinstance(value, (list, str)):
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        positive = (
            "beacon_interval_s",
            "heartbeat_interval_s",
            "peer_timeout_s",
            "disconnect_grace_s",
            "max_message_bytes",
            "send_hwm",
            "recv_hwm",
            "queue_hwm",
            "send_queue_max",
            "send_queue_max_bytes",
            "handler_concurrency",
            "ack_window",
            "store_max_bytes",
            "durable_buffer_max_bytes",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or math.isinf(value):
                raise ConfigError(f"{name} must be a finite positive number, got {value!r}")
        for name in ("max_message_bytes", "send_hwm", "recv_hwm", "queue_hwm", "send_queue_max", "send_queue_max_bytes",
                     "handler_concurrency", "ack_window", "durable_buffer_max_bytes"):  # counts: a fraction of one failed deep inside (a slice, a socket option)
            value = getattr(self, name)
            try:
                whole = operator.index(value)  # (an int, or an integer type's value: numpy's, say)
            except TypeError:
                whole = None
            largest = _LARGEST_HWM if name.endswith("_hwm") else _LARGEST_MESSAGE if name == "max_message_bytes" else None
            if whole is None or (largest is not None and whole > largest):
                most = f" and at most {largest}" if largest is not None else ""
                raise ConfigError(f"{name} must be a whole number >= 1{most}, got {value!r}")
            object.__setattr__(self, name, whole)
        self._optional_whole("pub_hwm", 1, _LARGEST_HWM, f"a whole number >= 1 and at most {_LARGEST_HWM}")
        self._optional_whole("send_queue_total_max", self.send_queue_max, None,
                             f"a whole number >= send_queue_max ({self.send_queue_max})")
        for name in ("push_timeout_s", "request_timeout_s", "linger_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or math.isinf(value):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
            if value > LONGEST_WAIT_S:
                object.__setattr__(self, name, LONGEST_WAIT_S)
        for name in ("beacon_port", "mailbox_port"):
            value = getattr(self, name)
            # (beacons to port 0 reach no one: 0 picks a mailbox port only, and is no beacon port
            # unless a node sends none)
            least = 1 if name == "beacon_port" and self.discovery else 0
            if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= 65535:
                raise ConfigError(f"{name} must be {least}..65535, got {value!r}")
        if self.peer_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError("peer_timeout_s must be longer than heartbeat_interval_s")
        if not isinstance(self.mesh, str) or not self.mesh.strip() or len(self.mesh) > 200:
            raise ConfigError(f"mesh must be a name of at most 200 characters, not blank, got {self.mesh!r}")
        for seed in self.seeds:
            endpoint = seed[41:] if isinstance(seed, str) and seed[40:41] == "@" else seed
            if not isinstance(endpoint, str) or parse_tcp_endpoint(endpoint) is None:
                raise ConfigError(f"seeds must be tcp://ip:port endpoints (KEY@tcp://... for secure nodes), "
                                  f"got {seed!r}")
        if self.advertise_address == "0.0.0.0":  # (refused only as the node started, as a ZmqMeshError)
            raise ConfigError("advertise_address must be an address peers can reach, not 0.0.0.0 "
                              "(bind_address='0.0.0.0' listens everywhere)")
        if self.advertise_address is not None and not is_ipv4(self.advertise_address):
            # (peers take a HELLO's endpoint only as tcp://a.b.c.d:port: a node advertising
            # another address met no one; bind_address takes ZeroMQ's forms too, an
            # interface's name or '*', with an advertise_address)
            raise ConfigError(f"advertise_address must be an IPv4 address such as '192.168.1.20', "
                              f"got {self.advertise_address!r}")
        if isinstance(self.store_max_bytes, float) or self.store_max_bytes < _LEAST_STORE_BYTES:
            # (SQLite ignores a page count that is not whole: no bound; and the store takes no less
            # than 1 MiB, which a config refused only as the node started)
            raise ConfigError(f"store_max_bytes must be a whole number of bytes, at least 1 MiB "
                              f"({_LEAST_STORE_BYTES}), got {self.store_max_bytes!r}")
        if self.store is not None and (not isinstance(self.store, (str, os.PathLike)) or not str(os.fspath(self.store)).strip()):
            raise ConfigError(f"store must name a directory (an empty name would be the current one, a blank one "
                              f"a directory named by spaces), got {self.store!r}")
        if self.store_synchronous not in ("normal", "full"):
            raise ConfigError(f"store_synchronous must be 'normal' or 'full', got {self.store_synchronous!r}")
        if self.history and self.store is None:
            raise ConfigError("history= needs a store: Node(..., store='path/dir')")
        if self.curve_secret_key is not None and self.curve_key_file is not None:
            raise ConfigError("give curve_secret_key or curve_key_file, not both")
        self._check_curve_peers()

    def _check_curve_peers(self) -> None:
        """Check that the peers' keys given (``curve_allow``, ``KEY@`` seeds) go with a key
        of this node's own, and that a secure node's seeds carry their keys (their form,
        not their Z85: the node checks that as it starts). Raises `ConfigError`: without a
        key the node is plain, open to anyone, whatever keys of others it was given."""
        secure = self.curve_secret_key is not None or self.curve_key_file is not None
        if self.curve_allow and not secure:
            raise ConfigError("curve_allow needs a key of this node's own (curve_secret_key or curve_key_file): "
                              "without one the node is plain, and admits anyone")
        for seed in self.seeds:
            keyed = seed[40:41] == "@"
            if keyed and not secure:
                raise ConfigError(f"seed {seed!r} is a KEY@tcp://... seed, for a secure node: give this node a key "
                                  "(curve_secret_key or curve_key_file), or the seed without its key")
            if secure and not keyed:
                raise ConfigError(f"seeds of a secure node are KEY@tcp://... (the seed's public key), got {seed!r}")

    def _optional_whole(self, name: str, least: int, most: int | None, what: str) -> None:
        """Check the option ``name``, a whole number from ``least`` to ``most`` or None
        (a string of digits from the environment), and store it as an int. Raises
        `ConfigError` naming ``what`` it must be."""
        value = raw = getattr(self, name)
        if isinstance(value, str):
            value = value.strip()  # (as ``int`` takes the other options' values: spaces around)
            value = int(value) if value.isascii() and value.isdigit() else -1
        if value is None:
            return
        try:
            whole = operator.index(value)
        except TypeError:
            whole = None
        if whole is None or isinstance(value, bool) or whole < least or (most is not None and whole > most):
            raise ConfigError(f"{name} must be {what}, or None, got {raw!r}")
        object.__setattr__(self, name, whole)

    @classmethod
    def from_options(cls, config: NodeConfig | None = None, **options: Any) -> NodeConfig:
        """A config from a base ``config`` (or the defaults and the environment) with ``options`` replaced.

        Without a base ``config``, every field not given in ``options`` may come from an
        environment variable ``ZMQMESH_<FIELD>`` (e.g. ``ZMQMESH_MESH``,
        ``ZMQMESH_BEACON_PORT``, ``ZMQMESH_SEEDS`` as a comma-separated list); this is how
        ``zmqmesh launch`` and deployments configure nodes without code changes.
        Raises `ConfigError` for an unknown option name or an unparsable variable, or a
        ``config`` that is not a `NodeConfig` (a dict given as one failed deep inside with
        a bare ``AttributeError``).
        """
        if config is not None and not isinstance(config, cls):
            raise ConfigError(f"config must be a NodeConfig (options go as keywords), got {type(config).__name__}")
        known = cls.fields()
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"unknown option(s): {', '.join(unknown)}")
        if config is None:
            options = {**_from_environment(known, set(options)), **options}
            return cls(**options)
        return config.replace(**options) if options else config

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The names of the options, in order (each class attribute of that name is its default)."""
        return fields_of(cls)

    def replace(self, **options: Any) -> NodeConfig:
        """A copy of this config with ``options`` changed. Raises `ConfigError` for a value
        out of range, `ArgumentTypeError` (a ``TypeError``) for an unknown option."""
        return replaced(self, **options)


LONGEST_WAIT_S = 1e9
"""The longest a wait lasts (some 31 years): a timeout past it waits that long (a lock's
wait or a thread's join past ``threading.TIMEOUT_MAX``, some 292 years, raises
`OverflowError`). The timeouts of a config are held to it as it is made."""
_LEAST_STORE_BYTES = 1 << 20  # (the least ``Store`` takes)
_LARGEST_HWM = (1 << 31) - 1  # (ZeroMQ's high-water marks are C ints)
_LARGEST_MESSAGE = (1 << 63) - 1 - (64 << 10)  # (ZeroMQ's MAXMSGSIZE, a 64-bit int, takes it and a frame's headroom)


def check_switch(value: object, name: str) -> bool:
    """``value`` as True or False: ``True``, ``False`` or a NumPy bool (``numpy.True_``,
    what a mask or a comparison of arrays gives). Raises `ConfigError` (a ``ValueError``)
    otherwise: a truth test read ``at_least_once="no"`` as on."""
    if value is True or value is False:
        return value
    kind = type(value)
    if kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"):  # (NumPy 2 and 1; not imported here)
        return bool(value)
    raise ConfigError(f"{name} must be True or False, got {f'{value!r}'[:60]}")


def _from_environment(fields: tuple[str, ...], given: set[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in fields:
        raw = os.environ.get(f"ZMQMESH_{name.upper()}")
        if raw is None or name in given:
            continue
        default = getattr(NodeConfig, name)
        try:
            if isinstance(default, tuple):
                values[name] = tuple(s.strip() for s in raw.split(",") if s.strip())
            elif isinstance(default, bool):
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(raw)
                values[name] = raw.lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                values[name] = int(raw)
            elif isinstance(default, float):
                values[name] = float(raw)
            else:
                values[name] = raw or None
        except ValueError:
            raise ConfigError(f"environment variable ZMQMESH_{name.upper()}={raw!r} is not valid") from None
    return values
