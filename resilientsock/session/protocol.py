"""The session protocol (docs/design.md §11): one sans-IO implementation shared by client and relay.

Rules of this module (the h11 shape):

1. No I/O. Nothing here opens, reads or writes a socket, sleeps or reads a clock. A ``Link`` is
   fed bytes (``receive_data``), hands out events (``next_event``) and turns intentions into
   bytes to send (``send_*``); the caller owns the socket. Randomness is injectable.
2. Two objects, two lifetimes. A ``Stream`` is the session's byte stream in one direction pair
   (counts, the unacknowledged bytes kept for a resume, the end markers); it lives as long as
   the session, across any number of transport connections. A ``Link`` is one transport
   connection: framing, the handshake, and which frames are legal now. Both ends use the same
   two classes; only ``Link(role)`` differs.
3. Every legal (role, state, frame) is in ``EXPECT``; anything else is a ``ProtocolError`` and
   the link's ``ERROR`` state is sticky. Errors say whose fault: ``ProtocolError`` (the peer
   broke the protocol), ``Refused`` (the peer said no, with a code).
4. Counts are units of the stream: every data byte is one unit, and the end marker (EOF or
   reset) is one more, so an end is acknowledged and re-sent exactly like data. A count the
   peer could not truthfully claim (an ack beyond what was sent, a resume before what was
   already acknowledged) is rejected, never trusted.
5. Secrets are compared only with ``hmac.compare_digest``; a proof covers a fresh relay
   challenge, the client's nonce and both ends' counts, so a recorded handshake replayed later
   fails.

Theory of operation: the wire format is written down in docs/session-protocol.md; in short,
the client opens with ``PREAMBLE`` and a HELLO (new session, or resume of an id); a new
session gets CREATED (id + secret); a resume gets a CHALLENGE, answers with a PROOF (its
counts + HMAC), and gets RESUMED (the relay's counts + HMAC). Then both ends send DATA frames
whose header carries a cumulative ACK of what they received, standalone ACKs when they have
nothing to send, an END marker, PING/PONG. After a resume each end re-sends exactly the units
beyond what the other said it received.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PREAMBLE", "VERSION", "HANDSHAKE_LIMIT", "MAX_DATA", "ProtocolError", "Refused",
    "Stream", "Link", "NEED_DATA", "NOT_SESSION", "new_credentials", "preamble_verdict",
    "creation_proof",
]

# Eight bytes no text protocol starts with (a NUL first, as PNG's signature does it); a TLS
# ClientHello starts with 0x16, HTTP/2 with "PRI", SSH with "SSH-".
PREAMBLE = b"\x00RSSN\r\n\x1a"
VERSION = 3  # 2: a resume's HELLO may carry early data (kind 3); 3: HELLO(new) may carry a
# creation-key proof, and its client nonce names the creation (a retry finds it)
MIN_VERSION = 1
HANDSHAKE_LIMIT = 4096  # bytes a handshake may use, frames included (docs/design.md §11)
MAX_DATA = 1 << 20  # largest DATA payload accepted (1 MiB, picked: a few big reads' worth)
MAX_CONTROL = 1024  # largest payload of any other frame in the open state (picked)
ID_LEN, SECRET_LEN, NONCE_LEN, MAC_LEN = 16, 32, 16, 32

# Frame header: type (u8), payload length (u32), cumulative ack of the sender (u64).
HEADER = struct.Struct("!BIQ")
HEADER_LEN = HEADER.size  # 13

# Frame types.
HELLO, CREATED, CHALLENGE, PROOF, RESUMED, ERROR_FRAME = 1, 2, 3, 4, 5, 6
DATA, ACK, END, PING, PONG, ABORT = 10, 11, 12, 13, 14, 15
FRAME_NAMES = {HELLO: "HELLO", CREATED: "CREATED", CHALLENGE: "CHALLENGE", PROOF: "PROOF",
               RESUMED: "RESUMED", ERROR_FRAME: "ERROR", DATA: "DATA", ACK: "ACK", END: "END",
               PING: "PING", PONG: "PONG", ABORT: "ABORT"}

_HELLO = struct.Struct(f"!BBB{NONCE_LEN}s")  # min version, max version, kind, client nonce
_HELLO_KIND_NEW, _HELLO_KIND_RESUME, _HELLO_KIND_TICKET, _HELLO_KIND_EARLY = 0, 1, 2, 3
_EARLY = struct.Struct("!Q")  # kind 3: the stream offset of the early data that follows
# Early data: at most this many unacknowledged bytes ride a ticket HELLO (version 2), so a
# resume that re-sends a small request costs no round trip more; the HELLO stays well inside
# HANDSHAKE_LIMIT. Picked: a request or a keystroke, not a transfer (that is not latency-bound).
EARLY_MAX = 2048
# version, session id, secret, the first resume ticket
_CREATED = struct.Struct(f"!B{ID_LEN}s{SECRET_LEN}s{NONCE_LEN}s")
_CHALLENGE = struct.Struct(f"!B{NONCE_LEN}s")  # version, relay nonce
_COUNTS = struct.Struct(f"!QQ{MAC_LEN}s")  # received, sent, mac (PROOF; HELLO with a ticket)
_RESUMED = struct.Struct(f"!QQ{MAC_LEN}s{NONCE_LEN}s")  # received, sent, mac, next ticket
_END = struct.Struct("!B")  # 0 = EOF, 1 = reset; then a UTF-8 reason
_ERROR = struct.Struct("!B")  # code; then a UTF-8 reason

# ERROR codes: why a handshake was refused (the relay's side of it).
E_UNKNOWN_SESSION = 1  # no such session: expired, ended, or the relay restarted
E_BAD_PROOF = 2
E_IMPOSSIBLE_COUNTS = 3
E_VERSION = 4
E_PROTOCOL = 5
E_UPSTREAM = 6  # the relay could not connect to its upstream
E_BUSY = 7  # the relay is full (sessions, descriptors or buffers): retry later
E_FORBIDDEN = 8  # version 3: this relay creates sessions only for holders of its creation key
ERROR_NAMES = {E_UNKNOWN_SESSION: "unknown session", E_BAD_PROOF: "bad proof",
               E_IMPOSSIBLE_COUNTS: "impossible counts", E_VERSION: "no common version",
               E_PROTOCOL: "protocol error", E_UPSTREAM: "upstream unreachable",
               E_BUSY: "relay busy", E_FORBIDDEN: "creation key required"}


class ProtocolError(Exception):
    """The peer broke the protocol (malformed, oversized or out-of-place frame, an impossible
    count). The link is in its sticky ERROR state afterwards; ``code`` is the ERROR code to
    send the peer before closing."""

    def __init__(self, reason: str, code: int = E_PROTOCOL) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class Refused(Exception):
    """The peer refused the handshake with an ERROR frame (``code``, ``reason``)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{ERROR_NAMES.get(code, f'error {code}')}: {reason}")
        self.code = code
        self.reason = reason


