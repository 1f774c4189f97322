#!/usr/bin/env python3
"""Durable soak: durable pushers, at-least-once pullers and keepers, each on its own store,
while a chaos loop SIGKILLs a random one every few seconds and restarts it at once on the
same store.

    python3 benchmarks/soak_durable.py                        # 3 minutes, a kill every 2-4 s
    python3 benchmarks/soak_durable.py --duration 60 -v --keep /tmp/run   # nodes log at DEBUG; kept

The processes (``_durable_soak_node.py``), on loopback, a mesh name and beacon port of the
run's own, stores in a temporary directory removed at the end (``--keep DIR`` keeps it:
the stores, each process's stderr in ``logs/``, every handling in ``handled.txt``):

* ``--pushers`` pushers (``p0``...) push ``{"p": name, "i": n}`` durably to one queue,
  numbered on from where the last instance of that name left (the last number whose
  ``push``/``push_many`` returned), and print those numbers;
* ``--pullers`` at-least-once pullers (``u0``...; the first ``--dedupe`` of them with
  ``dedupe=True`` and a store) print each message before their handler returns;
* ``--keepers`` keepers (``k0``...) keep the queue (``Node.keep``).

Every ``--kill-every`` seconds (a random time between half and all of it) one process,
chosen at random among all of them, is SIGKILLed and restarted at once on its store.
Every ``--cycle-every`` seconds a pusher pushes a burst and stops cleanly, handing what
is not yet acknowledged to a keeper, and is restarted; half of the time the next kill
falls within that stop (a keeper, a puller or the stopping pusher killed mid-hand-over).
``--freeze-every`` SIGSTOPs a puller for ``--freeze-s`` (its ack timeouts run out).

At the end the chaos stops, the pushers stop pushing, and the run waits (``--drain-timeout``)
for every number pushed to be handled and every store's queues to empty; then every node
stops cleanly. Checks (a table, then one JSON line; exit 1 if any fails, 2 if the harness
itself could not run):

* lost          - every number whose push returned was handled at least once.
* dedupe        - a dedupe puller handled no message id twice (by name, across its
                  restarts), except what docs/durability.md allows: a message among the
                  last ``--concurrency`` that an instance printed before it was killed
                  (its handler had not returned, or its id was not yet committed).
                  Handlings of one message by several pullers are duplicates the docs
                  allow: counted, with those marked redelivered and those from keepers.
* dead_letters  - with ``--poison-every N``, every Nth number's handler raises each time:
                  each such message is in a ``<queue>.dead`` of some store (read from its
                  segments), and no other message is (the other handlers are healthy).
* stores        - at the end every store's outbox, attempts, settled and parked tables
                  are empty but for the dead letters (nothing left growing); the dedupe
                  pullers' remembered ids are reported.
* health        - no push raised, no traceback or ERROR line, every clean stop exited 0
                  within its deadline, the queue drained.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
from _bench_proc import free_udp_port
from _soak_common import HarnessError, NodeProcess, wait_ready

import zmqmesh

HERE = Path(__file__).resolve().parent
NODE = HERE / "_durable_soak_node.py"
QUEUE = "jobs"
DEAD = f"{QUEUE}.dead"
STORE_TABLES = ("outbox", "attempts", "settled", "parked", "handled")


def note(text: str) -> None:
    sys.stdout.write(f"# {time.strftime('%H:%M:%S')} {text}\n")
    sys.stdout.flush()


class Instance(NodeProcess):
    """One node process (a restart is a new Instance), its stdout read line by line."""

    def __init__(self, name: str, role: str, serial: int, spec: dict[str, Any], log: Path) -> None:
        self.name, self.role, self.serial = name, role, serial
        self.label = f"{name}#{serial}"
        self.ready = False
        self.pushed: list[tuple[int, int]] = []
        self.push_errors: list[str] = []
        self.handled: list[tuple[str, int, str, int, int, str]] = []  # (pusher, n, id, redelivered, attempts, via)
        self.raw: list[str] = []  # the H and X lines, for --keep's handled.txt
        self.failed: list[tuple[str, int, str, int]] = []  # poison handled: (pusher, n, id, attempts)
        self.quiesced: int | None = None
        self.stopped: dict[str, Any] | None = None
        self.stats: dict[str, Any] = {}
        self.killed_at: float | None = None
        self.stop_sent: float | None = None
        super().__init__(NODE, spec, stderr=log)

    def _parse(self, line: str) -> None:
        word, _, rest = line.partition(" ")
        if word == "H":
            pusher, n, msg_id, red, attempts, via = rest.split()
            self.handled.append((pusher, int(n), msg_id, int(red), int(attempts), via))
            self.raw.append(line)
        elif word == "X":
            pusher, n, msg_id, attempts, _red, _t = rest.split()
            self.failed.append((pusher, int(n), msg_id, int(attempts)))
            self.raw.append(line)
        elif word == "PUSHED":
            first, end = rest.split()
            self.pushed.append((int(first), int(end)))
        elif word == "STATS":
            self.stats = json.loads(rest)
        elif word == "READY":
            self.ready = True
        elif word == "QUIESCED":
            self.quiesced = int(rest)
        elif word == "STOPPED":
            self.stopped = json.loads(rest)
        elif word == "PUSHERR":
            self.push_errors.append(rest)
        elif word in ("ERROR", "WATCHDOG") or line.strip():
            self.problems.append(line[:300])

    def kill(self) -> None:
        """SIGKILL, then read what it printed to the end (its last numbers count)."""
        if self.alive():
            self.killed_at = time.time()
        super().kill()

    def next_number(self) -> int:
        return max((end for _f, end in self.pushed), default=-1)

    def tracebacks(self) -> list[str]:
        chunks = self.log_text().split("Traceback")[1:]
        return [chunk[:600] for chunk in chunks if "RuntimeError: poison" not in chunk]


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.port = free_udp_port()
        self.mesh = f"dsoak-{uuid.uuid4().hex[:10]}"
        self.root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="zmqmesh-dsoak-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.options = {"mesh": self.mesh, "beacon_port": self.port, "heartbeat_interval_s": args.heartbeat,
                        "peer_timeout_s": args.peer_timeout, "linger_s": args.linger}
        self.pushers = [f"p{i}" for i in range(args.pushers)]
        self.pullers = [f"u{i}" for i in range(args.pullers)]
        self.keepers = [f"k{i}" for i in range(args.keepers)]
        self.dedupers = set(self.pullers[: args.dedupe])
        self.role = {**{n: "pusher" for n in self.pushers}, **{n: "puller" for n in self.pullers},
                     **{n: "keeper" for n in self.keepers}}
        self.instances: list[Instance] = []
        self.current: dict[str, Instance] = {}
        self.serial: Counter[str] = Counter()
        self.next_number: dict[str, int] = {n: 0 for n in self.pushers}
        self.kills: Counter[str] = Counter()
        self.cycles = 0
        self.stopping: dict[str, Instance] = {}
        self.freezes = 0
        self.frozen: tuple[Instance, float] | None = None
        self.rng = random.Random(args.seed)
        self.t0 = self.t_quiesce = 0.0
        self.drain_s: float | None = None
        self.stop_problems: list[str] = []
        self.store_rows: dict[str, dict[str, int]] = {}
        self.dead: list[tuple[str, str, int, str, str]] = []  # (store, pusher, n, id, x-attempts)

    def store_of(self, name: str) -> Path | None:
        if self.role[name] == "puller" and name not in self.dedupers:
            return None
        return self.root / "stores" / name

    def spawn(self, name: str) -> Instance:
        role = self.role[name]
        self.serial[name] += 1
        store = self.store_of(name)
        spec = {"name": name, "role": role, "queue": QUEUE, "options": self.options,
                "store": str(store) if store else None, "first": self.next_number.get(name, 0),
                "rate": self.args.rate, "batch": self.args.batch, "dedupe": name in self.dedupers,
                "concurrency": self.args.concurrency if role == "puller" else 1, "work_s": self.args.work_ms / 1000,
                "poison_every": self.args.poison_every,
                "ack_timeout_s": self.args.ack_timeout, "max_deliveries": 5, "verbose": self.args.verbose,
                "max_life": self.args.duration + self.args.drain_timeout + 300}
        (self.root / "logs").mkdir(exist_ok=True)
        inst = Instance(name, role, self.serial[name], spec, self.root / "logs" / f"{name}.{self.serial[name]}.log")
        self.instances.append(inst)
        self.current[name] = inst
        return inst

    def retire(self, inst: Instance) -> None:
        """What a pusher instance that ended pushed is where its name goes on from."""
        if inst.role == "pusher":
            self.next_number[inst.name] = max(self.next_number[inst.name], inst.next_number())

    def kill_and_restart(self, name: str) -> None:
        victim = self.current[name]
        stopping = self.stopping.pop(name, None) is not None
        victim.kill()
        self.retire(victim)
        self.kills[victim.role] += 1
        fresh = self.spawn(name)
        note(f"t={time.time() - self.t0:6.1f}s SIGKILL {victim.label} ({victim.role}"
             f"{', in its clean stop' if stopping else ''}); restarted as {fresh.label}")

    def cycle_pusher(self, name: str) -> None:
        """A burst, then a clean stop (a hand-over to the keepers); the chaos goes on meanwhile."""
        old = self.current[name]
        old.stop_sent = time.time()
        old.send(f"BURSTSTOP {self.args.burst}")
        self.stopping[name] = old
        self.cycles += 1

    def restart_stopped(self) -> None:
        limit = self.args.linger + 15
        for name, old in list(self.stopping.items()):
            assert old.stop_sent is not None
            if old.alive() and time.time() - old.stop_sent < limit:
                continue
            if old.alive():
                self.stop_problems.append(f"{old.label} did not exit within {limit:g} s of BURSTSTOP")
                old.kill()
            old.wait_exit(5)
            if old.proc.returncode != 0 or old.stopped is None:
                self.stop_problems.append(f"{old.label} exit status {old.proc.returncode} after BURSTSTOP")
            del self.stopping[name]
            self.retire(old)
            fresh = self.spawn(name)
            note(f"t={time.time() - self.t0:6.1f}s {old.label} pushed a burst of {self.args.burst} and stopped "
                 f"({time.time() - old.stop_sent:.2f} s); restarted as {fresh.label}")

    def run(self) -> None:
        args = self.args
        note(f"durable soak: {len(self.pushers)} pushers, {len(self.pullers)} pullers ({len(self.dedupers)} dedupe), "
             f"{len(self.keepers)} keepers; {args.duration:g} s, a kill every {args.kill_every / 2:g}-{args.kill_every:g} s, "
             f"a pusher cycled every {args.cycle_every:g} s; mesh {self.mesh}, beacon port {self.port}, dir {self.root}")
        first = [self.spawn(n) for n in self.keepers + self.pullers]
        wait_ready(first, args.startup_timeout)
        wait_ready([self.spawn(n) for n in self.pushers], args.startup_timeout)
        self.t0 = time.time()
        end = self.t0 + args.duration
        next_kill = self.t0 + self.rng.uniform(args.kill_every / 2, args.kill_every)
        next_cycle = self.t0 + args.cycle_every if args.cycle_every > 0 else float("inf")
        next_freeze = self.t0 + args.freeze_every if args.freeze_every > 0 else float("inf")
        while time.time() < end:
            now = time.time()
            if now >= next_kill:
                self.kill_and_restart(self.rng.choice(sorted(self.role)))
                next_kill = time.time() + self.rng.uniform(args.kill_every / 2, args.kill_every)
            if now >= next_cycle:
                name = self.pushers[self.cycles % len(self.pushers)]
                if name not in self.stopping:
                    self.cycle_pusher(name)
                    if self.rng.random() < 0.5:  # the next kill within the hand-over
                        next_kill = time.time() + self.rng.uniform(0.2, 1.5)
                next_cycle = time.time() + args.cycle_every
            self.restart_stopped()
            if now >= next_freeze and self.frozen is None:
                self.freeze(self.current[self.rng.choice(self.pullers)])
                next_freeze = time.time() + args.freeze_every
            if self.frozen is not None and now >= self.frozen[1]:
                self.thaw()
            for inst in list(self.current.values()):
                if not inst.alive() and inst.killed_at is None and inst.name not in self.stopping:
                    self.stop_problems.append(f"{inst.label} exited on its own ({inst.proc.returncode})")
                    self.retire(inst)
                    self.spawn(inst.name)
            time.sleep(0.02)
        self.drain()
        self.stop_all()
        self.read_stores()

    def freeze(self, inst: Instance) -> None:
        """SIGSTOP a puller for --freeze-s (a stuck handler, a pause): its ack timeouts run out."""
        if inst.alive():
            inst.signal(signal.SIGSTOP)
            self.frozen = (inst, time.time() + self.args.freeze_s)
            self.freezes += 1
            note(f"t={time.time() - self.t0:6.1f}s SIGSTOP {inst.label} for {self.args.freeze_s:g} s")

    def thaw(self) -> None:
        if self.frozen is not None:
            inst, _until = self.frozen
            if inst.alive():
                inst.signal(signal.SIGCONT)
            self.frozen = None

    def drain(self) -> None:
        args = self.args
        self.thaw()
        self.t_quiesce = time.time()
        while self.stopping:
            self.restart_stopped()
            time.sleep(0.05)
        note(f"chaos over: {sum(self.kills.values())} kills {dict(self.kills)}, {self.cycles} pusher cycles, "
             f"{self.freezes} freezes; draining")
        wait_ready(list(self.current.values()), args.startup_timeout)
        for name in self.pushers:
            self.current[name].send("QUIESCE")
        deadline = time.monotonic() + 40
        while any(self.current[n].quiesced is None for n in self.pushers) and time.monotonic() < deadline:
            time.sleep(0.05)
        deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < deadline:
            stored, dead = self.stored_total()
            if not self.missing(poison=False) and stored == 0 and dead >= self.poison_pushed():
                self.drain_s = time.time() - self.t_quiesce
                break
            time.sleep(0.25)
        note(f"drained in {self.drain_s:.1f} s" if self.drain_s is not None else
             f"NOT drained after {args.drain_timeout:g} s: {sum(len(v) for v in self.missing(False).values())} "
             f"numbers unhandled, (messages stored, dead letters) {self.stored_total()}")

    def stored_total(self) -> tuple[int, int]:
        """Messages stored in the pushers' and keepers' queues, and dead letters among them."""
        stored = dead = 0
        for name in self.pushers + self.keepers:
            try:
                queues = zmqmesh.inspect_store(self.root / "stores" / name)["queues"]
            except zmqmesh.ZmqMeshError:
                stored += 1  # not readable yet: not drained
                continue
            stored += sum(q["messages"] for n, q in queues.items() if n != DEAD)
            dead += queues.get(DEAD, {}).get("messages", 0)
        return stored, dead

    def stop_all(self) -> None:
        for group in (self.pushers, self.pullers, self.keepers):
            for name in group:
                self.current[name].stop_sent = time.time()
                self.current[name].send("STOP")
            for name in group:
                inst = self.current[name]
                if not inst.wait_exit(self.args.linger + 15):
                    self.stop_problems.append(f"{inst.label} did not exit within {self.args.linger + 15:g} s of STOP")
                    inst.kill()
                elif inst.proc.returncode != 0 or inst.stopped is None:
                    self.stop_problems.append(f"{inst.label} exit status {inst.proc.returncode} after STOP")
                self.retire(inst)

    def read_stores(self) -> None:
        """Each store's rows, the dead letters apart (read as an operator would, with sqlite3)."""
        for name in self.pushers + self.keepers + sorted(self.dedupers):
            path = self.store_of(name)
            assert path is not None
            db = sqlite3.connect(f"file:{path / 'zmqmesh.db'}?mode=ro", uri=True)
            try:
                rows = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in STORE_TABLES}  # noqa: S608
                dead = db.execute("SELECT items FROM outbox WHERE queue = ?", (DEAD,)).fetchall()
                rows["parked"] -= db.execute("SELECT count(*) FROM parked WHERE queue = ?", (DEAD,)).fetchone()[0]
            finally:
                db.close()
            rows["outbox"] -= len(dead)
            rows["dead_segments"] = len(dead)
            self.store_rows[name] = rows
            for (items,) in dead:
                for msg_id, _ts, headers, body, *_marked in msgpack.unpackb(items, raw=False, use_list=False):
                    data = msgpack.unpackb(body, raw=False)
                    head = msgpack.unpackb(headers, raw=False) if headers else {}
                    self.dead.append((name, data["p"], data["i"], msg_id, head.get("x-attempts", "?")))

    def cleanup(self) -> None:
        if self.args.keep:
            with open(self.root / "handled.txt", "w") as f:
                for inst in self.instances:
                    f.writelines(f"{inst.label} {'killed' if inst.killed_at else '-'} {line}\n" for line in inst.raw)
        for inst in self.instances:
            if inst.alive():
                inst.kill()
            inst.close()
        if not self.args.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- analysis ----------------------------------------------------------------------------

    def pushed(self) -> dict[str, set[int]]:
        out: dict[str, set[int]] = {n: set() for n in self.pushers}
        for inst in self.instances:
            for first, end in inst.pushed:
                out[inst.name].update(range(first, end))
        return out

    def is_poison(self, n: int) -> bool:
        every = self.args.poison_every
        return bool(every) and n % every == every - 1

    def handled_numbers(self) -> Counter[tuple[str, int]]:
        return Counter((p, n) for inst in self.instances for p, n, *_ in list(inst.handled))

    def missing(self, poison: bool = True) -> dict[str, list[int]]:
        """The numbers pushed not handled (poison ones: not dead-lettered; or left out)."""
        handled = self.handled_numbers()
        dead = {(p, n) for _s, p, n, _i, _a in self.dead}
        out = {p: sorted(n for n in ns if (p, n) not in (dead if self.is_poison(n) else handled)
                         and (poison or not self.is_poison(n)))
               for p, ns in self.pushed().items()}
        return {p: v for p, v in out.items() if v}

    def check_lost(self) -> dict[str, Any]:
        pushed = self.pushed()
        handled = self.handled_numbers()
        missing = self.missing()
        total = sum(1 for ns in pushed.values() for n in ns if not self.is_poison(n))
        lost = sum(len(v) for v in missing.values())
        extra = sum(1 for (p, n) in handled if n not in pushed.get(p, ()))
        ids = Counter(h[2] for inst in self.instances for h in inst.handled)
        return {
            "ok": lost == 0 and total > 0, "pushed": total, "lost": lost, "poison": self.poison_pushed(),
            "handlings": sum(handled.values()), "duplicates": sum(c - 1 for c in handled.values() if c > 1),
            "duplicate_ids": sum(c - 1 for c in ids.values() if c > 1),
            "redelivered_marked": sum(h[3] for inst in self.instances for h in inst.handled),
            "from_keepers": sum(1 for inst in self.instances for h in inst.handled if h[5].startswith("k")),
            "handled_unrecorded": extra, "lost_examples": {p: v[:10] for p, v in missing.items()},
        }

    def check_dedupe(self) -> dict[str, Any]:
        conc = self.args.concurrency
        unexcused: list[str] = []
        excused = 0
        per_puller: dict[str, int] = {}
        for name in sorted(self.dedupers):
            first_seen: dict[str, tuple[Instance, int]] = {}
            twice = 0
            for inst in (i for i in self.instances if i.name == name):
                for k, (p, n, msg_id, red, _a, _v) in enumerate(inst.handled):
                    if msg_id not in first_seen:
                        first_seen[msg_id] = (inst, k)
                        continue
                    twice += 1
                    before, at = first_seen[msg_id]
                    if before.killed_at is not None and at >= len(before.handled) - conc:
                        excused += 1  # handled as the instance was killed: its id may not be committed
                    else:
                        unexcused.append(f"{name}: {p}/{n} id {msg_id} handled by {before.label} (line {at} of "
                                         f"{len(before.handled)}) and again by {inst.label} (redelivered={red})")
            per_puller[name] = twice
        return {"ok": not unexcused, "twice_at_one_puller": per_puller, "excused_by_kill": excused,
                "unexcused": len(unexcused), "examples": unexcused[:8]}

    def poison_pushed(self) -> int:
        return sum(1 for ns in self.pushed().values() for n in ns if self.is_poison(n))

    def check_dead_letters(self) -> dict[str, Any]:
        """Every poison message dead-lettered, nothing else (the handlers are healthy)."""
        healthy = [d for d in self.dead if not self.is_poison(d[2])]
        numbers = Counter((p, n) for _s, p, n, _i, _a in self.dead if self.is_poison(n))
        ids = Counter(i for _s, _p, n, i, _a in self.dead if self.is_poison(n))
        handlings = Counter((p, n) for inst in self.instances for p, n, _i, _a in inst.failed)
        return {"ok": not healthy and len(numbers) == self.poison_pushed(), "dead_letters": len(self.dead),
                "poison_pushed": self.poison_pushed(), "poison_dead": len(numbers),
                "dead_twice": sum(c - 1 for c in ids.values() if c > 1),
                "healthy_dead": len(healthy), "by_store": dict(Counter(d[0] for d in self.dead)),
                "x_attempts": dict(Counter(str(d[4]) for d in self.dead)),
                "poison_handlings": dict(Counter(handlings.values())),
                "examples": [f"{s}: {p}/{n} id {i} x-attempts {a}" for s, p, n, i, a in healthy[:8]]}

    def check_stores(self) -> dict[str, Any]:
        left = {n: {t: c for t, c in rows.items() if t not in ("handled", "dead_segments") and c}
                for n, rows in self.store_rows.items()}
        left = {n: rows for n, rows in left.items() if rows}
        return {"ok": not left and bool(self.store_rows), "rows": self.store_rows, "left": left}

    def check_health(self) -> dict[str, Any]:
        problems = list(self.stop_problems)
        for inst in self.instances:
            problems.extend(f"{inst.label}: {p}" for p in inst.problems)
            problems.extend(f"{inst.label}: push error {e}" for e in inst.push_errors)
            problems.extend(f"{inst.label} traceback: {tb}" for tb in inst.tracebacks())
        if self.drain_s is None:
            problems.append(f"not drained within {self.args.drain_timeout:g} s")
        return {"ok": not problems, "processes": len(self.instances), "kills": dict(self.kills),
                "pusher_cycles": self.cycles, "freezes": self.freezes, "drain_s": None if self.drain_s is None else round(self.drain_s, 2),
                "problems": problems[:10]}


