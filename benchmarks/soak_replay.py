#!/usr/bin/env python3
"""Replay soak: publishers that keep their topics (``history=``) and subscribers that replay
them (``replay=``) or resume them (``durable_name=``), each on its own store, while a chaos
loop SIGKILLs a random one every few seconds and restarts it at once on the same store, and
now and then SIGSTOPs a subscriber for a while.

    python3 benchmarks/soak_replay.py                          # 3 minutes, a kill every 2-4 s
    python3 benchmarks/soak_replay.py --seconds 60 -v --keep /tmp/run   # nodes log at DEBUG; kept

The processes (``_replay_soak_node.py``), on loopback, with a mesh name and beacon port of
the run's own, stores in a temporary directory removed at the end (``--keep DIR`` keeps it:
the stores, each process's stderr in ``logs/``):

* ``p0`` publishes with `publish`, one message at a time, round robin over ``rs.p0.a``,
  ``rs.p0.b``, ``rs.p0.c``, keeping ``--history`` messages a topic; ``p1`` publishes with
  `publish_many` (1 to ``--batch`` messages to one topic at a time) on ``rs.p1.*``, keeping
  ``--history`` messages a topic and none older than ``--max-age`` seconds.
  Each message is ``{"p", "t", "i"}``, ``i`` its number in the topic. What is knowable
  after a kill: ``publish`` returns once the message is queued, and the loop keeps (and
  numbers) it later, so the numbers a killed publisher printed as published include some
  that were never kept and never sent (docs/durability.md: "a kill loses the rest, which
  was given no number"); a number recorded before publishing would say even more. What the
  store kept is what counts: a restarted publisher goes on from the number its store gives
  each topic next (``inspect_store``'s ``next_seq``), so ``i`` equals ``msg.sequence`` for
  every message kept, and the difference is counted as published but not kept.
* ``d0`` subscribes ``rs.`` with ``durable_name="d0"`` and ``replay="all"``; ``d1`` with
  ``durable_name="d1"``, ``replay=3600`` seconds and a slower handler (``--work-ms``); both
  have a store. ``r0`` subscribes with ``replay="all"`` and no store: each restart replays
  every history again.

Subscribers start first, then publishers. After ``--seconds`` of chaos the publishers stop
publishing, the run waits (``--drain-timeout``) until every subscriber has handled up to
the last number each topic reached, and every node stops cleanly. Checks (a table, then one
JSON line; exit 1 if any fails, 2 if the harness itself could not run):

* numbering  - every message handled is numbered as its publisher numbered it (``i`` ==
               ``msg.sequence``, its topic and publisher), one stream id per publisher.
* durable    - per durable subscriber, publisher stream and topic: every number from 0 to
               the last it reached is handled or reported missed (``msg.gap``; what it had not
               reached when the drain timed out is counted behind, and the health check fails); within one life the
               numbers only go up; a number handled again in a later life is marked
               ``msg.redelivered``, comes before anything new of its topic in that life, and
               a life has at most 256 such; no gap covers a number the subscriber handled, but
               on the first message of its topic in a life, over the burst its last life was
               in when killed (those the history dropped before they could come again;
               counted as ``gap_over_crashed_burst``).
* replay_all - per life of ``r0``, stream and topic: consecutive numbers, but for a gap
               reported (``msg.gap``: the numbers jump by it); no duplicate, nothing marked
               redelivered; no gap at all when every history spans more than a subscriber is
               ever away (a freeze and 10 s; else gaps are counted only), but on a topic's
               first message in a life, for what the history had trimmed before: that gap is
               the message's number (the topics are numbered from 0;
               tests/test_replay.py::test_what_fell_out_of_the_history_is_reported_as_a_gap);
               each topic begun no later than where its history began at the end; the last
               life reaches the last number kept of every topic.
* stores     - every publisher's store keeps at most ``--history`` messages a topic (plus
               the 5 % trimming slack and a frame), ``p1``'s none older than ``--max-age`` (+2 s);
               each subscriber store's places and size stay small.
* health     - no traceback, ERROR or WATCHDOG line, no ``publish`` raised, nothing
               counted in ``rejected`` (but ``zre_before_hello`` and ``zre_bad_identity``:
               membership, after a freeze or a kill; reported), no ``rewound`` count, every ``msg.id`` is
               ``<stream>/<topic>/<number>``, every clean stop exited 0, the subscribers drained,
               each subscriber's last life counted in ``stats()["pubsub"]["gap"]`` what its
               ``msg.gap`` showed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _bench_proc import free_udp_port
from _soak_common import HarnessError, NodeProcess, wait_ready

import zmqmesh

HERE = Path(__file__).resolve().parent
NODE = HERE / "_replay_soak_node.py"
PREFIX = "rs."
TOPIC_SUFFIXES = ("a", "b", "c")
REDELIVERY_BURST = 256  # docs/durability.md: the burst in progress at a crash, at most 256 messages
TRIM_SLACK = 0.05  # docs: "whole frames are trimmed, so a little more may stay" (5 %)
MAX_SUBSCRIBER_STORE_BYTES = 8 << 20
MEMBERSHIP_UNDER_CHAOS = {"zre_before_hello", "zre_bad_identity"}
"""Counted by a node that hears from a peer it took for gone (a frozen process, whose silence
outlasted peer_timeout_s) before that peer greets it again, or whose mailbox took a port a
killed node held and gets what a peer's requester still sends there: membership, not
replay; reported."""


def note(text: str) -> None:
    sys.stdout.write(f"# {time.strftime('%H:%M:%S')} {text}\n")
    sys.stdout.flush()


@dataclass(frozen=True)
class Handling:
    """One handler call, as a subscriber printed it."""

    life: int
    stream: str
    topic: str
    seq: int
    publisher: str
    number: int
    gap: int
    redelivered: bool


class Life(NodeProcess):
    """One process of a node (a restart is a new life), its stdout read line by line."""

    def __init__(self, name: str, role: str, serial: int, spec: dict[str, Any], log: Path) -> None:
        self.name, self.role, self.serial, self.spec = name, role, serial, spec
        self.label = f"{name}#{serial}"
        self.ready = False
        self.first: dict[str, int] = {}  # publisher: its first number per topic
        self.published_end: dict[str, int] = {}  # publisher: past its last returned publish
        self.published = 0
        self.publish_errors: list[str] = []
        self.handled: list[Handling] = []
        self.counters: dict[str, Any] = {}
        self.stopped: dict[str, Any] | None = None
        self.quiesced = False
        super().__init__(NODE, spec, stderr=log)

    def _parse(self, line: str) -> None:
        word, _, rest = line.partition(" ")
        if word == "H":
            msg_id, topic, seq, publisher, number, gap, red = rest.split()
            stream, _, named = msg_id.partition("/")
            if named != f"{topic}/{seq}":
                self.problems.append(f"message id {msg_id} of {topic} number {seq}: not <stream>/<topic>/<number>")
            self.handled.append(Handling(self.serial, stream, topic, -1 if seq == "None" else int(seq), publisher,
                                         int(number), int(gap), red == "1"))
        elif word == "PUB":
            topic, first, end = rest.split()
            self.published_end[topic] = int(end)
            self.published += int(end) - int(first)
        elif word == "FIRST":
            topic, n = rest.split()
            self.first[topic] = int(n)
        elif word == "STATS":
            self.counters = json.loads(rest)
        elif word == "STOPPED":
            self.stopped = self.counters = json.loads(rest)
        elif word == "READY":
            self.ready = True
        elif word == "QUIESCED":
            self.quiesced = True
        elif word == "PUBERR":
            self.publish_errors.append(rest)
        elif line.strip():  # ERROR, WATCHDOG, anything unforeseen
            self.problems.append(line[:300])

    def log_problems(self) -> list[str]:
        """Tracebacks and ERROR/CRITICAL log lines in its stderr."""
        text = self.log_text()
        found = [f"traceback: {chunk[:500]}" for chunk in text.split("Traceback")[1:]]
        found += [line[:300] for line in text.splitlines() if " ERROR " in line or " CRITICAL " in line]
        return found

    def warnings(self) -> int:
        return sum(" WARNING " in line for line in self.log_text().splitlines())


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.port = free_udp_port()
        self.mesh = f"rsoak-{uuid.uuid4().hex[:10]}"
        self.root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="zmqmesh-rsoak-"))
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        self.options = {"mesh": self.mesh, "beacon_port": self.port, "heartbeat_interval_s": args.heartbeat,
                        "peer_timeout_s": args.peer_timeout}
        self.topics = {p: [f"{PREFIX}{p}.{s}" for s in TOPIC_SUFFIXES] for p in ("p0", "p1")}
        self.history = {"p0": {f"{PREFIX}p0.": args.history},
                        "p1": {f"{PREFIX}p1.": {"max_messages": args.history, "max_age_s": args.max_age}}}
        self.subscribers = {"d0": {"replay": "all", "durable_name": "d0", "work_s": 0.0, "store": True},
                            "d1": {"replay": 3600.0, "durable_name": "d1", "work_s": args.work_ms / 1000, "store": True},
                            "r0": {"replay": "all", "durable_name": None, "work_s": 0.0, "store": False}}
        self.names = sorted(self.topics) + sorted(self.subscribers)
        self.lives: dict[str, list[Life]] = defaultdict(list)
        self.kills: Counter[str] = Counter()
        self.freezes: Counter[str] = Counter()
        self.frozen: tuple[Life, float] | None = None
        self.rng = random.Random(args.seed)
        self.t0 = 0.0
        self.drain_s: float | None = None
        self.stop_problems: list[str] = []
        self.final_next: dict[str, int] = {}
        self.stores: dict[str, dict[str, Any]] = {}
        self.ended_at = 0.0

    # processes -----------------------------------------------------------------------------

    def store_of(self, name: str) -> Path | None:
        if name in self.subscribers and not self.subscribers[name]["store"]:
            return None
        return self.root / "stores" / name

    def spec(self, name: str) -> dict[str, Any]:
        store = self.store_of(name)
        spec: dict[str, Any] = {"name": name, "options": self.options, "store": str(store) if store else None,
                                "verbose": self.args.verbose, "max_life": self.args.seconds + self.args.drain_timeout + 300}
        if name in self.topics:
            return {**spec, "role": "publisher", "topics": self.topics[name], "history": self.history[name],
                    "mode": "one" if name == "p0" else "many", "batch": self.args.batch, "rate": self.args.rate}
        sub = self.subscribers[name]
        return {**spec, "role": "subscriber", "prefix": PREFIX, "replay": sub["replay"],
                "durable_name": sub["durable_name"], "work_s": sub["work_s"]}

    def spawn(self, name: str) -> Life:
        serial = len(self.lives[name]) + 1
        role = "publisher" if name in self.topics else "subscriber"
        life = Life(name, role, serial, self.spec(name), self.root / "logs" / f"{name}.{serial}.log")
        self.lives[name].append(life)
        return life

    def current(self, name: str) -> Life:
        return self.lives[name][-1]

    # chaos --------------------------------------------------------------------------------------

    def kill_and_restart(self, name: str) -> None:
        victim = self.current(name)
        was_frozen = self.frozen is not None and self.frozen[0] is victim
        if was_frozen:
            self.frozen = None
        victim.kill()
        self.kills[name] += 1
        fresh = self.spawn(name)
        note(f"t={time.time() - self.t0:6.1f}s SIGKILL {victim.label}{' (frozen)' if was_frozen else ''}; "
             f"restarted as {fresh.label}")

    def freeze(self) -> None:
        name = self.rng.choice(sorted(self.subscribers))
        life = self.current(name)
        life.signal(signal.SIGSTOP)
        until = time.time() + self.rng.uniform(self.args.freeze_s / 3, self.args.freeze_s)
        self.frozen = (life, until)
        self.freezes[name] += 1
        note(f"t={time.time() - self.t0:6.1f}s SIGSTOP {life.label} for {until - time.time():.1f} s")

    def thaw(self) -> None:
        if self.frozen is not None:
            self.frozen[0].signal(signal.SIGCONT)
            self.frozen = None

    def run(self) -> None:
        args = self.args
        note(f"replay soak: publishers p0 (publish) and p1 (publish_many), subscribers d0, d1 (durable) and r0 "
             f"(replay='all'); {args.seconds:g} s, a kill every {args.kill_every / 2:g}-{args.kill_every:g} s, "
             f"a freeze every {args.freeze_every:g} s; mesh {self.mesh}, beacon port {self.port}, dir {self.root}")
        wait_ready([self.spawn(n) for n in sorted(self.subscribers)], args.startup_timeout)
        wait_ready([self.spawn(n) for n in sorted(self.topics)], args.startup_timeout)
        self.t0 = time.time()
        end = self.t0 + args.seconds
        next_kill = self.t0 + self.rng.uniform(args.kill_every / 2, args.kill_every)
        next_freeze = self.t0 + args.freeze_every if args.freeze_every > 0 else float("inf")
        while time.time() < end:
            now = time.time()
            if self.frozen is not None and now >= self.frozen[1]:
                self.thaw()
            if now >= next_kill:
                self.kill_and_restart(self.rng.choice(self.names))
                next_kill = time.time() + self.rng.uniform(args.kill_every / 2, args.kill_every)
            if now >= next_freeze and self.frozen is None:
                self.freeze()
                next_freeze = time.time() + self.rng.uniform(args.freeze_every / 2, args.freeze_every)
            time.sleep(0.05)
        self.thaw()
        wait_ready([self.current(n) for n in self.names], args.startup_timeout)
        self.drain()
        self.stop_all()
        self.read_stores()

    # the end --------------------------------------------------------------------------------

    def drain(self) -> None:
        """Publishers stop publishing; wait until every subscriber reached the last number of every topic."""
        started = time.time()
        for name in self.topics:
            self.current(name).send("QUIESCE")
        deadline = time.monotonic() + 30
        while not all(self.current(n).quiesced for n in self.topics):
            if time.monotonic() > deadline:
                raise HarnessError("a publisher did not stop publishing within 30 s")
            time.sleep(0.05)
        for name, topics in self.topics.items():
            life = self.current(name)
            for topic in topics:
                self.final_next[topic] = life.published_end.get(topic, life.first.get(topic, 0))
        note(f"published; last numbers {self.final_next}; draining")
        deadline = time.monotonic() + self.args.drain_timeout
        while time.monotonic() < deadline:
            if all(self.caught_up(name) for name in self.subscribers):
                self.drain_s = time.time() - started
                return
            time.sleep(0.2)
        note("not drained: " + "; ".join(f"{n} {self.behind(n)}" for n in self.subscribers if not self.caught_up(n)))

    def reached(self, name: str) -> dict[str, int]:
        """The highest number of each topic the subscriber handled (its last life only, for r0)."""
        lives = self.lives[name] if self.subscribers[name]["durable_name"] else self.lives[name][-1:]
        top: dict[str, int] = {}
        for life in lives:
            for h in list(life.handled):
                top[h.topic] = max(top.get(h.topic, -1), h.seq)
        return top

    def behind(self, name: str) -> dict[str, int]:
        top = self.reached(name)
        return {t: n - 1 - top.get(t, -1) for t, n in self.final_next.items() if top.get(t, -1) < n - 1}

    def caught_up(self, name: str) -> bool:
        return not self.behind(name)

    def stop_all(self) -> None:
        for name in self.names:
            self.current(name).send("STOP")
        for name in self.names:
            life = self.current(name)
            if not life.wait_exit(self.args.stop_timeout):
                self.stop_problems.append(f"{life.label} did not exit within {self.args.stop_timeout:g} s of STOP")
                life.kill()
            elif life.proc.returncode != 0 or life.stopped is None:
                self.stop_problems.append(f"{life.label} exit status {life.proc.returncode} after STOP")
        self.ended_at = time.time()

    def read_stores(self) -> None:
        for name in self.names:
            store = self.store_of(name)
            if store is not None:
                self.stores[name] = zmqmesh.inspect_store(store)

    def write_handled(self) -> None:
        """With --keep: every handling, a line each, in ``handled.txt``."""
        with open(self.root / "handled.txt", "w") as out:
            for name in sorted(self.subscribers):
                for h in self.handlings(name):
                    out.write(f"{name} {h.life} {h.stream[:8]} {h.topic} {h.seq} {h.gap} {int(h.redelivered)}\n")

    def cleanup(self) -> None:
        self.thaw()
        for lives in self.lives.values():
            for life in lives:
                if life.alive():
                    life.kill()
                life.close()
        if not self.args.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    # checks ---------------------------------------------------------------------------------

    def handlings(self, name: str) -> list[Handling]:
        return [h for life in self.lives[name] for h in life.handled]

    def check_numbering(self) -> dict[str, Any]:
        wrong: list[str] = []
        streams: dict[str, set[str]] = defaultdict(set)
        for name in self.subscribers:
            for h in self.handlings(name):
                streams[h.publisher].add(h.stream)
                if h.seq != h.number or not h.topic.startswith(f"{PREFIX}{h.publisher}."):
                    wrong.append(f"{name}#{h.life} {h.topic} sequence {h.seq}: payload {h.publisher}/{h.number}")
        several = {p: sorted(s) for p, s in streams.items() if len(s) != 1}
        return {"ok": not wrong and not several and set(streams) == set(self.topics), "misnumbered": len(wrong),
                "streams": {p: sorted(s) for p, s in streams.items()}, "examples": wrong[:6] + [
                    f"{p} under {len(s)} streams" for p, s in several.items()]}

    def check_durable(self) -> dict[str, Any]:
        per: dict[str, dict[str, Any]] = {}
        examples: list[str] = []
        for name, sub in self.subscribers.items():
            if sub["durable_name"]:
                per[name] = self.durable_findings(name, examples)
        ok = all(not (r["lost"] or r["out_of_order"] or r["unmarked_again"] or r["again_after_new"]
                      or r["false_gaps"] or r["again_over_burst"]) for r in per.values())
        return {"ok": ok and bool(per), **per, "examples": examples[:10]}

    def durable_findings(self, name: str, examples: list[str]) -> dict[str, Any]:
        seen: dict[tuple[str, str], set[int]] = defaultdict(set)  # handled in earlier lives
        gaps: dict[tuple[str, str], set[int]] = defaultdict(set)
        found = Counter[str]()
        most_again = 0
        # per stream and topic, its numbers among the last `REDELIVERY_BURST` handled by the last life that handled it
        burst: dict[tuple[str, str], set[int]] = {}
        for life in self.lives[name]:
            last: dict[tuple[str, str], int] = {}
            fresh_seen: set[tuple[str, str]] = set()
            again = 0
            here: dict[tuple[str, str], set[int]] = defaultdict(set)
            for h in life.handled:
                key = (h.stream, h.topic)
                found["handlings"] += 1
                begins = key not in last
                if h.seq <= last.get(key, -1):
                    found["out_of_order"] += 1
                    examples.append(f"{life.label} {h.topic} {h.seq} after {last[key]}")
                last[key] = h.seq
                if h.gap:
                    found["gap_reported"] += h.gap
                    missed = set(range(h.seq - h.gap, h.seq))
                    gaps[key] |= missed
                    found[self.gap_kind(missed, here[key], seen[key], begins, burst.get(key, set()))] += \
                        len(missed & (here[key] | seen[key]))
                if h.redelivered:
                    found["marked_redelivered"] += 1
                if h.seq in seen[key]:
                    again += 1
                    found["again"] += 1
                    if not h.redelivered:
                        found["unmarked_again"] += 1
                        examples.append(f"{life.label} {h.topic} {h.seq} again, not marked redelivered")
                    if key in fresh_seen:
                        found["again_after_new"] += 1
                        examples.append(f"{life.label} {h.topic} {h.seq} again after a new message of its topic")
                else:
                    fresh_seen.add(key)
                here[key].add(h.seq)
            most_again = max(most_again, again)
            if again > REDELIVERY_BURST:
                found["again_over_burst"] += 1
                examples.append(f"{life.label} handled {again} messages again (> {REDELIVERY_BURST})")
            for key, numbers in here.items():
                seen[key] |= numbers
            last: dict[tuple[str, str], set[int]] = defaultdict(set)
            for h in life.handled[-REDELIVERY_BURST:]:
                last[(h.stream, h.topic)].add(h.seq)
            burst.update((key, last.get(key, set())) for key in here)
        if found["false_gaps"]:
            examples.append(f"{name}: gaps reported over {found['false_gaps']} numbers it had handled")
        by_topic = {t: s for (s, t) in seen}
        for topic, end in self.final_next.items():
            key = (by_topic.get(topic, "?"), topic)
            reached = max(seen.get(key, set()) | gaps.get(key, set()), default=-1)
            missing = set(range(min(end, reached))) - seen.get(key, set()) - gaps.get(key, set())
            found["behind_at_end"] += max(0, end - 1 - reached)  # (not drained: the health check says so)
            if missing:
                found["lost"] += len(missing)
                examples.append(f"{name} {topic}: {len(missing)} lost, first {min(missing)} last {max(missing)}")
        reported = sum(int(life.counters.get("pubsub", {}).get("gap", 0)) for life in self.lives[name])
        return {"handlings": found["handlings"], "lost": found["lost"], "gap_reported": found["gap_reported"],
                "gap_counted": reported, "again": found["again"], "most_again_in_a_life": most_again,
                "marked_redelivered": found["marked_redelivered"], "unmarked_again": found["unmarked_again"],
                "again_after_new": found["again_after_new"], "again_over_burst": found["again_over_burst"],
                "out_of_order": found["out_of_order"], "false_gaps": found["false_gaps"],
                "gap_over_crashed_burst": found["gap_over_crashed_burst"], "behind_at_end": found["behind_at_end"],
                "lives": len(self.lives[name])}

    @staticmethod
    def gap_kind(missed: set[int], here: set[int], before: set[int], begins: bool, burst: set[int]) -> str:
        """What a gap reported over numbers the subscriber handled is: over those of the burst
        its last life was in when killed (the first message of its topic in a life, the numbers
        among the last `REDELIVERY_BURST` handled before: ``burst``, those of the topic among
        the last handled by the last life that handled it; or, as first written, numbers
        within `REDELIVERY_BURST` of the highest it handled), which may have been handled and
        were trimmed before they could come again (docs/durability.md, "Durable
        subscriptions"), or else false. (By numbers alone, a burst that held a gap filled
        live, rs.p0.c 3718 then 4139-4161 with msg.gap 420, was taken for false gaps over
        24 numbers handled among the last 70 of its life.)"""
        handled_before = missed & before
        if not handled_before:
            return "false_gaps"  # (over the numbers handled in this life, if any)
        crashed_burst = begins and not missed & here and (
            handled_before <= burst or min(handled_before) > max(before) - REDELIVERY_BURST)
        return "gap_over_crashed_burst" if crashed_burst else "false_gaps"

    def check_replay_all(self) -> dict[str, Any]:
        examples: list[str] = []
        found = Counter[str]()
        for name, sub in self.subscribers.items():
            if sub["durable_name"]:
                continue
            for life in self.lives[name]:
                last: dict[tuple[str, str], int] = {}
                for h in life.handled:
                    key = (h.stream, h.topic)
                    found["handlings"] += 1
                    begins = key not in last
                    if begins and h.seq > self.history_began(h.topic):
                        found["late_starts"] += 1
                        examples.append(f"{life.label} began {h.topic} at {h.seq}, past where its history began "
                                        f"at the end ({self.history_began(h.topic)})")
                    if not begins and h.seq != last[key] + 1 + h.gap:
                        kind = "duplicates" if h.seq <= last[key] else "skips"
                        found[kind] += 1
                        examples.append(f"{life.label} {h.topic} {h.seq} (gap {h.gap}) after {last[key]}")
                    last[key] = h.seq
                    if begins and h.gap:
                        found["trimmed_before"] += h.gap  # what the history no longer held when the life began
                        if h.gap != h.seq:
                            found["gaps"] += 1
                            examples.append(f"{life.label} began {h.topic} at {h.seq} with gap {h.gap}")
                    elif h.gap:
                        found["gaps"] += 1
                        found["gap_reported"] += h.gap
                        if self.history_outlasts_absences():
                            examples.append(f"{life.label} {h.topic} {h.seq} gap {h.gap}")
                    if h.redelivered:
                        found["marked_redelivered"] += 1
            short = self.behind(name)
            found["short_at_end"] += sum(short.values())
            if short:
                examples.append(f"{name} last life short of the end: {short}")
        failing = ["duplicates", "skips", "marked_redelivered", "short_at_end", "late_starts"]
        ok = not any(found[k] for k in failing + (["gaps"] if self.history_outlasts_absences() else []))
        return {"ok": ok and found["handlings"] > 0, **{k: found[k] for k in (
            "handlings", "duplicates", "skips", "gaps", "gap_reported", "trimmed_before", "marked_redelivered",
            "short_at_end", "late_starts")},
            "lives": sum(len(self.lives[n]) for n, s in self.subscribers.items() if not s["durable_name"]),
            "examples": examples[:10]}

    def history_outlasts_absences(self) -> bool:
        """Whether every topic's history spans more than a subscriber is ever away (a freeze,
        and 10 s for a restart and its peers' timeouts): then no gap is to be reported but on
        a topic's first message in a life of r0; otherwise gaps are counted, not failed."""
        per_topic_rate = self.args.rate / len(TOPIC_SUFFIXES)
        spans = min(self.args.history / per_topic_rate, self.args.max_age)
        return spans > self.args.freeze_s + 10

    def history_began(self, topic: str) -> int:
        """The first number the publisher's store kept of ``topic`` at the end (a history only moves on)."""
        publisher = topic[len(PREFIX):].split(".", 1)[0]
        kept = self.stores.get(publisher, {}).get("topics", {}).get(topic)
        return int(kept["first_seq"]) if kept else self.final_next.get(topic, 0)

    def check_stores(self) -> dict[str, Any]:
        problems: list[str] = []
        summary: dict[str, Any] = {}
        bound = int(self.args.history * (1 + TRIM_SLACK)) + self.args.batch + 1
        for name, seen in self.stores.items():
            summary[name] = {"bytes": seen["bytes"], "places": sum(seen["subscriptions"].values())}
            if name in self.topics:
                kept = {t: seen["topics"].get(t, {}) for t in self.topics[name]}
                summary[name]["kept"] = {t: k.get("messages", 0) for t, k in kept.items()}
                for topic, k in kept.items():
                    if k.get("messages", 0) > bound:
                        problems.append(f"{name} keeps {k['messages']} of {topic} (> {bound})")
                    if name == "p1" and k and k["oldest"] < self.ended_at - self.args.max_age - 2:
                        problems.append(f"{name} keeps {topic} from {self.ended_at - k['oldest']:.1f} s ago")
            elif seen["bytes"] > MAX_SUBSCRIBER_STORE_BYTES or summary[name]["places"] > 4 * len(self.final_next):
                problems.append(f"{name}: {seen['bytes']} bytes, {summary[name]['places']} places")
        return {"ok": not problems and bool(self.stores), "bound": bound, "stores": summary, "problems": problems}

    def check_health(self) -> dict[str, Any]:
        problems = list(self.stop_problems)
        rejected: Counter[str] = Counter()
        rewound = warnings = 0
        for lives in self.lives.values():
            for life in lives:
                problems.extend(f"{life.label}: {p}" for p in life.problems)
                problems.extend(f"{life.label}: publish raised {e}" for e in life.publish_errors)
                problems.extend(f"{life.label}: {p}" for p in life.log_problems())
                counted = {k: int(v) for k, v in life.counters.get("rejected", {}).items() if v}
                rejected.update(counted)
                if set(counted) - MEMBERSHIP_UNDER_CHAOS:
                    problems.append(f"{life.label} rejected {counted}")
                rewound += int(life.counters.get("pubsub", {}).get("rewound", 0))
                warnings += life.warnings()
        if rewound:
            problems.append(f"rewound {rewound}")
        for name in self.subscribers:
            last = self.current(name)
            shown, counted = sum(h.gap for h in last.handled), int(last.counters.get("pubsub", {}).get("gap", 0))
            if shown != counted:
                problems.append(f"{last.label}: msg.gap adds up to {shown}, stats()['pubsub']['gap'] says {counted}")
        if self.drain_s is None:
            problems.append(f"not drained within {self.args.drain_timeout:g} s")
        return {"ok": not problems, "processes": sum(len(v) for v in self.lives.values()),
                "kills": dict(self.kills), "freezes": dict(self.freezes), "warnings_logged": warnings,
                "rejected": dict(rejected),
                "drain_s": None if self.drain_s is None else round(self.drain_s, 2), "problems": problems[:10]}

    def figures(self) -> dict[str, Any]:
        published = sum(life.published for n in self.topics for life in self.lives[n])
        unkept = 0  # published (returned) by a killed life past what the next life found kept
        for name in self.topics:
            lives = self.lives[name]
            for before, after in zip(lives, lives[1:]):
                unkept += sum(max(0, end - after.first.get(t, 0)) for t, end in before.published_end.items())
        return {"published": published, "kept": sum(self.final_next.values()), "published_not_kept": unkept,
                "handled": {n: len(self.handlings(n)) for n in self.subscribers},
                "restarts": {n: len(v) - 1 for n, v in self.lives.items()}}


