#!/usr/bin/env python3
"""Soak test: a mesh of node processes under mixed traffic while one process is SIGKILLed
and restarted at a fixed period.

    python3 benchmarks/soak.py                              # 8 nodes, 5 minutes, a kill every 30 s
    python3 benchmarks/soak.py --duration 60 --kill-every 15

Every node (``_soak_node.py``) subscribes to ``soak.``, pulls the plain queue ``work`` and
the at-least-once queue ``aq``, serves ``echo`` and the idempotent ``lookup``, and sends
all of these. ``--nodes`` minus ``--victims`` nodes are long-lived (``c0``, ``c1``...);
the victims (``v0``...) are killed in turn, one every ``--kill-every`` seconds, and
restarted at once under the same name (a new node id). Only long-lived nodes push to
``aq``: a pusher holds what it has not had acknowledged, so the guarantee is about pullers
dying, which every kill exercises.

Checks (each printed in a table, then as one JSON line; the exit status is 1 if any fails,
2 if the harness itself could not run the soak):

* departures   - every LEAVE any node logged is of a process that was killed (logged
                 after the kill) or stopped at the end; no false departures. Every kill
                 is seen by every node that knew the victim, within peer_timeout + 1 s.
* aq_delivery  - every message a long-lived node pushed to ``aq`` (push returned) was
                 handled at least once by some puller (pullers print each id before it
                 is acknowledged). Duplicates and redeliveries are reported.
* requests     - request errors: PeerLostError on ``echo`` is expected only within a
                 kill's detection window; anything else (a timeout, an error from the
                 idempotent ``lookup``, a wrong reply) is a failure.
* pubsub       - stats()["pubsub"]["dropped"] summed over every process, gaps and
                 reorderings in per-publisher sequence numbers counted by the
                 subscribers themselves, and, between long-lived nodes, every message
                 published was received.
* pushes       - no push raised (no back-pressure timeout, no missing puller).
* rss          - VmRSS of each long-lived process, sampled from /proc during the
                 traffic: the mean of the last third is within 10 % of the mean of the
                 second third (the first third is warm-up).
* health       - no process died unexpectedly, every restarted node found the whole
                 mesh, no handler errors, no tracebacks, every clean stop exited 0.

Loopback only, a free UDP beacon port and a unique mesh name per run; every child is
killed in ``finally``; each phase is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, deque
from pathlib import Path
from typing import Any

from _bench_proc import free_udp_port
from _soak_common import HarnessError, NodeProcess

HERE = Path(__file__).resolve().parent
NODE = HERE / "_soak_node.py"



def note(text: str) -> None:
    sys.stdout.write(f"# {text}\n")
    sys.stdout.flush()


class Instance(NodeProcess):
    """One node process (a victim restarted is a new Instance), read line by line."""

    def __init__(self, name: str, role: str, serial: int, spec: dict[str, Any]) -> None:
        self.name = name
        self.role = role
        self.serial = serial
        self.label = f"{name}#{serial}"
        self.started = time.time()
        self.id: str | None = None
        self.ready_t: float | None = None
        self.traffic_t: float | None = None
        self.waited: dict[str, str] | None = None
        self.killed_at: float | None = None
        self.stopped_at: float | None = None
        self.died_unexpectedly: float | None = None
        self.joins: list[tuple[str, str, float]] = []
        self.leaves: list[tuple[str, str, float]] = []
        self.aq: list[tuple[str, int, int]] = []
        self.reqerrs: list[tuple[str, str, float, str]] = []
        self.pusherrs: list[tuple[str, str, float]] = []
        self.last_stats: dict[str, Any] | None = None
        self.quiesced: dict[str, Any] | None = None
        self.final: dict[str, Any] | None = None
        self.stopped_line = False
        self.stderr_tail: deque[str] = deque(maxlen=40)
        self.tracebacks: list[str] = []
        self.rss: list[tuple[float, int]] = []
        super().__init__(NODE, spec, stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        self._err = threading.Thread(target=self._read_stderr, daemon=True)
        self._err.start()

    # -- reading -----------------------------------------------------------------------------

    def _parse(self, line: str) -> None:
        word, _, rest = line.partition(" ")
        if word == "AQ":
            pusher, seq, red = rest.split()
            self.aq.append((pusher, int(seq), int(red)))
        elif word == "STATS":
            self.last_stats = json.loads(rest.split(" ", 1)[1])
        elif word == "JOIN":
            name, pid, t = rest.split()
            self.joins.append((name, pid, float(t)))
        elif word == "LEAVE":
            name, pid, t = rest.split()
            self.leaves.append((name, pid, float(t)))
        elif word == "REQERR":
            service, kind, t, *msg = rest.split(" ")
            self.reqerrs.append((service, kind, float(t), " ".join(msg)))
        elif word == "PUSHERR":
            queue, kind, t = rest.split()
            self.pusherrs.append((queue, kind, float(t)))
        elif word == "BOOT":
            self.id = rest.split()[0]
        elif word == "READY":
            self.ready_t = float(rest.split()[1])
        elif word == "WAITED":
            self.waited = json.loads(rest.split(" ", 1)[1])
        elif word == "TRAFFIC":
            self.traffic_t = float(rest)
        elif word == "QUIESCED":
            self.quiesced = json.loads(rest.split(" ", 1)[1])
        elif word == "FINAL":
            self.final = json.loads(rest.split(" ", 1)[1])
        elif word == "STOPPED":
            self.stopped_line = True
        elif word in ("ERROR", "WATCHDOG"):
            self.problems.append(line)
        elif line.strip():
            self.problems.append(f"unexpected output: {line[:200]}")

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        collecting: list[str] | None = None
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            self.stderr_tail.append(line)
            if line.startswith("Traceback"):
                collecting = [line]
            elif collecting is not None:
                collecting.append(line)
                if line and not line.startswith(" "):  # the exception line ends a traceback
                    self.tracebacks.append("\n".join(collecting[-12:]))
                    collecting = None

    # -- control -----------------------------------------------------------------------------

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def sample_rss(self, t_rel: float) -> None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        self.rss.append((t_rel, int(line.split()[1])))
                        return
        except OSError:
            pass

    def join_readers(self, timeout: float) -> None:
        self.join_stdout(timeout)
        self._err.join(max(0.1, timeout / 2))

    def end_of_life(self) -> float:
        """When this instance stopped taking part (kill, stop, death), or +inf."""
        for t in (self.killed_at, self.died_unexpectedly, self.stopped_at):
            if t is not None:
                return t
        return float("inf")

    def stats(self) -> dict[str, Any]:
        return self.final or self.last_stats or {}


# -- the run ---------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.port = free_udp_port()
        self.mesh = f"soak-{uuid.uuid4().hex[:10]}"
        self.options = {
            "beacon_port": self.port,
            "mesh": self.mesh,
            "heartbeat_interval_s": args.heartbeat,
            "peer_timeout_s": args.peer_timeout,
        }
        scale = args.rate_scale
        self.rates = {"pub": 20 * scale, "work": 20 * scale, "aq": 20 * scale, "echo": 10 * scale, "lookup": 5 * scale}
        n_core = args.nodes - args.victims
        self.core_names = [f"c{i}" for i in range(n_core)]
        self.victim_names = [f"v{i}" for i in range(args.victims)]
        self.instances: list[Instance] = []
        self.current: dict[str, Instance] = {}
        self.serial = Counter()
        self.kills: list[tuple[float, Instance]] = []
        self.t0 = 0.0
        self.t_quiesce = 0.0
        self.t_stop = 0.0
        self.drained = False
        self.detect_limit = args.peer_timeout + 1.0
        self.max_life = args.duration + 240

    def spawn(self, name: str) -> Instance:
        role = "core" if name in self.core_names else "victim"
        self.serial[name] += 1
        spec = {"name": name, "role": role, "nodes": self.args.nodes, "options": self.options,
                "rates": self.rates, "max_life": self.max_life}
        inst = Instance(name, role, self.serial[name], spec)
        self.instances.append(inst)
        self.current[name] = inst
        return inst

    def run(self) -> None:
        args = self.args
        note(f"soak: {args.nodes} nodes ({len(self.core_names)} long-lived, {len(self.victim_names)} victims), "
             f"{args.duration:g} s, a kill every {args.kill_every:g} s, mesh {self.mesh}, beacon port {self.port}")
        for name in self.core_names + self.victim_names:
            self.spawn(name)
        deadline = time.monotonic() + args.startup_timeout
        while not all(i.traffic_t for i in self.current.values()):
            dead = [i for i in self.current.values() if not i.alive()]
            if dead or time.monotonic() > deadline:
                raise HarnessError("the mesh did not start: " + "; ".join(
                    f"{i.label} alive={i.alive()} ready={bool(i.ready_t)} waited={i.waited} "
                    f"stderr={list(i.stderr_tail)[-3:]} problems={i.problems[-2:]}"
                    for i in self.current.values() if not i.traffic_t))
            time.sleep(0.05)
        self.t0 = time.time()
        note(f"traffic running on every node ({self.t0 - min(i.started for i in self.instances):.1f} s after launch)")

        kill_at = [self.t0 + k * args.kill_every for k in range(1, 10_000) if k * args.kill_every < args.duration]
        end = self.t0 + args.duration
        next_rss = self.t0
        victim_turn = 0
        while True:
            now = time.time()
            if now >= end:
                break
            if now >= next_rss:
                next_rss += args.rss_interval
                for name in self.core_names:
                    self.current[name].sample_rss(now - self.t0)
            if kill_at and now >= kill_at[0] and self.victim_names:
                kill_at.pop(0)
                name = self.victim_names[victim_turn % len(self.victim_names)]
                victim_turn += 1
                victim = self.current[name]
                victim.killed_at = time.time()
                victim.kill()
                self.kills.append((victim.killed_at, victim))
                fresh = self.spawn(name)
                note(f"t={victim.killed_at - self.t0:6.1f}s SIGKILL {victim.label} (pid {victim.pid}, "
                     f"id {str(victim.id)[:8]}); restarted as {fresh.label} (pid {fresh.pid})")
            for inst in list(self.current.values()):
                if not inst.alive() and inst.killed_at is None and inst.died_unexpectedly is None:
                    inst.died_unexpectedly = time.time()
                    note(f"{inst.label} exited on its own with {inst.proc.returncode}")
            time.sleep(0.02)

        # quiesce: stop the traffic everywhere and collect what was sent
        self.t_quiesce = time.time()
        for inst in self.current.values():
            inst.send("QUIESCE")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(
            i.quiesced is not None for i in self.current.values() if i.alive()
        ):
            time.sleep(0.05)

        # drain the at-least-once queue: wait until every pushed id was handled, bounded
        deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < deadline:
            if not self.aq_missing():
                self.drained = True
                break
            time.sleep(0.1)
        note(f"quiesced; at-least-once queue {'drained' if self.drained else 'NOT drained'} "
             f"{time.time() - self.t_quiesce:.1f} s after")

        # let the last kill's detection window pass before the clean stops start
        if self.kills:
            wait = self.kills[-1][0] + self.detect_limit + 0.5 - time.time()
            if wait > 0:
                time.sleep(wait)

        self.t_stop = time.time()
        for inst in self.current.values():
            if inst.alive():
                inst.stopped_at = time.time()
                inst.send("STOP")
        deadline = time.monotonic() + 20
        for inst in self.current.values():
            try:
                inst.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                inst.problems.append("did not exit within 20 s of STOP: killed")
                inst.kill()
        for inst in self.instances:
            inst.join_readers(5)

    def cleanup(self) -> None:
        for inst in self.instances:
            if inst.alive():
                inst.kill()
        for inst in self.instances:
            inst.close_pipes()

    # -- analysis ----------------------------------------------------------------------------

    def pushed_aq(self) -> dict[str, int]:
        out = {}
        for name in self.core_names:
            inst = self.current[name]
            src = inst.quiesced or (inst.last_stats or {}).get("mine") or {}
            out[name] = int(src.get("pushed", {}).get("aq", 0))
        return out

    def handled_aq(self) -> dict[str, Counter[int]]:
        handled: dict[str, Counter[int]] = {name: Counter() for name in self.core_names}
        for inst in self.instances:
            for pusher, seq, _red in list(inst.aq):
                handled.setdefault(pusher, Counter())[seq] += 1
        return handled

    def aq_missing(self) -> dict[str, list[int]]:
        pushed = self.pushed_aq()
        handled = self.handled_aq()
        return {name: missing for name, n in pushed.items()
                if (missing := [i for i in range(n) if i not in handled.get(name, {})])}

    def check_departures(self) -> dict[str, Any]:
        by_id = {i.id: i for i in self.instances if i.id}
        false: list[str] = []
        latencies: list[float] = []
        seen = Counter()
        for obs in self.instances:
            for name, pid, t in obs.leaves:
                subj = by_id.get(pid)
                if subj is not None and subj.killed_at is not None and t >= subj.killed_at - 0.05:
                    seen["kill"] += 1
                    latencies.append(t - subj.killed_at)
                elif subj is not None and subj.stopped_at is not None and t >= subj.stopped_at - 0.05:
                    seen["stop"] += 1
                else:
                    what = subj.label if subj else f"unknown id {pid[:8]}"
                    false.append(f"{obs.label} saw {name} ({what}) leave at t={t - self.t0:.2f}s")
        missed: list[str] = []
        late: list[str] = []
        for k, victim in self.kills:
            for obs in self.instances:
                if obs is victim or obs.end_of_life() < k + self.detect_limit:
                    continue
                if not any(pid == victim.id and t < k for _n, pid, t in obs.joins):
                    continue  # never knew this instance
                leave = [t for _n, pid, t in obs.leaves if pid == victim.id]
                if not leave:
                    missed.append(f"{obs.label} never saw {victim.label} (killed t={k - self.t0:.1f}s) leave")
                elif leave[0] - k > self.detect_limit:
                    late.append(f"{obs.label} saw {victim.label} leave {leave[0] - k:.2f}s after the kill")
        ok = not false and not missed and not late and bool(self.kills or not self.victim_names)
        return {
            "ok": ok, "kills": len(self.kills), "leaves_after_kill": seen["kill"], "leaves_after_stop": seen["stop"],
            "false_departures": len(false), "missed": len(missed), "late": len(late),
            "detect_ms_median": round(1000 * statistics.median(latencies), 1) if latencies else None,
            "detect_ms_max": round(1000 * max(latencies), 1) if latencies else None,
            "examples": (false + missed + late)[:8],
        }

    def check_aq(self) -> dict[str, Any]:
        pushed = self.pushed_aq()
        handled = self.handled_aq()
        missing = {name: [i for i in range(n) if i not in handled.get(name, {})] for name, n in pushed.items()}
        lost = sum(len(v) for v in missing.values())
        extra = sum(1 for name, c in handled.items() for i in c if i >= pushed.get(name, 0))
        dups = sum(n - 1 for c in handled.values() for n in c.values() if n > 1)
        redelivered = sum(red for inst in self.instances for _p, _s, red in inst.aq)
        total = sum(pushed.values())
        ok = lost == 0 and all(n > 0 for n in pushed.values())
        return {
            "ok": ok, "pushed": total, "handled_distinct": total - lost, "lost": lost,
            "handled_not_pushed": extra, "duplicates": dups, "redelivered_marked": redelivered,
            "drained": self.drained,
            "lost_examples": {n: v[:10] for n, v in missing.items() if v},
        }

    def in_kill_window(self, t: float) -> bool:
        return any(k - 0.2 <= t <= k + self.detect_limit + 1.0 for k, _v in self.kills)

    def check_requests(self) -> dict[str, Any]:
        ok_count = Counter()
        for inst in self.instances:
            mine = inst.quiesced or (inst.stats().get("mine") or {})
            for service, n in (mine.get("req_ok") or {}).items():
                ok_count[service] += n
        expected = Counter()
        unexpected: list[str] = []
        by_kind = Counter()
        for inst in self.instances:
            for service, kind, t, msg in inst.reqerrs:
                by_kind[f"{service}:{kind}"] += 1
                if kind == "PeerLostError" and service == "echo" and self.in_kill_window(t):
                    expected[kind] += 1
                else:
                    unexpected.append(f"{inst.label} {service} {kind} at t={t - self.t0:.2f}s: {msg[:120]}")
        ok = not unexpected and ok_count["echo"] > 0 and ok_count["lookup"] > 0
        return {
            "ok": ok, "ok_echo": ok_count["echo"], "ok_lookup": ok_count["lookup"],
            "errors": dict(by_kind), "expected_peer_lost": expected["PeerLostError"],
            "unexpected": len(unexpected), "examples": unexpected[:8],
        }

    def check_pubsub(self) -> dict[str, Any]:
        dropped = sum(int(i.stats().get("pubsub", {}).get("dropped", 0)) for i in self.instances)
        sent = sum(int(i.stats().get("pubsub", {}).get("sent", 0)) for i in self.instances)
        received = sum(int(i.stats().get("pubsub", {}).get("received", 0)) for i in self.instances)
        gaps = sum(int((i.stats().get("mine") or {}).get("sub_gaps", 0)) for i in self.instances)
        disorder = sum(int((i.stats().get("mine") or {}).get("sub_disorder", 0)) for i in self.instances)
        missing = 0
        problems: list[str] = []
        for s_name in self.core_names:
            sub = self.current[s_name]
            subs = (sub.final or {}).get("subs")
            if subs is None:
                problems.append(f"{sub.label} printed no FINAL")
                continue
            for p_name in self.core_names:
                pub = self.current[p_name]
                published = int((pub.quiesced or {}).get("published", 0))
                name, first, _last, count, _g, _d = subs.get(pub.id, [p_name, 0, -1, 0, 0, 0])
                if first != 0 or count != published:
                    missing += max(0, published - count)
                    problems.append(f"{sub.label} got {count} of {published} from {pub.label} (first seq {first})")
        ok = dropped == 0 and gaps == 0 and disorder == 0 and missing == 0 and not problems and sent > 0
        return {
            "ok": ok, "sent": sent, "received": received, "dropped_counted": dropped,
            "gaps_seen": gaps, "reordered": disorder, "missing_between_long_lived": missing,
            "examples": problems[:8],
        }

    def check_pushes(self) -> dict[str, Any]:
        errors = Counter(f"{q}:{k}" for i in self.instances for q, k, _t in i.pusherrs)
        pushed = Counter()
        handled_work = 0
        for inst in self.instances:
            mine = inst.quiesced or (inst.stats().get("mine") or {})
            for q, n in (mine.get("pushed") or {}).items():
                pushed[q] += n
            handled_work += int((inst.stats().get("mine") or {}).get("handled", {}).get("work", 0))
        return {
            "ok": not errors and pushed["work"] > 0,
            "errors": dict(errors), "work_pushed": pushed["work"], "work_handled": handled_work,
            "work_lost_at_most_once": pushed["work"] - handled_work,
        }

    def check_rss(self) -> dict[str, Any]:
        d = self.args.duration
        rows = {}
        ok = True
        for name in self.core_names:
            samples = self.current[name].rss
            second = [kb for t, kb in samples if d / 3 <= t < 2 * d / 3]
            last = [kb for t, kb in samples if t >= 2 * d / 3]
            if not second or not last:
                rows[name] = {"ok": False, "samples": len(samples)}
                ok = False
                continue
            m2, m3 = statistics.mean(second), statistics.mean(last)
            change = (m3 - m2) / m2
            row_ok = abs(change) <= self.args.rss_tolerance
            ok = ok and row_ok
            rows[name] = {"ok": row_ok, "first_kb": samples[0][1], "mid_kb": round(m2), "last_kb": round(m3),
                          "max_kb": max(kb for _t, kb in samples), "change_pct": round(100 * change, 2),
                          "samples": len(samples)}
        return {"ok": ok, "tolerance_pct": 100 * self.args.rss_tolerance, "processes": rows}

    def check_health(self) -> dict[str, Any]:
        problems: list[str] = []
        handler_errors = 0
        for inst in self.instances:
            if inst.died_unexpectedly is not None:
                problems.append(f"{inst.label} exited on its own ({inst.proc.returncode})")
            if inst.killed_at is None and inst.died_unexpectedly is None:
                if inst.proc.returncode != 0:
                    problems.append(f"{inst.label} exit status {inst.proc.returncode} after STOP")
                if inst.final is None:
                    problems.append(f"{inst.label} printed no FINAL")
            if inst.waited is not None and any(v != "ok" for v in inst.waited.values()):
                problems.append(f"{inst.label} did not find the whole mesh: {inst.waited}")
            if inst.killed_at is None and inst.traffic_t is None and inst.started < self.t_quiesce - 10:
                problems.append(f"{inst.label} never started its traffic")  # 10 s: more than any restart took
            problems.extend(f"{inst.label}: {p}" for p in inst.problems)
            problems.extend(f"{inst.label} traceback: {tb}" for tb in inst.tracebacks)
            s = inst.stats()
            handler_errors += sum(int(s.get(p, {}).get("errors", 0)) for p in ("pubsub", "pipeline", "service"))
        if handler_errors:
            problems.append(f"{handler_errors} handler/decode errors in stats()")
        rejoin = [i.traffic_t - i.started for i in self.instances if i.serial > 1 and i.traffic_t]
        return {
            "ok": not problems, "processes": len(self.instances), "handler_errors": handler_errors,
            "restart_to_traffic_s_max": round(max(rejoin), 2) if rejoin else None,
            "problems": problems[:8],
        }


def summary_line(name: str, r: dict[str, Any]) -> str:
    if name == "departures":
        return (f"{r['kills']} kills, {r['leaves_after_kill']} leaves after kills (detect median "
                f"{r['detect_ms_median']} ms, max {r['detect_ms_max']} ms), {r['leaves_after_stop']} after stops; "
                f"false {r['false_departures']}, missed {r['missed']}, late {r['late']}")
    if name == "aq_delivery":
        return (f"{r['pushed']} pushed, {r['lost']} lost, {r['duplicates']} duplicates, "
                f"{r['redelivered_marked']} marked redelivered, drained={r['drained']}")
    if name == "requests":
        return (f"{r['ok_echo']} echo + {r['ok_lookup']} lookup ok; errors {r['errors'] or 0}; "
                f"{r['expected_peer_lost']} expected PeerLost, {r['unexpected']} unexpected")
    if name == "pubsub":
        return (f"{r['sent']} sent, {r['received']} received, dropped {r['dropped_counted']}, gaps {r['gaps_seen']}, "
                f"reordered {r['reordered']}, missing between long-lived {r['missing_between_long_lived']}")
    if name == "pushes":
        return (f"{r['work_pushed']} work pushed, {r['work_handled']} handled "
                f"({r['work_lost_at_most_once']} lost with killed pullers, at-most-once); push errors {r['errors'] or 0}")
    if name == "rss":
        return "; ".join(f"{n} {p.get('mid_kb')}->{p.get('last_kb')} kB ({p.get('change_pct')}%)"
                         for n, p in r["processes"].items())
    if name == "health":
        return (f"{r['processes']} processes, handler errors {r['handler_errors']}, "
                f"restart->traffic max {r['restart_to_traffic_s_max']} s")
    return ""


def report(soak: Soak) -> bool:
    checks = {
        "departures": soak.check_departures(),
        "aq_delivery": soak.check_aq(),
        "requests": soak.check_requests(),
        "pubsub": soak.check_pubsub(),
        "pushes": soak.check_pushes(),
        "rss": soak.check_rss(),
        "health": soak.check_health(),
    }
    width = max(len(n) for n in checks)
    print()
    print(f"{'check':<{width}}  result  detail")
    print(f"{'-' * width}  ------  {'-' * 60}")
    for name, r in checks.items():
        print(f"{name:<{width}}  {'PASS' if r['ok'] else 'FAIL':<6}  {summary_line(name, r)}")
        for key in ("examples", "problems"):
            for ex in r.get(key) or []:
                print(f"{'':<{width}}          - {ex}")
        if name == "aq_delivery" and r["lost_examples"]:
            print(f"{'':<{width}}          - lost ids: {r['lost_examples']}")
    print()
    print(f"{'process':<8} {'rss first':>10} {'rss mid':>10} {'rss last':>10} {'change':>8} {'samples':>8}")
    for name, p in checks["rss"]["processes"].items():
        print(f"{name:<8} {p.get('first_kb', '-'):>10} {p.get('mid_kb', '-'):>10} {p.get('last_kb', '-'):>10} "
              f"{str(p.get('change_pct', '-')) + '%':>8} {p.get('samples', 0):>8}")
    print()
    for name, r in checks.items():
        print(json.dumps({"soak": "check", "check": name, **r}, separators=(",", ":"), default=str))
    ok = all(r["ok"] for r in checks.values())
    print(json.dumps({"soak": "summary", "ok": ok, "failed": [n for n, r in checks.items() if not r["ok"]],
                      "duration_s": soak.args.duration, "kill_every_s": soak.args.kill_every,
                      "nodes": soak.args.nodes, "victims": soak.args.victims, "kills": len(soak.kills),
                      "mesh": soak.mesh}, separators=(",", ":")))
    sys.stdout.flush()
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of traffic (default 300)")
    parser.add_argument("--kill-every", type=float, default=30.0, help="seconds between SIGKILLs (default 30)")
    parser.add_argument("--nodes", type=int, default=8, help="node processes (default 8)")
    parser.add_argument("--victims", type=int, default=3, help="how many of them are killed in turn (default 3)")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="multiply every traffic rate (default 1)")
    parser.add_argument("--heartbeat", type=float, default=0.5, help="heartbeat_interval_s (default 0.5)")
    parser.add_argument("--peer-timeout", type=float, default=2.0, help="peer_timeout_s (default 2.0)")
    parser.add_argument("--rss-interval", type=float, default=None, help="seconds between RSS samples")
    parser.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed RSS change (default 0.10)")
    parser.add_argument("--startup-timeout", type=float, default=45.0)
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.victims >= args.nodes or args.victims < 0 or args.nodes < 2:
        parser.error("need 2+ nodes and fewer victims than nodes")
    if args.kill_every <= 0 or args.duration <= 0:
        parser.error("--duration and --kill-every must be positive")
    if args.rss_interval is None:
        args.rss_interval = min(2.0, max(0.5, args.duration / 30))

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))  # run finally: kill the children
    soak = Soak(args)
    try:
        soak.run()
    except HarnessError as exc:
        note(f"HARNESS ERROR: {exc}")
        print(json.dumps({"soak": "summary", "ok": False, "harness_error": str(exc)}))
        return 2
    finally:
        soak.cleanup()
    return 0 if report(soak) else 1


if __name__ == "__main__":
    sys.exit(main())
