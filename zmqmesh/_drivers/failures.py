"""What a failed request send or socket means, for every driver's requesters: the blocking
ones of `thread` and the pipelined ones of `pipelined` (which a node loads only once it
pipelines requests, with `Node.request_many` or `Node.submit`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import zmq

from ..errors import MeshTimeoutError, NodeClosedError, ZmqMeshError

if TYPE_CHECKING:
    from .._engine.engine import Engine
    from .._stats import RequestTally

__all__ = ["CLOSED", "SUBMIT_THREAD_REFUSAL", "closed_or_failed", "clogged", "fewest_frames_that_fill", "report_link_replaced",
           "send_failure", "take_back_sent"]

log = logging.getLogger("zmqmesh.node")

SUBMIT_THREAD_REFUSAL = (
    "a blocking Node call was made on the node's submit thread (from a done-callback of a "
    "future of Node.submit): it would hold up every submitted request. Hand the work to "
    "another thread, or chain with submit() and add_done_callback()")

CLOSED = "the node stopped while a request was outstanding"


def closed_or_failed(engine: Engine, exc: zmq.ZMQError) -> ZmqMeshError:
    """What a ZeroMQ error on a request's socket means: the node stopped (its sockets were
    closed under the call), or a `ZmqMeshError` naming the failure."""
    if engine.closed:
        return NodeClosedError(CLOSED)
    return ZmqMeshError(f"ZeroMQ failed: {exc}")


def fewest_frames_that_fill(send_hwm: int) -> int:
    """The fewest unread frames with which a socket of ``send_hwm`` may refuse a send:
    ZeroMQ hears of the frames its I/O thread took only every ``send_hwm - lwm`` of them,
    ``lwm`` being half the mark, or the mark less 1,024 past 2,048 (libzmq's pipe.cpp), so
    its pipe may look full with up to ``lwm - 1`` frames taken already."""
    lwm = send_hwm - 1024 if send_hwm > 2048 else (send_hwm + 1) // 2
    return send_hwm - lwm + 1


def clogged(engine: Engine, given_up: int) -> bool:
    """Whether ``given_up`` requests (given up on, unanswered) on a socket that refuses a
    frame may fill it (`fewest_frames_that_fill` its ``send_hwm``): its provider stopped
    reading them. Fewer could not: ZeroMQ dropped its connection."""
    return given_up >= fewest_frames_that_fill(engine.config.send_hwm)


def report_link_replaced(engine: Engine, provider_id: str, given_up: int) -> None:
    """Count and log a request socket replaced because it refused a request (``zmq.Again``)
    though no other request waited on it, by what filled it. Its ``given_up`` requests
    (timed out, or abandoned by their callers, with no reply since), enough to fill it
    (`fewest_frames_that_fill`), clog it: the provider stopped reading
    (``request_link_stalled``). Fewer could not fill it: ZeroMQ dropped its connection
    (``request_link_dropped``: it ends one that carried a frame past ``MAXMSGSIZE``, a
    reply larger than this node's ``max_message_bytes``, and never connects it again)."""
    if clogged(engine, given_up):
        engine.stats.reject("request_link_stalled")
        log.warning("the connection to provider %s is full of %d requests given up on (timed out or abandoned) "
                    "that it never answered: it stopped reading them (a process stopped, frozen or overloaded); "
                    "they are thrown away with the connection, and a new one is made", provider_id[:8], given_up)
        return
    engine.stats.reject("request_link_dropped")
    log.warning("the connection to provider %s refuses requests though the %d given up on could not fill it: "
                "ZeroMQ dropped it (a reply larger than max_message_bytes ends a connection for good); "
                "reconnecting", provider_id[:8], given_up)


def send_failure(exc: zmq.ZMQError, provider_id: str, engine: Engine, service: str | None = None) -> ZmqMeshError:
    """What a failed send of a request means: the provider takes no more, its socket's
    ``send_hwm`` frames queued (`MeshTimeoutError`), or the socket failed
    (`closed_or_failed`)."""
    if isinstance(exc, zmq.Again):
        of = f" of {service!r}" if service is not None else ""
        return MeshTimeoutError(f"provider {provider_id[:8]}{of} is not accepting requests: its connection "
                                f"holds send_hwm frames it has not read")
    return closed_or_failed(engine, exc)


def take_back_sent(tally: RequestTally, service: str | bytes, counted: bool = False) -> None:
    """Take back, in the driver's ``tally``, a request that did not go (its send failed,
    or its caller gave up before it went): it was counted as sent under its service's name
    when its provider was picked (`Calling.choose`, `request_plan`), unless it calls a
    built-in service (never counted there); ``counted``: in the requests sent too
    (`send_batches` counts them before they go)."""
    if counted:
        counts = tally.counts
        counts["sent"] = counts.get("sent", 0) - 1
    if isinstance(service, bytes):
        if service[:1] == b"\x00":
            return
        service = service.decode()
    elif service[:1] == "\x00":
        return
    tally.sent[service] -= 1
