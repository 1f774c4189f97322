"""CURVE on every socket, with an allow-list enforced by ZAP: strangers learn and deliver nothing."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from helpers import free_tcp_port, wait_until

import zmqmesh
from zmqmesh import generate_keypair, read_public_key, read_secret_key
from zmqmesh._io.curve import KeyPair, make_server


def test_secure_mesh_admits_only_allowed_keys(mesh: dict[str, Any]) -> None:
    a, b, c = generate_keypair(), generate_keypair(), generate_keypair()
    got_b: list[Any] = []
    got_c: list[Any] = []
    alice = zmqmesh.Node("alice", **mesh, curve_secret_key=a.secret, curve_allow=(b.public,))
    bob = zmqmesh.Node("bob", **mesh, curve_secret_key=b.secret, curve_allow=(a.public,))
    bob.service("echo", lambda m: m.data)
    bob.pull("jobs", lambda m: got_b.append(("job", m.data)))
    bob.subscribe("t.", lambda m: got_b.append((m.topic, m.data)))
    # carol is secure and trusts both, but neither trusts her
    carol = zmqmesh.Node("carol", **mesh, curve_secret_key=c.secret, curve_allow=(a.public, b.public))
    carol.subscribe("t.y", lambda m: got_c.append(m.data))
    carol.service("echo", lambda m: "from carol")
    dave = zmqmesh.Node("dave", **mesh)  # plain
    with alice, bob, carol, dave:
        alice.wait_for_peers(1, timeout=10)
        bob.wait_for_peers(1, timeout=10)
        # everything works between alice and bob, encrypted
        assert alice.request("echo", {"x": 1}, timeout=5) == {"x": 1}
        alice.push("jobs", 7, timeout=5)
        alice.wait_for_subscribers("t.x", 1, timeout=5)
        alice.publish("t.x", "hello")
        wait_until(lambda: len(got_b) == 2, 5, "bob's deliveries")
        # carol is refused at the handshake and told nothing
        wait_until(lambda: alice.stats()["rejected"].get("curve_denied", 0) >= 1, 10, "carol refused by ZAP")
        assert alice.stats()["rejected"].get("curve_key_not_allowed", 0) >= 1  # her beacons ignored
        assert [p.name for p in alice.peers()] == ["bob"] and [p.name for p in bob.peers()] == ["alice"]
        assert carol.peers() == [] and dave.peers() == []
        assert alice.stats()["rejected"].get("beacon_other_security", 0) >= 1  # dave's plain beacons
        with pytest.raises(zmqmesh.NoProviderError):
            carol.push("jobs", "intrusion", timeout=0.5)
        with pytest.raises(zmqmesh.NoProviderError):
            carol.request("echo", None, timeout=0.5, peer=bob.id)
        carol.publish("t.x", "intrusion")
        alice.publish("t.y", "secret")  # carol subscribes t.y but receives nothing
        wait_until(lambda: len(got_b) == 3, 5, "alice's second publication")
        time.sleep(0.3)  # a negative check: nothing of carol's may arrive
        assert sorted(got_b, key=str) == sorted([("job", 7), ("t.x", "hello"), ("t.y", "secret")], key=str)
        assert got_c == []
        # the requests of alice never go to carol, who offers the same service
        assert {alice.request("echo", i, timeout=5) for i in range(5)} == set(range(5))


def test_bare_curve_client_with_unknown_key_is_refused(mesh: dict[str, Any]) -> None:
    server, stranger = generate_keypair(), generate_keypair()
    got: list[Any] = []
    node = zmqmesh.Node("guarded", **mesh, curve_secret_key=server.secret)
    node.pull("jobs", lambda m: got.append(m.data))
    with node:
        ctx = zmq.Context()
        sockets = []
        try:
            for keys, payload in ((stranger, "stranger"), (server, "insider")):
                push = ctx.socket(zmq.PUSH)
                sockets.append(push)
                push.setsockopt(zmq.LINGER, 0)
                push.curve_publickey = keys.public.encode()
                push.curve_secretkey = keys.secret.encode()
                push.curve_serverkey = server.public.encode()
                push.connect(node.endpoints["pull"])
                push.send_multipart([b"jobs", b"", msgpack.packb(payload)])
                if payload == "insider":
                    wait_until(lambda: got, 5, "the allowed client's message")
            plain = ctx.socket(zmq.PUSH)
            plain.setsockopt(zmq.LINGER, 0)
            plain.connect(node.endpoints["pull"])
            plain.send_multipart([b"jobs", b"", msgpack.packb("plain")])
            wait_until(lambda: node.stats()["rejected"].get("curve_denied", 0) >= 1, 5, "the stranger refused")
            time.sleep(0.3)  # a negative check: neither the stranger nor the plain client delivers
            assert got == ["insider"]
        finally:
            ctx.destroy(linger=0)


def test_keygen_writes_a_private_secret_file_and_nodes_read_it(tmp_path: Path, mesh: dict[str, Any]) -> None:
    result = subprocess.run([sys.executable, "-m", "zmqmesh", "keygen", "node1", "--dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    secret_file = tmp_path / "node1.key_secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    public = read_public_key(tmp_path / "node1.key")
    assert public in result.stdout and read_public_key(secret_file) == public
    other = generate_keypair()
    with zmqmesh.Node("from-file", **mesh, curve_key_file=str(secret_file), curve_allow=(other.public,)) as a, \
            zmqmesh.Node("from-env", **mesh, curve_secret_key=other.secret, curve_allow=(public,)) as b:
        a.wait_for_peers(1, timeout=10)
        assert b.peers()[0].headers["X-ZMQMESH-KEY"] == public
    again = subprocess.run([sys.executable, "-m", "zmqmesh", "keygen", "node1", "--dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_secret_key_files_readable_by_others_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.key_secret"
    keys = generate_keypair()
    path.write_text(f'public-key = "{keys.public}"\nsecret-key = "{keys.secret}"\n')
    os.chmod(path, 0o644)
    with pytest.raises(zmqmesh.ConfigError, match="readable by others"):
        read_secret_key(path)
    os.chmod(path, 0o600)
    assert read_secret_key(path) == keys.secret


def test_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    keys, friend = generate_keypair(), generate_keypair()
    monkeypatch.setenv("ZMQMESH_CURVE_SECRET_KEY", keys.secret)
    monkeypatch.setenv("ZMQMESH_CURVE_ALLOW", friend.public)
    config = zmqmesh.NodeConfig.from_options()
    assert config.curve_secret_key == keys.secret and config.curve_allow == (friend.public,)


def test_bad_keys_are_config_errors(mesh: dict[str, Any]) -> None:
    node = zmqmesh.Node("bad", **mesh, curve_secret_key="too short")
    with pytest.raises(zmqmesh.ConfigError):
        node.start()


@pytest.mark.parametrize("key", ["#" * 40, "%" * 40, "0" * 35 + "%%%%%"])
def test_z85_keys_past_32_bits_a_group_are_config_errors(key: str, mesh: dict[str, Any]) -> None:
    # forty characters of Z85's alphabet whose groups of five are worth more than 2**32
    with pytest.raises(zmqmesh.ConfigError, match="Z85"):
        zmqmesh.Node("bad", **mesh, curve_secret_key=key).start()
    keys = generate_keypair()
    with pytest.raises(zmqmesh.ConfigError, match="curve_allow"):
        zmqmesh.Node("bad", **mesh, curve_secret_key=keys.secret, curve_allow=(key,)).start()


def test_key_files_not_text_or_not_files_are_config_errors(tmp_path: Path) -> None:
    keys = generate_keypair()
    binary = tmp_path / "binary.key_secret"
    binary.write_bytes(b"\xde\xad" + zmq.utils.z85.decode(keys.secret))  # the raw 32 bytes, not Z85
    latin1 = tmp_path / "latin1.key_secret"  # a comment in Latin-1 before a good key
    latin1.write_bytes(b"# cl\xe9 de n\xf6ud\n" + f'public-key = "{keys.public}"\nsecret-key = "{keys.secret}"\n'.encode())
    for path in (binary, latin1):
        os.chmod(path, 0o600)
    with pytest.raises(zmqmesh.ConfigError, match="no secret-key"):
        read_secret_key(binary)
    with pytest.raises(zmqmesh.ConfigError, match="no public-key"):
        read_public_key(binary)
    assert read_secret_key(latin1) == keys.secret and read_public_key(latin1) == keys.public
    for bad in ("a\0b", str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(zmqmesh.ConfigError, match="cannot read key file"):
            read_public_key(bad)
    with pytest.raises(zmqmesh.ConfigError, match="cannot read key file"):
        read_secret_key("a\0b")


def test_a_key_file_is_read_within_a_bound() -> None:
    # /dev/zero given as a key file: read whole, it grew the process until memory ran out
    script = ("import resource, zmqmesh\n"
              "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
              "try:\n    zmqmesh.read_public_key('/dev/zero')\n"
              "except zmqmesh.ConfigError as exc:\n    print('ConfigError', exc)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("ConfigError") and "larger than" in result.stdout, result.stdout + result.stderr[-500:]


def test_refused_handshakes_are_all_counted_and_logged_at_a_bounded_rate(
        mesh: dict[str, Any], ctx: Any, caplog: pytest.LogCaptureFixture) -> None:
    keys = generate_keypair()
    with zmqmesh.Node("guarded", **mesh, curve_secret_key=keys.secret) as node, \
            caplog.at_level("WARNING", logger="zmqmesh.security"):
        strangers = []
        for _ in range(150):  # each a valid CURVE key the node does not allow
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RECONNECT_IVL, 60_000)  # (one handshake each)
            stranger = generate_keypair()
            sock.curve_publickey, sock.curve_secretkey = stranger.public.encode(), stranger.secret.encode()
            sock.curve_serverkey = keys.public.encode()
            sock.connect(node.endpoints["service"])
            strangers.append(sock)
        wait_until(lambda: node.stats()["rejected"].get("curve_denied", 0) >= 150, 15, "150 refusals counted")
        lines = [r for r in caplog.records if r.name == "zmqmesh.security"]
        assert 1 <= len(lines) <= 2, len(lines)  # (a stranger's handshakes do not flood the log)
        assert "refused" in lines[0].getMessage()


def test_curve_options_that_would_leave_a_node_plain_or_its_seeds_unchecked_are_config_errors(
        mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    keys, friend = generate_keypair(), generate_keypair()
    # an allow-list, or a seed's key, without a key of the node's own: the node was plain,
    # open to anyone, without a word
    with pytest.raises(zmqmesh.ConfigError, match="curve_allow needs"):
        zmqmesh.NodeConfig(curve_allow=(friend.public,))
    monkeypatch.setenv("ZMQMESH_CURVE_ALLOW", friend.public)
    with pytest.raises(zmqmesh.ConfigError, match="curve_allow needs"):
        zmqmesh.NodeConfig.from_options()
    monkeypatch.delenv("ZMQMESH_CURVE_ALLOW")
    with pytest.raises(zmqmesh.ConfigError, match="KEY@"):
        zmqmesh.NodeConfig(seeds=(f"{friend.public}@tcp://127.0.0.1:5670",))
    # a secure node's seed without a key, or with one that is none, was skipped with a warning
    with pytest.raises(zmqmesh.ConfigError, match="KEY@"):
        zmqmesh.NodeConfig(curve_secret_key=keys.secret, seeds=("tcp://127.0.0.1:5670",))
    for bad in ("~" * 40, "#" * 40):
        node = zmqmesh.Node("bad-seed", **mesh, curve_secret_key=keys.secret, seeds=(f"{bad}@tcp://127.0.0.1:5670",))
        with pytest.raises(zmqmesh.ConfigError, match="seed"):
            node.start()
    good = zmqmesh.NodeConfig(curve_secret_key=keys.secret, curve_allow=(friend.public,),
                              seeds=(f"{friend.public}@tcp://127.0.0.1:5670",))
    assert good.seeds == (f"{friend.public}@tcp://127.0.0.1:5670",)


def test_keygen_writes_through_no_link_and_leaves_no_half_pair(tmp_path: Path) -> None:
    # a dangling link where the public key goes: exists() says no, and the key was written
    # through it, to wherever it points
    elsewhere = tmp_path / "elsewhere"
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "n.key").symlink_to(elsewhere)
    with pytest.raises(FileExistsError):
        zmqmesh.write_keypair(keys, "n")
    assert not elsewhere.exists() and not (keys / "n.key_secret").exists()
    (keys / "m.key_secret").symlink_to(elsewhere)
    with pytest.raises(FileExistsError):
        zmqmesh.write_keypair(keys, "m")
    assert not elsewhere.exists() and not (keys / "m.key").exists()


def _handshakes(ctx: Any, attempts: list[tuple[Any, ...]], window_s: float = 1.5) -> dict[str, str]:
    """How each CURVE client handshake fares within ``window_s``, all made at once: for
    each ``(label, endpoint, server_key, kind[, key pair])`` (without a pair: a fresh one,
    allowed nowhere), "admitted" (it succeeded), "refused" (it failed, or the server hung up),
    "pending" (connected, and neither within the window: unanswered) or "unconnected"."""
    from zmq.utils.monitor import recv_monitor_message

    outcome: dict[str, str] = {}
    clients: list[tuple[str, Any, Any]] = []
    try:
        for label, endpoint, server_key, kind, *keys in attempts:
            pair = keys[0] if keys else generate_keypair()
            sock = ctx.socket(kind)
            sock.setsockopt(zmq.LINGER, 0)
            sock.curve_publickey, sock.curve_secretkey = pair.public.encode(), pair.secret.encode()
            sock.curve_serverkey = server_key.encode()
            monitor = sock.get_monitor_socket()
            clients.append((label, sock, monitor))
            sock.connect(endpoint)
            outcome[label] = "unconnected"
        failed = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED)
        deadline = time.monotonic() + window_s
        while time.monotonic() < deadline:
            for label, _sock, monitor in clients:
                while outcome[label] in ("unconnected", "pending") and monitor.poll(0):
                    event = recv_monitor_message(monitor)["event"]
                    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        outcome[label] = "admitted"
                    elif event & failed:
                        outcome[label] = "refused"
                    elif event == zmq.EVENT_CONNECTED:
                        outcome[label] = "pending"
            time.sleep(0.02)
        return outcome
    finally:
        for _label, sock, monitor in clients:
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)


@pytest.mark.parametrize("enforced", [True, False], ids=["zap-enforce-domain", "libzmq-without-the-option"])
def test_a_stopped_node_whose_handler_outlives_the_stop_admits_no_stranger(
        mesh: dict[str, Any], ctx: Any, monkeypatch: pytest.MonkeyPatch, enforced: bool) -> None:
    # A handler that outlives the stop keeps the inbound sockets open until it returns; the
    # ZAP handler closed with the other sockets, and a CURVE server with no ZAP handler
    # (libzmq's default) admits every key: strangers completed handshakes on all three.
    # The ZAP handler now stays bound, paused: a handshake asked meanwhile waits unanswered
    # (an allowed key's too), "pending", neither admitted nor refused. Without the draft
    # option ZAP_ENFORCE_DOMAIN (a libzmq built without it, simulated: make_server goes on
    # without it) the paused handler is the only defence, which this pins; the option's
    # own is pinned by test_a_curve_server_with_no_zap_handler_refuses_every_handshake.
    if not enforced:
        monkeypatch.delattr(zmq, "ZAP_ENFORCE_DOMAIN")
    keys = generate_keypair()
    release = threading.Event()
    node = zmqmesh.Node("guarded", **mesh, curve_secret_key=keys.secret)
    node.service("hang", lambda m: release.wait(20))
    caller = zmqmesh.Node("caller", **mesh, curve_secret_key=keys.secret)  # (its own key: allowed)
    try:
        with caller:
            node.start()
            endpoints = dict(node.endpoints)
            kinds = {"pull": zmq.PUSH, "service": zmq.DEALER, "sub": zmq.PUB}
            running = _handshakes(ctx, [(key, endpoints[key], keys.public, kind) for key, kind in kinds.items()])
            assert running == dict.fromkeys(kinds, "refused")  # (the node running: its handler refuses)
            caller.wait_for_peers(1, timeout=10)
            threading.Thread(target=lambda: caller.submit("hang", None, timeout=20), daemon=True).start()
            wait_until(lambda: node.stats()["service"]["received"] >= 1, 10, "the request in its handler")
            node.stop(timeout=0.2)
            attempts = [(key, endpoints[key], keys.public, kind) for key, kind in kinds.items()]
            attempts += [(f"{key} allowed", endpoints[key], keys.public, kind, keys) for key, kind in kinds.items()]
            stopped = _handshakes(ctx, attempts)
            assert stopped == {label: "pending" for label, *_ in attempts}, stopped
    finally:
        release.set()


def test_a_curve_server_with_no_zap_handler_refuses_every_handshake(ctx: Any) -> None:
    # libzmq's CURVE server with no ZAP handler bound admits any client key, unless the
    # socket has ZAP_ENFORCE_DOMAIN; make_server sets it, where libzmq takes the option
    from zmq.utils.monitor import recv_monitor_message

    probe = ctx.socket(zmq.PULL)
    try:
        probe.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    except (zmq.ZMQError, AttributeError):
        pytest.skip("this libzmq takes no ZAP_ENFORCE_DOMAIN (a build without draft options)")
    finally:
        probe.close(0)
    keys = generate_keypair()
    server = ctx.socket(zmq.PULL)  # (in a context with no ZAP handler: none was ever bound)
    server.setsockopt(zmq.LINGER, 0)
    make_server(server, keys)
    monitor = server.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    try:
        port = server.bind_to_random_port("tcp://127.0.0.1")
        stranger = generate_keypair()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.RECONNECT_IVL, 60_000)  # (one handshake)
        push.curve_publickey, push.curve_secretkey = stranger.public.encode(), stranger.secret.encode()
        push.curve_serverkey = keys.public.encode()
        push.connect(f"tcp://127.0.0.1:{port}")
        push.send(b"intrusion", zmq.NOBLOCK)
        assert monitor.poll(5000), "no handshake reported by the server"
        event = recv_monitor_message(monitor)["event"]
        assert event != zmq.EVENT_HANDSHAKE_SUCCEEDED, "a stranger completed a handshake with no ZAP handler"
        assert event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, event
        assert not server.poll(300)  # (a negative check: nothing of the stranger's arrives)
        push.close(0)
    finally:
        server.disable_monitor()
        monitor.close(0)
        server.close(0)


def test_a_public_key_file_given_as_the_secret_one_is_named_as_such(tmp_path: Path, mesh: dict[str, Any]) -> None:
    # the two files swapped: the public one (mode 644) was refused as "readable by others",
    # and made private, only then as one without a secret key
    public, secret = zmqmesh.write_keypair(tmp_path, "n")
    with pytest.raises(zmqmesh.ConfigError, match=r"no secret-key: it is a public key file"):
        read_secret_key(public)
    with pytest.raises(zmqmesh.ConfigError, match="no secret-key"):
        zmqmesh.Node("swapped", **mesh, curve_key_file=str(public)).start()
    assert read_public_key(secret) == read_public_key(public)  # (the other way round is fine)


def test_handshakes_that_fail_before_the_allow_list_are_counted(mesh: dict[str, Any], ctx: Any,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    # a plain client, or one that does not know the node's key, fails in ZeroMQ before the
    # ZAP handler: it was refused without a count or a word
    keys, wrong, stranger = generate_keypair(), generate_keypair(), generate_keypair()
    with zmqmesh.Node("guarded", **mesh, curve_secret_key=keys.secret) as node, \
            caplog.at_level("WARNING", logger="zmqmesh.security"):
        clients = []  # (kept: one closed before its handshake fails counts as no handshake)
        for endpoint in node.endpoints.values():  # (the mailbox and every pattern socket)
            for server_key in (None, wrong.public):
                sock = ctx.socket(zmq.DEALER)
                clients.append(sock)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RECONNECT_IVL, 60_000)  # (one handshake each)
                if server_key is not None:
                    sock.curve_publickey, sock.curve_secretkey = stranger.public.encode(), stranger.secret.encode()
                    sock.curve_serverkey = server_key.encode()
                sock.connect(endpoint)
        count = 2 * len(node.endpoints)
        wait_until(lambda: node.stats()["rejected"].get("curve_handshake_failed", 0) >= count, 10,
                   f"{count} failed handshakes counted")
        assert 1 <= len([r for r in caplog.records if r.name == "zmqmesh.security"]) <= 2
    assert node.stats()["rejected"].get("curve_denied", 0) == 0  # (none reached the ZAP handler)


def test_a_secure_async_node_that_fails_to_start_leaves_nothing_watched_on_the_loop(mesh: dict[str, Any]) -> None:
    # the ZAP handler's socket and its monitors stay watched on the caller's loop, closed
    # with the context, unless let go before
    import asyncio
    import socket

    keys = generate_keypair()

    async def main() -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            loop = asyncio.get_running_loop()
            watched = set(loop._selector.get_map())  # type: ignore[attr-defined]
            node = zmqmesh.AsyncNode("refused", **mesh, mailbox_port=busy.getsockname()[1], curve_secret_key=keys.secret)
            with pytest.raises(zmqmesh.ZmqMeshError, match="mailbox"):
                await node.start()
            await asyncio.sleep(0.05)
            assert set(loop._selector.get_map()) - watched == set()  # type: ignore[attr-defined]

    asyncio.run(main())


@pytest.mark.parametrize("name", ["../outside", "sub/inner", "/abs", ".", ".."])
def test_keygen_names_a_file_in_its_directory_only(tmp_path: Path, name: str) -> None:
    # a name with a separator wrote the pair outside the directory given (or failed, or
    # wrote hidden files "..key" beside it)
    keys = tmp_path / "keys"
    with pytest.raises(ValueError, match="name"):
        zmqmesh.write_keypair(keys, name)
    assert sorted(p.name for p in tmp_path.rglob("*")) in ([], ["keys"])
    result = subprocess.run([sys.executable, "-m", "zmqmesh", "keygen", name, "--dir", str(keys)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "name" in result.stderr


def test_a_config_shows_no_secret_key() -> None:
    # a config's repr (a log line, a traceback's locals, print(node.config)) showed the
    # node's secret key in full
    keys = generate_keypair()
    config = zmqmesh.NodeConfig(curve_secret_key=keys.secret)
    assert keys.secret not in repr(config) and keys.secret not in str(config)
    assert "curve_secret_key=<hidden>" in repr(config)
    assert "curve_secret_key=None" in repr(zmqmesh.NodeConfig())
    assert config == zmqmesh.NodeConfig(curve_secret_key=keys.secret) and config.curve_secret_key == keys.secret


def test_a_key_pair_shows_no_secret_key() -> None:
    # generate_keypair()'s KeyPair (the engine holds one) printed its secret key in full,
    # in a log line or a traceback's locals
    keys = generate_keypair()
    assert keys.secret not in repr(keys) and keys.secret not in str(keys)
    assert repr(keys) == f"KeyPair(public={keys.public!r}, secret=<hidden>)"
    assert keys.secret not in repr(KeyPair.from_secret(keys.secret)) and keys.secret not in repr([keys])
    public, secret = keys
    assert (public, secret) == (keys.public, keys.secret) == tuple(keys)  # (the value itself is unchanged)


def _curve_socket(ctx: zmq.Context, sockets: list[zmq.Socket[Any]], kind: int, keys: Any,
                  server_key: str | None = None) -> zmq.Socket[Any]:
    """A socket of ``kind`` with the CURVE ``keys``: a server, or a client of ``server_key``
    (kept in ``sockets``, for the test to close)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_publickey, sock.curve_secretkey = keys.public.encode(), keys.secret.encode()
    if server_key is None:
        sock.curve_server = True
    else:
        sock.curve_serverkey = server_key.encode()
    sockets.append(sock)
    return sock


