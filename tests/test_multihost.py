"""Meshes across hosts: real node processes on virtual hosts (Linux network namespaces).

Each test builds its own little network with `netns.Lab`: hosts are namespaces, switches
are bridges in namespaces of their own, cables are veth pairs, addresses are 10.20x.y.z.
Nodes run as separate processes inside the hosts (``ip netns exec HOST python3
host_node.py``), join the network with ``interface=``, and are driven over a JSON line
protocol. Everything is removed afterwards, also on failure; nothing is ever created in,
or sent on, the root namespace.

1. Broadcast discovery on a chosen interface: every node advertises its host's 10.x
   address (peer.address, mailbox, and the X-ZMQMESH-* endpoints), never 127.0.0.1 or
   0.0.0.0, and listens only there.
2. A multi-homed host: a node told ``interface=`` advertises, binds and connects from that
   interface's address; it is invisible on its host's other subnet.
3. Two subnets joined by a router (no broadcast between them) form one mesh through one
   seed and gossip.
4. Partition and heal: a host's cable is pulled; both sides see the departure within the
   peer timeout; after plugging it back in, everyone rejoins at the next beacons with no
   ghost, duplicate or flapping peer (exactly one leave and one rejoin per pair across
   the cut); pub/sub, push/pull and request/reply work across hosts before and after.
5. The deployment example (examples/multihost: three launch files, two sites) runs as its
   README says, with ``zmqmesh launch`` on each host.

Needs root (CI runs these as root); skipped with the reason otherwise.
"""

from __future__ import annotations

import re
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netns
import pytest
from netns import HostNode, Lab

import zmqmesh

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "multihost"
HEARTBEAT_S = 0.5
PEER_TIMEOUT_S = 2.0
BEACON_INTERVAL_S = 1.0
DETECTION_SLACK_S = 1.5
FORBIDDEN = ("127.0.0.1", "0.0.0.0")
ENDPOINT_HEADERS = ("X-ZMQMESH-PUB", "X-ZMQMESH-SUB", "X-ZMQMESH-PULL", "X-ZMQMESH-SERVICE")


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh virtual network, torn down (processes killed, namespaces deleted) whatever happens."""
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(f"multi-host tests need network namespaces (CI runs them as root): {reason}")
    netns.sweep_stale()
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


def mesh_options(**extra: Any) -> dict[str, Any]:
    """Options every node of one test shares: its own mesh name, fast failure detection.

    The beacon port stays ZRE's 5670: each lab is a private network.
    """
    return {
        "mesh": f"mh-{uuid.uuid4().hex[:10]}",
        "beacon_port": 5670,
        "beacon_interval_s": BEACON_INTERVAL_S,
        "heartbeat_interval_s": HEARTBEAT_S,
        "peer_timeout_s": PEER_TIMEOUT_S,
        **extra,
    }


def start_all(nodes: list[HostNode]) -> list[HostNode]:
    for node in nodes:
        node.ready()
    return nodes


def wait_full_mesh(nodes: list[HostNode], timeout: float) -> None:
    """Wait until every node's present peers (by join/leave events) are exactly the others."""
    for node in nodes:
        node.wait_peers({n.id for n in nodes if n is not node}, timeout, f"all {len(nodes) - 1} other nodes")


def check_peer_view(node: HostNode, expected: list[HostNode]) -> list[dict[str, Any]]:
    """``node.peers()`` is exactly ``expected`` (no ghost, no duplicate), each at its host's address."""
    peers = node.peers()
    ids = [p["id"] for p in peers]
    assert len(ids) == len(set(ids)), f"{node.name}: duplicate peers {sorted(ids)}"
    assert set(ids) == {n.id for n in expected}, (
        f"{node.name} sees {sorted(p['name'] for p in peers)}, expected {sorted(n.name for n in expected)}\n"
        + node.output(40)
    )
    by_id = {n.id: n for n in expected}
    for peer in peers:
        other = by_id[peer["id"]]
        address = other.advertised
        assert peer["name"] == other.name
        assert peer["address"] == address, f"{node.name} reaches {other.name} at {peer['address']}, not {address}"
        assert peer["endpoint"] == other.mailbox, f"{node.name}: {other.name}'s mailbox is {peer['endpoint']}"
        for header in ENDPOINT_HEADERS:
            value = peer["headers"].get(header, "")
            assert value.startswith(f"tcp://{address}:"), f"{node.name}: {other.name}'s {header} is {value!r}"
        for value in [peer["address"], peer["endpoint"], *peer["headers"].values()]:
            assert not any(bad in value for bad in FORBIDDEN), f"{node.name}: {other.name} advertises {value!r}"
    return peers


