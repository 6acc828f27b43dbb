"""STOMP 1.0-1.2 (RabbitMQ, ActiveMQ, Artemis): the CONNECT is the connection's login.

Rules of this module (docs/design.md §5 "Idempotency decides where a dialect knows it", §5a; the
protocol: https://stomp.github.io/stomp-specification-1.2.html):

1. Framing only. A frame is a command line, header lines, an empty line, a body ended by NUL
   (or ``content-length`` bytes, then NUL); end-of-lines between frames are heart-beats. Body
   bytes are passed by counting, never copied.
2. Setup: the first frame, ``CONNECT`` or ``STOMP``, answered ``CONNECTED``, is recorded
   (at most ``_SETUP_LIMIT`` bytes). ``restore()`` re-sends it on every new connection and
   checks that the answer is a ``CONNECTED`` frame (its session id and server header may
   differ); an ``ERROR`` (a refused login) raises ``SetupMismatch``: surfaced, nothing
   re-sent. Before the CONNECT is answered it is the journal's to re-send, as any request.
3. Not idempotent (never re-sent once written whole, unanswered): ``SEND`` (a message
   delivered twice), ``ACK`` / ``NACK`` (the broker rejects a second one), ``COMMIT``, and
   any frame this module does not know. Re-sent: ``CONNECT``/``STOMP`` before its answer,
   ``DISCONNECT``.
4. Refused (surfaced): while subscribed (messages sent during the gap would be missed, and a
   new connection lacks the subscription) and inside a transaction (``BEGIN`` without its
   ``COMMIT`` / ``ABORT``: a new connection lacks it).
5. Frames with no ``receipt`` header get no answer: ``write_only()`` while nothing written
   awaits one (``acks``), so the core confirms what the peer's TCP acknowledged and never
   re-sends an old SEND after a later drop.
   Unanswered means written whole and not answered by the journal's rule: a read answers the
   records written before it began (``answered``), not those another greenlet wrote while it
   waited (stomp.py reads in a receiver thread: a RECEIPT's first bytes, read by a read begun
   before the SEND, do not make that SEND safe to re-send).
6. A fresh connection is equivalent once ``restore()`` can redo the CONNECT (``fresh_ok``).
7. A framing error: parsing stops; with a CONNECT recorded that is a refusal (the stream can
   no longer be followed), without one "unknown" (byte rules).
"""

from __future__ import annotations

from ._base import Dialect, Restore, SetupMismatch, unanswered_after

_SETUP_LIMIT = 65536
_LINE_LIMIT = 65536
_UNANSWERED_LIMIT = 64  # unanswered non-idempotent frames kept (the newest always)
_CLIENT = frozenset((b"CONNECT", b"STOMP", b"SEND", b"SUBSCRIBE", b"UNSUBSCRIBE", b"ACK",
                     b"NACK", b"BEGIN", b"COMMIT", b"ABORT", b"DISCONNECT"))
_RESENDABLE = frozenset((b"CONNECT", b"STOMP", b"DISCONNECT", b"SUBSCRIBE", b"UNSUBSCRIBE",
                         b"BEGIN", b"ABORT"))


class _Lost(Exception):
    pass


def looks_like(first_write: bytes) -> bool:
    """Is this first record a STOMP CONNECT / STOMP frame?"""
    return first_write.startswith((b"CONNECT\n", b"CONNECT\r\n", b"STOMP\n", b"STOMP\r\n"))


