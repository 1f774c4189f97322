"""Prometheus metrics: a node given metrics_port serves its counters, and the gateway the
mesh's; a real scrape, parsed as Prometheus parses it, sees the figures move."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
from helpers import wait_until

import zmqmesh

prometheus = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[Any, float], metric: str, **labels: str) -> float:
    found = [v for (n, ls), v in samples.items() if n == metric and all((k, w) in ls for k, w in labels.items())]
    assert len(found) <= 1, found
    return found[0] if found else 0.0


def test_a_node_on_an_ipv6_address_names_a_url_that_scrapes(mesh: dict[str, Any]) -> None:
    """``metrics_endpoint`` for ``::1`` is a URL a client can open (the address in brackets);
    it read ``http://::1:PORT/metrics``, which none can."""
    with zmqmesh.Node("scraped6", **mesh, metrics_port=0, metrics_address="::1") as node:
        assert node.metrics_endpoint is not None and node.metrics_endpoint.startswith("http://[::1]:")
        assert value(scrape(node.metrics_endpoint), "zmqmesh_peers", node="scraped6") == 0


def test_a_node_serves_its_counters_and_they_move(mesh: dict[str, Any]) -> None:
    got: list[Any] = []
    with zmqmesh.Node("scraped", **mesh, metrics_port=0) as a, zmqmesh.Node("other", **mesh) as b:
        b.service("add", lambda msg: msg.data + 1)
        b.subscribe("t.", got.append)
        b.pull("jobs", got.append)
        assert a.metrics_endpoint is not None and a.metrics_endpoint.startswith("http://127.0.0.1:")
        assert b.metrics_endpoint is None
        a.wait_for_service("add", timeout=10)
        url = a.metrics_endpoint
        before = scrape(url)
        assert value(before, "zmqmesh_peers", node="scraped") == 1
        for i in range(20):
            assert a.request("add", i, timeout=5) == i + 1
        a.wait_for_subscribers("t.", 1, timeout=10)
        for _ in range(3):
            a.publish("t.x", 1)
        a.push("jobs", 2, timeout=5)
        wait_until(lambda: len(got) == 4, 10, "the messages")
        after = scrape(a.metrics_endpoint)
        moved = value(after, "zmqmesh_messages_total", node="scraped", pattern="request", event="sent") - \
            value(before, "zmqmesh_messages_total", node="scraped", pattern="request", event="sent")
        assert moved == 20
        assert value(after, "zmqmesh_named_messages_total", pattern="request", direction="sent", name="add") == 20
        assert value(after, "zmqmesh_named_messages_total", pattern="pubsub", direction="sent", name="t.x") == 3
        assert value(after, "zmqmesh_named_messages_total", pattern="pipeline", direction="sent", name="jobs") == 1
        assert value(after, "zmqmesh_request_duration_seconds_count", service="add") == 20
        assert value(after, "zmqmesh_request_duration_seconds_bucket", service="add", le="+Inf") == 20
        assert 0 < value(after, "zmqmesh_request_duration_seconds_sum", service="add") < 20
        assert value(after, "zmqmesh_peers", node="scraped") == 1
        assert ("zmqmesh_queued_messages", (("node", "scraped"), ("node_id", a.id))) in after
        for gauge in ("zmqmesh_send_queue_bytes", "zmqmesh_durable_buffered_bytes"):  # (nothing waits now)
            assert after[(gauge, (("node", "scraped"), ("node_id", a.id)))] == 0, gauge
    assert a.metrics_endpoint is None
    with pytest.raises(urllib.error.URLError):  # stopped with its node
        scrape(url)


