"""The dialect interface: what a protocol module tells the recovery core (docs/design.md §5a, §5b).

Rules of this package:

1. Sans-IO. A dialect never touches a socket, a clock or a thread. The core feeds it the bytes
   the application wrote (``wrote``, one call per record) and read (``read``, one call per
   chunk), in order, and asks it questions (``refusal``, ``restore``, ``hold``,
   ``resumable``, ``truncated``, ``mask``).
2. Never raise on the peer's or the application's bytes. Garbage, a protocol error, a parser
   that gives up: the dialect falls back to "unknown" (``refusal() is None``,
   ``resumable() is False``, ``restore() is None`` unless setup was already recorded), so the
   core's byte rules apply. Only ``Restore.feed`` raises, and only ``SetupMismatch``.
3. Cheap. ``wrote``/``read`` run on every I/O call of a detected connection: constant work per
   call where the protocol allows it, never a copy of a large body.
4. A refusal is sticky where the state it names cannot be undone on this lineage (a tunnel, a
   begun handshake); it ends with the state where the state can end (RESP: UNSUBSCRIBE).
"""

from __future__ import annotations

from typing import TypeVar

_E = TypeVar("_E")


def unanswered_after(entries: list[tuple[int, _E]], last: int) -> list[tuple[int, _E]]:
    """What a dialect's list of unanswered requests, ``(record, ...)`` in record order, keeps
    after a read that answered every record up to ``last`` (``Dialect.answered``)."""
    if not entries or entries[0][0] > last:
        return entries
    if entries[-1][0] <= last:
        return []
    return [e for e in entries if e[0] > last]


class SetupMismatch(Exception):
    """A setup answer on the new connection differs from the original (the text says why).

    After it the new connection lacks the old one's state: the core must surface the drop and
    replay nothing on it.
    """


class Restore:
    """Setup to redo on a new connection before anything is replayed (sans-IO).

    ``payload`` holds every setup request, in order; the core sends it whole, then feeds what
    it reads to ``feed`` until that returns an int.
    """

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def feed(self, data: bytes) -> int | None:
        """Bytes read from the new connection, in order.

        Returns None while more is needed; an int n once every setup answer is in and checked:
        the first n bytes of *this* ``data`` were setup answers, the rest belongs to what
        follows. Raises ``SetupMismatch`` if an answer differs from the original; after that,
        and after an int, the object must not be fed again.
        """
        raise NotImplementedError


class Dialect:
    """One connection lineage's protocol knowledge. The base class is "unknown": byte rules."""

    name: str = "unknown"

    def wrote(self, data: bytes) -> None:
        """One record the application wrote (one write call), in order."""

    def read(self, data: bytes) -> None:
        """One chunk the application read, in order."""

    def answered(self, late: int) -> None:
        """A read returned data (``read`` follows with it). By the journal's rule, every
        record written before that read began is answered by it; the last ``late`` records
        were written while it waited (another greenlet wrote: full duplex) and are not. A
        dialect that keeps unanswered requests (for ``unsafe``) forgets only the former."""

    def refusal(self) -> str | None:
        """If the connection dropped now: why the drop must be surfaced, or None (byte rules).

        The text is one sentence naming the protocol, fit for a PEP 678 note.
        """
        return None

    def unsafe(self) -> str | None:
        """If the connection dropped now, under ``replay="idempotent"`` (docs/design.md §5,
        "Idempotency decides where a dialect knows it"): the name of an unanswered request
        that may have reached the server (all of its bytes were written, no answer yet) and
        that is not idempotent (running it twice leaves the server otherwise than once would),
        such as ``"POST /orders"`` or ``"INCR counter"``; None if every such request may run
        again. A request not yet written whole cannot have run, so it does not count."""
        return None

    def fresh_ok(self) -> bool:
        """True if a new connection is equivalent to this one for what the application
        writes next (no greeting, login or handshake it would lack, or the setup ``restore``
        redoes): after a surfaced error the core may then open one lazily on the next write.
        False (the default, and for every unknown protocol): the socket stays as dead as a
        plain one (docs/design.md §5)."""
        return False

    def write_only(self) -> bool:
        """True while no request written awaits an answer (memcached ``noreply``): then a
        record the peer's TCP acknowledged counts as delivered (``confirm="tcp-ack"`` for
        these records), so it is never replayed later over a newer value."""
        return False

    def fin_is_final(self) -> bool:
        """True if a server that sent its FIN never runs a request written after it (its
        protocol has no half-close: HTTP/1.x, RESP and memcached servers close when they are
        done, a lingering close discards what follows). The EOF of such a request is then a
        drop, never a half-close, and a forwarder that passes the FIN on and still takes our
        bytes cannot make it look like one (docs/design.md §5). False: unknown (the default)."""
        return False

    def acked(self) -> None:
        """Every record written so far is confirmed (the peer's TCP acknowledged what no
        answer will ever confirm): nothing written before now can be re-sent."""

    def restore(self) -> Restore | None:
        """Setup to redo on a new connection (a fresh object on every call), or None."""
        return None

    def hold(self) -> bool:
        """True while the exchange in progress spans writes and must be re-sent whole."""
        return False

    def resumable(self) -> bool:
        """True if the answer being read (or the held exchange) may be re-requested (§5b)."""
        return False

    def truncated(self) -> bool:
        """True if the protocol's framing says the answer being read is not complete: an EOF
        now cuts it (a body shorter than its length, a reply begun and not ended, a request
        whose answer has not come). False where an EOF is a normal end, or not known."""
        return False

    def mid_frame(self) -> bool:
        """True while the reader is inside a message of the peer's (begun, not ended). In full
        duplex the reader's stream goes on over a new connection, which cannot carry the rest
        of that message: the drop is surfaced then (docs/design.md §5). False: not known."""
        return False

    def mask(self, data: bytes) -> bytes:
        """The next chunk of the current answer as it enters the comparison digest.

        On the caller's side, call it right after ``read(data)`` on the same chunk; after
        ``reset_answer()``, on the new connection's answer from its byte 0, until it has seen
        as many bytes as the caller got. The answer begins at the first read after a write,
        except while ``hold()`` is True (a held exchange is one answer across its writes).
        Always returns ``len(data)`` bytes, so offsets in the digest match the answer's.
        """
        return data

    def reset_answer(self) -> None:
        """The re-sent request's answer is next: ``mask`` starts over at its byte 0."""

    def new_connection(self) -> None:
        """A new connection is in place after a recovery (restore and replay done). The
        command / request stream carries on across it (the replay re-creates it), so parse
        state is kept; only per-connection facts that a refusal did not cover are reset."""

    def discard(self) -> None:
        """The connection was thrown away after a surfaced error (the journal was cleared):
        whatever was in flight is gone, and the next connection starts at a message boundary.
        Recorded setup is kept (``restore`` redoes it on the next connection); sticky
        refusals stay. So a ``refusal()`` that is still not None after ``discard()`` (a
        tunnel, a begun SSH / TLS / MySQL / ... handshake, a prelude too large to redo) means
        the lineage cannot continue on any new connection: the application's next bytes
        belong to a session no new connection has, and the core must not reconnect lazily
        for them (a plain socket would raise, and so should it)."""