# -- events -------------------------------------------------------------------------------------


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")  # next_event(): feed more bytes first
NOT_SESSION = _Sentinel("NOT_SESSION")  # relay: the first bytes are not the preamble
_CONSUMED = _Sentinel("CONSUMED")  # internal: a frame with no event of its own (an ACK)


@dataclass(frozen=True)
class HelloNew:
    version: int
    key_proof: bytes = b""  # version 3: HMAC(creation key, nonce), see ``creation_proof``
    # the client's nonce (a retry of this creation sends the same one); random: not compared
    nonce: bytes = field(default=b"", compare=False)


@dataclass(frozen=True)
class HelloResume:
    version: int
    session_id: bytes


@dataclass(frozen=True)
class HelloTicket:
    """A resume in one round trip: the proof rides the HELLO, over the ticket the relay
    issued on the previous link (its challenge, handed out in advance)."""

    version: int
    session_id: bytes
    received: int
    sent: int
    early_from: int = 0  # version 2: the stream offset of ``early`` (bytes re-sent with it)
    early: bytes = b""


@dataclass(frozen=True)
class Created:
    session_id: bytes
    secret: bytes


@dataclass(frozen=True)
class Challenged:
    pass


@dataclass(frozen=True)
class ProofReceived:
    received: int
    sent: int


@dataclass(frozen=True)
class Resumed:
    received: int
    sent: int


@dataclass(frozen=True)
class Data:
    payload: bytes | memoryview  # a view of the received chunk: use it before the next feed


@dataclass(frozen=True)
class Ended:
    reset: bool
    reason: str


@dataclass(frozen=True)
class Aborted:
    """The peer tore the session down at once (its plain end vanished after its end marker)."""

    reason: str


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Pong:
    pass


Event = (HelloNew | HelloResume | HelloTicket | Created | Challenged | ProofReceived | Resumed
         | Data | Ended | Aborted | Ping | Pong)


def new_credentials(rand: Callable[[int], bytes] = os.urandom) -> tuple[bytes, bytes]:
    """A fresh (session id: 128 bits, secret: 256 bits)."""
    return rand(ID_LEN), rand(SECRET_LEN)


def creation_proof(key: bytes, nonce: bytes) -> bytes:
    """Version 3: the proof that a HELLO(new) comes from a holder of the relay's creation
    key, bound to that HELLO's client nonce."""
    return hmac.new(key, b"resilientsock create v3\0" + nonce, hashlib.sha256).digest()


def preamble_verdict(first: bytes) -> bool | None:
    """For the relay's plain-or-session decision: True when ``first`` starts with the
    preamble, False when it cannot (proxy plainly), None when it is a prefix (read more)."""
    n = min(len(first), len(PREAMBLE))
    if first[:n] != PREAMBLE[:n]:
        return False
    return True if n == len(PREAMBLE) else None


def _mac(secret: bytes, who: bytes, session_id: bytes, relay_nonce: bytes, client_nonce: bytes,
         counts: tuple[int, ...], extra: bytes = b"") -> bytes:
    msg = b"".join((b"resilientsock session v1 ", who, b"\0", session_id, relay_nonce,
                    client_nonce, struct.pack(f"!{len(counts)}Q", *counts), extra))
    return hmac.new(secret, msg, hashlib.sha256).digest()


# -- the stream ---------------------------------------------------------------------------------


_KEEP_BY_REF = 4096  # an immutable payload this large is kept by reference, not copied