def report(soak: Soak) -> bool:
    checks = {"lost": soak.check_lost(), "dedupe": soak.check_dedupe(), "dead_letters": soak.check_dead_letters(),
              "stores": soak.check_stores(), "health": soak.check_health()}
    lost, dedupe, health, dead = checks["lost"], checks["dedupe"], checks["health"], checks["dead_letters"]
    details = {
        "lost": f"{lost['pushed']} pushed (and {lost['poison']} poison), {lost['lost']} lost; {lost['handlings']} handlings, "
                f"{lost['duplicates']} duplicates ({lost['duplicate_ids']} by id), "
                f"{lost['redelivered_marked']} marked redelivered, {lost['from_keepers']} from keepers, {lost['handled_unrecorded']} handled whose push's "
                "return the kill hid",
        "dedupe": f"twice at one puller {dedupe['twice_at_one_puller']}, excused by a kill {dedupe['excused_by_kill']}, "
                  f"unexcused {dedupe['unexcused']}",
        "dead_letters": f"{dead['dead_letters']} dead letters {dead['by_store']}: {dead['poison_dead']} of "
                        f"{dead['poison_pushed']} poison messages, {dead['dead_twice']} twice, {dead['healthy_dead']} "
                        f"healthy ones; x-attempts {dead['x_attempts']}, handler runs a poison message "
                        f"{dead['poison_handlings']}",
        "stores": "; ".join(f"{n} " + " ".join(f"{t}={c}" for t, c in rows.items())
                            for n, rows in checks["stores"]["rows"].items()),
        "health": f"{health['processes']} processes, kills {health['kills']}, {health['pusher_cycles']} pusher "
                  f"cycles, {health['freezes']} freezes, drained in {health['drain_s']} s",
    }
    print()
    print(f"{'check':<12}  result  detail")
    print(f"{'-' * 12}  ------  {'-' * 60}")
    for name, r in checks.items():
        print(f"{name:<12}  {'PASS' if r['ok'] else 'FAIL':<6}  {details[name]}")
        for ex in (r.get("examples") or []) + (r.get("problems") or []):
            print(f"{'':<12}          - {ex}")
        if r.get("lost_examples"):
            print(f"{'':<12}          - lost: {r['lost_examples']}")
    ok = all(r["ok"] for r in checks.values())
    print(json.dumps({"soak": "durable", "ok": ok, "failed": [n for n, r in checks.items() if not r["ok"]],
                      "duration_s": soak.args.duration, "mesh": soak.mesh, **{n: r for n, r in checks.items()}},
                     separators=(",", ":"), default=str))
    sys.stdout.flush()
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of chaos (default 180)")
    parser.add_argument("--kill-every", type=float, default=4.0, help="a kill every half to all of this (default 4 s)")
    parser.add_argument("--cycle-every", type=float, default=8.0, help="a pusher's clean stop every (default 8 s; 0: none)")
    parser.add_argument("--freeze-every", type=float, default=10.0,
                        help="SIGSTOP a puller for --freeze-s every (default 10 s; 0: never)")
    parser.add_argument("--freeze-s", type=float, default=1.5, help="how long a freeze lasts (default 1.5 s)")
    parser.add_argument("--pushers", type=int, default=2)
    parser.add_argument("--pullers", type=int, default=3)
    parser.add_argument("--dedupe", type=int, default=2, help="how many of the pullers dedupe (default 2)")
    parser.add_argument("--keepers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=200.0, help="messages a second per pusher (default 200)")
    parser.add_argument("--batch", type=int, default=50, help="largest push_many (default 50)")
    parser.add_argument("--burst", type=int, default=2000, help="pushed just before a pusher's clean stop")
    parser.add_argument("--poison-every", type=int, default=1000,
                        help="every Nth number's handler raises, always (default 1000; 0: none)")
    parser.add_argument("--concurrency", type=int, default=2, help="the pullers' handler_concurrency (default 2)")
    parser.add_argument("--work-ms", type=float, default=3.0, help="each handler's work (default 3 ms)")
    parser.add_argument("--ack-timeout", type=float, default=1.0, help="the pullers' ack_timeout_s (default 1 s)")
    parser.add_argument("--heartbeat", type=float, default=0.5)
    parser.add_argument("--peer-timeout", type=float, default=2.0)
    parser.add_argument("--linger", type=float, default=2.0, help="linger_s: a pusher's stop's hand-over deadline")
    parser.add_argument("--startup-timeout", type=float, default=30.0)
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", default=None, help="run in DIR and keep it (stores, logs)")
    parser.add_argument("-v", "--verbose", action="store_true", help="nodes log at DEBUG to their log files")
    args = parser.parse_args(argv)
    if min(args.pushers, args.pullers) < 1 or not 0 <= args.dedupe <= args.pullers or args.keepers < 0:
        parser.error("need a pusher, a puller, and no more dedupe pullers than pullers")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))  # run finally: kill the children
    soak = Soak(args)
    try:
        soak.run()
        return 0 if report(soak) else 1
    except HarnessError as exc:
        note(f"HARNESS ERROR: {exc}")
        print(json.dumps({"soak": "durable", "ok": False, "harness_error": str(exc)}))
        return 2
    finally:
        soak.cleanup()


if __name__ == "__main__":
    sys.exit(main())