def _played_peer(node: zmqmesh.Node, ctx: zmq.Context, sockets: list[zmq.Socket[Any]], node_key: str, keys: Any,
                 offer: str, header: str, endpoint: str, mesh_name: str) -> tuple[str, zmq.Socket[Any]]:
    """A peer played over its own CURVE link (``keys``) to ``node`` (whose public key is
    ``node_key``): its HELLO offers "<offer>" under ``offer``'s prefix and announces
    ``endpoint`` under ``header``. Returns its id once ``node`` knows it, and the DEALER it
    speaks to the node's mailbox through."""
    from zmqmesh._wire import zre
    from zmqmesh._wire.frames import HEADER, OFFER_PREFIXES
    from zmqmesh._wire.zre import Command, ZreMessage

    kind, group = offer.split(":")
    uuid = os.urandom(16)
    link = _curve_socket(ctx, sockets, zmq.ROUTER, keys)  # (where the node's link to it connects)
    link_endpoint = f"tcp://127.0.0.1:{link.bind_to_random_port('tcp://127.0.0.1')}"
    dealer = _curve_socket(ctx, sockets, zmq.DEALER, keys, node_key)
    dealer.setsockopt(zmq.ROUTING_ID, b"\x01" + uuid)
    dealer.connect(node.endpoints["mailbox"])
    dealer.send_multipart(zre.encode_command(ZreMessage(
        Command.HELLO, 1, endpoint=link_endpoint, name="played", groups=[OFFER_PREFIXES[kind] + group],
        headers={HEADER["mesh"]: mesh_name, HEADER["key"]: keys.public, HEADER[header]: endpoint})))
    wait_until(lambda: any(p.id == uuid.hex() for p in node.peers()), 10, "the played peer to be known")
    return uuid.hex(), dealer