class Unacked:
    """The bytes sent and not yet acknowledged, in order, as a list of chunks.

    A large payload the caller cannot change (``bytes``, or a read-only view of them) is kept
    by reference: no copy of a big write. Anything else is copied, small payloads coalesced
    into one ``bytearray`` so many tiny writes cost no object each. Acknowledged bytes are
    dropped from the front without moving the rest.
    """

    __slots__ = ("_chunks", "_len")

    def __init__(self) -> None:
        self._chunks: deque[Any] | None = None  # made on the first write (an idle session
        self._len = 0                           # holds none: a deque is 760 bytes)

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def append(self, payload: bytes | bytearray | memoryview) -> None:
        n = len(payload)
        if not n:
            return
        self._len += n
        chunks = self._chunks
        if chunks is None:
            chunks = self._chunks = deque()
        if n >= _KEEP_BY_REF and (type(payload) is bytes or (
                type(payload) is memoryview and payload.readonly
                and type(payload.obj) is bytes)):
            chunks.append(memoryview(payload).cast("B") if type(payload) is memoryview
                          else payload)
            return
        last = chunks[-1] if chunks else None
        if type(last) is bytearray and len(last) < (1 << 20):
            last += payload
        else:
            chunks.append(bytearray(payload))

    def drop(self, n: int) -> None:
        """Forget the first ``n`` bytes (acknowledged; at most what is held)."""
        n = min(n, self._len)
        if not n:
            return
        self._len -= n
        chunks = self._chunks
        assert chunks is not None
        while n:
            first = chunks[0]
            size = len(first)
            if size <= n:
                chunks.popleft()
                n -= size
            elif type(first) is bytearray:
                del first[:n]  # O(1): bytearray drops a prefix in place
                n = 0
            else:
                chunks[0] = memoryview(first)[n:]
                n = 0
        if not self._len:
            self._chunks = None

    def __bytes__(self) -> bytes:
        return b"".join(self._chunks) if self._chunks else b""

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (bytes, bytearray, memoryview)):
            return bytes(self) == bytes(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class Stream:
    """One session's byte stream, both directions, as seen from one end.

    ``sent``/``received`` count units (data bytes, plus 1 for an end marker); ``acked`` is what
    the peer acknowledged. ``unacked`` holds the data bytes in [acked, data_sent): kept until
    acknowledged, re-sent after a resume. ``room()`` is what may still be written before
    ``limit`` is reached (the caller stops reading its plain end: backpressure).
    """

    __slots__ = ("limit", "data_sent", "acked", "unacked", "end_sent", "received",
                 "end_received", "ack_sent", "_held", "heard")

    def __init__(self, limit: int = 16 * 1024 * 1024) -> None:
        if limit < 1:
            raise ValueError(f"buffer limit must be >= 1 byte, got {limit!r}")
        self.limit = limit
        self.data_sent = 0
        self.acked = 0
        self.unacked = Unacked()
        self.end_sent: Ended | None = None
        self.received = 0
        self.end_received: Ended | None = None
        self.ack_sent = 0  # the highest ack conveyed to the peer
        self._held = 0  # see ``held``: changed only by hold() and handed_on()
        # The peer sent a frame on an open link (an ACK, a PING, a PONG, an END, an ABORT;
        # DATA counts in ``received``): a client that did received CREATED.
        self.heard = False

    @property
    def held(self) -> int:
        """Units received but not yet handed to the plain end (the carrier's delivery queue):
        acknowledgements never cover them, so the peer keeps them and its writers block at its
        own limit: the queue stays bounded by the peer's limit while this end goes on reading
        its link (control frames never wait behind a stalled plain end). Counted in
        ``received`` (resume counts): this process holds them. Always ``0 <= held <=
        received``: ``hold`` and ``handed_on`` check it, and nothing else changes it."""
        return self._held

    def hold(self, n: int) -> None:
        """``n`` units already counted as received wait for the plain end: no acknowledgement
        covers them until ``handed_on`` says they were written there. Called before anything
        can yield after they were counted, so no frame built meanwhile acknowledges them."""
        held = self._held + n
        assert n >= 0 and held <= self.received, \
            f"hold({n}): {self._held} held already, {self.received} received"
        self._held = held

    def handed_on(self, n: int) -> None:
        """``n`` held units were written to the plain end (or dropped with it): the next
        acknowledgement covers them."""
        held = self._held - n
        assert n >= 0 and held >= 0, f"handed_on({n}): only {self._held} held"
        self._held = held

    @property
    def sent(self) -> int:
        return self.data_sent + (1 if self.end_sent is not None else 0)

    def discard(self) -> None:
        """The session is over at this end: its unacknowledged bytes go at once (nothing
        will re-send them; the session object may live on in a reference cycle until the
        garbage collector's next full pass, which in a quiet process may be never). The
        counts stay."""
        self.unacked = Unacked()

    def room(self) -> int:
        return max(0, self.limit - self.unacked._len)

    @property
    def ack_point(self) -> int:
        """What an acknowledgement says now: units received and handed on."""
        return self.received - self._held

    def ack_due(self) -> int:
        """Units handed on but not yet acknowledged to the peer."""
        return self.received - self._held - self.ack_sent

    def _ack_now(self) -> int:
        """The ack a frame built now carries, recorded as conveyed: every unit received and
        handed on, none still held (the one place an ack is computed)."""
        ack = self.ack_sent = self.received - self._held
        return ack

    @property
    def done(self) -> bool:
        """Nothing more to carry: both end markers exchanged and acknowledged, or a reset
        delivered (a reset ends both directions at once)."""
        sent_all = self.end_sent is not None and self.acked == self.sent
        got_all = self.end_received is not None and self.ack_sent == self.received
        if sent_all and got_all:
            return True
        if sent_all and self.end_sent is not None and self.end_sent.reset:
            return True
        return got_all and self.end_received is not None and self.end_received.reset

    # sending ------------------------------------------------------------------------------

    def data(self, payload: bytes | memoryview) -> bytes:
        """Frames carrying ``payload`` (kept in ``unacked`` until acknowledged)."""
        if self.end_sent is not None:
            raise ValueError("data after the end marker")
        self.unacked.append(payload)
        n = len(payload)
        self.data_sent += n
        if n <= MAX_DATA:  # one frame (the usual case)
            ack = self.ack_sent = self.received - self.held
            return HEADER.pack(DATA, n, ack) + payload
        return self._data_frames(payload)

    def data_header(self, payload: bytes | memoryview) -> bytes:
        """Like ``data`` for one frame (``len(payload) <= MAX_DATA``), but returns only the
        header: the caller sends it and then ``payload`` itself (no copy into a frame)."""
        if self.end_sent is not None:
            raise ValueError("data after the end marker")
        if not 0 < len(payload) <= MAX_DATA:
            raise ValueError(f"one frame carries 1..{MAX_DATA} bytes, not {len(payload)}")
        self.unacked.append(payload)
        self.data_sent += len(payload)
        ack = self._ack_now()
        return HEADER.pack(DATA, len(payload), ack)

    def _data_frames(self, payload: bytes | bytearray | memoryview) -> bytes:
        ack = self._ack_now()
        n = len(payload)
        if n <= MAX_DATA:
            return HEADER.pack(DATA, n, ack) + payload
        view = memoryview(payload)
        return b"".join(HEADER.pack(DATA, len(view[i:i + MAX_DATA]), ack) + view[i:i + MAX_DATA]
                        for i in range(0, n, MAX_DATA))

    def end(self, reset: bool = False, reason: str = "") -> bytes:
        """The end marker: EOF (``reset=False``) or reset, after every byte sent before it."""
        if self.end_sent is not None:
            return b""
        self.end_sent = Ended(reset, reason)
        return self._end_frame()

    def _end_frame(self) -> bytes:
        assert self.end_sent is not None
        body = _END.pack(1 if self.end_sent.reset else 0) + self.end_sent.reason.encode()[:512]
        ack = self._ack_now()
        return HEADER.pack(END, len(body), ack) + body

    def ack(self) -> bytes:
        ack = self._ack_now()
        return HEADER.pack(ACK, 0, ack)

    def abort(self, reason: str) -> bytes:
        """ABORT: tear the session down now (not sequenced; the caller repeats it after a
        resume until the peer has it)."""
        body = reason.encode()[:512]
        return HEADER.pack(ABORT, len(body), self.ack_point) + body

    def ping(self) -> bytes:
        ack = self._ack_now()
        return HEADER.pack(PING, 0, ack)

    def pong(self) -> bytes:
        ack = self._ack_now()
        return HEADER.pack(PONG, 0, ack)

    # receiving ----------------------------------------------------------------------------

    def on_ack(self, n: int) -> None:
        """The peer received ``n`` units: drop what it no longer needs. An ack older than one
        already seen is ignored (two writers on one connection may reorder frames' acks); an
        ack beyond what was sent is a ProtocolError."""
        if n < self.acked:
            return
        if n > self.data_sent and n > self.sent:
            raise ProtocolError(f"impossible ack {n} (acknowledged {self.acked}, sent "
                                f"{self.sent})", E_IMPOSSIBLE_COUNTS)
        drop = min(n, self.data_sent) - min(self.acked, self.data_sent)
        if drop:
            self.unacked.drop(drop)
        self.acked = n

    def on_data(self, size: int) -> None:
        if self.end_received is not None:
            raise ProtocolError("DATA after the end marker")
        self.received += size

    def on_end(self, ended: Ended) -> None:
        if self.end_received is not None:
            raise ProtocolError("a second end marker")
        self.end_received = ended
        self.received += 1

    # resuming -----------------------------------------------------------------------------

    def take_early(self, offset: int, data: bytes) -> bytes | None:
        """Relay, after a ticket HELLO's proof checked: the part of its early data (``data``
        from stream offset ``offset``) not received yet, now counted as received and held
        (``hold``: no ack covers it until ``handed_on``) — to be delivered before anything the
        new link carries. None: impossible (a gap before it, or data after the end marker);
        nothing is counted then."""
        got = self.received - (1 if self.end_received is not None else 0)
        if offset > got:
            return None
        new = data[got - offset:]
        if new and self.end_received is not None:
            return None
        if new:
            self.on_data(len(new))
            self.hold(len(new))
        return new

    def check_peer_counts(self, peer_received: int, peer_sent: int) -> str | None:
        """None when the peer's claimed counts can be true, else why not (rule 4)."""
        if peer_received < self.acked:
            return (f"peer claims {peer_received} received, but already acknowledged "
                    f"{self.acked}")
        if peer_received > self.sent:
            return f"peer claims {peer_received} received, but only {self.sent} were sent"
        if peer_sent < self.received:
            return f"peer claims {peer_sent} sent, but {self.received} were received"
        if peer_sent < self.ack_sent:
            return f"peer claims {peer_sent} sent, below the ack {self.ack_sent} given"
        return None

    def resume(self, peer_received: int) -> bytes:
        """After a verified resume: acknowledge up to ``peer_received`` and return the frames
        re-sending every unit beyond it (data, then the end marker if one was sent)."""
        self.on_ack(peer_received)
        out = self._data_frames(bytes(self.unacked)) if self.unacked else b""
        if self.end_sent is not None and self.acked <= self.data_sent:
            out += self._end_frame()
        if not out:
            out = self.ack()
        return out


# -- the link (one transport connection) ------------------------------------------------------

CLIENT, RELAY = "client", "relay"

# Link states.
START = "START"  # client: nothing sent yet
AWAIT_PREAMBLE = "AWAIT_PREAMBLE"  # relay: deciding plain or session
AWAIT_HELLO = "AWAIT_HELLO"
AWAIT_CREATED = "AWAIT_CREATED"
AWAIT_CHALLENGE = "AWAIT_CHALLENGE"
CHALLENGED = "CHALLENGED"  # client: challenge in hand, proof to send
AWAIT_PROOF = "AWAIT_PROOF"
CREATING = "CREATING"  # relay: HELLO(new) in hand, CREATED to send
CHALLENGING = "CHALLENGING"  # relay: HELLO(resume) in hand, CHALLENGE to send
VERIFYING = "VERIFYING"  # relay: PROOF in hand, RESUMED (or ERROR) to send
AWAIT_RESUMED = "AWAIT_RESUMED"
AWAIT_TICKET_ANSWER = "AWAIT_TICKET_ANSWER"  # client: RESUMED, or a CHALLENGE if stale
OPEN = "OPEN"
ERROR = "ERROR"  # sticky
CLOSED = "CLOSED"  # an ERROR frame was sent or received: nothing more on this link

# Which frames each (role, state) accepts, and the state they lead to. Everything not listed is
# a ProtocolError (rule 3). Sends move states too: see SENDS.
EXPECT: dict[tuple[str, str], dict[int, str]] = {
    (RELAY, AWAIT_HELLO): {HELLO: CREATING},  # CREATING or CHALLENGING, by the HELLO's kind
    (RELAY, AWAIT_PROOF): {PROOF: VERIFYING},
    (RELAY, OPEN): {DATA: OPEN, ACK: OPEN, END: OPEN, PING: OPEN, PONG: OPEN, ABORT: OPEN},
    (CLIENT, AWAIT_CREATED): {CREATED: OPEN, ERROR_FRAME: CLOSED},
    (CLIENT, AWAIT_CHALLENGE): {CHALLENGE: CHALLENGED, ERROR_FRAME: CLOSED},
    (CLIENT, AWAIT_RESUMED): {RESUMED: OPEN, ERROR_FRAME: CLOSED},
    (CLIENT, AWAIT_TICKET_ANSWER): {RESUMED: OPEN, CHALLENGE: CHALLENGED, ERROR_FRAME: CLOSED},
    (CLIENT, OPEN): {DATA: OPEN, ACK: OPEN, END: OPEN, PING: OPEN, PONG: OPEN, ABORT: OPEN,
                     ERROR_FRAME: CLOSED},
}
# Which send_* call is legal in which state, and the state after it.
SENDS: dict[tuple[str, str], dict[str, str]] = {
    (CLIENT, START): {"hello_new": AWAIT_CREATED, "hello_resume": AWAIT_CHALLENGE,
                      "hello_ticket": AWAIT_TICKET_ANSWER},
    (CLIENT, CHALLENGED): {"proof": AWAIT_RESUMED},
    (RELAY, CREATING): {"created": OPEN, "error": CLOSED},
    (RELAY, CHALLENGING): {"challenge": AWAIT_PROOF, "error": CLOSED},
    (RELAY, VERIFYING): {"resumed": OPEN, "error": CLOSED,
                         "challenge": AWAIT_PROOF},  # a stale ticket: the two-trip resume
    (RELAY, AWAIT_PREAMBLE): {"error": CLOSED},
    (RELAY, AWAIT_HELLO): {"error": CLOSED},
    (RELAY, AWAIT_PROOF): {"error": CLOSED},
    (RELAY, OPEN): {"error": CLOSED},
    (RELAY, ERROR): {"error": CLOSED},
}
HANDSHAKE_STATES = {START, AWAIT_PREAMBLE, AWAIT_HELLO, AWAIT_CREATED, AWAIT_CHALLENGE,
                    CHALLENGED, AWAIT_PROOF, CREATING, CHALLENGING, VERIFYING, AWAIT_RESUMED,
                    AWAIT_TICKET_ANSWER}


class Link:
    """One transport connection of a session, client or relay side (see module docstring).

    After a ``ProtocolError`` or ``Refused`` from ``next_event`` the link is in ``ERROR`` /
    ``CLOSED`` and every later call raises again: close the connection. The session's
    ``Stream`` is untouched by anything that happens before the handshake completes.
    """

    __slots__ = ("role", "state", "_buf", "_pos", "_handshake_bytes", "stream", "session_id",
                 "client_nonce", "relay_nonce", "version", "_rand", "_error", "peer_counts",
                 "_peer_mac", "_proof_counts", "_chunk", "_cpos", "_data_left", "next_ticket",
                 "_peer_ticket", "_early")

    def __init__(self, role: str, rand: Callable[[int], bytes] = os.urandom) -> None:
        if role not in (CLIENT, RELAY):
            raise ValueError(f"role must be {CLIENT!r} or {RELAY!r}, got {role!r}")
        self.role = role
        self.state = START if role == CLIENT else AWAIT_PREAMBLE
        self._buf = bytearray()
        self._pos = 0
        self._handshake_bytes = 0
        self.stream: Stream | None = None
        self.session_id = b""
        self.client_nonce = b""
        self.relay_nonce = b""
        self.version = VERSION
        self._rand = rand
        self._error: Exception | None = None
        self.peer_counts: tuple[int, int] | None = None
        self._peer_mac = b""
        self._proof_counts = (0, 0)
        self.next_ticket = b""  # relay: issued in CREATED/RESUMED; client: received there
        self._peer_ticket = b""
        # The hot path: a received chunk parsed in place (DATA payloads are memoryviews of it,
        # no copy) until a frame straddles its end; then the rest goes to _buf.
        self._chunk: memoryview | None = None
        self._cpos = 0
        # Payload bytes of a DATA frame still to come: a frame that straddles a chunk's end is
        # handed on as it arrives (counts are per byte: a drop mid-frame resumes mid-frame),
        # never gathered into _buf first.
        self._data_left = 0
        self._early: tuple[int, bytes] | None = None  # a ticket HELLO's early data (kind 3)

    # input ----------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._chunk is not None:  # fed before NEED_DATA: keep it simple, copy
            self._spill()
            self._buf += data
            return
        if self._pos:
            # Drop what was parsed (cheap: CPython deletes a bytearray's prefix in place).
            del self._buf[:self._pos]
            self._pos = 0
        if self.state == OPEN and isinstance(data, bytes):
            view = memoryview(data)
            if self._buf:
                # A frame straddled the previous chunk: complete it in _buf (copying only its
                # own bytes) and parse the rest of this chunk in place.
                if len(self._buf) < HEADER_LEN:
                    take = HEADER_LEN - len(self._buf)
                    self._buf += view[:take]
                    view = view[take:]
                    if len(self._buf) < HEADER_LEN:
                        return
                length = HEADER.unpack_from(self._buf, 0)[1]
                need = HEADER_LEN + length - len(self._buf)
                if need > 0:
                    self._buf += view[:need]
                    view = view[need:]
            if len(view):
                self._chunk, self._cpos = view, 0
            return
        self._buf += data

    def data_frame(self, data: bytes) -> memoryview | None:
        """The hot path of an open link: when ``data`` (a chunk as received) is exactly one
        whole DATA frame and nothing is buffered, its payload (a view of ``data``), with the
        frame's acknowledgement applied and its bytes counted as received, as
        ``receive_data`` and ``next_event`` would return it as one ``Data``. Otherwise None,
        and nothing was consumed: feed ``data`` with ``receive_data``."""
        if (self.state != OPEN or self._chunk is not None or self._data_left
                or self._pos != len(self._buf) or type(data) is not bytes):
            return None
        length = len(data) - HEADER_LEN
        if length <= 0 or length > MAX_DATA:
            return None
        ftype, size, ack = HEADER.unpack_from(data)
        if ftype != DATA or size != length:
            return None
        stream = self.stream
        assert stream is not None
        try:
            if ack != stream.acked:
                stream.on_ack(ack)
            if stream.end_received is not None:
                stream.on_data(length)  # raises: DATA after the end marker
        except ProtocolError as exc:
            self._fail(exc)
        stream.received += length  # Stream.on_data
        return memoryview(data)[HEADER_LEN:]

    def _spill(self) -> None:
        chunk, self._chunk = self._chunk, None
        assert chunk is not None
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += chunk[self._cpos:]

    def unconsumed(self) -> bytes:
        """Bytes received but not parsed (the relay forwards them when proxying plainly)."""
        if self._chunk is not None:
            self._spill()
        return bytes(self._buf[self._pos:])

    def next_event(self) -> Event | _Sentinel:
        """The next event, ``NEED_DATA``, or (relay, first bytes) ``NOT_SESSION``."""
        if self._error is not None:
            raise self._error
        try:
            while True:  # a run of ACK frames is consumed here, not by recursion (any length)
                ev = self._next_event()
                if ev is not _CONSUMED:
                    return ev
        except ProtocolError as exc:
            self.state = ERROR
            self._error = exc
            raise
        except Refused as exc:
            self.state = CLOSED
            self._error = exc
            raise

    def _next_event(self) -> Event | _Sentinel:
        chunk = self._chunk
        if chunk is not None and self._pos >= len(self._buf):
            cpos = self._cpos
            left = self._data_left
            if left:  # the rest of a DATA frame begun in an earlier chunk
                stream = self.stream
                assert stream is not None
                end = min(len(chunk), cpos + left)
                stream.on_data(end - cpos)
                self._data_left = left - (end - cpos)
                self._cpos = end
                if end == len(chunk):
                    self._chunk = None
                return Data(chunk[cpos:end])
            if len(chunk) - cpos >= HEADER_LEN:
                ftype, length, ack = HEADER.unpack_from(chunk, cpos)
                if ftype == DATA and 0 < length <= MAX_DATA:
                    stream = self.stream
                    assert stream is not None
                    stream.on_ack(ack)
                    start = cpos + HEADER_LEN
                    end = start + length
                    if end > len(chunk):  # it straddles: what is here now, the rest later
                        end = len(chunk)
                        self._data_left = start + length - end
                    if end > start:
                        stream.on_data(end - start)
                    self._cpos = end
                    if end == len(chunk):
                        self._chunk = None
                    if end == start:
                        return _CONSUMED
                    # A view, not a copy: the bytes go on to a socket and are not kept.
                    return Data(chunk[start:end])
            if cpos == len(chunk):
                self._chunk = None
            else:
                self._spill()
        buf, pos = self._buf, self._pos
        if self.state == AWAIT_PREAMBLE:
            verdict = preamble_verdict(bytes(buf[pos:pos + len(PREAMBLE)]))
            if verdict is None:
                return NEED_DATA
            if verdict is False:
                return NOT_SESSION
            self._pos = pos + len(PREAMBLE)
            self._handshake_bytes = len(PREAMBLE)
            self.state = AWAIT_HELLO
            return self._next_event()
        left = self._data_left
        if left:  # the rest of a DATA frame, fed while a chunk was still being parsed
            take = min(left, len(buf) - pos)
            if take <= 0:
                return NEED_DATA
            with memoryview(buf) as view:
                body = bytes(view[pos:pos + take])
            self._pos = pos + take
            self._data_left = left - take
            stream = self.stream
            assert stream is not None
            stream.on_data(take)
            return Data(body)
        if len(buf) - pos < HEADER_LEN:
            return NEED_DATA
        ftype, length, ack = HEADER.unpack_from(buf, pos)
        allowed = EXPECT.get((self.role, self.state))
        if allowed is None or ftype not in allowed:
            raise ProtocolError(f"{FRAME_NAMES.get(ftype, f'frame type {ftype}')} not allowed "
                                f"in state {self.state} ({self.role})")
        cap = MAX_DATA if ftype == DATA else (
            MAX_CONTROL if self.state == OPEN else HANDSHAKE_LIMIT)
        if length > cap:
            raise ProtocolError(f"{FRAME_NAMES[ftype]} frame of {length} bytes (limit {cap})")
        if self.state != OPEN:
            # Checked on every call, counted once: a frame split across reads comes back here
            # with NEED_DATA as often as it takes to arrive (each byte counts once).
            if self._handshake_bytes + HEADER_LEN + length > HANDSHAKE_LIMIT:
                raise ProtocolError(f"handshake longer than {HANDSHAKE_LIMIT} bytes")
        end = pos + HEADER_LEN + length
        if len(buf) < end:
            return NEED_DATA
        if self.state != OPEN:
            self._handshake_bytes += HEADER_LEN + length
        if ftype == DATA and length and end == len(buf) and self.state == OPEN:
            # A DATA frame that straddled two chunks, completed in _buf (receive_data copies
            # only its bytes there): hand _buf itself on as the payload's view, no second copy.
            self._buf = bytearray()
            self._pos = 0
            stream = self.stream
            assert stream is not None
            stream.on_ack(ack)
            stream.on_data(length)
            return Data(memoryview(buf)[pos + HEADER_LEN:end])
        with memoryview(buf) as view:
            body = bytes(view[pos + HEADER_LEN:end])
        self._pos = end
        if self.state == OPEN:
            return self._open_event(ftype, body, ack)
        return self._handshake_event(ftype, body, allowed[ftype])

    def _open_event(self, ftype: int, body: bytes, ack: int) -> Event | _Sentinel:
        stream = self.stream
        assert stream is not None
        if ftype == ERROR_FRAME:
            code, reason = _parse_error(body)
            raise Refused(code, reason)
        stream.on_ack(ack)
        if ftype == DATA:
            if not body:
                raise ProtocolError("empty DATA frame")
            stream.on_data(len(body))
            return Data(body)
        stream.heard = True
        if ftype == ACK:
            return _CONSUMED
        if ftype == END:
            if len(body) < _END.size:
                raise ProtocolError("short END frame")
            (kind,) = _END.unpack_from(body)
            if kind not in (0, 1):
                raise ProtocolError(f"END kind {kind}")
            ended = Ended(kind == 1, body[_END.size:].decode("utf-8", "replace"))
            stream.on_end(ended)
            return ended
        if ftype == PING:
            return Ping()
        if ftype == ABORT:
            return Aborted(body.decode("utf-8", "replace"))
        return Pong()

    def _handshake_event(self, ftype: int, body: bytes, next_state: str) -> Event:
        if ftype == ERROR_FRAME:
            self.state = CLOSED
            code, reason = _parse_error(body)
            raise Refused(code, reason)
        if ftype == HELLO:
            if len(body) < _HELLO.size:
                raise ProtocolError("short HELLO")
            low, high, kind, nonce = _HELLO.unpack_from(body)
            if low > high:
                raise ProtocolError(f"HELLO versions {low}..{high}")
            if high < MIN_VERSION or low > VERSION:
                raise ProtocolError(f"client speaks versions {low}..{high}, relay "
                                    f"{MIN_VERSION}..{VERSION}", E_VERSION)
            self.version = min(high, VERSION)
            self.client_nonce = nonce
            if kind == _HELLO_KIND_NEW:
                proof = body[_HELLO.size:]
                if proof and (len(proof) != MAC_LEN or self.version < 3):
                    raise ProtocolError("HELLO(new) with trailing bytes")
                self.state = CREATING
                return HelloNew(self.version, proof, nonce)
            if kind == _HELLO_KIND_RESUME:
                if len(body) != _HELLO.size + ID_LEN:
                    raise ProtocolError("HELLO(resume) must carry a 16-byte session id")
                self.session_id = body[_HELLO.size:]
                self.state = CHALLENGING
                return HelloResume(self.version, self.session_id)
            if kind == _HELLO_KIND_TICKET:
                if len(body) != _HELLO.size + ID_LEN + _COUNTS.size:
                    raise ProtocolError("HELLO(ticket) must carry an id, counts and a proof")
                self.session_id = body[_HELLO.size:_HELLO.size + ID_LEN]
                received, sent, mac = _COUNTS.unpack_from(body, _HELLO.size + ID_LEN)
                self.peer_counts = (received, sent)
                self._peer_mac = mac
                self.state = VERIFYING
                return HelloTicket(self.version, self.session_id, received, sent)
            if kind == _HELLO_KIND_EARLY:
                head = _HELLO.size + ID_LEN + _COUNTS.size + _EARLY.size
                if self.version < 2:
                    raise ProtocolError("HELLO(ticket, early data) needs version 2")
                if not head < len(body) <= head + EARLY_MAX:
                    raise ProtocolError(f"HELLO(ticket, early data) must carry an id, counts, "
                                        f"a proof, an offset and 1..{EARLY_MAX} bytes")
                self.session_id = body[_HELLO.size:_HELLO.size + ID_LEN]
                received, sent, mac = _COUNTS.unpack_from(body, _HELLO.size + ID_LEN)
                (offset,) = _EARLY.unpack_from(body, head - _EARLY.size)
                early = body[head:]
                if offset + len(early) > sent:
                    raise ProtocolError(f"early data {offset}+{len(early)} beyond the "
                                        f"{sent} units sent", E_IMPOSSIBLE_COUNTS)
                self.peer_counts = (received, sent)
                self._peer_mac = mac
                self._early = (offset, early)
                self.state = VERIFYING
                return HelloTicket(self.version, self.session_id, received, sent, offset, early)
            raise ProtocolError(f"HELLO kind {kind}")
        if ftype == CREATED:
            if len(body) != _CREATED.size:
                raise ProtocolError("malformed CREATED")
            version, sid, secret, ticket = _CREATED.unpack(body)
            self.version = version
            self.session_id = sid
            self.next_ticket = ticket
            self.state = next_state
            return Created(sid, secret)
        if ftype == CHALLENGE:
            if len(body) != _CHALLENGE.size:
                raise ProtocolError("malformed CHALLENGE")
            self.version, self.relay_nonce = _CHALLENGE.unpack(body)
            self.state = next_state
            return Challenged()
        if ftype in (PROOF, RESUMED):
            layout = _COUNTS if ftype == PROOF else _RESUMED
            if len(body) != layout.size:
                raise ProtocolError(f"malformed {FRAME_NAMES[ftype]}")
            received, sent, mac, *ticket = layout.unpack(body)
            self.peer_counts = (received, sent)
            self._peer_mac = mac
            self._peer_ticket = ticket[0] if ticket else b""
            self.state = next_state
            if ftype == PROOF:
                return ProofReceived(received, sent)
            return Resumed(received, sent)
        raise ProtocolError(f"unexpected {FRAME_NAMES.get(ftype, ftype)}")  # pragma: no cover

    # output ---------------------------------------------------------------------------------

    def _move(self, action: str) -> None:
        nxt = SENDS.get((self.role, self.state), {}).get(action)
        if nxt is None:
            raise RuntimeError(f"cannot send {action} in state {self.state} ({self.role})")
        self.state = nxt

    def send_hello_new(self, stream: Stream, nonce: bytes | None = None,
                       key: bytes | None = None) -> bytes:
        """Client: the preamble and a request for a new session, to be carried by ``stream``.

        ``nonce``: a retry of a creation whose CREATED never arrived passes the first
        attempt's (``client_nonce``): a version-3 relay answers with the session it created
        then, so the upstream sees one connection. ``key``: the relay's creation key (a proof
        of it rides the HELLO; only a version-3 relay understands it)."""
        self._move("hello_new")
        self.stream = stream
        self.client_nonce = nonce if nonce is not None else self._rand(NONCE_LEN)
        body = _HELLO.pack(MIN_VERSION, VERSION, _HELLO_KIND_NEW, self.client_nonce)
        if key:
            body += creation_proof(key, self.client_nonce)
        return PREAMBLE + HEADER.pack(HELLO, len(body), 0) + body

    def send_hello_resume(self, session_id: bytes, stream: Stream) -> bytes:
        """Client: the preamble and a request to resume ``session_id`` (its ``stream``)."""
        if len(session_id) != ID_LEN:
            raise ValueError("session id must be 16 bytes")
        self._move("hello_resume")
        self.session_id = session_id
        self.stream = stream
        self.client_nonce = self._rand(NONCE_LEN)
        body = _HELLO.pack(MIN_VERSION, VERSION, _HELLO_KIND_RESUME, self.client_nonce)
        body += session_id
        return PREAMBLE + HEADER.pack(HELLO, len(body), 0) + body

    def send_hello_ticket(self, session_id: bytes, stream: Stream, ticket: bytes,
                          secret: bytes, version: int = 1) -> bytes:
        """Client: the preamble and a resume in one round trip, proved over ``ticket`` (the
        relay's last ``next_ticket``). If the relay no longer holds that ticket it answers
        with a CHALLENGE and the resume takes the two-trip path (``send_proof``).

        ``version`` is the session's (from CREATED): from 2 on, up to ``EARLY_MAX``
        unacknowledged bytes ride the HELLO as early data (kind 3), proved with it. The relay
        counts what it had not received of them before it answers, so its RESUMED counts
        include them and ``finish_resume`` re-sends only what follows; if it answers with a
        CHALLENGE instead, it took none of them and they are re-sent after RESUMED as usual."""
        if len(session_id) != ID_LEN or len(ticket) != NONCE_LEN:
            raise ValueError("session id and ticket must be 16 bytes")
        self._move("hello_ticket")
        self.session_id = session_id
        self.stream = stream
        self.client_nonce = self._rand(NONCE_LEN)
        self.relay_nonce = ticket
        counts = (stream.received, stream.sent)
        self._proof_counts = counts
        unacked = stream.unacked
        if version >= 2 and 0 < len(unacked) <= EARLY_MAX:
            early = bytes(unacked)
            offset = stream.data_sent - len(early)
            mac = _mac(secret, b"client early", session_id, ticket, self.client_nonce,
                       (*counts, offset), early)
            body = (_HELLO.pack(MIN_VERSION, VERSION, _HELLO_KIND_EARLY, self.client_nonce)
                    + session_id + _COUNTS.pack(*counts, mac) + _EARLY.pack(offset) + early)
        else:
            mac = _mac(secret, b"client", session_id, ticket, self.client_nonce, counts)
            body = (_HELLO.pack(MIN_VERSION, VERSION, _HELLO_KIND_TICKET, self.client_nonce)
                    + session_id + _COUNTS.pack(*counts, mac))
        return PREAMBLE + HEADER.pack(HELLO, len(body), 0) + body

    def check_ticket_proof(self, ticket: bytes, secret: bytes) -> bool:
        """Relay, on ``HelloTicket``: does the proof hold over the session's current ticket?
        (False for a stale or unknown one: answer with ``send_challenge``, or refuse.)"""
        self.relay_nonce = ticket
        return self.check_proof(secret)

    def send_created(self, session_id: bytes, secret: bytes, stream: Stream) -> bytes:
        """Relay: the new session's id and secret, and its first resume ticket
        (``next_ticket``, to keep); the link is open on ``stream``."""
        self._move("created")
        self.session_id = session_id
        self.stream = stream
        self.next_ticket = self._rand(NONCE_LEN)
        body = _CREATED.pack(self.version, session_id, secret, self.next_ticket)
        return HEADER.pack(CREATED, len(body), 0) + body

    def send_challenge(self) -> bytes:
        """Relay: a fresh challenge for the resume the client asked for."""
        self._move("challenge")
        self._early = None  # a stale ticket's early data is not taken: re-sent after RESUMED
        self.relay_nonce = self._rand(NONCE_LEN)
        body = _CHALLENGE.pack(self.version, self.relay_nonce)
        return HEADER.pack(CHALLENGE, len(body), 0) + body

    def send_proof(self, secret: bytes) -> bytes:
        """Client: its counts and the HMAC proving it holds ``secret``."""
        self._move("proof")
        stream = self.stream
        assert stream is not None
        counts = (stream.received, stream.sent)
        # The proofs cover the counts as sent: the stream may move on (the application keeps
        # writing) before RESUMED arrives.
        self._proof_counts = counts
        mac = _mac(secret, b"client", self.session_id, self.relay_nonce, self.client_nonce,
                   counts)
        body = _COUNTS.pack(*counts, mac)
        return HEADER.pack(PROOF, len(body), 0) + body

    def check_proof(self, secret: bytes) -> bool:
        """Relay: does the PROOF received prove ``secret``? Constant time (rule 5). For an
        unknown id pass any 32-byte secret: the cost is the same and the answer False."""
        assert self.peer_counts is not None
        early = self._early
        if early is not None:  # a ticket HELLO with early data (a CHALLENGE drops it)
            expected = _mac(secret, b"client early", self.session_id, self.relay_nonce,
                            self.client_nonce, (*self.peer_counts, early[0]), early[1])
        else:
            expected = _mac(secret, b"client", self.session_id, self.relay_nonce,
                            self.client_nonce, self.peer_counts)
        return hmac.compare_digest(expected, self._peer_mac)

    def send_resumed(self, secret: bytes, stream: Stream) -> bytes:
        """Relay, after ``check_proof`` and ``stream.check_peer_counts`` passed: RESUMED with
        the relay's own counts and proof, then every unit the client has not received."""
        assert self.peer_counts is not None
        self._move("resumed")
        self.stream = stream
        self.next_ticket = self._rand(NONCE_LEN)
        counts = (*self.peer_counts, stream.received, stream.sent)
        mac = _mac(secret, b"relay", self.session_id, self.relay_nonce, self.client_nonce,
                   counts, self.next_ticket)
        body = _RESUMED.pack(stream.received, stream.sent, mac, self.next_ticket)
        return HEADER.pack(RESUMED, len(body), 0) + body + stream.resume(self.peer_counts[0])

    def finish_resume(self, secret: bytes) -> bytes:
        """Client, on ``Resumed``: verify the relay's proof and counts (``ProtocolError`` if
        either is wrong: the stream is not touched) and return the frames re-sending every unit
        the relay has not received."""
        stream = self.stream
        assert stream is not None and self.peer_counts is not None
        r_received, r_sent = self.peer_counts
        counts = (*self._proof_counts, r_received, r_sent)
        expected = _mac(secret, b"relay", self.session_id, self.relay_nonce, self.client_nonce,
                        counts, self._peer_ticket)
        if not hmac.compare_digest(expected, self._peer_mac):
            self._fail(ProtocolError("the relay's proof is wrong", E_BAD_PROOF))
        self.next_ticket = self._peer_ticket
        why = stream.check_peer_counts(r_received, r_sent)
        if why is not None:
            self._fail(ProtocolError(f"relay counts: {why}", E_IMPOSSIBLE_COUNTS))
        return stream.resume(r_received)

    def send_error(self, code: int, reason: str) -> bytes:
        """An ERROR frame; nothing more is sent or accepted on this link."""
        self._move("error")
        body = _ERROR.pack(code) + reason.encode()[:512]
        return HEADER.pack(ERROR_FRAME, len(body), 0) + body

    def _fail(self, exc: ProtocolError) -> None:
        self.state = ERROR
        self._error = exc
        raise exc


def _parse_error(body: bytes) -> tuple[int, str]:
    if len(body) < _ERROR.size:
        return E_PROTOCOL, "short ERROR frame"
    (code,) = _ERROR.unpack_from(body)
    return code, body[_ERROR.size:].decode("utf-8", "replace")