def check_own_endpoints(node: HostNode) -> None:
    """The node's own endpoints are on its interface, and so are its listening sockets."""
    address = node.advertised
    for key, endpoint in node.endpoints.items():
        assert endpoint.startswith(f"tcp://{address}:"), f"{node.name}: {key} endpoint {endpoint}"
    sockets = node.call("sockets")
    listening = [s for s in sockets if s["listening"]]
    assert len(listening) >= 5, f"{node.name}: listening sockets {listening}"
    for sock in listening:
        assert sock["address"] == address, f"{node.name} listens on {sock['address']}:{sock['port']}"
    for sock in sockets:
        if sock["proto"] == "udp":  # the beacon socket hears this interface's broadcasts only
            assert sock["address"] not in FORBIDDEN, f"{node.name}: beacon socket bound to {sock['address']}"


def events_between(node: HostNode, kind: str, peer: HostNode) -> list[dict[str, Any]]:
    return node.find(kind, peer_id=peer.id)


def stays(condition: Any, duration: float, what: str, nodes: list[HostNode]) -> None:
    """``condition()`` holds (checked every 50 ms) for ``duration`` seconds: a bounded negative check."""
    end = time.monotonic() + duration
    while time.monotonic() < end:
        assert condition(), f"{what} stopped holding\n" + "\n".join(n.output(10) for n in nodes)
        time.sleep(0.05)


# -- 1. discovery by broadcast on a chosen interface --------------------------------------------


@pytest.mark.timeout(60)
def test_broadcast_discovery_on_a_chosen_interface_advertises_the_host_address(lab: Lab) -> None:
    switch = lab.switch()
    hosts = [lab.host(name) for name in ("a", "b", "c")]
    for i, host in enumerate(hosts, start=1):
        lab.wire(host, "lan0", switch, f"10.201.0.{i}/24")
    a, b, c = hosts
    options = mesh_options()
    # Host b is configured the way `zmqmesh launch` does it: ZMQMESH_* variables only.
    env_b = {
        "ZMQMESH_INTERFACE": "lan0",
        "ZMQMESH_MESH": options["mesh"],
        "ZMQMESH_BEACON_PORT": str(options["beacon_port"]),
        "ZMQMESH_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
        "ZMQMESH_PEER_TIMEOUT_S": str(PEER_TIMEOUT_S),
    }
    nodes = start_all([
        lab.node(a, "a1", {**options, "interface": "lan0"}, service=["echo.a1"]),
        lab.node(a, "a2", {**options, "interface": "lan0"}),  # two nodes share host a's beacon port
        lab.node(b, "b1", env=env_b),
        lab.node(c, "c1", {**options, "interface": "lan0"}),
    ])
    wait_full_mesh(nodes, timeout=15)

    for node in nodes:
        check_own_endpoints(node)
        check_peer_view(node, [n for n in nodes if n is not node])
    reply = nodes[3].call("request", service="echo.a1", data="from c", timeout=5)
    assert reply == {"echo": "from c", "by": "a1", "host": reply["host"]}


