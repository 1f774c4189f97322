"""A long-running node serves until SIGINT or SIGTERM, then stops cleanly."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_until

SYNC = """
import sys, zmqmesh
node = zmqmesh.Node("server", mesh=sys.argv[1], beacon_port=int(sys.argv[2]))
node.service("ping", lambda msg: "pong")
node.on_join(lambda peer: None)
print("serving", flush=True)
node.run_forever()
print("stopped", node.running, flush=True)
"""

ASYNC = """
import asyncio, sys, zmqmesh
async def main():
    node = zmqmesh.AsyncNode("server", mesh=sys.argv[1], beacon_port=int(sys.argv[2]))
    node.service("ping", lambda msg: "pong")
    print("serving", flush=True)
    await node.serve_forever()
    print("stopped", node.running, flush=True)
asyncio.run(main())
"""


@contextlib.contextmanager
def serving_process(*argv: str) -> Iterator[subprocess.Popen[str]]:
    """The Python process ``python argv...``, its output piped as text, once it printed
    "serving" (its node about to serve); killed at the end if it still runs."""
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "serving"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("code", [SYNC, ASYNC], ids=["Node.run_forever", "AsyncNode.serve_forever"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serving_ends_cleanly_on_a_signal(code: str, sig: int, mesh: dict[str, Any]) -> None:
    import zmqmesh

    with serving_process("-c", textwrap.dedent(code), mesh["mesh"], str(mesh["beacon_port"])) as proc, \
            zmqmesh.Node("client", **mesh) as client:
        assert client.request("ping", timeout=10) == "pong"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
        wait_until(lambda: not client.peers(), 5, "the server's goodbye")  # it left politely
    assert proc.returncode == 0, err
    assert "stopped False" in out
    assert "Traceback" not in err


def test_run_forever_wants_the_main_thread(mesh: dict[str, Any]) -> None:
    import threading

    import zmqmesh

    node = zmqmesh.Node("n", **mesh)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            node.run_forever()
        except BaseException as exc:
            raised.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert raised and isinstance(raised[0], zmqmesh.ZmqMeshError)
    assert not node.running


async def _serve_refused(node: Any, outcome: list[Any]) -> None:
    """``node.serve_forever()`` expected to be refused: what it raised, then whether the
    node runs, into ``outcome``; the node stopped after."""
    try:
        await node.serve_forever()
    except BaseException as exc:
        outcome.append(exc)
    outcome.append(node.running)
    await node.stop()


def test_serve_forever_on_a_loop_without_signal_handlers_leaves_nothing_running(mesh: dict[str, Any]) -> None:
    """A loop that cannot take signal handlers (``add_signal_handler`` raises
    NotImplementedError: Windows' loops, say): `AsyncNode.serve_forever` raises
    `ZmqMeshError` before it starts anything, and leaves no handler in place. (Before: it
    started the node, then raised the bare NotImplementedError, the node left running.)"""
    import asyncio

    import zmqmesh

    class NoSignals(asyncio.SelectorEventLoop):
        def add_signal_handler(self, sig: int, callback: Any, *args: Any) -> None:
            raise NotImplementedError

    node = zmqmesh.AsyncNode("n", **mesh)
    outcome: list[Any] = []
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    loop = NoSignals()  # (not asyncio.Runner's loop_factory: Python 3.10 has none)
    try:
        loop.run_until_complete(_serve_refused(node, outcome))
    finally:
        loop.close()
    assert len(outcome) == 2 and type(outcome[0]) is zmqmesh.ZmqMeshError and outcome[1] is False, outcome
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_serve_forever_wants_the_main_thread_too(mesh: dict[str, Any]) -> None:
    """`AsyncNode.serve_forever` on a loop run by another thread than the main one (whose
    loop cannot take signal handlers) started the node, then raised asyncio's bare
    ``RuntimeError``, leaving the node running. It raises `ZmqMeshError` before it starts
    anything, as `Node.run_forever` does."""
    import asyncio
    import threading

    import zmqmesh

    node = zmqmesh.AsyncNode("n", **mesh)
    outcome: list[Any] = []

    def run() -> None:
        asyncio.run(_serve_refused(node, outcome))

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert len(outcome) == 2 and type(outcome[0]) is zmqmesh.ZmqMeshError and outcome[1] is False, outcome


def test_a_stop_flag_is_raised_from_a_signal_handler_and_waited_on() -> None:
    """A SIGALRM handler raises the flag while the main thread waits without a timeout (a
    `threading.Event` set there can deadlock); unraised, a wait ends at its timeout, and
    NaN, like 0, looks once."""
    from zmqmesh import StopFlag

    flag = StopFlag()
    assert flag.wait(0.05) is False and flag.wait(float("nan")) is False and not flag.is_set()
    previous = signal.signal(signal.SIGALRM, flag.set)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        assert flag.wait() is True and flag.is_set()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert flag.wait(0) is True  # raised once, raised for good


def _voluntary_switches() -> int:
    import threading

    with open(f"/proc/self/task/{threading.get_native_id()}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("voluntary_ctxt_switches"))


def test_a_stop_flag_waits_asleep_and_wakes_when_another_thread_raises_it() -> None:
    """A wait sleeps until the flag is raised: it does not wake up to look (the flag was
    polled 20 times a second, which kept every idle node waking up)."""
    import threading

    from zmqmesh import StopFlag

    flag = StopFlag()
    before = _voluntary_switches()
    assert flag.wait(0.5) is False
    assert _voluntary_switches() - before <= 3  # (polling every 50 ms would be about 10)
    threading.Timer(0.1, flag.set).start()
    assert flag.wait(10) is True


def test_a_stop_flag_wakes_every_waiter() -> None:
    import threading

    from zmqmesh import StopFlag

    flag = StopFlag()
    woke: list[bool] = []
    waiters = [threading.Thread(target=lambda: woke.append(flag.wait(10))) for _ in range(3)]
    for waiter in waiters:
        waiter.start()
    threading.Timer(0.1, flag.set).start()
    for waiter in waiters:
        waiter.join(15)
    assert woke == [True, True, True]


FORKED = """
import os, signal, sys, time

def early_signal():  # a signal landing in the child before zmqmesh's fork hook gave it its own pipe
    os.kill(os.getpid(), signal.SIGUSR1)
    for _ in range(100):
        pass  # (the handler runs at a bytecode boundary here)

os.register_at_fork(after_in_child=early_signal)  # (registered first: runs first in the child)
from zmqmesh import StopFlag
raised, fresh = StopFlag(), StopFlag()
raised.set()
signal.signal(signal.SIGUSR1, fresh.set)
pid = os.fork()
if pid == 0:  # the child: both flags raised, and its waits end at once
    os._exit(0 if raised.wait(0) and fresh.wait(5) else 1)
_, status = os.waitpid(pid, 0)
signal.signal(signal.SIGUSR1, signal.SIG_DFL)
cpu = time.process_time()
waited = fresh.wait(1.0)  # the child's set neither raised the parent's flag nor woke it
print(os.waitstatus_to_exitcode(status), fresh.is_set(), waited, time.process_time() - cpu < 0.5, flush=True)
"""


def test_a_stop_flag_is_its_own_in_a_forked_child() -> None:
    """A child made by fork has flags of its own: what it raises, even from a signal that
    lands before its pipes are its own, neither raises nor wakes the parent's, whose wait
    sleeps out its timeout (it spun on the child's byte)."""
    result = subprocess.run([sys.executable, "-c", FORKED], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "False", "False", "True"]


STOPPED_ELSEWHERE = """
import sys, threading, zmqmesh
node = zmqmesh.Node("server", mesh=sys.argv[1], beacon_port=int(sys.argv[2]))
threading.Timer(0.3, node.stop).start()
node.run_forever()
print("returned", node.running, flush=True)
"""


def test_run_forever_returns_when_another_thread_stops_the_node(mesh: dict[str, Any]) -> None:
    result = subprocess.run([sys.executable, "-c", STOPPED_ELSEWHERE, mesh["mesh"], str(mesh["beacon_port"])],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "returned False" in result.stdout


def test_a_node_stopped_before_it_started_stays_stopped(mesh: dict[str, Any]) -> None:
    """stop() before start(): start() and run_forever() raise NodeClosedError and start no
    thread (the node used to start anyway, and run_forever then served until a signal);
    AsyncNode.start() raises too."""
    import asyncio
    import threading

    import zmqmesh

    node = zmqmesh.Node("early", **mesh)
    node.stop()
    with pytest.raises(zmqmesh.NodeClosedError):
        node.start()
    with pytest.raises(zmqmesh.NodeClosedError):
        node.run_forever()
    assert not node.running
    assert not [t.name for t in threading.enumerate() if t.name.endswith("-early")]

    async def main() -> None:
        anode = zmqmesh.AsyncNode("early-async", **mesh)
        await anode.stop()
        with pytest.raises(zmqmesh.NodeClosedError):
            await anode.start()
        assert not anode.running

    asyncio.run(main())


SIGNALLED_TWICE = """
import os, signal, sys, threading, time, zmqmesh

class Node(zmqmesh.Node):
    def stop(self, timeout=5.0):
        if not self._stopped:
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C, in the middle of the stop
            time.sleep(0.2)  # (the handler runs meanwhile)
            super().stop(timeout)
            print("stopped", self.running, flush=True)

node = Node("server", mesh=sys.argv[1], beacon_port=int(sys.argv[2]))
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
node.run_forever()
print("returned", signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)
"""


def test_a_second_signal_during_the_stop_does_not_cut_it_short(mesh: dict[str, Any]) -> None:
    """run_forever keeps its handlers through the stop: a second Ctrl-C only asks again
    (it raised KeyboardInterrupt in the middle of the stop), and the previous handler is
    back once it returns."""
    result = subprocess.run([sys.executable, "-c", SIGNALLED_TWICE, mesh["mesh"], str(mesh["beacon_port"])],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["stopped False", "returned True"]
    assert "Traceback" not in result.stderr


FORKED_WHILE_SERVING_SYNC = """
import multiprocessing, os, signal, sys, threading, time, zmqmesh
def nap():
    time.sleep(20)
node = zmqmesh.Node("server", mesh=sys.argv[1], beacon_port=int(sys.argv[2]))
said = []
def fork_and_signal():
    try:
        while not node.running:
            time.sleep(0.02)
        ctx = multiprocessing.get_context("fork")
        for sig in (signal.SIGTERM, signal.SIGINT):
            child = ctx.Process(target=nap)
            child.start()
            time.sleep(0.5)
            os.kill(child.pid, sig)
            child.join(5)
            said.append(str(child.exitcode))
            if child.exitcode is None:
                child.kill()
                child.join()
        said.append(str(node.running))
    finally:
        node.stop()
threading.Thread(target=fork_and_signal).start()
node.run_forever()
print(" ".join(said), flush=True)
"""

FORKED_WHILE_SERVING_ASYNC = """
import asyncio, multiprocessing, os, signal, sys, time, zmqmesh
def nap():
    time.sleep(20)
async def main():
    node = zmqmesh.AsyncNode("server", mesh=sys.argv[1], beacon_port=int(sys.argv[2]))
    said = []
    async def fork_and_signal():
        try:
            while not node.running:
                await asyncio.sleep(0.02)
            ctx = multiprocessing.get_context("fork")
            for sig in (signal.SIGTERM, signal.SIGINT):
                child = ctx.Process(target=nap)
                child.start()
                await asyncio.sleep(0.5)
                os.kill(child.pid, sig)
                await asyncio.get_running_loop().run_in_executor(None, child.join, 5)
                said.append(str(child.exitcode))
                if child.exitcode is None:
                    child.kill()
                    child.join()
            await asyncio.sleep(0.5)  # (time for a signal handed to this loop to stop the node)
            said.append(str(node.running))
        finally:
            await node.stop()
    helper = asyncio.ensure_future(fork_and_signal())
    await node.serve_forever()
    await helper
    print(" ".join(said), flush=True)
asyncio.run(main())
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", [FORKED_WHILE_SERVING_SYNC, FORKED_WHILE_SERVING_ASYNC],
                         ids=["Node.run_forever", "AsyncNode.serve_forever"])
def test_a_child_forked_while_serving_ends_on_its_signals(code: str, mesh: dict[str, Any]) -> None:
    """A child forked while a node serves gets the signal handlers from before the serving
    back: SIGTERM (``Process.terminate()``) and SIGINT end it (it inherited handlers that
    only asked the parent's node to stop, and ignored both), and with an AsyncNode its
    signals no longer reach the parent's loop (the parent stopped serving)."""
    result = subprocess.run([sys.executable, "-c", code, mesh["mesh"], str(mesh["beacon_port"])],
                            capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr
    said = result.stdout.split()
    # (under asyncio.run the handler from before is asyncio's SIGINT one, which a child
    # inherits as any asyncio program's does: it takes a first SIGINT as a cancellation)
    wanted = [str(-signal.SIGTERM), "1" if code is FORKED_WHILE_SERVING_SYNC else said[1], "True"]
    assert said == wanted, result.stdout + result.stderr[-2000:]


SERVING_GIVEN_UP = """
import asyncio, signal, sys, zmqmesh

def own_sigterm(signum, frame):
    pass

async def main():
    signal.signal(signal.SIGTERM, own_sigterm)
    before = signal.getsignal(signal.SIGINT)  # (asyncio.run's: a Ctrl-C cancels the main task)
    node = zmqmesh.AsyncNode("server", mesh=sys.argv[1], beacon_port=int(sys.argv[2]))
    for given_up in ("asyncio.timeout", "task.cancel"):
        try:
            if given_up == "asyncio.timeout" and hasattr(asyncio, "timeout"):
                async with asyncio.timeout(0.3):
                    await node.serve_forever()
            elif given_up == "asyncio.timeout":  # (Python 3.10 has no asyncio.timeout)
                await asyncio.wait_for(node.serve_forever(), 0.3)
            else:
                serving = asyncio.ensure_future(zmqmesh.AsyncNode("other", mesh=sys.argv[1],
                                                                   beacon_port=int(sys.argv[2])).serve_forever())
                await asyncio.sleep(0.3)
                serving.cancel()
                await serving
        except (TimeoutError, asyncio.TimeoutError, asyncio.CancelledError):
            pass
        print(given_up, signal.getsignal(signal.SIGINT) is before, signal.getsignal(signal.SIGTERM) is own_sigterm,
              node.running, flush=True)
asyncio.run(main())
"""


def test_a_serve_forever_given_up_puts_back_the_handlers_it_replaced(mesh: dict[str, Any]) -> None:
    """`AsyncNode.serve_forever` cancelled (an ``asyncio.timeout``, a TaskGroup whose other
    task failed) stopped the node, and left SIGINT to Python's default handler and SIGTERM
    to the system's: asyncio.run's SIGINT handler (a Ctrl-C cancels the main task) and the
    program's own SIGTERM handler were gone for the rest of the program (False False, for
    both ways of giving up). The handlers it replaced are put back, as `Node.run_forever`
    does."""
    result = subprocess.run([sys.executable, "-c", SERVING_GIVEN_UP, mesh["mesh"], str(mesh["beacon_port"])],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["asyncio.timeout True True False", "task.cancel True True False"], \
        result.stdout + result.stderr[-2000:]


SERVING_TOGETHER = """
import asyncio, sys, zmqmesh
async def main():
    nodes = [zmqmesh.AsyncNode(name, mesh=sys.argv[1], beacon_port=int(sys.argv[2])) for name in ("a", "b", "c")]
    for node in nodes:
        node.service("ping-" + node.name, lambda msg: "pong")
    print("serving", flush=True)
    await asyncio.gather(*(node.serve_forever() for node in nodes))
    print("stopped", *(node.running for node in nodes), flush=True)
asyncio.run(main())
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_async_nodes_serving_together_all_end_on_one_signal(sig: int, mesh: dict[str, Any]) -> None:
    """AsyncNodes serving together on one loop each put their handler in place, and a
    loop holds one per signal: a signal reached only the last one, the others served on,
    and a second signal ended the process half-way (SIGTERM: killed, no goodbye; SIGINT:
    a KeyboardInterrupt traceback). One signal ends them all, cleanly."""
    import zmqmesh

    with serving_process("-c", SERVING_TOGETHER, mesh["mesh"], str(mesh["beacon_port"])) as proc, \
            zmqmesh.Node("client", **mesh) as client:
        for name in ("a", "b", "c"):
            client.wait_for_service("ping-" + name, timeout=15)
        proc.send_signal(sig)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)  # (a second one, as a user would)
            out, err = proc.communicate(timeout=15)
        wait_until(lambda: not client.peers(), 5, "the goodbyes")
    assert proc.returncode == 0 and out.splitlines()[:1] == ["stopped False False False"], \
        f"exit status {proc.returncode}: {out!r} {err[-1500:]}"


SERVING_SIGNALLED_TWICE = """
import asyncio, os, signal, sys, threading, time, zmqmesh
async def main():
    node = zmqmesh.AsyncNode("server", mesh=sys.argv[1], beacon_port=int(sys.argv[2]))
    started = asyncio.Event()
    async def slow(msg):
        started.set()
        await asyncio.sleep(1.5)  # (the stop waits for it)
        return "done"
    node.service("slow", slow)
    async def signal_twice():
        await started.wait()
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(0.5)  # (in the middle of the stop)
        os.kill(os.getpid(), signal.SIGINT)
    helper = asyncio.ensure_future(signal_twice())
    print("serving", flush=True)
    await node.serve_forever()
    await helper
    print("stopped", node.running, flush=True)
asyncio.run(main())
"""


def test_a_second_signal_during_an_async_stop_does_not_cut_it_short(mesh: dict[str, Any]) -> None:
    """`AsyncNode.serve_forever` took its handlers away before its stop: a second Ctrl-C
    in the middle of the stop (which waits for the handlers under way) went to the
    handler from before, asyncio.run's, which cancelled the program and raised
    KeyboardInterrupt (a traceback, exit status 1). It keeps them through the stop, as
    `Node.run_forever` does: a second signal only asks again."""
    import zmqmesh

    with serving_process("-c", SERVING_SIGNALLED_TWICE, mesh["mesh"], str(mesh["beacon_port"])) as proc, \
            zmqmesh.Node("client", **mesh) as client:
        client.wait_for_service("slow", timeout=15)
        reply = client.submit("slow", None, timeout=15)
        out, err = proc.communicate(timeout=20)
        assert reply.result(10) == "done"
    assert proc.returncode == 0 and out.splitlines()[:1] == ["stopped False"], f"{proc.returncode}: {out!r} {err[-1500:]}"
    assert "Traceback" not in err, err[-1500:]


SERVING_IGNORING = """
import asyncio, signal, sys, zmqmesh

def dispositions(msg):
    return [str(signal.getsignal(sig)) for sig in (signal.SIGINT, signal.SIGTERM)]

def run_forever():
    node = zmqmesh.Node("server", mesh=sys.argv[1], beacon_port=int(sys.argv[2]))
    node.service("dispositions", dispositions)
    node.service("ping", lambda msg: "pong")
    print("serving", flush=True)
    node.run_forever()
    return node

async def serve_forever():
    node = zmqmesh.AsyncNode("server", mesh=sys.argv[1], beacon_port=int(sys.argv[2]))
    node.service("dispositions", dispositions)
    node.service("ping", lambda msg: "pong")
    print("serving", flush=True)
    await node.serve_forever()
    return node

node = run_forever() if sys.argv[3] == "Node.run_forever" else asyncio.run(serve_forever())
print("stopped", node.running, *dispositions(None), flush=True)
"""

STARTED_IGNORING = """
import os, signal, sys
signal.signal(int(sys.argv[1]), signal.SIG_IGN)  # (a parent that ignores it, as a shell does for a script's background job's SIGINT)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


@pytest.mark.parametrize("serve", ["Node.run_forever", "AsyncNode.serve_forever"])
@pytest.mark.parametrize(("ignored", "other"), [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)],
                         ids=["SIGTERM ignored", "SIGINT ignored"])
def test_a_signal_ignored_when_serving_began_stays_ignored(serve: str, ignored: int, other: int,
                                                           mesh: dict[str, Any]) -> None:
    """A process started with SIGTERM or SIGINT ignored (by a parent that ignored it: a
    shell script's background job ignores SIGINT) kept it ignored until it served: `Node.run_forever` and
    `AsyncNode.serve_forever` put their handler in place for it anyway, and that signal
    stopped the node (in 0.03 s) against what the one who started the process asked. It
    stays ignored while the node serves and after; the other signal still ends it."""
    import zmqmesh

    ignoring = str(signal.SIG_IGN)
    with serving_process("-c", STARTED_IGNORING, str(int(ignored)), "-c", SERVING_IGNORING, mesh["mesh"],
                         str(mesh["beacon_port"]), serve) as proc, zmqmesh.Node("client", **mesh) as client:
        client.wait_for_service("dispositions", timeout=15)
        serving = client.request("dispositions", timeout=10)
        assert serving[[signal.SIGINT, signal.SIGTERM].index(ignored)] == ignoring, serving
        assert serving[[signal.SIGINT, signal.SIGTERM].index(other)] != ignoring, serving
        proc.send_signal(ignored)  # (dropped by the system: the process ignores it)
        assert client.request("ping", timeout=10) == "pong"
        assert proc.poll() is None
        proc.send_signal(other)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err[-1500:]
    stopped = out.split()
    assert stopped[:2] == ["stopped", "False"] and ignoring in stopped[2:], out + err[-1500:]
    assert "Traceback" not in err, err[-1500:]
