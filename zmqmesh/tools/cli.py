"""The ``zmqmesh`` command.

    zmqmesh demo                           a live multi-process mesh on loopback
    zmqmesh launch FILE.toml               start and supervise the processes a file names
    zmqmesh peers [--json] [--watch]       list the nodes of a mesh (and follow it)
    zmqmesh publish TOPIC JSON             one-shot calls, for poking a running mesh
    zmqmesh subscribe PREFIX [--count N]
    zmqmesh push QUEUE JSON [--durable]
    zmqmesh request SERVICE JSON
    zmqmesh keep QUEUE... --store DIR      keep durable messages that stopping pushers hand over
    zmqmesh store inspect DIR              what a node's store holds
    zmqmesh store dead-letters DIR QUEUE [--retry | --drop]
    zmqmesh store subscriptions DIR [NAME --forget]
    zmqmesh keygen NAME [--dir DIR]        write a CURVE key pair (secret file mode 600)
    zmqmesh --version

Every error is one line on stderr and a non-zero exit status, never a traceback. A
command whose output's reader goes away (``zmqmesh subscribe x | head -1``) ends quietly
with status 141, as a command that SIGPIPE ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Any

from zmqmesh import (
    MeshTimeoutError,
    Message,
    Node,
    Peer,
    StopFlag,
    ZmqMeshError,
    __version__,
    drop_dead_letters,
    durable_subscriptions,
    forget_durable_subscription,
    inspect_store,
    retry_dead_letters,
)

from ._stopping import LOOK_S, SignalStop, Stopped, ignore_stop_signals, sliced, until
from .jsonview import dumps, peer_dict, shown
from .pipes import PIPE_CLOSED, write_nowhere

__all__ = ["main"]


class CliError(Exception):
    """A user-facing error: printed as one line."""


class UsageError(CliError):
    """Arguments the command refuses that the parser cannot see alone (an environment
    variable, a combination of options): one line, status 2, as a bad argument."""


_stdout_gone = [False]


def _lose_stdout() -> None:
    """The reader of stdout went away: send what is still to be written nowhere (no
    error at exit either), and remember it for the exit status."""
    _stdout_gone[0] = True
    write_nowhere(sys.stdout)


def _out(text: str, stop: StopFlag | None = None, file: Any = None) -> None:
    """Print one line and flush it. When the reader has gone (``| head -1``): with
    ``stop`` (a handler on a node's thread), raise it, so that the command ends; without,
    raise `BrokenPipeError` (``main`` ends the command quietly, status 141)."""
    try:
        print(text, file=file or sys.stdout, flush=True)
    except BrokenPipeError:
        if file not in (None, sys.stdout):
            return  # (stderr's reader gone: nothing to tell it)
        _lose_stdout()
        if stop is None:
            raise
        stop.set()


def _payload(text: str) -> Any:
    """The JSON value ``text`` holds. Raises `CliError` for text that is not JSON, or nested
    deeper than the interpreter recurses."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"payload is not valid JSON: {exc}") from None
    except RecursionError:
        raise CliError("payload is nested too deeply") from None


_LONGEST_S = 1e9  # (some 31 years: past that, time.sleep and the deadlines overflow)


def _seconds(text: str, zero_ok: bool = False) -> float:
    """An argparse type: a positive (or, with ``zero_ok``, zero) finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 <= value <= _LONGEST_S) or (value == 0 and not zero_ok):
        raise argparse.ArgumentTypeError(
            f"must be a {'' if zero_ok else 'positive '}number of seconds, at most {_LONGEST_S:.0e}, got {text!r}")
    return value


def _seconds_or_zero(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more."""
    return _seconds(text, zero_ok=True)


def _name(text: str) -> str:
    """An argparse type: a name that is not empty (an unset shell variable gives one)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _count(text: str) -> int:
    """An argparse type: a whole number, 1 or more."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, 1 or more, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    """An argparse type: a UDP or TCP port, 1 to 65535."""
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, got {text!r}")
    return int(text)


def _listen_address(text: str) -> str:
    """An argparse type: where the gateway listens, ``host:port`` (``[::1]:port`` for an
    IPv6 address), the port from 0 (any free one) to 65535. (`run_gateway` checks the
    same for a caller of its own.)"""
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"must be host:port with a port from 0 to 65535, got {text!r}")
    return text


def _parser() -> argparse.ArgumentParser:
    mesh = argparse.ArgumentParser(add_help=False)
    group = mesh.add_argument_group("mesh")
    group.add_argument("--mesh", default=None, help="mesh name (default: $ZMQMESH_MESH or 'zmqmesh')")
    group.add_argument("--beacon-port", type=_port, default=None,
                       help="UDP beacon port (default: $ZMQMESH_BEACON_PORT or 5670)")
    group.add_argument("--interface", default=None,
                       help="network interface to join (default: $ZMQMESH_INTERFACE or loopback)")
    group.add_argument("--seed", action="append", default=[],
                       help="mailbox endpoint to greet (repeatable; default: $ZMQMESH_SEEDS)")
    group.add_argument("--wait", type=_seconds_or_zero, default=1.0,
                       help="seconds to listen for peers first (default 1)")

    parser = argparse.ArgumentParser(prog="zmqmesh", description="Brokerless peer-to-peer messaging on ZeroMQ.")
    parser.add_argument("--version", action="version", version=f"zmqmesh {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the node does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="run a live multi-process mesh on loopback")
    demo.add_argument("--beacon-port", type=_port, default=5670, help="UDP beacon port (default 5670)")
    demo.add_argument("--orders", type=_count, default=8, help="orders to push through the mesh")

    gateway = sub.add_parser("gateway", parents=[mesh], help="serve HTTP (JSON routes, SSE, dashboard) for the mesh")
    gateway.add_argument("--listen", type=_listen_address, default="127.0.0.1:8080", help="host:port (default 127.0.0.1:8080)")
    gateway.add_argument("--token", type=_name, default=None, help="bearer token (required off loopback; or ZMQMESH_GATEWAY_TOKEN)")
    gateway.add_argument("--allow-host", type=_name, action="append", default=[], metavar="NAME",
                         help="a Host name to answer besides loopback and the listen host (repeatable)")
    gateway.add_argument("--tracebacks", action="store_true",
                         help="send the remote handler's traceback with a 500 (default: only to the log)")

    keygen = sub.add_parser("keygen", help="write a CURVE key pair: NAME.key and NAME.key_secret (mode 600)")
    keygen.add_argument("name", help="file name stem")
    keygen.add_argument("--dir", default=".", help="directory to write to (default: current)")

    launch = sub.add_parser("launch", help="start and supervise the processes a TOML file names")
    launch.add_argument("file", help="launch file (TOML)")

    peers = sub.add_parser("peers", parents=[mesh], help="join the mesh briefly and list its nodes")
    peers.add_argument("--json", action="store_true", help="print JSON instead of a table")
    peers.add_argument("--watch", action="store_true", help="then follow joins and leaves until Ctrl-C")
    peers.add_argument("--duration", type=_seconds_or_zero, default=None, help=argparse.SUPPRESS)

    publish = sub.add_parser("publish", parents=[mesh], help="publish one message")
    publish.add_argument("topic")
    publish.add_argument("data", help="JSON payload")

    subscribe = sub.add_parser("subscribe", parents=[mesh], help="print messages on topics with a prefix")
    subscribe.add_argument("prefix")
    subscribe.add_argument("--count", type=_count, default=None, help="stop after this many messages")
    subscribe.add_argument("--timeout", type=_seconds, default=None, help="stop after this many seconds")

    push = sub.add_parser("push", parents=[mesh], help="push one message to a queue")
    push.add_argument("queue")
    push.add_argument("data", help="JSON payload")
    push.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to wait for a puller (or a keeper)")
    push.add_argument("--durable", action="store_true",
                      help="commit the message first; with no puller, hand it to a keeper of the queue")
    push.add_argument("--store", default=None, help="the store for --durable (default: a temporary one)")

    keep = sub.add_parser("keep", parents=[mesh], help="keep the durable messages stopping pushers hand over")
    keep.add_argument("queues", nargs="+", metavar="QUEUE")
    keep.add_argument("--store", required=True, help="the keeper's store directory")

    store = sub.add_parser("store", help="look into a node's store")
    store_sub = store.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    inspect = store_sub.add_parser("inspect", help="queues, backlog, dead letters, kept topics, size")
    inspect.add_argument("dir")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    dead = store_sub.add_parser("dead-letters", help="show, retry or drop the dead letters of a queue")
    dead.add_argument("dir")
    dead.add_argument("queue", type=_name)
    dead.add_argument("--dead-letter", type=_name, default=None, help="the dead-letter queue (default QUEUE.dead)")
    action = dead.add_mutually_exclusive_group()
    action.add_argument("--retry", action="store_true", help="move them back to QUEUE (the node must be stopped)")
    action.add_argument("--drop", action="store_true", help="delete them (the node must be stopped)")
    subscriptions = store_sub.add_parser("subscriptions", help="list the durable subscriptions, or forget one")
    subscriptions.add_argument("dir")
    subscriptions.add_argument("name", nargs="?", type=_name, default=None, help="one durable subscription's name")
    subscriptions.add_argument("--forget", action="store_true",
                               help="forget NAME: its places go from the store (the node must be stopped)")
    subscriptions.add_argument("--json", action="store_true", help="print JSON")

    request = sub.add_parser("request", parents=[mesh], help="call a service and print the reply")
    request.add_argument("service")
    request.add_argument("data", help="JSON payload")
    request.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to wait for the reply (default 5)")
    return parser


def _node(args: argparse.Namespace, name: str, **options: Any) -> Node:
    if args.mesh is not None:
        options["mesh"] = args.mesh
    if args.beacon_port is not None:
        options["beacon_port"] = args.beacon_port
    if args.interface is not None:
        options["interface"] = args.interface
    if args.seed:
        options["seeds"] = tuple(args.seed)
    return Node(name, **options)


def _listen(stop: StopFlag, seconds: float) -> None:
    """Give beacons time to arrive: this command's whole point is to look at the mesh.
    Raises `Stopped` once ``stop`` is raised."""
    if stop.wait(max(0.0, seconds)):
        raise Stopped


def _table(peers: list[Peer]) -> str:
    rows: list[tuple[str, ...]] = [("NAME", "ADDRESS", "SERVICES", "QUEUES", "TOPICS", "LAST SEEN")]
    now = time.time()
    for p in peers:
        rows.append(tuple(map(shown, (p.name, p.endpoint, ",".join(sorted(p.services)) or "-",
                                       ",".join(sorted(p.queues)) or "-", ",".join(sorted(p.topics)) or "-",
                                       f"{max(0.0, now - p.last_seen):.1f}s ago"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _stopped_status(signalled: SignalStop, code: int) -> int:
    """The status of a command a signal may have stopped: 130 after a Ctrl-C, else ``code``
    (a SIGTERM or a hangup is a stop asked for: the command's own status)."""
    return 130 if signalled.interrupted else code


@contextlib.contextmanager
def _saying_when_stopped(what: str) -> Iterator[None]:
    """Say on stderr ``what`` was left undone when a signal cuts a wait of the block short
    (`Stopped` goes on: status 1, or 130)."""
    try:
        yield
    except Stopped:
        _out(f"zmqmesh: stopped: {what}", file=sys.stderr)
        raise


def _not_sent(count: int) -> None:
    """Say on stderr that a signal stopped the command before it handed ``count``
    message(s) over: they are not sent (never lost unsaid)."""
    _out(f"zmqmesh: stopped: {count} message(s) not sent", file=sys.stderr)


def _peers(args: argparse.Namespace, signalled: SignalStop) -> int:
    node = _node(args, "zmqmesh-peers")
    stop = signalled.flag
    if args.watch and args.json:  # one JSON object per line, nothing else on stdout
        node.on_join(lambda p: _out(dumps({"event": "join", **peer_dict(p)}), stop))
        node.on_leave(lambda p: _out(dumps({"event": "leave", **peer_dict(p)}), stop))
    elif args.watch:
        node.on_join(lambda p: _out(f"{time.strftime('%H:%M:%S')} + {shown(p.name)} {shown(p.endpoint)}", stop))
        node.on_leave(lambda p: _out(f"{time.strftime('%H:%M:%S')} - {shown(p.name)} {shown(p.endpoint)}", stop))
    with node:
        if stop.wait(max(0.0, args.wait)):  # (told to stop while it listened: nothing to list)
            return 0
        peers = sorted(node.peers(), key=lambda p: (p.name, p.id))
        if args.json:  # (watching, every peer came as a "join" line already)
            if not args.watch:
                _out(dumps([peer_dict(p) for p in peers], indent=2))
        elif peers:
            _out(_table(peers))
        else:
            _out(f"no peers found in mesh {node.config.mesh!r} within {args.wait} s")
        if args.watch:
            _out("watching joins and leaves (Ctrl-C to stop)", file=sys.stderr if args.json else None)
            stop.wait(args.duration)
    return 0 if peers or args.watch else 1


def _publish(args: argparse.Namespace, signalled: SignalStop) -> int:
    data = _payload(args.data)
    stop = signalled.flag
    with _node(args, "zmqmesh-publish") as node:
        try:
            _listen(stop, args.wait)
            subscribers = sum(1 for p in node.peers() if any(args.topic.startswith(t) for t in p.topics))
            if subscribers:
                sliced(stop, lambda s: node.wait_for_subscribers(args.topic, subscribers, timeout=s), 5)
        except Stopped:
            _not_sent(1)
            return 1
        node.publish(args.topic, data)
    _out(f"published to {subscribers} subscriber(s)")
    return 0


def _subscribe(args: argparse.Namespace, signalled: SignalStop) -> int:
    done = signalled.flag
    seen = [0]
    node = _node(args, "zmqmesh-subscribe")

    @node.subscribe(args.prefix)
    def show(msg: Message) -> None:
        sender = msg.sender.name if msg.sender else "-"
        _out(f"{shown(msg.topic)} {dumps(msg.data)} (from {shown(sender)})", done)
        seen[0] += 1
        if args.count is not None and seen[0] >= args.count:
            done.set()

    with node:
        _out(f"subscribed to {args.prefix!r}")
        done.wait(args.timeout)
    return 0


def _push(args: argparse.Namespace, signalled: SignalStop) -> int:
    data = _payload(args.data)
    if args.durable:
        return _push_durable(args, data, signalled.flag)
    stop = signalled.flag
    deadline = time.monotonic() + args.timeout
    with _node(args, "zmqmesh-push") as node:
        try:  # (in slices: a wait for a puller, or for room, looks at the flag every LOOK_S)
            with contextlib.suppress(MeshTimeoutError):  # (none by the deadline: the push says so)
                sliced(stop, lambda s: node.wait_for_pullers(args.queue, timeout=s), args.timeout)
            sliced(stop, lambda s: node.push(args.queue, data, timeout=s), max(0.0, deadline - time.monotonic()))
        except Stopped:
            _not_sent(1)
            return 1
    _out(f"pushed to {args.queue!r}")
    return 0


_TAKER_LOOK_S = 0.02
"""How often `push --durable` looks for a puller or keeper of its queue (and at the flag)."""


def _taker_present(node: Node, queue: str) -> bool:
    """Whether an at-least-once puller or a keeper of ``queue`` is there now (durable
    messages go to no other; the groups are those of docs/protocol.md)."""
    wanted = {f"zmqmesh/ackqueue/{queue}", f"zmqmesh/keep/{queue}"}
    return any(wanted & p.groups for p in node.peers())


def _push_durable(args: argparse.Namespace, data: Any, stop: StopFlag) -> int:
    """Commit, then deliver to a puller or hand to a keeper before exiting; a message that
    neither took stays in the store (a temporary one is kept, and named). A temporary store
    is removed when the command ends holding nothing in it, whatever ended it (a node that
    could not start, a signal while it waited for a taker: then the message is not sent,
    and said so). A signal once it is committed lets the stop hand it over as ever."""
    store = args.store or tempfile.mkdtemp(prefix="zmqmesh-push-")
    node: Node | None = None
    try:
        node = _node(args, "zmqmesh-push", store=store)
        with node:
            try:
                until(stop, lambda: _taker_present(node, args.queue), args.timeout, _TAKER_LOOK_S)
            except Stopped:
                _not_sent(1)
                raise
            node.push(args.queue, data, durable=True)
            mesh = node.config.mesh
    except BaseException:
        if not args.store:
            if node is not None:
                node.stop()  # (a start interrupted goes on stopping: the store is let go once it ends)
            if _holds_messages(store):
                print(f"zmqmesh: the message is kept in the store {store}", file=sys.stderr)
            else:
                shutil.rmtree(store, ignore_errors=True)
        raise
    left = inspect_store(store)["queues"].get(args.queue, {"messages": 0})["messages"]
    if left:
        raise CliError(f"no puller or keeper of {args.queue!r} took the message within {args.timeout} s in mesh "
                       f"{mesh!r}; it is kept in the store {store}")
    if not args.store:
        shutil.rmtree(store, ignore_errors=True)
    print(f"pushed to {args.queue!r} (durable)")
    return 0


def _holds_messages(store: str) -> bool:
    """Whether the store in ``store`` holds messages (False where none was made, or it
    cannot be read)."""
    try:
        return bool(inspect_store(store)["queues"])
    except ZmqMeshError:
        return False


def _keep(args: argparse.Namespace, signalled: SignalStop) -> int:
    node = _node(args, "zmqmesh-keeper", store=args.store)
    for queue in args.queues:
        node.keep(queue)
    with node:
        _out(f"keeping {', '.join(repr(q) for q in args.queues)} in {args.store} (Ctrl-C to stop)")
        signalled.flag.wait()
    return 0


def _columns(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    """Columns padded to their widest cell."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in (header, *rows))


def _store(args: argparse.Namespace) -> int:
    if args.store_command == "subscriptions":
        return _subscriptions(args)
    if args.store_command == "inspect":
        info = inspect_store(args.dir)
        if args.json:
            print(dumps(info, indent=2))
            return 0
        # (what the store names, written escaped: a name with a newline would forge a row)
        print(f"{shown(info['path'])}: {info['bytes']} bytes, schema {info['schema']}")
        now = time.time()
        queues = [(shown(name) + (" (dead letters)" if name.endswith(".dead") else ""), str(q["messages"]),
                   str(q["bytes"]), f"{max(0.0, now - q['oldest']):.0f}s ago") for name, q in info["queues"].items()]
        print(_columns(("QUEUE", "MESSAGES", "BYTES", "OLDEST"), queues) if queues else "no messages stored")
        topics = [(shown(name), str(t["messages"]), str(t["bytes"]), f"{max(0.0, now - t['oldest']):.0f}s ago",
                   f"{t['first_seq']}..{t['next_seq'] - 1}") for name, t in info["topics"].items()]
        if topics:
            print(_columns(("KEPT TOPIC", "MESSAGES", "BYTES", "OLDEST", "NUMBERS"), topics))
        for queue, count in info["handled"].items():
            print(f"dedupe: {count} handled id(s) remembered for {queue!r}")
        for name, count in info["subscriptions"].items():
            print(f"durable subscription {name!r}: its place in {count} publisher topic(s)")
        return 0
    dead = args.dead_letter or f"{args.queue}.dead"
    if args.retry and dead == args.queue:
        raise CliError(f"the dead-letter queue is {args.queue!r} itself: nothing to move back")
    if args.retry or args.drop:
        if args.retry:
            print(f"moved {retry_dead_letters(args.dir, args.queue, dead)} dead letter(s) back to {args.queue!r}")
        else:
            print(f"dropped {drop_dead_letters(args.dir, args.queue, dead)} dead letter(s) of {args.queue!r}")
        # (what is left there, its node stopped, are segments damaged on disk: the store keeps them)
        left = inspect_store(args.dir)["queues"].get(dead, {"messages": 0})["messages"]
        if left:
            raise CliError(f"{left} dead letter(s) left in {dead!r}: damaged on disk, they cannot be read; "
                           "the store keeps them for an operator")
    else:
        count = inspect_store(args.dir)["queues"].get(dead, {"messages": 0})["messages"]
        print(f"{count} dead letter(s) in {dead!r}")
    return 0


def _subscriptions(args: argparse.Namespace) -> int:
    """``store subscriptions``: list the durable subscriptions (all, or NAME's), or forget
    NAME (``--forget``). A NAME the store has no place of is an error (status 1)."""
    if args.forget and args.name is None:
        raise UsageError("--forget needs the NAME of the durable subscription to forget")
    if args.forget:
        gone = forget_durable_subscription(args.dir, args.name)
        if not gone["streams"]:
            raise CliError(f"no durable subscription {args.name!r} in {args.dir}")
        if args.json:
            print(dumps({"forgot": args.name, **gone}, indent=2))
        else:
            print(f"forgot durable subscription {args.name!r}: its place in {gone['topics']} topic(s) "
                  f"of {gone['streams']} publisher stream(s)")
        return 0
    found = durable_subscriptions(args.dir)
    if args.name is not None:
        if args.name not in found:
            raise CliError(f"no durable subscription {args.name!r} in {args.dir}")
        found = {args.name: found[args.name]}
    if args.json:
        print(dumps(found, indent=2))
    elif found:
        rows = [(shown(name), str(s["streams"]), str(s["topics"])) for name, s in found.items()]
        print(_columns(("DURABLE NAME", "STREAMS", "TOPICS"), rows))
    else:
        print("no durable subscriptions")
    return 0


def _request(args: argparse.Namespace, signalled: SignalStop) -> int:
    data = _payload(args.data)
    stop = signalled.flag
    deadline = time.monotonic() + args.timeout

    def provided(seconds: float) -> None:  # (in slices: each looks at the flag, `sliced`)
        sliced(stop, lambda s: node.wait_for_service(args.service, timeout=s), seconds)

    with _node(args, "zmqmesh-request") as node, _saying_when_stopped("no reply came"):
        try:  # the mesh shows itself within a beacon interval: met, and offering nothing, say so at once
            provided(min(max(args.wait, 1.0), args.timeout))
        except MeshTimeoutError:
            peers = node.peers()
            if not peers:  # nobody met yet: the mesh may still come, within the timeout
                try:
                    provided(max(0.0, deadline - time.monotonic()))
                except MeshTimeoutError:
                    peers = node.peers()
            if not node.providers(args.service):
                found = (f"{len(peers)} peer{'' if len(peers) == 1 else 's'} found"
                         + (f" ({', '.join(sorted(p.name for p in peers))})" if peers else f"; {node.discovery}"))
                raise CliError(f"no node offers the service {args.service!r} in mesh {node.config.mesh!r}: "
                               f"{found}") from None
        reply = _reply(node, stop, args.service, data, max(0.001, deadline - time.monotonic()))
    _out(dumps(reply))
    return 0


_REPLY_GRACE_S = 5.0
"""How long past its timeout a request's future may take to be completed by the node's
thread (it fails it at the timeout) before the command gives up on it."""


def _reply(node: Node, stop: StopFlag, service: str, data: Any, timeout: float) -> Any:
    """What `Node.request` returns (and raises), as soon as the reply comes, with a look at
    ``stop`` every `LOOK_S` meanwhile (a request is sent once: the wait is sliced, not the
    call). Raises `Stopped` once ``stop`` is raised; the node's stop fails the request then."""
    reply = node.submit(service, data, timeout=timeout)

    def answered(seconds: float) -> None:  # (ends with the reply, not at the slice's end)
        if futures.wait((reply,), timeout=seconds).not_done:
            raise MeshTimeoutError(f"no reply from {service!r} within {timeout} s")

    sliced(stop, answered, timeout + _REPLY_GRACE_S)
    return reply.result()


def _gateway(args: argparse.Namespace, signalled: SignalStop) -> int:
    import asyncio
    import os

    try:
        from .gateway import GatewayArgumentError, GatewayError, run_gateway
    except ImportError as exc:
        raise CliError(str(exc)) from None
    options: dict[str, Any] = {"name": "gateway"}
    for key in ("mesh", "beacon_port", "interface"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.seed:
        options["seeds"] = tuple(args.seed)
    token = args.token if args.token is not None else os.environ.get("ZMQMESH_GATEWAY_TOKEN")
    if token == "":  # (as `--token ""`: an unset shell variable, say, would serve with no token at all)
        raise UsageError("ZMQMESH_GATEWAY_TOKEN is set but empty: give it a token, or unset it")
    if not args.verbose:  # (what it drops and what fails are its reports: they stay in the log)
        logging.getLogger("zmqmesh.gateway").setLevel(logging.WARNING)

    async def serve() -> None:
        gateway = asyncio.ensure_future(run_gateway(
            args.listen, token, ready=lambda url: print(f"gateway listening on {url}", flush=True),
            hosts=tuple(args.allow_host), tracebacks=args.tracebacks, **options))
        # (the flag is looked at, not waited on: the loop sleeps in its selector, which a
        # signal handler does not wake)
        while not signalled.flag.is_set() and not gateway.done():
            await asyncio.wait({gateway}, timeout=LOOK_S)
        gateway.cancel()  # (once: a second signal does not cut the stop's grace for the calls in flight short)
        with contextlib.suppress(asyncio.CancelledError):
            await gateway

    try:
        asyncio.run(serve())
    except GatewayArgumentError as exc:  # (a --listen off loopback without a token: as the other refused arguments)
        raise UsageError(str(exc)) from None
    except GatewayError as exc:
        raise CliError(str(exc)) from None
    return 0


_ON_A_FLAG = {"peers": _peers, "subscribe": _subscribe, "keep": _keep, "gateway": _gateway,
              "publish": _publish, "push": _push, "request": _request}
"""The commands that run a node: SIGINT, SIGTERM and SIGHUP raise a flag their waits
look at (`SignalStop`), from the moment the command line is read to the process's exit;
a one-shot command stopped before it sent its message says so, status 1 (130 after a
Ctrl-C, as every command)."""


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line; exits with the command's status."""
    signalled: SignalStop | None = None
    try:
        parser = _parser()
        args = parser.parse_args(argv)
        # (left in place until the process exits: a signal after the command's stop has
        # nothing left to stop, and must not raise in the exit's finalizers)
        signalled = SignalStop().take() if args.command in _ON_A_FLAG else None
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
        if not args.verbose:
            logging.getLogger("zmqmesh").setLevel(logging.ERROR)
        if signalled is not None:
            code = _ON_A_FLAG[args.command](args, signalled)
        elif args.command == "demo":
            from .demo import run_demo

            code = run_demo(beacon_port=args.beacon_port, orders=args.orders)
        elif args.command == "keygen":
            from zmqmesh import read_public_key, write_keypair

            public, secret = write_keypair(args.dir, args.name)
            print(f"public key {read_public_key(public)}\nwrote {public} and {secret} (mode 600)")
            code = 0
        elif args.command == "launch":
            from .launch import LaunchError, launch

            try:
                code = launch(args.file)
            except LaunchError as exc:  # (a bad launch file: as bad arguments, not a process that failed)
                print(f"zmqmesh: error: {exc}", file=sys.stderr)
                code = 2
        elif args.command == "store":
            code = _store(args)
        else:
            parser.print_help()
            code = 2
    except KeyboardInterrupt:
        code = 130
    except Stopped:  # (a wait a signal cut short: the command said what it left undone)
        code = 1
    except BrokenPipeError:  # (stdout's reader went away: nothing to say, and nobody to say it to)
        _lose_stdout()
        code = PIPE_CLOSED
    except UsageError as exc:
        print(f"zmqmesh: error: {exc}", file=sys.stderr)
        code = 2
    except (CliError, ZmqMeshError, OSError, ValueError) as exc:
        message = str(exc) or type(exc).__name__  # (a remote handler's, among them: a provider's text)
        print(f"zmqmesh: error: {shown(message)}", file=sys.stderr)
        code = 1
    except Exception as exc:  # a bug of ours: still one line, with a hint
        print(f"zmqmesh: internal error: {type(exc).__name__}: {exc} (run with -v and report it)", file=sys.stderr)
        code = 70
    if signalled is not None and code != PIPE_CLOSED:
        code = _stopped_status(signalled, code)
    if _stdout_gone[0] and code in (0, 130):  # (a handler lost the reader: the command ended for that)
        code = PIPE_CLOSED
    ignore_stop_signals()
    sys.exit(code)