class _Frames:
    """Incremental STOMP framer: ``feed`` returns completed frames as (command, headers,
    raw bytes or None); raw is kept up to ``keep`` bytes (0: never)."""

    def __init__(self) -> None:
        self._head = bytearray()  # command and header lines of the frame being read
        self._in_body = False
        self._left = -1           # content-length bytes of body still to pass; -1: to NUL
        self._raw: bytearray | None = None
        self._cmd = b""
        self._headers: dict[bytes, bytes] = {}
        self.keep = 0

    @property
    def inside(self) -> bool:
        return self._in_body or bool(self._head.strip(b"\r\n"))

    def feed(self, data: bytes) -> list[tuple[bytes, dict[bytes, bytes], bytes | None]]:
        out = []
        i, n = 0, len(data)
        while i < n:
            if not self._in_body:
                if not self._head:  # heart-beats between frames
                    while i < n and data[i] in (0x0A, 0x0D):
                        i += 1
                    if i >= n:
                        break
                start = len(self._head)
                self._head += data[i:]
                ends = [k + len(sep) for sep in (b"\n\n", b"\n\r\n")
                        if (k := self._head.find(sep)) >= 0]
                if not ends:
                    if len(self._head) > _LINE_LIMIT:
                        raise _Lost("a frame head over 64 KiB")
                    break
                cut = min(ends)
                i += cut - start
                head = bytes(self._head[:cut])
                self._head = bytearray()
                lines = head.replace(b"\r\n", b"\n").split(b"\n")
                self._cmd = lines[0]
                self._headers = {}
                for line in lines[1:]:
                    if b":" in line:
                        name, _, value = line.partition(b":")
                        self._headers.setdefault(name, value)  # 1.2: the first one counts
                length = self._headers.get(b"content-length")
                self._left = int(length) if length is not None else -1
                self._in_body = True
                self._raw = bytearray(head) if self.keep else None
            if self._left > 0:
                take = min(self._left, n - i)
                self._left -= take
                self._save(data[i:i + take])
                i += take
                continue
            j = data.find(b"\x00", i)
            if j < 0:
                if self._left == 0:
                    raise _Lost("no NUL after a content-length body")
                self._save(data[i:])
                break
            if self._left == 0 and j != i:
                raise _Lost("no NUL after a content-length body")
            self._save(data[i:j + 1])
            i = j + 1
            self._in_body = False
            raw = bytes(self._raw) if self._raw is not None else None
            self._raw = None
            out.append((self._cmd, self._headers, raw))
        return out

    def _save(self, b: bytes) -> None:
        if self._raw is not None:
            if len(self._raw) + len(b) > self.keep:
                self._raw = None
            else:
                self._raw += b


class _StompRestore(Restore):
    __slots__ = ("_frames", "_buf")

    def __init__(self, connect: bytes) -> None:
        super().__init__(connect)
        self._frames = _Frames()
        self._frames.keep = 4096

    def feed(self, data: bytes) -> int | None:
        # Feed a byte at a time up to the first frame's NUL, so what follows stays the
        # caller's (the first frame is small: CONNECTED's head).
        end = data.find(b"\x00")
        chunk = data if end < 0 else data[:end + 1]
        try:
            frames = self._frames.feed(chunk)
        except (_Lost, ValueError) as e:
            raise SetupMismatch(f"STOMP: the CONNECT's answer is not a STOMP frame ({e})") \
                from None
        if not frames:
            return None
        cmd, headers, _ = frames[0]
        if cmd != b"CONNECTED":
            why = headers.get(b"message", b"")[:80].decode("latin-1", "replace")
            raise SetupMismatch(f"STOMP: the CONNECT was answered {cmd[:20].decode('latin-1')}"
                                f"{' (' + why + ')' if why else ''} on the new connection; "
                                "the original answer was CONNECTED")
        return len(chunk)