# -- 2. a multi-homed host ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_multihomed_host_advertises_and_uses_the_named_interface(lab: Lab) -> None:
    switch_a, switch_b = lab.switch("swa"), lab.switch("swb")
    m, x, y = lab.host("m"), lab.host("x"), lab.host("y")
    lab.wire(m, "lana", switch_a, "10.202.1.1/24")
    lab.wire(m, "lanb", switch_b, "10.202.2.1/24")
    # m's default route (and so its "primary" address) is on subnet A: a node that guessed
    # its address from the routing table would advertise 10.202.1.1 on subnet B too.
    m.ip("route", "add", "default", "via", "10.202.1.254", "dev", "lana")
    lab.wire(x, "eth0", switch_a, "10.202.1.2/24")
    lab.wire(y, "eth0", switch_b, "10.202.2.2/24")
    options = mesh_options()
    mb = lab.node(m, "m-b", {**options, "interface": "lanb"}, ifname="lanb", service=["who"])
    ma = lab.node(m, "m-a", {**options, "interface": "lana"}, ifname="lana")
    nx = lab.node(x, "x", {**options, "interface": "eth0"})
    ny = lab.node(y, "y", {**options, "interface": "eth0"})
    nodes = start_all([mb, ma, nx, ny])

    ny.wait_peers({mb.id}, 15)
    mb.wait_peers({ny.id}, 15)
    nx.wait_peers({ma.id}, 15)
    ma.wait_peers({nx.id}, 15)
    for node, other in ((mb, ny), (ny, mb), (ma, nx), (nx, ma)):
        check_own_endpoints(node)
        check_peer_view(node, [other])
    assert ny.call("request", service="who", data=1, timeout=5)["by"] == "m-b"

    # Every TCP connection y has is with m's subnet-B address: m-b's sockets connect from
    # the interface it was told, never from the default route's address.
    established = [s for s in ny.call("sockets") if s["established"]]
    assert established, "y has no TCP connection to m-b"
    assert {s["remote"] for s in established} == {"10.202.2.1"}, established
    # The subnets stay apart: beacons of one interface are not heard on the other.
    stays(
        lambda: ny.joined_ids() == {mb.id} and nx.joined_ids() == {ma.id} and mb.joined_ids() == {ny.id},
        2 * BEACON_INTERVAL_S + 0.5,
        "the two subnets staying separate meshes",
        nodes,
    )


# -- 3. two subnets, one router, seeds and gossip -----------------------------------------------


@pytest.mark.timeout(60)
def test_two_subnets_behind_a_router_form_one_mesh_through_one_seed(lab: Lab) -> None:
    sw1, sw2 = lab.switch("sw1"), lab.switch("sw2")
    router = lab.host("r")
    lab.wire(router, "eth1", sw1, "10.203.1.254/24")
    lab.wire(router, "eth2", sw2, "10.203.2.254/24")
    lab.sysctl(router, "net.ipv4.ip_forward=1")
    hosts = {}
    for subnet, sw, names in ((1, sw1, ("a1", "a2")), (2, sw2, ("b1", "b2"))):
        for i, name in enumerate(names, start=1):
            host = hosts[name] = lab.host(name)
            lab.wire(host, "eth0", sw, f"10.203.{subnet}.{i}/24")
            host.ip("route", "add", "default", "via", f"10.203.{subnet}.254")
    options = mesh_options(interface="eth0")  # discovery stays on: beacons within each subnet
    a1 = lab.node(hosts["a1"], "a1", options)
    a2 = lab.node(hosts["a2"], "a2", options, service=["svc.a2"], pull=["jobs.a2"])
    b2 = lab.node(hosts["b2"], "b2", options, service=["svc.b2"], subscribe=["news."])
    start_all([a1, a2, b2])
    a1.wait_peers({a2.id}, 15)
    a2.wait_peers({a1.id}, 15)
    assert b2.joined_ids() == set(), "b2 met subnet 1 without a seed"

    # b1 is the only node told about the other subnet: one seed, a1's mailbox.
    b1 = lab.node(hosts["b1"], "b1", {**options, "seeds": [a1.mailbox]})
    nodes = [a1, a2, b1, b2]
    b1.ready()
    wait_full_mesh(nodes, timeout=20)
    for node in nodes:
        check_peer_view(node, [n for n in nodes if n is not node])

    # Nodes that only heard of each other through gossip talk directly, across the router.
    assert b2.call("request", service="svc.a2", data="b2->a2", timeout=5)["by"] == "a2"
    assert a2.call("request", service="svc.b2", data="a2->b2", timeout=5)["by"] == "b2"
    b2.call("wait_for_pullers", queue="jobs.a2", n=1, timeout=10)
    b2.call("push", queue="jobs.a2", data={"job": 1}, timeout=5)
    a2.wait_for(lambda: a2.find("pull", queue="jobs.a2", data={"job": 1}), 10, "the job from b2")
    a1.call("wait_for_subscribers", topic="news.x", n=1, timeout=10)
    a1.call("publish", topic="news.x", data="over the router")
    b2.wait_for(lambda: b2.find("sub", topic="news.x", data="over the router"), 10, "a1's news")