@pytest.mark.parametrize("pattern", ["pubsub", "pipeline"])
def test_a_sender_reaches_a_node_restarted_with_new_keys_at_the_endpoint_its_ghost_announced(
        mesh: dict[str, Any], ctx: zmq.Context, pattern: str) -> None:
    """A node restarted with new keys, its SUB (or PULL) bound at the port of the one before
    (the kernel gave it again), while the one before is still listed: once that one is
    gone, the XPUB (the queue's PUSH) is connected to the endpoint with the new node's key.
    (It stayed connected with the old key, its handshake failing for good: the new node got
    no publication, no message, of this node.) Two peers are played over their own CURVE
    links; the one before changes its offers while both are listed."""
    from zmqmesh._wire import zre
    from zmqmesh._wire.frames import OFFER_PREFIXES
    from zmqmesh._wire.zre import Command, ZreMessage

    kind, offer, header, sending = {
        "pubsub": (zmq.SUB, "topics", "sub", lambda: node.publish("news.today", 1)),
        "pipeline": (zmq.PULL, "queues", "pull", lambda: node.push("news.", 1, timeout=5)),
    }[pattern]
    own, old, new = generate_keypair(), generate_keypair(), generate_keypair()
    sub_endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    sockets: list[zmq.Socket[Any]] = []

    with zmqmesh.Node("publisher", **{**mesh, "peer_timeout_s": 30.0}, curve_secret_key=own.secret,
                      curve_allow=(old.public, new.public)) as node:
        def play(keys: Any) -> tuple[str, zmq.Socket[Any]]:
            return _played_peer(node, ctx, sockets, own.public, keys, f"{offer}:news.", header, sub_endpoint,
                                mesh["mesh"])

        before_id, before = play(old)
        sending()  # (the queue's PUSH is made, connected to the one there)
        play(new)
        before.send_multipart(zre.encode_command(ZreMessage(  # (the one before changes while both are listed)
            Command.JOIN, 2, group=OFFER_PREFIXES[offer] + "more.", status=1)))
        wait_until(lambda: any(p.id == before_id and "more." in (p.topics if pattern == "pubsub" else p.queues)
                               for p in node.peers()), 10, "its JOIN")
        before.send_multipart(zre.encode_command(ZreMessage(Command.GOODBYE, 3)))
        wait_until(lambda: all(p.id != before_id for p in node.peers()), 10, "the node before to be gone")
        sub = _curve_socket(ctx, sockets, kind, new)  # the new node's socket, at the endpoint both announced
        sub.bind(sub_endpoint)
        if kind == zmq.SUB:
            sub.setsockopt(zmq.SUBSCRIBE, b"news.")
        deadline = time.monotonic() + 10
        received = False
        while not received and time.monotonic() < deadline:
            sending()
            received = bool(sub.poll(100))
        assert received, "this node never reached the new node's socket"
    for sock in sockets:
        sock.close(0)


