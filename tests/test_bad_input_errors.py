"""Bad input to every public call raises a `ZmqMeshError`, and still the built-in type it
raised before (``ValueError`` or ``TypeError``): callers catching either keep working.

Before: 330 of 354 bad calls (names, groups, headers, frames, unencodable data, handlers
that cannot be called) raised a bare ``ValueError``/``TypeError`` that ``except
ZmqMeshError`` missed. Each case is followed by a good call, which must still succeed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import free_udp_port, wait_until

import zmqmesh
from zmqmesh import (
    ArgumentTypeError,
    ConfigError,
    EncodeError,
    MessageTooLargeError,
    ZmqMeshError,
)


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


BAD_DATA = {
    "object": object(),
    "set": {1},
    "int-past-64-bits": 2**64,
    "int-below-int64": -(2**63) - 1,
    "nested-past-msgpack-limit": _nested(2000),
    "lone-surrogate": "\udc80",
}
BAD_HEADERS: dict[str, tuple[Any, type[Exception], type[ZmqMeshError]]] = {
    "not-a-dict": ([("a", "b")], TypeError, EncodeError),
    "int-value": ({"a": 1}, TypeError, EncodeError),
    "int-name": ({1: "a"}, TypeError, EncodeError),
    "lone-surrogate": ({"a": "\udc80"}, TypeError, EncodeError),
    "65-headers": ({str(i): "" for i in range(65)}, ValueError, ConfigError),
    "17-KiB": ({"a": "x" * 17_000}, ValueError, ConfigError),
}
BAD_NAMES = {"int": 5, "none": None, "201-bytes": "x" * 201, "lone-surrogate": "\udc80", "bytes": b"q"}
BAD_GROUPS = {"int": 5, "empty": "", "256-bytes": "g" * 256, "reserved": "zmqmesh/x", "lone-surrogate": "\udc80"}


def _echo(msg: zmqmesh.Message) -> Any:
    return msg.data


def _cases() -> Iterator[Any]:
    """``(call(node), the built-in type it raised before, the class it raises now)``."""
    sends: dict[str, Callable[[zmqmesh.Node, Any], Any]] = {
        "publish": lambda n, d: n.publish("t", d),
        "push": lambda n, d: n.push("q", d, timeout=5),
        "push-durable": lambda n, d: n.push("q", d, durable=True),
        "push_many": lambda n, d: n.push_many("q", [1, 2, d], timeout=5),
        "push_many-durable": lambda n, d: n.push_many("q", [1, 2, d], durable=True),
        "publish_many": lambda n, d: n.publish_many("t", [1, 2, d]),
        "request": lambda n, d: n.request("svc", d, timeout=5),
        "request_many": lambda n, d: n.request_many("svc", [1, d], timeout=5),
        "submit": lambda n, d: n.submit("svc", d, timeout=5).result(10),
    }
    for call, send in sends.items():
        for what, bad in BAD_DATA.items():
            yield pytest.param(lambda n, send=send, bad=bad: send(n, bad), TypeError, EncodeError,
                               id=f"{call}-data-{what}")
    headed: dict[str, Callable[[zmqmesh.Node, Any], Any]] = {
        "publish": lambda n, h: n.publish("t", 1, headers=h),
        "push": lambda n, h: n.push("q", 1, timeout=5, headers=h),
        "push-durable": lambda n, h: n.push("q", 1, durable=True, headers=h),
        "push_many": lambda n, h: n.push_many("q", [1, 2], timeout=5, headers=h),
        "publish_many": lambda n, h: n.publish_many("t", [1, 2], headers=h),
        "request": lambda n, h: n.request("svc", 1, timeout=5, headers=h),
        "request_many": lambda n, h: n.request_many("svc", [1], timeout=5, headers=h),
        "submit": lambda n, h: n.submit("svc", 1, timeout=5, headers=h).result(10),
    }
    for call, send in headed.items():
        for what, (bad, old, new) in BAD_HEADERS.items():
            yield pytest.param(lambda n, send=send, bad=bad: send(n, bad), old, new, id=f"{call}-headers-{what}")
    named: dict[str, Callable[[zmqmesh.Node, Any], Any]] = {
        "publish": lambda n, x: n.publish(x, 1),
        "push": lambda n, x: n.push(x, 1, timeout=0.5),
        "push-durable": lambda n, x: n.push(x, 1, durable=True),
        "push_many": lambda n, x: n.push_many(x, [1], timeout=0.5),
        "publish_many": lambda n, x: n.publish_many(x, [1]),
        "request": lambda n, x: n.request(x, 1, timeout=0.5),
        "request_many": lambda n, x: n.request_many(x, [1], timeout=0.5),
        "submit": lambda n, x: n.submit(x, 1, timeout=0.5).result(10),
        "subscribe": lambda n, x: n.subscribe(x, _echo),
        "pull": lambda n, x: n.pull(x, _echo),
        "pull-dead_letter": lambda n, x: n.pull("q9", _echo, at_least_once=True, dead_letter=x or 5),
        "service": lambda n, x: n.service(x, _echo),
        "keep": lambda n, x: n.keep(x),
        "providers": lambda n, x: n.providers(x),
        "wait_for_subscribers": lambda n, x: n.wait_for_subscribers(x, 1, 0.1),
        "wait_for_service": lambda n, x: n.wait_for_service(x, 1, 0.1),
        "wait_for_pullers": lambda n, x: n.wait_for_pullers(x, 1, 0.1),
        "wait_for_keepers": lambda n, x: n.wait_for_keepers(x, 1, 0.1),
    }
    for call, use in named.items():
        for what, bad in BAD_NAMES.items():
            yield pytest.param(lambda n, use=use, bad=bad: use(n, bad), ValueError, ConfigError,
                               id=f"{call}-name-{what}")
    grouped: dict[str, Callable[[zmqmesh.Node, Any], Any]] = {
        "join": lambda n, g: n.join(g), "leave": lambda n, g: n.leave(g), "shout": lambda n, g: n.shout(g, b"x")}
    for call, use in grouped.items():
        for what, bad in BAD_GROUPS.items():
            yield pytest.param(lambda n, use=use, bad=bad: use(n, bad), ValueError, ConfigError,
                               id=f"{call}-group-{what}")
    others: list[tuple[str, Callable[[zmqmesh.Node], Any], type[Exception], type[ZmqMeshError]]] = [
        ("pull-reserved", lambda n: n.pull("\x00x", _echo), ValueError, ConfigError),
        ("service-reserved", lambda n: n.service("\x00x", _echo), ValueError, ConfigError),
        ("pull-dead_letter-reserved", lambda n: n.pull("q8", _echo, at_least_once=True, dead_letter="\x00x"),
         ValueError, ConfigError),
        ("pull-second-handler", lambda n: n.pull("q", lambda m: None), ValueError, ConfigError),
        ("service-second-handler", lambda n: n.service("svc", lambda m: None), ValueError, ConfigError),
        ("subscribe-handler-not-callable", lambda n: n.subscribe("zz", 5), TypeError, ArgumentTypeError),
        ("pull-handler-not-callable", lambda n: n.pull("zz", 5), TypeError, ArgumentTypeError),
        ("service-handler-not-callable", lambda n: n.service("zz", 5), TypeError, ArgumentTypeError),
        ("on_join-not-callable", lambda n: n.on_join(5), TypeError, ArgumentTypeError),
        ("on_leave-not-callable", lambda n: n.on_leave(5), TypeError, ArgumentTypeError),
        ("on_whisper-not-callable", lambda n: n.on_whisper(5), TypeError, ArgumentTypeError),
        ("on_shout-not-callable", lambda n: n.on_shout(5), TypeError, ArgumentTypeError),
        ("shout-no-frame", lambda n: n.shout("g"), ValueError, ConfigError),
        ("shout-frame-int", lambda n: n.shout("g", 5), TypeError, EncodeError),
        # (a str.encode's UnicodeEncodeError before, and still)
        ("shout-frame-lone-surrogate", lambda n: n.shout("g", "\udc80"), UnicodeEncodeError, ConfigError),
        ("whisper-frame-lone-surrogate", lambda n: n.whisper(n.id, b"x", "\udc80"), UnicodeEncodeError,
         ConfigError),
        ("whisper-no-frame", lambda n: n.whisper(n.id), ValueError, ConfigError),
        ("whisper-frame-int", lambda n: n.whisper(n.id, 5), TypeError, EncodeError),
        ("whisper-peer-int", lambda n: n.whisper(5, b"x"), TypeError, ArgumentTypeError),
        ("request-peer-int", lambda n: n.request("svc", 1, timeout=1, peer=5), TypeError, ArgumentTypeError),
        ("request_many-peer-int", lambda n: n.request_many("svc", [1], timeout=1, peer=5), TypeError,
         ArgumentTypeError),
        ("submit-peer-int", lambda n: n.submit("svc", 1, timeout=1, peer=5).result(10), TypeError,
         ArgumentTypeError),
        ("node_stats-peer-int", lambda n: n.node_stats(5), TypeError, ArgumentTypeError),
        ("push_many-items-not-iterable", lambda n: n.push_many("q", 5), TypeError, ArgumentTypeError),
        ("push_many-durable-items-not-iterable", lambda n: n.push_many("q", 5, durable=True), TypeError,
         ArgumentTypeError),
        ("publish_many-items-not-iterable", lambda n: n.publish_many("t", 5), TypeError, ArgumentTypeError),
        ("request_many-items-not-iterable", lambda n: n.request_many("svc", 5), TypeError, ArgumentTypeError),
    ]
    for name, call, old, new in others:
        yield pytest.param(call, old, new, id=name)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zmqmesh.Node]:
    """One running node for every case (each case leaves it as it found it): it pulls
    ``q`` at least once, serves ``svc`` and subscribes to ``t``; it has a store."""
    options = {"beacon_port": free_udp_port(), "mesh": f"test-{uuid.uuid4().hex[:10]}"}
    with zmqmesh.Node("bad-input", store=str(tmp_path_factory.mktemp("store")), **options) as running:
        running.pull("q", _echo, at_least_once=True)
        running.service("svc", _echo)
        running.subscribe("t", _echo)
        running.wait_for_pullers("q")
        running.wait_for_service("svc")
        yield running


@pytest.mark.parametrize(("call", "old", "new"), list(_cases()))
def test_bad_input_raises_a_zmqmesh_error_that_is_still_the_old_builtin_type(
        node: zmqmesh.Node, call: Callable[[zmqmesh.Node], Any], old: type[Exception],
        new: type[ZmqMeshError]) -> None:
    with pytest.raises(old) as caught:
        call(node)
    assert isinstance(caught.value, ZmqMeshError) and isinstance(caught.value, new), repr(caught.value)
    assert node.request("svc", 42, timeout=5) == 42  # the node still works


def test_an_unencodable_item_is_named_by_its_index_and_chained_to_msgpacks_error(node: zmqmesh.Node) -> None:
    with pytest.raises(EncodeError, match=r"item 2 \(from 0\) of the batch \(int\)") as caught:
        node.push_many("q", [1, 2, 2**64], timeout=5)
    assert isinstance(caught.value.__cause__, OverflowError)
    with pytest.raises(EncodeError, match=r"item 1 \(from 0\) of the batch \(set\)"):
        node.request_many("svc", [1, {1}], timeout=5)
    with pytest.raises(EncodeError, match=r"the payload \(object\)"):
        node.publish("t", object())
    with pytest.raises(EncodeError, match="header 'x'"):
        node.push("q", 1, timeout=5, headers={"x": 1})


def test_an_item_too_large_is_named_by_its_index(tmp_path: Path, mesh: dict[str, Any]) -> None:
    """A batch's item past ``max_message_bytes`` raised "payload is N bytes", naming none:
    now its index, whichever way it is encoded (a map; bytes msgpack's bin takes; bytes
    that travel in their own frame); nothing of the batch is sent."""
    limit = 100_000
    big = {"x": "y" * limit}
    got: list[Any] = []
    with zmqmesh.Node("too-large", store=str(tmp_path), max_message_bytes=limit, **mesh) as n:
        n.pull("q", lambda m: got.append(m.data))
        n.pull("kept", lambda m: got.append(m.data), at_least_once=True)
        n.service("svc", _echo)
        n.wait_for_pullers("q")
        n.wait_for_pullers("kept")
        n.wait_for_service("svc")
        calls: list[tuple[Callable[[list[Any]], Any], Any, str]] = [
            (lambda items: n.push_many("q", items, timeout=5), big, "item 2"),
            (lambda items: n.push_many("q", items, timeout=5), b"z" * (limit + 1), "item 2"),  # (own frame)
            (lambda items: n.push_many("q", items, timeout=5, headers={"h": "v"}), b"z" * limit, "item 2"),
            (lambda items: n.push_many("kept", items, durable=True), b"z" * limit, "item 2"),
            (lambda items: n.publish_many("t", items), big, "item 2"),
            (lambda items: n.request_many("svc", items, timeout=5), big, "item 2"),
        ]
        for call, too_large, named in calls:
            with pytest.raises(MessageTooLargeError, match=rf"^{named} \(from 0\) of the batch is \d+ bytes"):
                call(["a", b"b", too_large, "d"])
        with pytest.raises(MessageTooLargeError, match=r"^the payload is \d+ bytes"):
            n.push("q", big, timeout=5)
        n.push("q", "next", timeout=5)
        wait_until(lambda: got == ["next"], 10, "the next message, alone")


def test_a_batch_with_an_unencodable_item_sends_none_of_it(tmp_path: Path, mesh: dict[str, Any]) -> None:
    """push_many, publish_many and a durable push_many: nothing of a failed batch arrives;
    the next good message does, alone."""
    got: list[Any] = []
    with zmqmesh.Node("all-or-nothing", store=str(tmp_path), **mesh) as n:
        n.pull("plain", lambda m: got.append(("plain", m.data)))
        n.pull("kept", lambda m: got.append(("kept", m.data)), at_least_once=True)
        n.subscribe("topic", lambda m: got.append(("topic", m.data)))
        n.wait_for_pullers("plain")
        n.wait_for_pullers("kept")
        for fail in (lambda: n.push_many("plain", ["a", "b", object()], timeout=5),
                     lambda: n.push_many("kept", ["a", "b", object()], durable=True),
                     lambda: n.publish_many("topic", ["a", "b", object()])):
            with pytest.raises(EncodeError):
                fail()
        n.push("plain", "next", timeout=5)
        n.push("kept", "next", durable=True)
        n.publish("topic", "next")
        wait_until(lambda: len(got) >= 3, 10, "the three good messages")
        assert sorted(got) == [("kept", "next"), ("plain", "next"), ("topic", "next")]


class _Handed:
    """A batch that hands its items over as it is iterated (as a queue's drain does): a
    second ``iter()`` finds none."""

    def __init__(self, items: range) -> None:
        self.items, self.iterated = list(items), 0

    def __iter__(self) -> Iterator[Any]:
        self.iterated += 1
        items, self.items = self.items, []
        return iter(items)


def test_the_items_of_a_batch_call_are_iterated_once(tmp_path: Path, mesh: dict[str, Any]) -> None:
    """The check that ``items`` can be iterated takes the iterator the call then uses
    (before: it asked for one of its own, and the batch handing its items over sent none
    of them: push_many, durable push_many, publish_many and request_many, 5 items each)."""
    got: list[Any] = []
    with zmqmesh.Node("iterated-once", store=str(tmp_path), **mesh) as n:
        n.pull("plain", lambda m: got.append(("plain", m.data)))
        n.pull("kept", lambda m: got.append(("kept", m.data)), at_least_once=True)
        n.subscribe("topic", lambda m: got.append(("topic", m.data)))
        n.service("svc", _echo)
        n.wait_for_pullers("plain")
        n.wait_for_pullers("kept")
        n.wait_for_service("svc")
        batches = [_Handed(range(5)) for _ in range(4)]
        n.push_many("plain", batches[0], timeout=5)
        n.push_many("kept", batches[1], durable=True)
        n.publish_many("topic", batches[2])
        assert list(n.request_many("svc", batches[3], timeout=5)) == list(range(5))
        wait_until(lambda: len(got) >= 15, 10, "the 15 messages")
        assert sorted(got) == sorted((kind, i) for kind in ("plain", "kept", "topic") for i in range(5))
        assert [batch.iterated for batch in batches] == [1, 1, 1, 1]


def test_an_async_node_raises_the_same_classes(mesh: dict[str, Any]) -> None:
    cases: list[tuple[str, Callable[[zmqmesh.AsyncNode], Any], type[Exception], type[ZmqMeshError]]] = [
        ("publish-data", lambda n: n.publish("t", object()), TypeError, EncodeError),
        ("push-data", lambda n: n.push("q", 2**64, timeout=5), TypeError, EncodeError),
        ("push_many-item", lambda n: n.push_many("q", [1, {1}], timeout=5), TypeError, EncodeError),
        ("publish_many-item", lambda n: n.publish_many("t", [1, {1}]), TypeError, EncodeError),
        ("request-data", lambda n: n.request("svc", object(), timeout=5), TypeError, EncodeError),
        ("request_many-item", lambda n: n.request_many("svc", [1, object()], timeout=5), TypeError, EncodeError),
        ("push-headers", lambda n: n.push("q", 1, timeout=5, headers={"a": 1}), TypeError, EncodeError),
        ("request-headers-65", lambda n: n.request("svc", 1, headers={str(i): "" for i in range(65)}),
         ValueError, ConfigError),
        ("publish-topic", lambda n: n.publish(5, 1), ValueError, ConfigError),
        ("push-queue", lambda n: n.push("x" * 201, 1), ValueError, ConfigError),
        ("request-service", lambda n: n.request("", 1), ValueError, ConfigError),
        ("join-reserved", lambda n: n.join("zmqmesh/x"), ValueError, ConfigError),
        ("shout-frame", lambda n: n.shout("g", 5), TypeError, EncodeError),
        ("whisper-no-frame", lambda n: n.whisper(n.id), ValueError, ConfigError),
        ("whisper-peer", lambda n: n.whisper(5, b"x"), TypeError, ArgumentTypeError),
        ("request-peer", lambda n: n.request("svc", 1, peer=5), TypeError, ArgumentTypeError),
        ("request_many-items", lambda n: n.request_many("svc", 5), TypeError, ArgumentTypeError),
    ]
    wrong: list[str] = []

    async def main() -> None:
        async with zmqmesh.AsyncNode("async-bad-input", **mesh) as n:
            n.pull("q", _echo)
            n.service("svc", _echo)
            await n.wait_for_service("svc")
            for name, call, old, new in cases:
                try:
                    await call(n)
                except Exception as exc:
                    if not (isinstance(exc, old) and isinstance(exc, new)):
                        wrong.append(f"{name}: {exc!r}")
                else:
                    wrong.append(f"{name}: no error")
                assert await n.request("svc", 42, timeout=5) == 42

    asyncio.run(main())
    assert wrong == []


@pytest.mark.parametrize(("name", "old", "new"), [
    ("", ValueError, ConfigError), ("  ", ValueError, ConfigError), (".x", ValueError, ConfigError),
    ("a/b", ValueError, ConfigError), ("a\x00b", ValueError, ConfigError),
    (5, TypeError, ArgumentTypeError), (None, TypeError, ArgumentTypeError)])
def test_write_keypair_refuses_a_bad_name_with_a_zmqmesh_error(tmp_path: Path, name: Any, old: type[Exception],
                                                               new: type[ZmqMeshError]) -> None:
    """(Before: ValueError for a bad name, AttributeError for one that is no str, and
    os.open's ValueError for a NUL.)"""
    with pytest.raises(old) as caught:
        zmqmesh.write_keypair(tmp_path, name)
    assert isinstance(caught.value, new)
    assert list(tmp_path.iterdir()) == []
    assert all(path.exists() for path in zmqmesh.write_keypair(tmp_path, "good"))


def test_a_config_with_an_unknown_option_is_a_zmqmesh_error() -> None:
    with pytest.raises(TypeError) as caught:
        zmqmesh.NodeConfig(nope=1)  # type: ignore[call-arg]
    assert isinstance(caught.value, ArgumentTypeError)
    with pytest.raises(TypeError) as caught:
        zmqmesh.NodeConfig().replace(nope=1)
    assert isinstance(caught.value, ArgumentTypeError)


class _IndexedSnapshots:
    """Snapshots a for loop iterates by ``__getitem__`` alone (no ``__iter__``: no ``Iterable``)."""

    def __init__(self, snapshots: list[dict[str, Any]]) -> None:
        self.snapshots = snapshots

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.snapshots[index]


def test_metrics_text_takes_what_a_for_loop_iterates() -> None:
    """``metrics_text`` refused with `ArgumentTypeError` snapshots a for loop iterates by
    ``__getitem__`` (it asked ``isinstance(snapshots, Iterable)``), which it took before;
    and it reads a one-shot iterable once."""
    pytest.importorskip("prometheus_client")
    with zmqmesh.Node("metrics-text", beacon_port=free_udp_port(), mesh=f"test-{uuid.uuid4().hex[:10]}") as n:
        snapshot = n.stats()
    expected = zmqmesh.metrics_text([snapshot])
    assert zmqmesh.metrics_text(_IndexedSnapshots([snapshot])) == expected
    assert zmqmesh.metrics_text(iter([snapshot])) == expected


@pytest.mark.parametrize("call", [
    pytest.param(lambda: zmqmesh.inspect_store(5), id="inspect_store"),
    pytest.param(lambda: zmqmesh.durable_subscriptions(None), id="durable_subscriptions"),
    pytest.param(lambda: zmqmesh.retry_dead_letters(5, "q"), id="retry_dead_letters"),
    pytest.param(lambda: zmqmesh.drop_dead_letters(5, "q"), id="drop_dead_letters"),
    pytest.param(lambda: zmqmesh.forget_durable_subscription(5, "x"), id="forget_durable_subscription"),
    pytest.param(lambda: zmqmesh.StopFlag().wait("1"), id="StopFlag.wait"),
    pytest.param(lambda: zmqmesh.metrics_text(5), id="metrics_text"),  # type: ignore[arg-type]
])
def test_the_tools_refuse_an_argument_of_the_wrong_type_with_a_zmqmesh_error(call: Callable[[], Any]) -> None:
    """(Before: the bare TypeError of os.fspath, of a comparison, of iterating an int.)"""
    with pytest.raises(TypeError) as caught:
        call()
    assert isinstance(caught.value, ArgumentTypeError)


@pytest.mark.parametrize("name", [5, None, b"x"])
def test_forgetting_a_durable_subscription_by_a_name_that_is_no_str_is_refused(tmp_path: Path, mesh: dict[str, Any],
                                                                              name: Any) -> None:
    """``forget_durable_subscription(store, 5)`` forgot the subscription named ``"5"`` (SQLite
    compared the int as text), and ``None`` or bytes reported that the store had none of that
    name: no name of a subscription is anything but a str."""
    with zmqmesh.Node("forgetful", store=str(tmp_path), **mesh):
        pass
    with pytest.raises(TypeError) as caught:
        zmqmesh.forget_durable_subscription(tmp_path, name)
    assert isinstance(caught.value, ArgumentTypeError)
    assert zmqmesh.forget_durable_subscription(tmp_path, "5") == {"streams": 0, "topics": 0}


@pytest.mark.parametrize("tool", [zmqmesh.retry_dead_letters, zmqmesh.drop_dead_letters])
def test_a_dead_letter_queue_named_by_no_str_is_refused(tmp_path: Path, mesh: dict[str, Any],
                                                        tool: Callable[..., int]) -> None:
    """``drop_dead_letters(store, "q", dead_letter=5)`` deleted the queue named ``"5"``
    (SQLite compared the int as text), whose messages were no dead letters at all."""
    with zmqmesh.Node("lettered", store=str(tmp_path), **mesh) as node:
        node.push("5", "not a dead letter", durable=True)
    with pytest.raises(TypeError) as caught:
        tool(tmp_path, "q", dead_letter=5)
    assert isinstance(caught.value, ArgumentTypeError)
    assert zmqmesh.inspect_store(tmp_path)["queues"]["5"]["messages"] == 1