# -- 4. partition and heal ----------------------------------------------------------------------


def exchange(tag: str, a1: HostNode, c1: HostNode, everyone: list[HostNode]) -> None:
    """pub/sub, push/pull and request/reply from host a to host c and back; each delivered once."""
    for sender, receiver, side in ((a1, c1, "a"), (c1, a1, "c")):
        topic = f"news.{side}.{tag}"
        sender.call("wait_for_subscribers", topic=topic, n=len(everyone), timeout=15)
        sender.call("publish", topic=topic, data={"tag": tag, "from": sender.name})
        other = "c" if side == "a" else "a"
        sender.call("wait_for_pullers", queue=f"jobs.{other}", n=1, timeout=15)
        sender.call("push", queue=f"jobs.{other}", data={"tag": tag, "from": sender.name}, timeout=5)
        reply = sender.call("request", service=f"echo.{other}", data={"tag": tag}, timeout=5)
        assert reply["by"] == receiver.name and reply["echo"] == {"tag": tag}, reply
        job = {"tag": tag, "from": sender.name}
        receiver.wait_for(lambda receiver=receiver, other=other, job=job: receiver.find("pull", queue=f"jobs.{other}", data=job), 10, f"the {tag} job")
        assert len(receiver.find("pull", queue=f"jobs.{other}", data=job)) == 1, f"{receiver.name} got {job} twice"
    for node in everyone:
        for side, sender in (("a", a1), ("c", c1)):
            topic = f"news.{side}.{tag}"
            node.wait_for(lambda node=node, topic=topic: node.find("sub", topic=topic), 10, f"{topic} at {node.name}")
            got = node.find("sub", topic=topic)
            assert len(got) == 1 and got[0]["data"] == {"tag": tag, "from": sender.name}, got