def test_a_metrics_port_in_use_fails_the_start_with_a_clear_error(mesh: dict[str, Any]) -> None:
    with zmqmesh.Node("first", **mesh, metrics_port=0) as first:
        assert first.metrics_endpoint is not None
        port = int(first.metrics_endpoint.rsplit(":", 1)[1].split("/")[0])
        second = zmqmesh.Node("second", **mesh, metrics_port=port)
        with pytest.raises(zmqmesh.ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            second.start()
    with pytest.raises(zmqmesh.ConfigError, match="metrics_port"):
        zmqmesh.Node("bad", **mesh, metrics_port=70000)


def test_the_gateway_serves_the_whole_mesh(gateway: str, spawn: Any) -> None:
    spawn("worker", service=["echo"])
    body = b'{"x": 1}'
    request = urllib.request.Request(f"{gateway}/request/echo", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    wait_until(lambda: _ok(request), 20, "the gateway to call echo")
    samples = scrape(f"{gateway}/metrics")
    nodes = {dict(labels)["node"] for (name, labels) in samples if name == "zmqmesh_peers"}
    assert nodes == {"gateway", "worker"}
    assert value(samples, "zmqmesh_named_messages_total", node="worker", pattern="service", direction="received",
                 name="echo") >= 1
    assert value(samples, "zmqmesh_request_duration_seconds_count", node="gateway", service="echo") >= 1


def _ok(request: urllib.request.Request) -> bool:
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return False


def test_stats_can_be_read_from_any_thread_while_at_least_once_traffic_flows(mesh: dict[str, Any]) -> None:
    import threading
    import time

    got: list[Any] = []
    errors: list[BaseException] = []
    # (two threads reading stats without a pause starve the nodes' other threads: on a slow
    # host, for longer than the fixture's peer timeout, and a false departure redelivers)
    mesh = {**mesh, "peer_timeout_s": 10.0}
    with zmqmesh.Node("pusher", **mesh) as a, zmqmesh.Node("puller", **mesh) as b:
        b.pull("jobs", got.append, at_least_once=True)
        a.wait_for_pullers("jobs", timeout=10)
        stop = threading.Event()

        def read() -> None:
            while not stop.is_set():
                try:
                    a.stats()
                    b.stats()
                    time.sleep(0)  # (lets the other threads take the interpreter)
                except BaseException as exc:  # noqa: BLE001 - any failure is the finding
                    errors.append(exc)
                    return

        readers = [threading.Thread(target=read) for _ in range(2)]
        for reader in readers:
            reader.start()
        try:
            for i in range(20_000):
                a.push("jobs", i, timeout=10)
            wait_until(lambda: len(got) == 20_000, 60, "every job")
        finally:
            stop.set()
            for reader in readers:
                reader.join(10)
        assert errors == []
        wait_until(lambda: a.stats()["gauges"]["queued"] == 0, 10, "the acknowledgements")
        assert b.stats()["names"]["pipeline"]["received"]["jobs"] == 20_000
        assert a.stats()["names"]["pipeline"]["sent"]["jobs"] == 20_000


@pytest.mark.timeout(30)
def test_a_node_of_an_older_version_gets_no_byte_gauges_it_never_reported() -> None:
    """The gateway scrapes the whole mesh, of mixed versions in a rolling upgrade: a node
    whose counters hold no ``send_queue_bytes`` or ``durable_buffered_bytes`` (a version
    before 501cead, or one before the durable gauge) was reported at 0 bytes, a level it
    never told, and an alert on the bound read it as idle. Its sample is left out."""
    from prometheus_client.parser import text_string_to_metric_families

    from zmqmesh._observe.prometheus import metrics_text

    old = {"id": "o" * 32, "name": "old", "gauges": {"peers": 2, "queued": 5, "queue_backlog": {"jobs": 5}}}
    new = {"id": "n" * 32, "name": "new", "gauges": {"peers": 2, "queued": 0, "queue_backlog": {},
                                                       "send_queue_bytes": 640, "durable_buffered_bytes": 0}}
    text = metrics_text([old, new]).decode()
    by_family = {f.name: {s.labels["node"]: s.value for s in f.samples}
                 for f in text_string_to_metric_families(text)}
    assert by_family["zmqmesh_send_queue_bytes"] == {"new": 640}, by_family["zmqmesh_send_queue_bytes"]
    assert by_family["zmqmesh_durable_buffered_bytes"] == {"new": 0}
    assert by_family["zmqmesh_queued_messages"] == {"old": 5, "new": 0}


@pytest.mark.timeout(60)
def test_strangers_idle_connections_hold_no_thread_nor_descriptor_of_the_node_for_long(
        mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each connection to a node's metrics server took a thread and a file descriptor for
    as long as its client kept it open, sending nothing: strangers' idle connections held
    every descriptor of the node's process (a node limited to 256 then met no peer: "cannot
    open a link ...: Too many open files"). Now a few are served at once, the others closed
    at once, and one that keeps the server waiting is closed."""
    import socket
    import threading

    from zmqmesh._observe import prometheus as metrics

    monkeypatch.setattr(metrics, "IDLE_TIMEOUT_S", 1.0, raising=False)
    with zmqmesh.Node("scraped", **mesh, metrics_port=0) as node:
        assert node.metrics_endpoint is not None
        port = int(node.metrics_endpoint.rsplit(":", 1)[1].split("/")[0])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(200)]
        try:
            for conn in idle[:100]:
                conn.sendall(b"GET /metrics HTTP/1.1\r\n")  # (a head that never ends)
            serving = [t for t in threading.enumerate() if "process_request_thread" in t.name]
            assert len(serving) <= 64, f"{len(serving)} threads serve 200 idle connections"
            for conn in idle:  # closed by the node: at once, or once they kept it waiting
                assert conn.recv(1024) == b""
        finally:
            for conn in idle:
                conn.close()
        assert value(scrape(node.metrics_endpoint), "zmqmesh_peers", node="scraped") == 0
        with zmqmesh.Node("caller", **mesh) as caller:
            node.service("echo", lambda msg: msg.data)
            caller.wait_for_service("echo", timeout=10)
            assert caller.request("echo", 7, timeout=5) == 7


@pytest.mark.timeout(60)
def test_strangers_that_trickle_their_requests_do_not_keep_the_metrics_from_scrapers(
        mesh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection's timeout bounds each wait for it, not its life: strangers that each
    sent a byte of a header that never ends more often than `IDLE_TIMEOUT_S` held every
    slot of the metrics server for as long as they kept it up, and no scrape was served
    (16 connections trickling a byte every 0.2 s: 0 of the scrapes served over 6 s). Now a
    connection is closed once it has been open `CONNECTION_LIMIT_S`, however it trickles."""
    import socket
    import threading
    import time

    from zmqmesh._observe import prometheus as metrics

    monkeypatch.setattr(metrics, "IDLE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(metrics, "CONNECTION_LIMIT_S", 1.5, raising=False)
    with zmqmesh.Node("scraped", **mesh, metrics_port=0) as node:
        assert node.metrics_endpoint is not None
        port = int(node.metrics_endpoint.rsplit(":", 1)[1].split("/")[0])
        strangers = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(metrics.MAX_CONNECTIONS)]
        stop = threading.Event()

        def trickle() -> None:
            for conn in strangers:
                conn.sendall(b"GET /metrics HTTP/1.1\r\n")
            while not stop.is_set():
                for conn in strangers:
                    try:
                        conn.sendall(b"X")  # (a byte of a header that never ends)
                    except OSError:
                        pass
                stop.wait(0.2)

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            time.sleep(0.5)  # (every slot taken)
            served = 0
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline and not served:
                try:
                    with urllib.request.urlopen(node.metrics_endpoint, timeout=2) as answer:
                        served += b"zmqmesh_peers" in answer.read()
                except OSError:
                    time.sleep(0.2)
            assert served, "no scrape served while strangers trickled"
        finally:
            stop.set()
            thread.join(5)
            for conn in strangers:
                conn.close()


@pytest.mark.timeout(60)
def test_a_scraper_that_stops_reading_makes_no_traceback_on_stderr(monkeypatch: pytest.MonkeyPatch,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    """The answer's write to a scraper that stops reading times out after `IDLE_TIMEOUT_S`:
    wsgiref printed that failure's traceback on the process's stderr ("TimeoutError: timed
    out", a library's print); it is logged (debug) now, as the server's other failures."""
    import socket
    import time

    from zmqmesh._observe import prometheus as metrics

    monkeypatch.setattr(metrics, "IDLE_TIMEOUT_S", 0.5)
    big = {"name": "n", "id": "i",  # (a text larger than the socket buffers take: some 12 MB)
           "names": {"pubsub": {"out": {f"topic-{i:06d}-" + "x" * 200: 1 for i in range(40_000)}}}}
    server = metrics.MetricsServer(lambda: [big], "127.0.0.1", 0)
    try:
        conn = socket.socket()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        conn.connect(("127.0.0.1", server.port))
        conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")  # (and never reads the answer)
        time.sleep(4)
        conn.close()
    finally:
        server.close()
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.timeout(60)
def test_a_strangers_connection_does_not_outlive_the_node(mesh: dict[str, Any]) -> None:
    """The metrics server ends the connections open too long as it serves; once the node
    stopped it serves no more, and a stranger trickling its request kept its connection,
    a thread and a descriptor of the process, for as long as it trickled. Stopping the node
    ends the connections open."""
    import socket
    import time

    node = zmqmesh.Node("scraped", **mesh, metrics_port=0).start()
    try:
        assert node.metrics_endpoint is not None
        port = int(node.metrics_endpoint.rsplit(":", 1)[1].split("/")[0])
        stranger = socket.create_connection(("127.0.0.1", port), timeout=10)
        stranger.sendall(b"GET /metrics HTTP/1.1\r\n")
        time.sleep(0.5)  # (taken: a thread reads its request)
    finally:
        node.stop()
    try:
        stranger.settimeout(0.3)
        ended = False
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not ended:
            try:
                stranger.sendall(b"X")  # (a byte of a header that never ends)
                ended = stranger.recv(1024) == b""
            except TimeoutError:
                pass
            except OSError:
                ended = True
        assert ended, "the connection outlived the node"
    finally:
        stranger.close()


def _accepted_connections(port: int) -> int:
    """The connections to ``port`` on 127.0.0.1 that this host still holds open on the
    accepting side (established, or closed by the far end and not yet by the acceptor),
    from the kernel's table."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        return sum(1 for line in list(table)[1:] if line.split()[1] == local and line.split()[3] in ("01", "08"))


def test_service_sent_never_goes_down_when_a_batch_caller_leaves_while_its_replies_wait(
        mesh: dict[str, Any], ctx: Any) -> None:
    """The replies to a batch of requests wait for the quick handlers of the batch, and
    were counted in ``service.sent`` as they began to wait: a caller gone meanwhile made
    them unroutable, and ``sent`` went down again (41, then 40), which Prometheus takes
    for a counter reset (``increase()`` then counts the whole counter again). They are
    counted as they go; those that cannot go, as dropped."""
    import threading

    import msgpack
    import zmq

    from zmqmesh._wire import frames as wire

    entered, release = threading.Event(), threading.Event()

    def echo(msg: zmqmesh.Message) -> Any:
        if msg.data == "slow":  # (the last of the batch: the reply before it waits for it)
            entered.set()
            release.wait(30)
        return msg.data

    with zmqmesh.Node("provider", **mesh) as node:
        node.service("echo", echo)
        endpoint = node.endpoints["service"]
        port = int(endpoint.rsplit(":", 1)[1])
        caller = ctx.socket(zmq.DEALER)
        caller.setsockopt(zmq.LINGER, 0)
        caller.connect(endpoint)
        try:
            for i in range(40):  # quick on each of its last runs: a reply waits for it
                caller.send_multipart([b"echo", b"w%d" % i, msgpack.packb(i)])
                assert caller.poll(10_000), "no reply"
                caller.recv_multipart()
            caller.send(wire.request_batch([(b"echo", b"r1", msgpack.packb("fast")),
                                            (b"echo", b"r2", msgpack.packb("slow"))]))
            assert entered.wait(10), "the batch's second handler never ran"
            before = node.stats()["service"]
        finally:
            caller.close()
        try:
            wait_until(lambda: _accepted_connections(port) == 0, 10, "the caller's connection gone at the provider")
        finally:
            release.set()
        wait_until(lambda: node.stats()["service"]["dropped"] >= 2, 10, "the replies to the gone caller dropped")
        after = node.stats()["service"]
        assert after["sent"] >= before["sent"], (before, after)
        assert (after["sent"], after["dropped"]) == (40, 2)


def _get_metrics(port: int, host: str, address: str = "127.0.0.1") -> tuple[bytes, bytes]:
    """A raw ``GET /metrics`` to ``address:port`` naming ``host`` in its ``Host`` header:
    ``(status line, body)``."""
    import socket

    with socket.create_connection((address, port), timeout=10) as conn:
        conn.sendall(f"GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


def test_a_loopback_metrics_server_answers_no_other_host_name(mesh: dict[str, Any]) -> None:
    """A web page whose own name its DNS turns into 127.0.0.1 (DNS rebinding) reads what
    it fetches from its name: a node's metrics server on loopback answered a request
    for ``rebound.example`` with its counters, and the topics they name (200, with
    ``payroll.alice``). It answers loopback names and its address only (403 otherwise),
    as the gateway does."""
    with zmqmesh.Node("scraped", **mesh, metrics_port=0) as node:
        node.subscribe("payroll.", lambda msg: None)
        node.publish("payroll.alice", 1)
        wait_until(lambda: node.stats()["pubsub"]["received"] == 1, 10, "the publication, counted")
        port = int(node.metrics_endpoint.rsplit(":", 1)[1].split("/")[0])  # type: ignore[union-attr]
        for host in (f"rebound.example:{port}", "rebound.example", f"127.0.0.1:{port}@rebound.example",
                     f"localhost.rebound.example:{port}"):
            status, body = _get_metrics(port, host)
            assert b" 403 " in status and b"payroll" not in body, (host, status)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
            status, body = _get_metrics(port, host)
            assert b" 200 " in status and b'name="payroll.alice"' in body, (host, status)
    with zmqmesh.Node("scraped6", **mesh, metrics_port=0, metrics_address="::1") as node:
        port = int(node.metrics_endpoint.rsplit(":", 1)[1].split("/")[0])  # type: ignore[union-attr]
        assert b" 200 " in _get_metrics(port, f"[::1]:{port}", "::1")[0]
        assert b" 403 " in _get_metrics(port, f"rebound.example:{port}", "::1")[0]


def test_node_stats_from_a_caller_that_takes_less_gets_the_counters_without_names(mesh: dict[str, Any]) -> None:
    """A node's stats answer went out whatever the caller's ``max_message_bytes``: past
    it (and its frame margin), 152,700 bytes to a caller that takes 64 KiB, the frame
    ended the caller's connection and `node_stats` waited out its timeout (5 s, then
    MeshTimeoutError; between the two, a DecodeError). The answer leaves the names out
    for such a caller (``names_omitted``), as for one too large for the node itself."""
    long = "x" * 190
    provider = zmqmesh.Node("provider", **mesh)
    provider.subscribe("", lambda msg: None)
    for i in range(260):
        provider.service(f"s{i:03d}-{long}", lambda msg: 1)
    caller = zmqmesh.Node("caller", max_message_bytes=65536, **mesh)
    with provider, caller:
        caller.wait_for_peers(1, timeout=15)
        wait_until(lambda: len(caller.providers(f"s259-{long}")) == 1, 15, "the provider's services")
        caller.wait_for_subscribers("t", 1, timeout=15)
        for i in range(260):  # names the provider counts: calls received, publications received and sent
            caller.request(f"s{i:03d}-{long}", i)
            caller.publish(f"t{i:03d}-{long}", i)
            provider.publish(f"p{i:03d}-{long}", i)
        wait_until(lambda: provider.stats()["pubsub"]["received"] >= 260, 15, "the publications")
        counters = caller.node_stats(provider.id, timeout=10)
        assert counters["names_omitted"] is True and counters["names"] == {}
        assert counters["service"]["received"] >= 260 and counters["id"] == provider.id
        assert "s000-" + long in provider.stats()["names"]["service"]["received"]  # (it keeps them)
        assert "names_omitted" not in provider.node_stats(provider.id)  # (a caller that takes them all)


def test_a_stopped_node_names_no_metrics_endpoint(mesh: dict[str, Any]) -> None:
    """``metrics_endpoint`` is None when the node serves no metrics: once it stopped, it
    still named the URL of its closed server (a scraper told of it found nothing there,
    and the port may be another program's by then)."""
    node = zmqmesh.Node("scraped", **mesh, metrics_port=0)
    assert node.metrics_endpoint is None  # (not started: nothing served yet)
    with node:
        url = node.metrics_endpoint
        assert url is not None and value(scrape(url), "zmqmesh_peers", node="scraped") == 0
    assert node.metrics_endpoint is None