def test_a_first_push_while_restarted_pullers_ghosts_are_listed_reaches_the_new_nodes(
        mesh: dict[str, Any], ctx: zmq.Context) -> None:
    """Four nodes pulling "jobs", restarted with new keys, each PULL bound at the port of
    the one before, while the ones before are still listed: this node's first push to
    "jobs" makes its PUSH socket then, connected to each endpoint with the new node's key,
    and every new node gets messages while the ones before are still listed. (The socket's
    first sync took each endpoint's key from whichever of the two came first out of a set:
    a new node given the old key got nothing until the one before was gone.) Peers played
    over their own CURVE links, as in the test above."""
    own = generate_keypair()
    pairs = [(generate_keypair(), generate_keypair(), f"tcp://127.0.0.1:{free_tcp_port()}") for _ in range(4)]
    sockets: list[zmq.Socket[Any]] = []
    allowed = tuple(k.public for old, new, _ in pairs for k in (old, new))
    with zmqmesh.Node("pusher", **{**mesh, "peer_timeout_s": 30.0}, curve_secret_key=own.secret,
                      curve_allow=allowed) as node:
        def play(keys: Any, pull_endpoint: str) -> str:
            return _played_peer(node, ctx, sockets, own.public, keys, "queues:jobs", "pull", pull_endpoint,
                                mesh["mesh"])[0]

        before = [play(old, endpoint) for old, _, endpoint in pairs]
        for _, new, endpoint in pairs:
            play(new, endpoint)
        pulls = []
        for _, new, endpoint in pairs:
            pull = _curve_socket(ctx, sockets, zmq.PULL, new)  # the new node's socket, at the endpoint both announced
            pull.bind(endpoint)
            pulls.append(pull)
        reached: set[int] = set()
        deadline = time.monotonic() + 10
        while len(reached) < len(pulls) and time.monotonic() < deadline:
            node.push("jobs", 1, timeout=5)
            for n, pull in enumerate(pulls):
                while pull.poll(0):
                    pull.recv_multipart()
                    reached.add(n)
            time.sleep(0.01)
        assert reached == set(range(len(pulls))), "a new node's socket was never reached"
        assert {p.id for p in node.peers()} >= set(before), "the ones before are still listed"
    for sock in sockets:
        sock.close(0)