@pytest.mark.timeout(90)
def test_partition_is_detected_on_both_sides_and_heals_without_ghosts_or_storms(lab: Lab) -> None:
    switch = lab.switch()
    hosts = {name: lab.host(name) for name in ("a", "b", "c")}
    for i, host in enumerate(hosts.values(), start=1):
        lab.wire(host, "eth0", switch, f"10.204.0.{i}/24")
    options = mesh_options(interface="eth0")
    roles = {"a1": {"pull": ["jobs.a"], "service": ["echo.a"]}, "c1": {"pull": ["jobs.c"], "service": ["echo.c"]}}
    nodes = []
    for host in hosts.values():
        for k in (1, 2):
            name = f"{host.short}{k}"
            nodes.append(lab.node(host, name, options, subscribe=["news."], **roles.get(name, {})))
    start_all(nodes)
    by_name = {n.name: n for n in nodes}
    a1, c1 = by_name["a1"], by_name["c1"]
    side_c = [n for n in nodes if n.host.short == "c"]
    side_ab = [n for n in nodes if n.host.short != "c"]
    wait_full_mesh(nodes, timeout=20)
    exchange("before", a1, c1, nodes)

    # Pull host c's cable out of the switch. c1 and c2 still talk (same host).
    cut = time.monotonic()
    switch.detach(hosts["c"], "eth0")
    for node in side_ab:
        node.wait_peers({n.id for n in side_ab if n is not node}, PEER_TIMEOUT_S + 8, "the departure of host c")
    for node in side_c:
        node.wait_peers({n.id for n in side_c if n is not node}, PEER_TIMEOUT_S + 8, "the departure of hosts a and b")
    detection: dict[str, float] = {}
    for observer in nodes:
        for gone in (side_c if observer in side_ab else side_ab):
            leaves = [e for e in events_between(observer, "leave", gone) if e["t"] >= cut]
            assert len(leaves) == 1, f"{observer.name} saw {gone.name} leave {len(leaves)} times"
            detection[f"{observer.name} saw {gone.name} leave"] = leaves[0]["t"] - cut
    slowest = max(detection.values())
    assert slowest < PEER_TIMEOUT_S + DETECTION_SLACK_S, f"departures seen too late: {detection}"
    with pytest.raises(netns.NodeError, match="NoProviderError"):
        a1.call("request", service="echo.c", data="nobody there", timeout=0.5)

    # Plug it back in: everyone rejoins, once.
    heal = time.monotonic()
    switch.attach(hosts["c"], "eth0")
    wait_full_mesh(nodes, timeout=15)
    rejoin = max(
        max(e["t"] for e in events_between(observer, "join", other)) - heal
        for observer in nodes for other in nodes if other.host is not observer.host
    )
    for node in nodes:
        check_peer_view(node, [n for n in nodes if n is not node])
    exchange("after", a1, c1, nodes)

    # No flapping afterwards: watch until the peer timeout has passed twice since the rejoin.
    quiet_until = heal + rejoin + 2 * PEER_TIMEOUT_S
    stays(lambda: all(len(n.joined_ids()) == len(nodes) - 1 for n in nodes), max(0.0, quiet_until - time.monotonic()),
          "the healed mesh staying whole", nodes)
    for observer in nodes:
        for other in nodes:
            if other is observer:
                continue
            across = (observer in side_c) != (other in side_c)
            joins = len(events_between(observer, "join", other))
            leaves = len(events_between(observer, "leave", other))
            expected = (2, 1) if across else (1, 0)
            assert (joins, leaves) == expected, (
                f"{observer.name} saw {other.name} join {joins}x and leave {leaves}x, expected {expected}\n"
                f"rejected input: {observer.call('stats').get('rejected')}\n{observer.output(40)}"
            )
    print(f"\npartition: slowest detection {slowest:.2f} s (timeout {PEER_TIMEOUT_S} s), rejoin {rejoin:.2f} s")
    # The first beacon after the heal starts the greeting, which takes milliseconds: a
    # rejoin slower than that waited for stale state (e.g. a half-open connection) to expire.
    assert rejoin < BEACON_INTERVAL_S + 1.5, f"rejoin took {rejoin:.2f} s after the heal"


