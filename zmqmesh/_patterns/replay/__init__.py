"""Replaying subscriptions, the subscriber's side: a publisher's kept history first, then
its live messages, with no gap and no duplicate, in order per publisher.

A subscription that replays (``replay="all"`` or a number of seconds) or resumes
(``durable_name``) follows each publisher that keeps its topics (``history=``) with a
`Cursor`: the next number it expects per topic. While the cursor catches up it fetches
pages of the history (the built-in service ``\\x00history``) and holds the live frames
that arrive meanwhile; once the history is exhausted, the held frames are released (those
already replayed are skipped). A page's row numbered past what the cursor expects, of a
topic of which no live frame is held, may have come live after all (still in the socket):
the cursor leaves it to the live frames if it was kept after a message that came live
(`Cursor.live_pos`), which it knows from a held frame's row, a held frame that says its
position (``"p"``), or, for the first read of a publisher's history, the publisher's
answer to the subscription's replay marker (`Replays.marked`): that read waits for it, up
to `MARKER_WAIT_S`. If no live frame came, the history is read again a few times
(`TAIL_LOOKS_S`) until one does: what was published before the live subscription reached
the publisher, and after the history was read, arrives no other way. Live, a frame
whose numbers jump is a gap: the missing messages are fetched from the history, and what
the history no longer holds is reported on the next message (``msg.gap``) and counted
(``stats()["pubsub"]["gap"]``). A topic new to the cursor whose first number is past 0
(numbered after its publisher forgot topics: see `_patterns.history`) is no gap: its
first live frame says where its numbering began if it has a meta frame (``"s"``), or
else a page of the history does (``"start"``). A cursor that began mid-stream
(``replay`` in seconds, or a durable subscription's first start with ``replay="new"``)
reads from where it began, every read until one read the history through (`Cursor.request`:
that many seconds ago, or, for ``"new"``, the position its publisher answered the replay
marker with, `Cursor.live_from`, and before the answer the time the cursor was made), and
from then on follows every topic from its start, each where the read found it, or from its
first live frame held if before (`Replays._read_through`, `Cursor.met_at`; a durable
subscription records where, to resume there: `DurablePlaces.begun_at`): a topic begun
later is no exception. A durable subscription records where it began mid-stream until
then (`DurablePlaces.began_mid_stream`): restarted before, it resumes from there. A gap shows only with a next frame, so once a
publisher has been quiet for `QUIET_LOOK_S`, the subscription asks it for the numbers
its topics have reached (a page of no rows) and catches up if it is behind: a last frame
dropped at a high-water mark is not missed for good. A read of the history that fails is tried again
(`FETCH_RETRIES_S`), or, if its publisher left, made again once the publisher is back
(`AWAY_HOLD_S`), the live frames held meanwhile.

A cursor keeps an entry per topic it met, and a publisher of a topic per order id meets
it with ever-new ones: a cursor forgets the topics its publisher no longer numbers
(`Replays._forget_topics`), as a look at the numbers (a page of no rows) shows, made once
the publisher is quiet (`QUIET_LOOK_S`) or once the cursor follows `CURSOR_TOPICS` topics
(twice as many as it kept at its last look, if more). A publisher forgets a topic only
once nothing of it is kept, and numbers it again past every number it gave (its floor:
see `_patterns.history`), so nothing of a topic forgotten on both sides can come again
under its old numbers, and a message published on it later is a new topic's.

A publisher of many kept topics sends the numbers they reached (``next``) in pieces, each
within what the reader takes in a message; a cursor collects them and applies them once
it has them all (`Cursor.map_piece`).

A durable subscription keeps its places in the node's store (`DurablePlaces`).

A publisher names the runs (openings) of its store (``X-ZMQMESH-RUNS``); a cursor that
finds the run it followed last missing from them reads the history again, since the
numbers may have gone back (a store restored from an older copy): `Replays._rewind`.

Everything here runs on the inbox's thread; the drivers only carry out the fetches
(`Fetch`) and post their outcome back. The modules (their tunables, such as
`MAX_HELD` or `QUIET_LOOK_S`, live in the module that uses them):

* `cursor`: a subscription's place in one publisher's stream, and the reads it asks for;
* `replays`: `Replays`, which moves the cursors: live frames, pages, gaps, looks again;
* `places`: where durable subscriptions are, in the store;
* `awaiting`: live frames of senders whose HELLO is still on its way;
* `plain`: what went plainly of streams no cursor could follow, marked redelivered once one does;
* `rereads`: when each stream's history is to be read again.
"""

from .cursor import Cursor, Fetch
from .replays import Replays

__all__ = ["Cursor", "Fetch", "Replays"]
