"""Names, ids and trace headers chosen by strangers: what they do to a node's logs,
counters and metrics. Each must reach them escaped and bounded, never raw or unbounded."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from helpers import wait_until

import zmqmesh
from zmqmesh._wire import frames as wire

pytestmark = pytest.mark.timeout(60)

FORGED = "\n2026-01-01 00:00:00 CRITICAL root: FORGED\x1b[2J"
"""A name that, written raw, would forge a log line (and clear a terminal)."""


def _raw_lines(records: list[logging.LogRecord]) -> list[str]:
    """The messages of ``records`` that carry the forged line raw."""
    return [r.getMessage() for r in records if "\nFORGED" in r.getMessage() or "\n2026" in r.getMessage()
            or "\x1b" in r.getMessage()]


def _gateway_peer_names(gateway: str) -> set[str]:
    """The names of the nodes the gateway at ``gateway`` lists (``/peers``)."""
    import json
    import urllib.request

    with urllib.request.urlopen(gateway + "/peers", timeout=10) as answer:
        return {p["name"] for p in json.loads(answer.read())}


def test_a_peers_name_reaches_the_log_escaped(mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="zmqmesh")
    with zmqmesh.Node("target", **mesh) as target:
        stranger = zmqmesh.Node("stranger" + FORGED, **mesh).start()
        target.wait_for_peers(1, timeout=15)
        stranger.stop()
        wait_until(lambda: not target.peers(), 15, "the stranger's departure")
    said = [r.getMessage() for r in caplog.records if "stranger" in r.getMessage()]
    assert any("joined from" in m for m in said) and any(") gone:" in m for m in said)  # (escaped, still said)
    assert _raw_lines([r for r in caplog.records if r.name == "zmqmesh.membership"]) == []


def test_hostile_trace_context_headers_neither_flood_nor_forge_a_traced_nodes_log(
        mesh: dict[str, Any], procs: list[Any]) -> None:
    """With traces on, OpenTelemetry logs each trace context field it cannot parse, raw, a
    line per message: a stranger's ``tracestate`` forged lines in a traced node's log, and
    any malformed field cost a line per message. They are left out before, counted, and
    said in one line; the well-formed ``traceparent`` beside them is still followed."""
    pytest.importorskip("opentelemetry.sdk", reason="the OpenTelemetry SDK is not installed")
    from pathlib import Path

    from helpers import ScriptProcess

    mid = ScriptProcess(Path(__file__).resolve().parent / "traced_node.py", "mid", mesh["mesh"], mesh["beacon_port"])
    procs.append(mid)
    mid.wait_for("READY")
    parent = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    hostile = [
        {"traceparent": parent, "tracestate": "a=b," + FORGED + ",c=d"},
        {"traceparent": parent, "tracestate": ",".join(f"k{i}=v" for i in range(40))},
        {"traceparent": parent, "baggage": "x" * 9000 + FORGED},
        {"traceparent": parent, "baggage": "a=b," + FORGED},
        {"traceparent": "00-" + "1" * 600},
    ]
    sent = 40
    with zmqmesh.Node("stranger", **mesh) as stranger:
        stranger.wait_for_subscribers("t.", 1, timeout=20)
        for i in range(sent):
            stranger.publish("t.x", i, headers=hostile[i % len(hostile)])
        for i in range(sent):
            stranger.push("jobs", i, headers=hostile[i % len(hostile)], timeout=10)
        wait_until(lambda: sum(line.startswith("GOT") for line in mid.lines) >= 2 * sent, 20, "every delivery")
    mid.close()
    wait_until(lambda: "DONE" in mid.lines, 20, "the spans")
    forged = [line for line in mid.lines if "FORGED" in line]
    otel_said = [line for line in mid.lines if "malformed trace context" not in line and (
        "w3c" in line or "Baggage" in line or "header exceeded" in line or "key/value pairs" in line)]
    assert forged == [] and otel_said == [], "\n".join(forged + otel_said)[:2000]
    assert sum("malformed trace context" in line for line in mid.lines) == 1  # (said once, counted)
    import json
    received = [json.loads(line[5:]) for line in mid.lines if line.startswith("SPAN ")]
    followed = [s for s in received if s["name"] in ("receive", "process jobs") and s["parent"] == "2" * 16]
    assert len(followed) == 2 * sent * 4 // 5  # (those whose traceparent was well-formed)


@pytest.mark.timeout(120)
def test_trace_context_of_long_runs_of_blanks_costs_a_traced_node_little(
        mesh: dict[str, Any], procs: list[Any]) -> None:
    """A ``baggage`` of a blank run (``a``, 8,000 spaces, ``b``) took the check of its
    form 0.1 to 0.3 s a message (a split at ``[ \\t]*,[ \\t]*``: n * n steps), and one
    well-formed with 4,000 blanks before a property took OpenTelemetry's own split 20 to
    110 ms: 400 such publications held a traced subscriber's handlers 24 s and more.
    Runs past 16 blanks are left out as malformed, before OpenTelemetry reads them (and
    counted); the rest costs microseconds."""
    pytest.importorskip("opentelemetry.sdk", reason="the OpenTelemetry SDK is not installed")
    from pathlib import Path

    from helpers import ScriptProcess

    mid = ScriptProcess(Path(__file__).resolve().parent / "traced_node.py", "mid", mesh["mesh"], mesh["beacon_port"])
    procs.append(mid)
    mid.wait_for("READY")
    parent = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    slow = [{"traceparent": parent, "baggage": "a" + " " * 8000 + "b"},
            {"traceparent": parent, "baggage": "k=v" + " " * 4000 + ";p"}]
    sent = 400
    with zmqmesh.Node("stranger", **mesh) as stranger:
        stranger.wait_for_subscribers("t.", 1, timeout=20)
        for i in range(sent):
            stranger.publish("t.x", i, headers=slow[i % 2])
        wait_until(lambda: sum(line.startswith("GOT") for line in mid.lines) >= sent, 20,
                   "every publication handled (each took 20 to 300 ms before)")
    mid.close()
    wait_until(lambda: "DONE" in mid.lines, 20, "the spans")
    assert sum("malformed trace context" in line for line in mid.lines) == 1  # (left out, counted, said once)


@pytest.mark.parametrize("name", ["é" * 128, "a\udc80", 123, b"node"], ids=["256-bytes", "surrogate", "int", "bytes"])
def test_a_node_name_no_hello_can_carry_is_refused_at_once(name: Any) -> None:
    """A name of more than 255 bytes was taken, and every HELLO of the node then failed
    (a traceback per beacon heard): it met no peer, ever."""
    with pytest.raises(zmqmesh.ConfigError, match="255 bytes"):
        zmqmesh.Node(name)
    with pytest.raises(zmqmesh.ConfigError, match="255 bytes"):
        zmqmesh.AsyncNode(name)


def test_a_node_named_with_255_bytes_meets_its_peers(mesh: dict[str, Any]) -> None:
    longest = "é" * 127 + "a"
    with zmqmesh.Node(longest, **mesh) as named, zmqmesh.Node("other", **mesh) as other:
        assert [p.name for p in other.wait_for_peers(1, timeout=15)] == [longest]
        assert named.wait_for_peers(1, timeout=15)


@pytest.mark.timeout(90)
def test_a_node_whose_groups_pass_what_a_peer_takes_in_a_hello_says_so(
        mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """The names a node offers are bounded by their count (2,000), not their length: 1,000
    at-least-once queues of 200-byte names (three groups each) before the start, and 700
    more after it, take its groups past the 1 MiB of names a peer takes in a HELLO. Every
    peer refuses that HELLO and never sees the node; the node said nothing of it (the
    review's finding: 1,999 such queues, no peer, nothing at the node). Now it logs an
    error and counts it once, ``zre.groups_past_hello``."""
    def queue(i: int) -> str:
        return f"{i:05d}" + "q" * 195

    fat = zmqmesh.Node("fat", **mesh)
    for i in range(1000):
        fat.pull(queue(i), lambda msg: None, at_least_once=True, ack_timeout_s=1.0, dead_letter="dead")
    with caplog.at_level(logging.ERROR, logger="zmqmesh.membership"), fat, zmqmesh.Node("peer", **mesh):
        fat.wait_for_peers(1, timeout=20)  # (within the bound yet: the peer sees it)
        assert not fat.stats()["zre"].get("groups_past_hello")
        for i in range(1000, 1700):
            fat.pull(queue(i), lambda msg: None, at_least_once=True, ack_timeout_s=1.0, dead_letter="dead")
        wait_until(lambda: fat.stats()["zre"].get("groups_past_hello") == 1, 30, "the node to say it")
        fresh = zmqmesh.Node("fresh", **mesh).start()  # (one that greets it from now on refuses its HELLO)
        try:
            wait_until(lambda: fresh.stats()["rejected"].get("zre_hello_too_large", 0) >= 1, 30, "the refusal")
        finally:
            fresh.stop()
    said = [r for r in caplog.records if "past the 1048576 a peer takes in a HELLO" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]


@pytest.mark.timeout(90)
def test_a_peer_that_claims_100_000_names_adds_no_series_to_the_gateways_metrics(gateway: str, spawn: Any) -> None:
    """The gateway's /metrics and dashboard show each node's counters as it answers for
    them: a stranger's answer naming 100,000 topics and 100,000 services made as many
    series of every scrape, and went to every /events stream each second. Counters past
    what a node of this version keeps are left out whole and counted, as those of another
    shape are; the other nodes' stay."""
    pytest.importorskip("aiohttp", reason="the gateway extra (aiohttp) is not installed")
    pytest.importorskip("prometheus_client", reason="the metrics extra is not installed")
    import json
    import urllib.request

    from helpers import next_event

    spawn("worker")
    spawn("inventor", invented_names=100_000)

    wait_until(lambda: {"worker", "inventor"} <= _gateway_peer_names(gateway), 15, "both nodes at the gateway")
    with urllib.request.urlopen(gateway + "/metrics", timeout=30) as scrape:
        text = scrape.read().decode()
    assert 'node="worker"' in text
    assert sum('node="inventor"' in line for line in text.splitlines()) == 0
    assert len(text) < 1_000_000
    with urllib.request.urlopen(gateway + "/events", timeout=30) as events:
        stats = next_event(events, "stats")
        while len(stats["nodes"]) < 2:  # (one from before the worker came)
            stats = next_event(events, "stats")
    assert len(stats["nodes"]) == 2  # the gateway and the worker
    assert stats["gateway"]["events"]["unreadable_stats"] >= 1
    assert len(json.dumps(stats)) < 100_000


@pytest.mark.timeout(90)
def test_a_peers_histograms_without_buckets_or_of_100_000_buckets_are_left_out_of_the_gateways_metrics(
        gateway: str, spawn: Any) -> None:
    """A stranger's answer to the stats service timing a service in a histogram without
    buckets made every scrape of the gateway's /metrics a 500 (prometheus_client's
    IndexError), the whole mesh's counters gone while it stayed; one timing it in 100,000
    buckets made 100,031 series of every scrape (13 MB), past the 4,096 samples a node's
    counters were bounded by (a histogram counted as one). Both are left out whole, and
    counted; the other nodes' stay."""
    pytest.importorskip("aiohttp", reason="the gateway extra (aiohttp) is not installed")
    pytest.importorskip("prometheus_client", reason="the metrics extra is not installed")
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from zmqmesh._observe.prometheus import MAX_SAMPLES

    spawn("worker")
    spawn("bucketless", stats_latency={"s": {"buckets": [], "sum": 0, "count": 0}})
    spawn("bucketed", latency_buckets=100_000)

    wait_until(lambda: {"worker", "bucketless", "bucketed"} <= _gateway_peer_names(gateway), 15, "the nodes at the gateway")
    with urllib.request.urlopen(gateway + "/metrics", timeout=30) as scrape:
        text = scrape.read().decode()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    nodes = {s.labels.get("node") for s in samples}
    assert "worker" in nodes and "bucketless" not in nodes and "bucketed" not in nodes
    assert len(samples) < MAX_SAMPLES
    assert [s.value for s in samples if s.name == "zmqmesh_gateway_events_total"
            and s.labels["event"] == "unreadable_stats"][0] >= 2


@pytest.mark.parametrize("fill", ["t", "\\", '"', "\n"], ids=["plain", "backslashes", "quotes", "newlines"])
def test_a_scrape_of_many_nodes_at_their_bounds_is_bounded_the_smallest_first(fill: str) -> None:
    """Each node's counters are bounded (8,192 samples, labels of 1,024 characters: some
    9 MB of text), not the nodes of a mesh: the gateway's /metrics of 16 strangers at
    those bounds was 145 MB of text, 650 MB resident, and of 1,024 peers would be 9 GB.
    A scrape holds `MAX_SCRAPE_CHARS` at most now, the smallest nodes' counters first:
    a small node stays, those that would pass the bound are left out whole and told.
    Labels of characters the text escapes (a backslash, a quote, a newline: two
    characters each) are sized as written (counted as read, they made 47.9 MiB).
    (The gateway itself holds no answer that large: test_gateway.py's
    test_the_nodes_answers_the_gateway_holds_stay_within_its_budget_the_smallest_kept.)"""
    pytest.importorskip("prometheus_client", reason="the metrics extra is not installed")
    from zmqmesh._observe.prometheus import MAX_SCRAPE_CHARS, metrics_text

    def node(name: str, names: int) -> dict[str, Any]:
        topics = {f"{name}-{i:08d}".ljust(1000, fill): 1 for i in range(names)}
        return {"id": name, "name": name, "names": {"pubsub": {"received": topics}}}

    fat = [f"fat{i}" for i in range(5)]
    told: list[str] = []
    text = metrics_text([*(node(name, 8000) for name in fat), node("worker", 1)],
                        unreadable=lambda snap, _exc: told.append(snap["name"])).decode()
    assert len(text) <= MAX_SCRAPE_CHARS, len(text)
    shown = {name for name in ("worker", *fat) if f'node="{name}"' in text}
    assert "worker" in shown and 0 < len(shown & set(fat)) < len(fat), shown
    assert sorted(told) == sorted(set(fat) - shown), told


@pytest.mark.parametrize("buckets", [[], [["x", 1], ["+Inf", 1]], [[0.1, 1]], [[0.5, 1], [0.1, 1], ["+Inf", 1]],
                                     [["nan", 1], ["+Inf", 1]], [["1" * 2000, 1], ["+Inf", 1]]])
def test_a_histogram_prometheus_client_cannot_read_leaves_out_its_node_alone(buckets: list[Any]) -> None:
    """Histograms without buckets, with a bound that is no number, none ``+Inf``, bounds
    that do not increase, or a bound past a label's length: their node is left out and
    told, the scrape of the others made (prometheus_client raised out of the scrape for
    the first two)."""
    pytest.importorskip("prometheus_client", reason="the metrics extra is not installed")
    from zmqmesh._observe.prometheus import metrics_text

    told: list[Exception] = []
    good = {"id": "a", "name": "good", "latency": {"s": {"buckets": [[0.1, 1], ["+Inf", 2]], "sum": 0.1, "count": 2}}}
    bad = {"id": "b", "name": "bad", "latency": {"s": {"buckets": buckets, "sum": 0.0, "count": 1}}}
    text = metrics_text([good, bad], unreadable=lambda snap, exc: told.append(exc)).decode()
    assert 'node="good"' in text and 'node="bad"' not in text
    assert len(told) == 1 and isinstance(told[0], ValueError)


def test_a_peers_stats_answer_that_is_not_a_map_is_a_decode_error(mesh: dict[str, Any], spawn: Any) -> None:
    """`node_stats` returns a peer's counters, a dict: a stranger's answer of another
    type (a number, a list, text, nil) came back as it was, for the caller's first
    ``["pubsub"]`` to fail with a TypeError far from its cause. It is a `DecodeError`,
    from `Node` and `AsyncNode` alike; a map of any shape still comes back."""
    import asyncio

    strangers = [spawn(f"odd{i}", stats_answer=answer) for i, answer in enumerate((5, [1, 2], "counters", None))]
    spawn("mapped", stats_answer={"pubsub": "elsewhere"})

    async def asked(peer: str) -> Any:
        async with zmqmesh.AsyncNode("asker", **mesh) as node:
            await node.wait_for_peers(6, timeout=15)
            return await node.node_stats(peer)

    with zmqmesh.Node("target", **mesh) as node:
        by_name = {p.name: p for p in node.wait_for_peers(5, timeout=15)}
        for stranger in strangers:
            with pytest.raises(zmqmesh.DecodeError, match="not a map"):
                node.node_stats(by_name[stranger.name])
        assert node.node_stats(by_name["mapped"]) == {"pubsub": "elsewhere"}
        with pytest.raises(zmqmesh.DecodeError, match="not a map"):
            asyncio.run(asked(by_name["odd0"].id))
        assert asyncio.run(asked(by_name["mapped"].id)) == {"pubsub": "elsewhere"}


@pytest.mark.timeout(90)
def test_a_peers_stats_answer_that_is_not_a_map_is_counted_unreadable_by_the_gateway(gateway: str, spawn: Any) -> None:
    """The gateway counts (``unreadable_stats``) and logs the nodes whose counters it
    leaves out of /metrics and the dashboard: one that answered the stats service with
    what is not a map at all (a number) was left out silently, counted nowhere (0 after
    three scrapes, where a node answering a map of another shape counted 1 a scrape)."""
    pytest.importorskip("aiohttp", reason="the gateway extra (aiohttp) is not installed")
    pytest.importorskip("prometheus_client", reason="the metrics extra is not installed")
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    spawn("worker")
    spawn("five", stats_answer=5)

    def unreadable() -> float:
        with urllib.request.urlopen(gateway + "/metrics", timeout=30) as scrape:
            text = scrape.read().decode()
        assert 'node="worker"' in text and 'node="five"' not in text
        return next(s.value for family in text_string_to_metric_families(text) for s in family.samples
                    if s.name == "zmqmesh_gateway_events_total" and s.labels["event"] == "unreadable_stats")

    wait_until(lambda: {"worker", "five"} <= _gateway_peer_names(gateway), 15, "both nodes at the gateway")
    wait_until(lambda: unreadable() >= 1, 15, "the node that answered a number, counted unreadable")


def test_topics_of_invalid_utf8_that_read_alike_keep_their_counts(mesh: dict[str, Any]) -> None:
    """A topic is counted under its bytes and shown as text, the undecodable bytes as
    U+FFFD: two topics that read alike so (``t\\xff``, ``t\\xfe``) showed the count of
    the last one only, the other's messages gone from ``names`` silently."""
    import msgpack
    import zmq

    got: list[str] = []
    with zmqmesh.Node("target", **mesh) as target:
        target.subscribe("t", lambda msg: got.append(msg.topic))
        ctx = zmq.Context.instance()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        try:
            pub.connect(target.endpoints["sub"])
            wait_until(lambda: pub.send_multipart([b"warm", b"", msgpack.packb(0)]) or pub.poll(0, zmq.POLLOUT),
                       5, "the connection")
            import time
            time.sleep(0.5)  # (the subscription reaches the plain PUB)
            for topic, count in ((b"t\xff", 5), (b"t\xfe", 3)):
                for i in range(count):
                    pub.send_multipart([topic, b"", msgpack.packb(i)])
            wait_until(lambda: len(got) == 8, 10, "the 8 messages")
        finally:
            pub.close(0)
        received = target.stats()["names"]["pubsub"]["received"]
    assert got == ["t\ufffd"] * 8
    assert received == {"t\ufffd": 8}


@pytest.mark.timeout(90)
def test_a_peer_answering_for_another_node_is_shown_as_itself(gateway: str, spawn: Any) -> None:
    """The gateway showed each node's counters under the id and name its answer claimed:
    a stranger answering in the worker's id and name took the worker's place on the
    dashboard, and doubled the worker's series in /metrics (the same labels, two values).
    Counters are shown under the id and name of the node that was asked."""
    pytest.importorskip("aiohttp", reason="the gateway extra (aiohttp) is not installed")
    pytest.importorskip("prometheus_client", reason="the metrics extra is not installed")
    import urllib.request

    from helpers import next_event

    worker = spawn("worker")
    liar = spawn("liar", claims={"id": worker.id, "name": "worker"})

    wait_until(lambda: {"worker", "liar"} <= _gateway_peer_names(gateway), 15, "both nodes at the gateway")
    with urllib.request.urlopen(gateway + "/metrics", timeout=30) as scrape:
        text = scrape.read().decode()
    sent = [line for line in text.splitlines()
            if line.startswith("zmqmesh_messages_total{") and 'event="sent"' in line and 'pattern="pubsub"' in line]
    assert sum(f'node_id="{worker.id}"' in line for line in sent) == 1, sent
    assert any(f'node_id="{liar.id}"' in line and 'node="liar"' in line and "999999" in line for line in sent)
    with urllib.request.urlopen(gateway + "/events", timeout=30) as events:
        stats = next_event(events, "stats")
        while len(stats["nodes"]) < 3:  # (one from before both came)
            stats = next_event(events, "stats")
    assert stats["nodes"][worker.id]["pubsub"]["sent"] != 999_999
    assert stats["nodes"][liar.id]["pubsub"]["sent"] == 999_999


@pytest.mark.timeout(90)
def test_a_providers_failure_reaches_the_gateways_log_bounded_and_set_off(mesh: dict[str, Any]) -> None:
    """The gateway logs the failure of each call a client makes to a handler that raised,
    with what its provider sent: the message and traceback, raw and whole (up to 16 MiB a
    call), so a provider wrote what lines it liked into the gateway's log, as large as it
    liked, at each call. They are logged cut, and set off line by line."""
    pytest.importorskip("aiohttp", reason="the gateway extra (aiohttp) is not installed")
    import signal
    import urllib.error
    import urllib.request

    from helpers import gateway_url_and_process

    def boom(msg: zmqmesh.Message) -> None:
        raise ValueError("huge" + FORGED + "x" * 1_000_000)

    import threading

    with zmqmesh.Node("provider", **mesh) as provider, gateway_url_and_process(mesh) as (url, proc):
        assert proc.stdout is not None
        said: list[str] = []
        reader = threading.Thread(target=lambda: said.extend(proc.stdout), daemon=True)  # type: ignore[union-attr]
        reader.start()
        provider.service("boom", boom)
        request = urllib.request.Request(url + "/request/boom?timeout=20", data=b"null", method="POST",
                                         headers={"Content-Type": "application/json"})
        statuses = []
        for _ in range(20):  # (until the gateway meets the provider)
            try:
                urllib.request.urlopen(request, timeout=30).close()
            except urllib.error.HTTPError as error:
                statuses.append(error.code)
                error.close()
                if error.code == 500:
                    break
            import time
            time.sleep(0.5)
        assert statuses[-1] == 500, statuses
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        reader.join(10)
        logged = "".join(said)
    assert "huge" in logged
    assert len(logged) < 50_000, len(logged)
    assert not any(line.startswith(("FORGED", "2026")) for line in logged.splitlines())
    assert "\x1b" not in logged


def test_a_pullers_failure_reaches_the_dead_letter_log_line_escaped(
        tmp_path: Any, mesh: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """A durable message dead-lettered is logged with the failure its puller reported: a
    text of the puller's choosing (another node's), which written raw forged a log line."""
    caplog.set_level(logging.WARNING, logger="zmqmesh")
    puller = zmqmesh.Node("puller", **mesh)

    @puller.pull("orders", at_least_once=True, max_deliveries=1)
    def handle(msg: zmqmesh.Message) -> None:
        raise ValueError("no" + FORGED)

    with puller, zmqmesh.Node("pusher", store=str(tmp_path), **mesh) as pusher:
        pusher.push("orders", "poison", durable=True)
        wait_until(lambda: pusher.stats()["pipeline"].get("dead_lettered", 0) == 1, 20, "the dead letter")
    said = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert said and "FORGED" in said[0]  # (said, escaped)
    assert _raw_lines([r for r in caplog.records if r.name.startswith("zmqmesh")]) == []


@pytest.mark.parametrize("stamp", [float("nan"), float("inf"), -float("inf"), True, "1700000000", None, 10**400])
def test_a_senders_clock_that_is_no_finite_number_reaches_handlers_as_none(stamp: Any) -> None:
    """A message's ``timestamp`` is the sender's ``time.time()``: a stranger's NaN or
    infinity reached handlers as it was, to turn every latency they computed into NaN."""
    headers, timestamp, _first = wire.parse_meta({"h": [None], "t": stamp}, 1)
    assert timestamp is None and wire.sent_at(stamp) is None


def test_a_senders_clock_that_is_a_number_is_kept() -> None:
    assert wire.parse_meta({"h": [None], "t": 1700000000}, 1)[1] == 1700000000.0
    assert wire.sent_at(1700000000.25) == 1700000000.25


_CLOCKS = [(float("nan"), None), (float("inf"), None), (-float("inf"), None), (1700000000.25, 1700000000.25)]
"""A raw sender's clocks, and the timestamp a handler must see for each (the finite one
shows the raw peer's clock is read at all)."""


def _raw_dealer(ctx: Any, endpoint: str) -> Any:
    import zmq

    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    return dealer


@pytest.mark.parametrize(("stamp", "expected"), _CLOCKS, ids=["nan", "inf", "-inf", "finite"])
def test_a_requests_clock_that_is_no_finite_number_reaches_the_handler_as_none(
        mesh: dict[str, Any], ctx: Any, stamp: float, expected: float | None) -> None:
    # a request's meta frame (docs/protocol.md: {"h", "t", "v"}) from a raw peer: its "t"
    # of NaN or an infinity reached the handler as msg.timestamp, as it was
    import msgpack

    seen: list[Any] = []
    node = zmqmesh.Node("provider", **mesh)
    node.service("clock", lambda m: seen.append(m.timestamp))
    with node:
        dealer = _raw_dealer(ctx, node.endpoints["service"])
        try:
            dealer.send_multipart([b"clock", b"r1", msgpack.packb(None), msgpack.packb({"h": {}, "t": stamp})])
            assert dealer.poll(5000), "no reply"
            reply = dealer.recv_multipart()
            assert reply[:2] == [b"r1", b"\x00"], reply
        finally:
            dealer.close(0)
    assert seen == [expected], seen


@pytest.mark.parametrize(("stamp", "expected"), _CLOCKS, ids=["nan", "inf", "-inf", "finite"])
def test_an_at_least_once_items_clock_that_is_no_finite_number_reaches_the_handler_as_none(
        mesh: dict[str, Any], ctx: Any, stamp: float, expected: float | None) -> None:
    # a durable at-least-once item [redelivered, data, id, timestamp, headers, attempts]
    # dealt by a raw peer: its timestamp of NaN or an infinity reached the handler as it was
    import msgpack

    seen: list[Any] = []
    node = zmqmesh.Node("puller", **mesh)
    node.pull("jobs", lambda m: seen.append(m.timestamp), at_least_once=True)
    with node:
        dealer = _raw_dealer(ctx, node.endpoints["service"])
        try:
            item = [False, {"i": 1}, "stranger-item-1", stamp, None, 0]
            dealer.send_multipart([b"\x00queue/jobs", (1).to_bytes(8, "big"), msgpack.packb(item)])
            assert dealer.poll(5000), "no acknowledgement"
            reply = dealer.recv_multipart()
            assert reply[1] == b"\x00", reply  # (acknowledged: the handler returned)
        finally:
            dealer.close(0)
    assert seen == [expected], seen