@pytest.mark.timeout(60)
def test_a_dead_link_behind_live_beacons_is_seen_as_dead(lab: Lab) -> None:
    """Host b stops passing TCP while its beacons (UDP) still go out: each side must see
    the other leave within about the peer timeout (the kernel's keepalive probes and
    user timeout take the link down; a beacon alone does not keep a peer whose link is
    dead), stay apart while TCP
    is blocked, and rejoin once it passes again."""
    switch = lab.switch()
    hosts = [lab.host(name) for name in ("a", "b")]
    for i, host in enumerate(hosts, start=1):
        lab.wire(host, "eth0", switch, f"10.208.0.{i}/24")
    options = mesh_options(interface="eth0")
    a, b = start_all([lab.node(host, f"{host.short}1", options) for host in hosts])
    wait_full_mesh([a, b], timeout=20)

    # TCP out of b goes to a class whose queue holds no packet, so every one is dropped
    # (the kernel here has no tc drop action); UDP passes. (A queue of one packet let
    # htb's default burst, 1.6 kB, through: the class has no burst either.)
    tc = ["tc", "-n", hosts[1].ns]
    netns.run([*tc, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10"])
    netns.run([*tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit"])
    netns.run([*tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:20", "htb", "rate", "8bit",
               "ceil", "8bit", "burst", "1", "cburst", "1"])
    netns.run([*tc, "qdisc", "add", "dev", "eth0", "parent", "1:20", "handle", "20:", "pfifo", "limit", "0"])
    cut = time.monotonic()
    netns.run([*tc, "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
               "match", "ip", "protocol", "6", "0xff", "flowid", "1:20"])
    a.wait_peers(set(), PEER_TIMEOUT_S + 8, "b to be seen as gone")
    b.wait_peers(set(), PEER_TIMEOUT_S + 8, "a to be seen as gone")
    detection = {f"{x.name} saw {y.name} leave": events_between(x, "leave", y)[0]["t"] - cut for x, y in ((a, b), (b, a))}
    # the link is down within the peer timeout, and the peer gone a grace period later
    grace = zmqmesh.NodeConfig().disconnect_grace_s
    assert max(detection.values()) < PEER_TIMEOUT_S + grace + 0.7, f"the dead link was seen too late: {detection}"
    stays(lambda: not a.joined_ids() and not b.joined_ids(), 2 * BEACON_INTERVAL_S, "the two staying apart", [a, b])

    netns.run([*tc, "qdisc", "del", "dev", "eth0", "root"])
    wait_full_mesh([a, b], timeout=15)
    print(f"\ndead link behind live beacons: {detection}")


# -- 5. the deployment example ------------------------------------------------------------------


def launch_file(tmp_path: Path, name: str, seed: str | None = None) -> Path:
    """A copy of examples/multihost/NAME runnable from anywhere (and with the real seed)."""
    text = (EXAMPLE / name).read_text().replace("python3 fleet.py", f"python3 {EXAMPLE / 'fleet.py'}")
    if seed is not None:
        text, count = re.subn(r'(?m)^seeds = \[.*\]', f'seeds = ["{seed}"]', text)
        assert count == 1, f"{name} has no seeds line"
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.timeout(90)
def test_the_multihost_example_runs_on_two_sites_with_zmqmesh_launch(lab: Lab, tmp_path: Path) -> None:
    # The README's network: site 1 = 10.0.1.0/24 (hosts a, b), site 2 = 10.0.2.0/24 (host c), one router.
    site1, site2 = lab.switch("sw1"), lab.switch("sw2")
    router = lab.host("r")
    lab.wire(router, "eth1", site1, "10.0.1.1/24")
    lab.wire(router, "eth2", site2, "10.0.2.1/24")
    lab.sysctl(router, "net.ipv4.ip_forward=1")
    hosts = {}
    for short, switch, cidr, gateway in (("a", site1, "10.0.1.10/24", "10.0.1.1"),
                                         ("b", site1, "10.0.1.11/24", "10.0.1.1"),
                                         ("c", site2, "10.0.2.10/24", "10.0.2.1")):
        host = hosts[short] = lab.host(short)
        lab.wire(host, "eth0", switch, cidr)
        host.ip("route", "add", "default", "via", gateway)

    def launch(short: str, path: Path) -> netns.LabProcess:
        return lab.spawn(hosts[short], [sys.executable, "-m", "zmqmesh", "launch", str(path)], label=f"host-{short}")

    host_a = launch("a", launch_file(tmp_path, "host-a.toml"))
    seed = host_a.wait_line(r"anchor: ready, mailbox (tcp://10\.0\.1\.10:\d+)", 30).group(1)
    host_b = launch("b", launch_file(tmp_path, "host-b.toml"))
    host_c = launch("c", launch_file(tmp_path, "host-c.toml", seed=seed))
    launchers = [host_a, host_b, host_c]
    try:
        done = host_c.wait_line(r"producer: 60 jobs done by (\d+) workers on (\d+) hosts", 60)
        assert (done.group(1), done.group(2)) == ("6", "3"), done.group(0)
        for address in ("10.0.1.10", "10.0.1.11", "10.0.2.10"):  # fleet.status, from the anchor
            host_c.wait_line(rf"producer:   {re.escape(address)}: .*worker\.\d+@", 10)
        host_c.wait_line(r"\[producer\s*\] exited with status 0", 20)
        host_a.wait_line(r"anchor: progress 60/60", 10)  # pub/sub from site 2 to site 1
        host_a.wait_line(r"anchor: \+ producer\.\d+@\S+ at 10\.0\.2\.10", 1)
    finally:
        for proc in launchers:
            proc.signal(signal.SIGTERM)
        codes = [proc.finish(20) for proc in launchers]
    assert codes == [0, 0, 0], "\n".join(p.output() for p in launchers)
    for proc in launchers:
        assert "Traceback" not in "\n".join(proc.lines), proc.output()
    print("\n" + "\n".join(line for line in host_c.lines if "producer:" in line))