def report(soak: Soak) -> bool:
    checks = {"numbering": soak.check_numbering(), "durable": soak.check_durable(),
              "replay_all": soak.check_replay_all(), "stores": soak.check_stores(), "health": soak.check_health()}
    figures = soak.figures()
    dur, rall, health = checks["durable"], checks["replay_all"], checks["health"]
    details = {
        "numbering": f"{checks['numbering']['misnumbered']} misnumbered; streams "
                     + ", ".join(f"{p}: {len(s)}" for p, s in checks["numbering"]["streams"].items()),
        "durable": "; ".join(f"{n}: {r['handlings']} handled in {r['lives']} lives, {r['lost']} lost, "
                             f"gap {r['gap_reported']} (stats {r['gap_counted']}), {r['again']} again "
                             f"(most {r['most_again_in_a_life']} a life, {r['unmarked_again']} unmarked, "
                             f"{r['again_after_new']} late), {r['marked_redelivered']} marked, "
                             f"{r['out_of_order']} out of order, {r['false_gaps']} false gaps, "
                             f"{r['gap_over_crashed_burst']} of a crashed burst in a gap, {r['behind_at_end']} behind at the end"
                             for n, r in dur.items() if isinstance(r, dict) and "lost" in r),
        "replay_all": f"{rall['handlings']} handled in {rall['lives']} lives, {rall['duplicates']} duplicates, "
                      f"{rall['skips']} skips, {rall['gaps']} gaps ({rall['gap_reported']}), {rall['trimmed_before']} "
                      "trimmed before a life began (its first gap), "
                      f"{rall['marked_redelivered']} marked redelivered, {rall['short_at_end']} short at the end, "
                      f"{rall['late_starts']} topics begun past their history's start",
        "stores": "; ".join(f"{n} {s['bytes'] // 1024} KiB" + (f" kept {s['kept']}" if "kept" in s else
                                                                f" {s['places']} places")
                            for n, s in checks["stores"]["stores"].items()),
        "health": f"{health['processes']} processes, kills {health['kills']}, freezes {health['freezes']}, "
                  f"{health['warnings_logged']} warnings logged, rejected {health['rejected']}, "
                  f"drained in {health['drain_s']} s",
    }
    print()
    print(f"published {figures['published']} (kept {figures['kept']}, {figures['published_not_kept']} published "
          f"by a killed publisher and never kept); handled {figures['handled']}; restarts {figures['restarts']}")
    print(f"{'check':<11}  result  detail")
    print(f"{'-' * 11}  ------  {'-' * 60}")
    for name, r in checks.items():
        print(f"{name:<11}  {'PASS' if r['ok'] else 'FAIL':<6}  {details[name]}")
        for ex in (r.get("examples") or []) + (r.get("problems") or []):
            print(f"{'':<11}          - {ex}")
    ok = all(r["ok"] for r in checks.values())
    print(json.dumps({"soak": "replay", "ok": ok, "failed": [n for n, r in checks.items() if not r["ok"]],
                      "seconds": soak.args.seconds, "mesh": soak.mesh, **figures, **checks},
                     separators=(",", ":"), default=str))
    sys.stdout.flush()
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="seconds of chaos (default 180)")
    parser.add_argument("--kill-every", type=float, default=4.0, help="a kill every half to all of this (default 4 s)")
    parser.add_argument("--freeze-every", type=float, default=12.0,
                        help="SIGSTOP a subscriber every half to all of this (default 12 s; 0: never)")
    parser.add_argument("--freeze-s", type=float, default=4.0, help="a freeze lasts a third to all of this (default 4 s)")
    parser.add_argument("--rate", type=float, default=150.0, help="messages a second per publisher (default 150)")
    parser.add_argument("--batch", type=int, default=40, help="largest publish_many (default 40)")
    parser.add_argument("--history", type=int, default=3000, help="messages kept a topic (default 3000)")
    parser.add_argument("--max-age", type=float, default=40.0, help="p1's max_age_s (default 40)")
    parser.add_argument("--work-ms", type=float, default=1.0, help="d1's handler's work (default 1 ms)")
    parser.add_argument("--heartbeat", type=float, default=0.5)
    parser.add_argument("--peer-timeout", type=float, default=2.0)
    parser.add_argument("--startup-timeout", type=float, default=30.0)
    parser.add_argument("--drain-timeout", type=float, default=90.0)
    parser.add_argument("--stop-timeout", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", default=None, help="run in DIR and keep it (stores, logs)")
    parser.add_argument("-v", "--verbose", action="store_true", help="nodes log at DEBUG to their log files")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))  # run finally: kill the children
    soak = Soak(args)
    try:
        soak.run()
        if args.keep:
            soak.write_handled()
        return 0 if report(soak) else 1
    except HarnessError as exc:
        note(f"HARNESS ERROR: {exc}")
        print(json.dumps({"soak": "replay", "ok": False, "harness_error": str(exc)}))
        return 2
    finally:
        soak.cleanup()


if __name__ == "__main__":
    sys.exit(main())