class StompDialect(Dialect):
    """STOMP connection knowledge (module docstring: the rules)."""

    name = "stomp"
    acks = True

    def __init__(self) -> None:
        self._connect: bytes | None = None   # the recorded CONNECT frame (rule 2)
        self._too_big = False
        self.lost: str | None = None
        self._subs: set[bytes] = set()
        self._tx: set[bytes] = set()
        self._records = 0  # records written (``wrote`` calls): ``answered`` counts back from it
        self._fresh()

    def _fresh(self) -> None:
        self._w = _Frames()
        self._w.keep = _SETUP_LIMIT if self._connect is None else 0
        self._r = _Frames()
        self._pending_connect: bytes | None = None
        self._receipts = 0
        # non-idempotent frames written whole, not answered yet (rule 5): (record, name)
        self._unanswered: list[tuple[int, str]] = []

    # -- feeding --------------------------------------------------------------------------

    def wrote(self, data: bytes) -> None:
        self._records += 1
        if self.lost is not None:
            return
        try:
            for cmd, headers, raw in self._w.feed(data):
                self._frame(cmd, headers, raw)
        except (_Lost, ValueError) as e:
            self._lose(f"frame written: {e}")

    def _frame(self, cmd: bytes, headers: dict[bytes, bytes], raw: bytes | None) -> None:
        if cmd not in _CLIENT:
            self._not_idempotent(cmd[:20].decode("latin-1", "replace") or "a frame")
        elif cmd in (b"CONNECT", b"STOMP"):
            if self._connect is None:
                if raw is None:
                    self._too_big = True
                else:
                    self._pending_connect = raw
            self._w.keep = 0
        elif cmd == b"SUBSCRIBE":
            self._subs.add(headers.get(b"id", b""))
        elif cmd == b"UNSUBSCRIBE":
            self._subs.discard(headers.get(b"id", b""))
        elif cmd == b"BEGIN":
            self._tx.add(headers.get(b"transaction", b""))
        elif cmd in (b"COMMIT", b"ABORT"):
            self._tx.discard(headers.get(b"transaction", b""))
        if cmd not in _RESENDABLE and cmd in _CLIENT:
            what = cmd.decode("latin-1")
            dest = headers.get(b"destination") or headers.get(b"id") or \
                headers.get(b"transaction") or b""
            self._not_idempotent(f"{what} {dest[:60].decode('latin-1', 'replace')}".strip())
        if b"receipt" in headers:
            self._receipts += 1

    def _not_idempotent(self, name: str) -> None:
        entry = (self._records, name)
        if len(self._unanswered) < _UNANSWERED_LIMIT:
            self._unanswered.append(entry)
        else:
            self._unanswered[-1] = entry  # the newest stays: answered() keeps it longest

    def answered(self, late: int) -> None:
        if self._unanswered:
            self._unanswered = unanswered_after(self._unanswered, self._records - late)

    def read(self, data: bytes) -> None:
        if self.lost is not None:
            return
        try:
            for cmd, _headers, _raw in self._r.feed(data):
                if cmd == b"CONNECTED" and self._pending_connect is not None:
                    self._connect = self._pending_connect
                    self._pending_connect = None
                elif cmd == b"RECEIPT":
                    self._receipts = max(0, self._receipts - 1)
        except (_Lost, ValueError) as e:
            self._lose(f"frame read: {e}")

    def acked(self) -> None:
        self._unanswered = []

    def _lose(self, why: str) -> None:
        self.lost = why

    # -- questions ------------------------------------------------------------------------

    def refusal(self) -> str | None:
        if self._too_big:
            return (f"STOMP: the CONNECT frame was larger than {_SETUP_LIMIT} bytes, so the "
                    "login cannot be redone on a new connection")
        if self.lost is not None:
            if self._connect is not None:
                return (f"STOMP: the frame stream could not be followed ({self.lost}), so the "
                        "login cannot be redone with certainty")
            return None
        if self._subs:
            return ("STOMP: a SUBSCRIBE is active; messages sent during the gap would be "
                    "missed, and a new connection lacks the subscription")
        if self._tx:
            return "STOMP: a transaction (BEGIN) is open; a new connection lacks it"
        return None

    def restore(self) -> Restore | None:
        if self._connect is None or self._too_big:
            return None
        return _StompRestore(self._connect)

    def unsafe(self) -> str | None:
        if self.lost is not None:
            return None
        return self._unanswered[0][1] if self._unanswered else None

    def fresh_ok(self) -> bool:
        return self.refusal() is None and self._connect is not None

    def write_only(self) -> bool:
        return (self.lost is None and not self._receipts and self._pending_connect is None
                and not self._w.inside)

    def resumable(self) -> bool:
        return False  # answers are pushes and receipts: nothing to re-request

    def mid_frame(self) -> bool:
        return self.lost is None and self._r.inside

    def discard(self) -> None:
        # The connection is gone, with its subscriptions and transactions; the recorded
        # CONNECT stays (restore redoes it). A stream lost with no CONNECT recorded is new.
        if self._connect is None:
            self.lost = None
        self._subs.clear()
        self._tx.clear()
        self._fresh()
