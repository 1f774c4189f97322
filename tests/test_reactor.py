"""The sync Node's event loop: readers, timers, thread hand-offs, failures, shutdown."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import in_threads

from zmqmesh._io.reactor import Reactor, run_on
from zmqmesh.errors import MeshTimeoutError


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    loop = Reactor()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.stop()
    thread.join(5)
    assert not thread.is_alive()
    loop.close()


def test_timers_run_in_time_order_and_cancelled_ones_never(reactor: Reactor) -> None:
    ran: list[str] = []
    done = threading.Event()

    def schedule() -> None:
        reactor.call_later(0.06, ran.append, "late")
        reactor.call_later(0.02, ran.append, "early")
        reactor.call_later(0.04, ran.append, "cancelled").cancel()
        reactor.call_at(reactor.time() + 0.08, done.set)

    reactor.call_soon_threadsafe(schedule)
    assert done.wait(5)
    assert ran == ["early", "late"]


def test_a_reader_is_called_while_its_descriptor_is_readable(reactor: Reactor) -> None:
    a, b = socket.socketpair()
    got: list[bytes] = []
    three = threading.Event()

    def readable() -> None:
        got.append(a.recv(1))
        if len(got) == 3:
            three.set()

    try:
        run_on(reactor, reactor.add_reader, a.fileno(), readable, timeout=5)
        b.sendall(b"xyz")
        assert three.wait(5)
        assert b"".join(got) == b"xyz"
        assert run_on(reactor, reactor.remove_reader, a.fileno(), timeout=5) is True
        assert run_on(reactor, reactor.remove_reader, a.fileno(), timeout=5) is False
    finally:
        a.close()
        b.close()


def test_a_failing_callback_is_logged_and_the_loop_goes_on(reactor: Reactor, caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        raise RuntimeError("handler bug")

    reactor.call_soon_threadsafe(boom)
    assert run_on(reactor, lambda: "still running", timeout=5) == "still running"
    assert any("handler bug" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_run_on_returns_results_raises_errors_and_times_out(reactor: Reactor) -> None:
    assert run_on(reactor, lambda x: x * 2, 21, timeout=5) == 42
    with pytest.raises(ValueError, match="bad"):
        run_on(reactor, lambda: (_ for _ in ()).throw(ValueError("bad")), timeout=5)
    release = threading.Event()
    reactor.call_soon_threadsafe(release.wait, 5)  # the loop is busy for a while
    try:
        started = time.monotonic()
        with pytest.raises(MeshTimeoutError):
            run_on(reactor, lambda: None, timeout=0.2)
        assert time.monotonic() - started < 3
    finally:
        release.set()


def test_calls_from_many_threads_all_arrive(reactor: Reactor) -> None:
    count = [0]

    def bump() -> None:
        count[0] += 1

    def sender() -> None:
        for _ in range(2000):
            reactor.call_soon_threadsafe(bump)

    in_threads(sender, 4, 10)
    assert run_on(reactor, lambda: count[0], timeout=5) == 8000


def test_a_callback_from_another_thread_runs_whenever_it_comes(reactor: Reactor) -> None:
    """The loop writes itself no wake-up byte while it runs callbacks, only when it may
    sleep: a callback posted at any moment of its turn must still run, with nothing
    else to wake it (this loop has no timers: it would sleep for good)."""
    for i in range(500):
        done = threading.Event()
        reactor.call_soon_threadsafe(done.set)
        assert done.wait(2), f"round {i}: a callback posted from another thread was left waiting"
        if i % 4 == 0:
            time.sleep(0.0002)  # (now and then the loop is asleep when the next comes)


def test_a_closed_reactor_refuses_work() -> None:
    loop = Reactor()
    loop.close()
    with pytest.raises(RuntimeError):
        loop.call_soon_threadsafe(lambda: None)
    with pytest.raises(MeshTimeoutError):
        run_on(loop, lambda: None, timeout=1)
    assert loop.remove_reader(0) is False


def test_a_call_queued_when_the_loop_closes_fails_at_once() -> None:
    """A call handed to the loop after its last turn never runs: its caller hears so when
    the loop closes (it waited out its whole timeout)."""
    loop = Reactor()  # (never run: what it is handed waits in its queue)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            run_on(loop, lambda: None, timeout=10)
        except MeshTimeoutError as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.2)
    started = time.monotonic()
    loop.close()
    caller.join(15)
    assert outcome and "gone" in str(outcome[0])
    assert time.monotonic() - started < 5


def test_cancelled_timers_do_not_pile_up(reactor: Reactor) -> None:
    # heartbeat timers are set and cancelled all the time: the heap must not keep them
    def churn() -> None:
        for _ in range(10_000):
            reactor.call_later(3600, lambda: None).cancel()

    run_on(reactor, churn, timeout=10)
    run_on(reactor, lambda: None, timeout=5)  # one more turn: the sweep has run
    assert run_on(reactor, lambda: len(reactor._timers), timeout=5) <= 64


def test_a_timer_cancelled_earlier_in_the_same_turn_does_not_run(reactor: Reactor) -> None:
    ran: list[str] = []
    done = threading.Event()

    def schedule() -> None:
        when = reactor.time() + 0.05
        victim: list[Any] = []
        reactor.call_at(when, lambda: victim[0].cancel())  # due together with the victim, and first
        victim.append(reactor.call_at(when, ran.append, "victim"))
        reactor.call_at(when + 0.05, done.set)

    reactor.call_soon_threadsafe(schedule)
    assert done.wait(5)
    assert ran == []


def test_a_stop_before_run_forever_is_kept() -> None:
    loop = Reactor()
    loop.stop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive()
    loop.close()


def test_with_input_names_the_sockets_holding_a_message_and_rearms_their_descriptors() -> None:
    import zmq
    from helpers import wait_until

    from zmqmesh._io.sockets import has_input, recv_frames, with_input

    ctx = zmq.Context()
    pulls = [ctx.socket(zmq.PULL) for _ in range(3)]
    pushes = [ctx.socket(zmq.PUSH) for _ in range(3)]
    try:
        for i, (pull, push) in enumerate(zip(pulls, pushes)):
            pull.bind(f"inproc://with-input-{i}")
            push.connect(f"inproc://with-input-{i}")
        pairs = [(pull, kind) for pull, kind in zip(pulls, ("req", "pull", "sub"))]
        assert with_input(pairs) == []
        pushes[1].send(b"one")
        pushes[2].send(b"two")
        wait_until(lambda: len(with_input(pairs)) == 2, 2.0, "both messages to arrive")
        assert with_input(pairs) == [pairs[1], pairs[2]]  # (in the order given, tags kept)
        assert recv_frames(pulls[1]) == [b"one"]
        assert with_input(pairs) == [pairs[2]]
        assert not has_input(pulls[1]) and has_input(pulls[2])
        # the descriptor of a socket found empty signals the next message
        poller = zmq.Poller()
        poller.register(pulls[1].FD, zmq.POLLIN)
        pushes[1].send(b"three")
        assert poller.poll(2000)
        assert with_input(pairs) == [pairs[1], pairs[2]]
    finally:
        for sock in pulls + pushes:
            sock.close(0)
        ctx.term()



def test_a_waker_wakes_a_poll_once_per_clear_from_any_thread_until_closed() -> None:
    import select

    from zmqmesh._io.waker import Waker

    waker = Waker()
    poller = select.poll()
    poller.register(waker.fd, select.POLLIN)
    assert poller.poll(0) == []
    for _ in range(1000):  # wakes before a clear are one: the pipe never fills
        waker.wake()
    assert poller.poll(0) == [(waker.fd, select.POLLIN)]
    waker.clear()
    assert poller.poll(0) == []
    threading.Timer(0.05, waker.wake).start()
    assert poller.poll(5000) == [(waker.fd, select.POLLIN)]  # a sleeper woken from another thread
    waker.clear()
    waker.close_sender()
    waker.wake()  # (closed: ignored, no error)
    assert poller.poll(0) in ([], [(waker.fd, select.POLLHUP)])
    waker.close()
    waker.close()  # (twice: no error)
    assert waker.fd == -1


@pytest.mark.parametrize("copy", [True, False], ids=["copied", "uncopied"])
def test_a_message_interrupted_between_its_frames_still_goes_whole(copy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal's ``KeyboardInterrupt`` raised in the main thread between two frames of a
    message (as the first frame's send returns) left the socket in the middle of it: the
    next message sent on the socket went onto its end, and the receiver got one message
    of both (a request then came to its provider malformed, and its caller waited out its
    timeout). The message is finished before the interruption goes on."""
    import zmq
    from helpers import wait_until

    from zmqmesh._io import sockets

    sent = sockets._send
    sends = [0]

    def send_then_interrupt(sock: Any, frame: Any, flags: int, copy: bool) -> Any:
        sent(sock, frame, flags, copy)
        sends[0] += 1
        if sends[0] == 1:  # (Python runs a pending signal's handler as a call returns)
            raise KeyboardInterrupt

    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        pull.bind("inproc://interrupted")
        push.connect("inproc://interrupted")
        big = b"x" * (zmq.COPY_THRESHOLD + 1)
        monkeypatch.setattr(sockets, "_send", send_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            sockets.send_frames(push, [b"a", b"b", big], copy=copy)
        sockets.send_frames(push, [b"next", b"message"], copy=copy)
        wait_until(lambda: sockets.has_input(pull), 2.0, "the first message")
        assert sockets.recv_frames(pull, wait=True) == [b"a", b"b", big]
        assert sockets.recv_frames(pull, wait=True) == [b"next", b"message"]
    finally:
        pull.close(0)
        push.close(0)
        ctx.term()
