"""The recovery decision, sans-IO: events in, verdicts out (docs/design.md §3-§5b, §8).

Rules of this module:

1. Everything that decides what a drop means lives here; nothing here does I/O. The socket
   (``_socket.py``) reports events — it wrote, it read, it met EOF, an error struck in a phase,
   a new connection is ready, the application closed — and obeys the verdict it gets back.
   No verdict rides on an exception.
2. Time is injected (``clock``), as in tenacity: the budget, the backoff schedule and the
   process-wide token bucket are tested without sleeping.
3. States, and what moves between them (the socket asks ``Machine.move``; a move that is not
   in this table is a bug and raises):

   ==========  =======================  ==========  ====================================
   state       event                    next        meaning
   ==========  =======================  ==========  ====================================
   connected   recover                  recovering  a drop the rules let us recover
   connected   surface-discard          broken      error shown, connection thrown away
   connected   surface-keep             connected   error shown, connection kept (timeout)
   connected   interrupted              broken      BaseException in a write
   recovering  reconnected              connected   restored, replayed: published
   recovering  gave-up                  broken      the budget is spent (error shown)
   recovering  interrupted              broken      BaseException inside the recovery
   broken      recover                  recovering  the next write reconnects lazily,
                                                   where ``lazy_refusal`` allows
   any         close                    closed      the application closed it (sticky)
   ==========  =======================  ==========  ====================================

4. A drop is judged by ``RULES``, in order: the first rule whose condition holds decides
   (each condition returns the note's text, or None). No rule holds: recover — unless the
   same re-sent records met a drop ``POISON_CAP`` times on connections that never carried an
   answer byte (a poison request: surfaced, and remembered for the peer, so a client's own
   retry of the same bytes on a new socket surfaces at once), or an unanswered EOF repeats
   (passed on).
5. A budget (``Episode``) belongs to one recovery episode: it starts at a drop and ends when
   the connection has carried an answer again, or has stayed up longer than a whole deadline
   (so a long call that meets a second drop much later starts afresh, review r20, while a
   poison record that is reset after every re-send exhausts one budget). A socket timeout set
   by the application bounds every call as well (``call_end``): the caller asked never to wait
   longer (§4).
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from zlib import crc32 as _crc32

try:  # xxHash's XXH3 runs at ~45 GB/s here, CRC-32 at ~4: the digest is on the read path
    from xxhash import xxh3_64 as _xxh3_64

    _xxh3: Any = _xxh3_64
except ImportError:  # pragma: no cover - the declared dependency is missing
    _xxh3 = None

from greenlet import getcurrent as _getcurrent

from ._errors import ErrorCategory, ErrorInfo
from ._journal import Journal
from ._policy import RetryPolicy

__all__ = ["Machine", "Episode", "TokenBucket", "PoisonMemory", "POISONED", "Verdict", "Drop",
           "RULES", "TRANSITIONS", "CONNECTED", "RECOVERING", "BROKEN", "CLOSED"]

Clock = Callable[[], float]

CONNECTED, RECOVERING, BROKEN, CLOSED = "connected", "recovering", "broken", "closed"
# Replay modes that re-send unanswered records (and resume answers, §5b).
REPLAYING = ("idempotent", "unanswered")

TRANSITIONS: dict[tuple[str, str], str] = {
    (CONNECTED, "recover"): RECOVERING,
    (CONNECTED, "surface-discard"): BROKEN,
    (CONNECTED, "surface-keep"): CONNECTED,
    (CONNECTED, "interrupted"): BROKEN,
    (RECOVERING, "reconnected"): CONNECTED,
    (RECOVERING, "gave-up"): BROKEN,
    (RECOVERING, "interrupted"): BROKEN,
    (BROKEN, "recover"): RECOVERING,
    (BROKEN, "interrupted"): BROKEN,
    (BROKEN, "gave-up"): BROKEN,
}

# Verdict kinds.
RECOVER = "recover"  # reconnect, restore, replay (and resume ``resume`` bytes of the answer)
SURFACE = "surface"  # raise the error with ``note``; ``discard`` says whether the connection goes
EARLY_ANSWER = "early-answer"  # the peer answered before the write failed: deliver, replay nothing
PASS_EOF = "pass-eof"  # hand the caller b"" (the protocol's end, or the server's answer)

TLS_TRANSPORT_CAP = 3  # "retry, small cap" (docs/design.md §3); picked, not measured
# A reset that meets the same re-sent records again and again, on connections that never
# carried an answer, is the server's answer (a poison request): surfaced after this many
# re-sends, as a repeated EOF is after one. Picked: a flaky path rarely resets three fresh
# connections in a row before their first answer byte; a server that resets every request
# (a TLS-only port, a crashing handler) does, at once.
POISON_CAP = 3
# An EOF that cut an answer (the dialect's framing wants more) is resumed softly: refused
# reconnects (no route, no name) are retried for CUT_RETRY, and the connect and the new
# answer's first byte get CUT_WAIT each (within what the application's timeout leaves); on any
# other failure, or when the time is up, the caller gets the EOF, as without resilientsock.
# Picked: a server that is there answers a re-sent GET in milliseconds on a LAN, a proxy
# flapping is back within half a second, and a server closed for good costs at most this
# once per cut answer — urllib3's one-shot test servers close their listener (CUT_RETRY
# each: 4 of its tests), or leave it open with nobody reading (CUT_WAIT).
CUT_WAIT = 1.0
CUT_RETRY = 0.5
# When the next backoff wait would outlast the budget, one last attempt is made this long
# before the budget ends (not none after sleeping it out): a server back 1 s into a 5 s
# timeout is still found when the schedule's wait has grown past what is left. Picked: a
# loopback or LAN connect with its replay fits in it; a slower one gets what is left anyway.
FINAL_MARGIN = 0.05
# Full duplex, an EOF while the writer greenlet is between two writes and every record is
# answered: the EOF waits up to this long for the writer's next write to tell a cut path
# (a reset comes back: recovered) from the stream's end (passed on). Picked: a streaming
# writer writes again within milliseconds, even on a loaded machine within a few hundred;
# a server that ends a duplex conversation costs its reader this once.
DUPLEX_EOF_WAIT = 0.5


@dataclass(frozen=True)
class Verdict:
    """What the socket must do about one event."""

    kind: str
    rule: str = ""  # the name of the rule that decided
    note: str = ""  # the text of the PEP 678 note (without the "resilientsock: " prefix)
    discard: bool = False  # SURFACE: throw the connection away (journal cleared)
    quiet: bool = False  # SURFACE: the application's own read timeout: not an error, DEBUG
    resume: int = 0  # RECOVER: bytes of the answer the caller already has (§5b)


@dataclass(frozen=True)
class Drop:
    """An error (or an unanswered EOF) that struck a protected connection, with the facts
    the socket found out by I/O before asking (the machine does none itself)."""

    info: ErrorInfo
    phase: str  # "read" | "write" | "eof"
    cut: bool = False  # an EOF that the dialect's framing says cut the answer (§5b)
    writing: bool = False  # the interrupted call is a write (its record is not yet journaled)
    peer_not_reading: bool = False  # a write timeout, and the peer's TCP acknowledged all
    early_answer: bool = False  # a failed write, and the peer's bytes are waiting to be read
    duplex: bool = False  # another greenlet reads this socket (its answers are not early)


class TokenBucket:
    """Process-wide limiter for reconnect attempts (docs/design.md §4): a lone drop never waits
    (burst of ``rate / 10``), a mass drop is spread out. Cooperative (gevent): no lock."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.tokens: float | None = None
        self.stamp = 0.0

    def delay(self, rate: float) -> float:
        """Reserve one attempt; returns how long to wait before making it."""
        burst = max(1.0, rate / 10.0)
        now = self.clock()
        if self.tokens is None:
            self.tokens = burst
        else:
            self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        self.tokens -= 1.0  # reserve, even if we must wait for it
        return 0.0 if self.tokens >= 0 else -self.tokens / rate


class PoisonMemory:
    """Process-wide memory of poison requests (rule 4): the peer and the digest of the
    unanswered bytes a server reset after every re-send. A client library's own retry sends
    the same bytes on a new socket; its drop then surfaces at once, as it would without us,
    instead of being re-sent POISON_CAP times more for each of the library's attempts (layered
    retries do not multiply, docs/design.md §9). An entry lasts one deadline (30 s without one);
    at most ``size`` are kept, the oldest forgotten first. Cooperative (gevent): no lock."""

    def __init__(self, clock: Clock = time.monotonic, size: int = 64) -> None:
        self.clock = clock
        self.size = size
        self.seen: dict[tuple[Any, int], float] = {}  # key -> until when it is remembered

    def remember(self, key: tuple[Any, int], span: float) -> None:
        seen = self.seen
        seen.pop(key, None)
        seen[key] = self.clock() + span
        while len(seen) > self.size:
            try:
                seen.pop(next(iter(seen)), None)
            except (StopIteration, RuntimeError):  # another thread changed it (no patch())
                break

    def recalls(self, key: tuple[Any, int]) -> bool:
        until = self.seen.get(key)
        if until is None:
            return False
        if self.clock() >= until:
            self.seen.pop(key, None)
            return False
        return True


POISONED = PoisonMemory()


class Episode:
    """The budget of one recovery episode (rule 5)."""

    __slots__ = ("policy", "clock", "start", "attempts", "original", "last", "tls_transport",
                 "up_since", "timeout_hit", "library", "base", "gone", "restarts", "final")

    def __init__(self, policy: RetryPolicy, clock: Clock, original: BaseException | None) -> None:
        self.policy = policy
        self.clock = clock
        self.start = clock()
        self.attempts = 0
        self.original = original
        self.last: BaseException | None = original
        self.tls_transport = 0
        self.up_since: float | None = None  # when the last reconnect succeeded
        self.timeout_hit: float | None = None  # the socket timeout that ran out, if it did
        self.library: str | None = None  # the retrying client library whose call dropped
        # The backoff schedule counts attempts from ``base``: it restarts when an attempt
        # reaches the server after attempts that found nobody (the outage is over), at most
        # POISON_CAP times an episode.
        self.base = 0
        self.gone = False  # the last failed attempt found nobody (refused, no route, no name)
        self.restarts = 0
        self.final = False  # the last attempt the budget allows has been scheduled

    def end(self, call_end: float | None) -> float:
        deadline = self.policy.deadline
        end = math.inf if deadline is None else self.start + deadline
        return end if call_end is None else min(end, call_end)

    def remaining(self, call_end: float | None) -> float:
        return self.end(call_end) - self.clock()

    def spent(self, call_end: float | None, app_timeout: float | None) -> bool:
        """True when no further attempt may start (and note why)."""
        cap = self.policy.max_attempts
        if cap is not None and self.attempts >= cap:
            return True
        if self.tls_transport > TLS_TRANSPORT_CAP:
            return True
        now = self.clock()
        if call_end is not None and now >= call_end and app_timeout is not None:
            self.timeout_hit = app_timeout
            return True
        deadline = self.policy.deadline
        return deadline is not None and now >= self.start + deadline

    def delay(self, bucket: TokenBucket, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before the next attempt (full jitter; the first is immediate)."""
        backoff = self.policy.backoff(self.attempts - self.base, rand)
        return max(backoff, bucket.delay(self.policy.reconnect_rate))

    def attempted(self, reached: bool, gone: bool) -> None:
        """An attempt ended (failed, or the connection was published); ``reached``: its
        connect succeeded (the server is there); ``gone``: it found nobody. A server back
        after an outage restarts the schedule, so the backoff grown while it was away (up to
        5 s) is not slept once it is there."""
        if reached and self.gone and self.restarts < POISON_CAP:
            self.restarts += 1
            self.base = self.attempts - 1  # the schedule's first jittered wait (docs/design.md §4)
        self.gone = gone

    def healthy(self) -> bool:
        """Has the connection stayed up longer than a whole deadline since the reconnect?"""
        if self.up_since is None:
            return False
        span = self.policy.deadline if self.policy.deadline is not None else 30.0
        return self.clock() - self.up_since >= span

    def describe(self) -> str:
        last = self.last
        text = f"{last}" if last is not None and str(last) else type(last).__name__
        total = self.attempts
        spent = self.clock() - self.start
        if self.timeout_hit is not None:
            return (f"gave up: the socket's timeout of {self.timeout_hit:g} s ran out after "
                    f"{total} attempt{'s' if total != 1 else ''} in {spent:.1f} s "
                    f"(last: {text})")
        return (f"gave up after {total} attempt{'s' if total != 1 else ''} in {spent:.1f} s "
                f"(last: {text})")


class _Crc32:
    """The fallback digest, with xxhash's interface."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = _crc32(data, self.value)

    def reset(self) -> None:
        self.value = 0

    def intdigest(self) -> int:
        return self.value


def new_digest() -> Any:
    """A running digest for answer resume: XXH3-64 (a difference goes unnoticed with
    probability about 2**-64), else CRC-32 (2**-32). Constant memory whatever the answer's
    size."""
    return _xxh3() if _xxh3 is not None else _Crc32()


def preload_dialects() -> None:
    """Import the dialect modules now (``patch()`` calls this once gevent has patched): the
    first write of a process would otherwise pay for them (measured here: 15.6 ms, the
    first 64 KiB ``sendall`` against 0.05 ms for the next, docs/design.md §12). Not HTTP's: h11 is
    imported only for HTTP (its dialect's rule). Never raises."""
    try:
        from .dialects import handshake, ldap, memcached, resp, stomp  # noqa: F401
    except Exception:  # pragma: no cover - the dialect layer is optional; detect() copes
        pass


# -- the rules for a drop ----------------------------------------------------------------------

def _read_timeout(m: Machine, d: Drop) -> str | None:
    if d.info.category is ErrorCategory.TIMEOUT and d.phase == "read" \
            and not m.policy.retry_read_timeouts:
        return ("read timeout: the peer is probably alive and busy, so the connection and "
                "its unanswered requests are kept (retry_read_timeouts retries it)")
    return None


def _peer_not_reading(m: Machine, d: Drop) -> str | None:
    if d.info.category is ErrorCategory.TIMEOUT and d.phase == "write" and d.peer_not_reading:
        return ("write timeout: the peer is alive (its TCP acknowledged everything sent) but "
                "is not reading, so a new connection would not help")
    return None


def _early_answer(m: Machine, d: Drop) -> str | None:
    # Full duplex on a line protocol (another greenlet reads one answer line per request
    # line): unread bytes are answers to earlier lines, re-sent and answered again on the new
    # connection, not an early answer to the write that failed. Elsewhere (an upload the
    # server answered early and closed on, with a reader greenlet) they are one.
    if d.writing and d.early_answer and not ((d.duplex or m.duplex) and m.line_stream()):
        return ("the server answered before the write failed (an early answer such as 413 or "
                "404 from a server that closed without reading the rest): that answer is "
                "delivered and nothing is re-sent")
    return None


def _half_closed(m: Machine, d: Drop) -> str | None:
    if m.half_closed and d.phase != "eof":
        return ("the server half-closed this connection (it sent its end of the stream and "
                "went on reading, as nginx's lingering close does) and has now stopped "
                "reading: a plain socket gets this error, and nothing is re-sent")
    return None


def _not_retryable(m: Machine, d: Drop) -> str | None:
    if d.info.category is ErrorCategory.TIMEOUT and d.phase == "write":
        return None  # a write timeout discards the connection and re-sends (§3)
    if not d.info.retryable and not (d.info.category is ErrorCategory.TIMEOUT
                                     and m.policy.retry_read_timeouts):
        from ._errors import REASONS

        return f"{d.info.category} is not retried: {REASONS[d.info.category]}"
    return None


def _dialect(m: Machine, d: Drop) -> str | None:
    dialect = m.dialect
    return None if dialect is None else dialect.refusal()


def _not_idempotent(m: Machine, d: Drop) -> str | None:
    """docs/design.md §5 (wave 3): under the default replay="idempotent" (and the stricter "safe"),
    a request the dialect knows is not idempotent, and that may have reached the server, is
    not re-sent (measured: a MULTI ... EXEC ran twice under replay="safe", the first write
    on a reused connection)."""
    dialect = m.dialect
    if dialect is None or m.policy.replay not in ("idempotent", "safe"):
        return None
    if not (m.journal.pending or d.writing or m.holding()):
        return None
    what = dialect.unsafe()
    if what is None:
        return None
    return (f"{dialect.name}: {what} may have reached the server (written whole, no answer "
            "yet) and is not idempotent, so it is not re-sent: running it twice could leave "
            "the server otherwise than once (session mode re-sends it exactly once; "
            "replay='unanswered' opts in to at-least-once)")


def _server_session(m: Machine, d: Drop) -> str | None:
    if m.session and m.policy.on_reconnect is None:
        return ("the server spoke first (a banner, as in SMTP, FTP, POP3, IMAP) and a session "
                "was under way: a new connection starts a new session, where re-sent commands "
                "would be read out of context (an on_reconnect hook that restores the session "
                "lets resilientsock recover it)")
    return None


def _mid_answer(m: Machine, d: Drop) -> str | None:
    if m.duplex:
        return None  # full duplex: the reader's stream goes on, nothing is resumed
    if not m.answered or not (d.phase == "read" or d.cut or m.holding()):
        return None
    why = m.resume_refusal()
    if why is None:
        return None
    return ("the connection dropped mid-answer: part of the answer was already returned, "
            f"and {why}")


def _overflow(m: Machine, d: Drop) -> str | None:
    if m.journal.overflowed:
        return (f"more than journal_limit={m.policy.journal_limit} bytes were unconfirmed, so "
                "replay was no longer promised")
    return None


def _replay_none(m: Machine, d: Drop) -> str | None:
    if m.policy.replay == "none" and (m.journal.pending or d.writing):
        return "replay='none': unconfirmed writes are never re-sent"
    return None


def _replay_safe(m: Machine, d: Drop) -> str | None:
    if m.policy.replay != "safe" or not (m.journal.pending or d.writing):
        return None
    count = len(m.journal) + (1 if d.writing else 0)
    if m.conn_answered and count <= 1 and d.info.category is ErrorCategory.CONNECTION_LOST:
        return None
    return ("replay='safe': the unanswered writes may have reached a live peer (only the "
            "first write on an idle, reused connection is re-sent)")


# (name, condition, verdict kind, discard, quiet), in order: the first that holds decides.
RULES: tuple[tuple[str, Callable[[Machine, Drop], str | None], str, bool, bool], ...] = (
    ("read-timeout", _read_timeout, SURFACE, False, True),
    ("peer-not-reading", _peer_not_reading, SURFACE, False, False),
    ("early-answer", _early_answer, EARLY_ANSWER, False, False),
    ("half-closed", _half_closed, SURFACE, True, False),
    ("not-retryable", _not_retryable, SURFACE, True, False),
    ("dialect", _dialect, SURFACE, True, False),
    ("not-idempotent", _not_idempotent, SURFACE, True, False),
    ("server-session", _server_session, SURFACE, True, False),
    ("mid-answer", _mid_answer, SURFACE, True, False),
    ("journal-overflow", _overflow, SURFACE, True, False),
    ("replay-none", _replay_none, SURFACE, True, False),
    ("replay-safe", _replay_safe, SURFACE, True, False),
)


class _Lines:
    """Full duplex on a line protocol (rule 6): which request lines have been answered.

    Request records end with a newline; answer lines are counted as they are read. Record
    ``r`` (cumulative request lines ``c``) is confirmed once ``c`` answer lines were read:
    one answer line per request line, the robot's and most line protocols' shape. ``partial``
    is the answer line the reader has begun (resumed on a new connection)."""

    __slots__ = ("req", "ans", "marks", "partial", "confirmed")

    def __init__(self) -> None:
        self.req = 0  # request lines written since line counting began
        self.ans = 0  # answer lines read (on the current connection's count)
        self.marks: deque[tuple[int, int]] = deque()  # (journal mark after a record, req)
        self.partial = bytearray()  # bytes of the answer line in progress
        self.confirmed = 0  # request lines whose answers were read


_PARTIAL_MAX = 65536  # an answer line longer than this is no line protocol: counting stops
_MARKS_MAX = 1 << 16  # request records awaiting their answer line: more, and counting stops


class Machine:
    """The recovery state of one protected socket (see the module docstring)."""

    def __init__(self, policy: RetryPolicy, clock: Clock = time.monotonic,
                 poisoned: PoisonMemory = POISONED) -> None:
        self.policy = policy
        self.clock = clock
        self.poisoned = poisoned
        self.target: Any = None  # the peer, for the poison memory (set by the socket)
        self.state = CONNECTED
        self.gen = 0  # connection generation: moves at every new connection
        self.journal = Journal(policy.journal_limit, keep_data=policy.replay != "none")
        self.journal.keeping = policy.resume_answers and policy.replay in REPLAYING
        self.episode: Episode | None = None
        self.owner: Any = None  # the greenlet running the recovery
        self.explicit = policy.confirm == "explicit"
        self.tcp_ack = policy.confirm == "tcp-ack"
        # Above this many unconfirmed bytes the socket looks at the journal after a write
        # (the write-only-stream warning).
        self.warn_at = max(1 << 20, policy.journal_limit // 4)
        self.writing = 0  # write calls under way (full duplex: an EOF then is part of a drop)
        # The answer in progress: bytes returned since the last write, and their digest.
        self.answered = 0
        self.digest = new_digest()  # of what the caller got of the answer in progress (§5b)
        self.conn_answered = False  # this connection has carried an answer (replay='safe')
        # Server-first protocols (banner rule): bytes before the application's first write.
        self.wrote = False
        self.banner = bytearray()
        self.session = False  # a banner, then an answer to a write: session state exists
        self.server_first = False  # this lineage's server speaks first (survives a discard)
        # Protocol knowledge (§5a).
        self.dialect: Any = None
        self.detected = False
        # An error was surfaced and the connection let go (surface-discard, gave-up): the
        # socket is as dead as a plain one, unless the dialect says a new connection is
        # equivalent (``lazy_refusal``, docs/design.md §5). A new connection published clears it.
        self.dead = False
        # An unanswered EOF that repeats for the same re-sent records (§5): the mark of the
        # journal when an EOF recovery replayed, and whether anything was read since.
        self.eof_mark: int | None = None
        # An EOF that cut the answer in progress was resumed when the caller had this many of
        # its bytes: the same cut again, with no byte more, is the server's answer (§5b).
        self.cut_at: int | None = None
        # Drops that met the same re-sent records before any answer (POISON_CAP).
        self.poison = 0
        self.poison_mark: int | None = None
        # The peer half-closed this connection and still takes our bytes (§5: a half-close
        # is not a drop): its EOF is passed on, and a write error on it later is surfaced.
        self.half_closed = False
        # The client library that opened this socket in its own connect function, if any
        # (``_libraries.Owner``, decided at the first connect): its retries come first.
        self.library: Any = None
        # Read calls under way (counted by the socket's read paths), and whether a read and
        # a write of different greenlets ever overlapped on this socket: full duplex. Its
        # answers cannot be matched to its requests by timing, so no answer is resumed or
        # taken for early (§5b), and an EOF with unconfirmed records is a drop even after
        # answer bytes (the reader's stream must go on, docs/design.md §5).
        self.reading = 0
        self.duplex = False
        self.writer: Any = None  # the greenlet that wrote last (duplex only)
        self.lines: _Lines | None = None  # full duplex on a line protocol (rule 6)
        self.lines_off = False  # the stream is not one answer line per request line
        self.read_eol = False  # the last read ended with a newline (duplex only)
        self.eof_repeats = 0  # unanswered EOFs in a row for the same records (duplex)

    # -- state --------------------------------------------------------------------------------

    def move(self, event: str) -> str:
        if event == "close":
            self.state = CLOSED
            return CLOSED
        if event in ("surface-discard", "gave-up"):
            self.dead = True
        elif event == "reconnected":
            self.dead = False
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise RuntimeError(f"resilientsock: no transition from {self.state!r} on "
                               f"{event!r}") from None
        return self.state

    # -- events on the connection -------------------------------------------------------------

    def wrote_data(self, data: Any) -> None:
        """The application wrote ``data`` (one record)."""
        journal = self.journal
        if self.reading:
            self.duplex = True  # another greenlet is inside a read while this one wrote
        if self.duplex:
            self.writer = _getcurrent()
        if not self.lines_off and not self.explicit and self.dialect is None and (
                self.lines is not None
                or not (journal._head < len(journal._ends) or journal.overflowed)):
            self._wrote_lines(data, journal)  # (its first test inlined: a frame less a write)
        if self.answered or journal._keep != journal._done:
            # A write after an answer ends it (before the append: a request/answer exchange
            # then finds the journal empty, and its request is held, not copied).
            dialect = self.dialect
            if dialect is None or not dialect.hold():
                self.answered = 0
                self.digest.reset()
                self.cut_at = None
                journal.end_answer()
        journal.append(data)
        lines = self.lines
        if lines is not None:
            lines.marks.append((journal.seq, lines.req))
            if len(lines.marks) > _MARKS_MAX:
                self._lines_stop()  # far more requests than answer lines: not this shape
        self.eof_mark = None
        dialect = self.dialect
        if dialect is not None:
            dialect.wrote(bytes(data))
        elif not self.wrote:
            self.wrote = True
            if not self.detected:
                self.detect(bytes(data), None)
                if self.dialect is not None and self.lines is not None:
                    self._lines_stop()  # a known protocol: its dialect knows better

    def _wrote_lines(self, data: Any, journal: Journal) -> None:
        """Full duplex: count the request lines of a record (rule 6). Counting begins at a
        clean point — nothing unconfirmed, and no answer line half read."""
        lines = self.lines
        if lines is None:
            if journal.pending or not (self.read_eol or not self.conn_answered):
                return
            lines = self.lines = _Lines()
        if data[-1:] != b"\n":
            self._lines_stop()  # records are not lines
            return
        chunk = data if isinstance(data, bytes | bytearray) else bytes(data)
        lines.req += chunk.count(b"\n")

    def line_stream(self) -> bool:
        """Full duplex on a line protocol (rule 6): counted, or — before counting began —
        by the look of what is unconfirmed (it ends with a newline)."""
        if not self.duplex or self.lines_off:
            return False
        if self.lines is not None:
            return True
        journal = self.journal
        return journal.keep_data and journal.pending and journal.last_byte() == b"\n"

    def _lines_stop(self) -> None:
        self.lines = None
        self.lines_off = True

    def _read_lines(self, data: Any, lines: _Lines, confirm: bool) -> None:
        chunk = data if isinstance(data, bytes | bytearray) else bytes(data)
        n = chunk.count(b"\n")
        if not n:
            lines.partial += chunk
            if len(lines.partial) > _PARTIAL_MAX:
                self._lines_stop()
            return
        lines.ans += n
        lines.partial[:] = chunk[chunk.rindex(b"\n") + 1:]
        if lines.ans > lines.req:
            self._lines_stop()  # more answer lines than request lines: not this shape
            return
        marks = lines.marks
        upto = None
        while marks and marks[0][1] <= lines.ans:
            upto, lines.confirmed = marks.popleft()
        if upto is not None and confirm:
            self.journal.confirm_before(upto)
            self.journal.drop_kept()

    def _lines_realign(self, lines: _Lines) -> None:
        """Forget the marks of records the journal confirmed otherwise (the answer rule
        before full duplex): the answer lines still to come for them are theirs."""
        head = self.journal._base + self.journal._head
        marks = lines.marks
        while marks and marks[0][0] <= head:
            _, cum = marks.popleft()
            lines.confirmed = max(lines.confirmed, cum)

    def read_data(self, data: Any, mark: int) -> None:
        """The application read ``data`` (>= 1 byte); ``mark`` was the journal's mark when
        the read began: every record before it is answered."""
        journal = self.journal
        if self.writing:
            self.duplex = True  # another greenlet is inside a write while this one read
        lines = self.lines
        if lines is not None:
            # Line counting (rule 6) from the first write on: in full duplex it alone
            # confirms; otherwise it follows the answer rule.
            self._read_lines(data, lines, self.duplex)
            if self.duplex and self.lines is not None:
                mark = journal._base + journal._head  # confirmed by lines alone
        elif not self.lines_off:
            self.read_eol = data[-1:] == b"\n"
        if self.duplex:
            self.eof_repeats = 0
        if journal._done != journal._total or journal.overflowed:  # journal.pending
            if not self.explicit:
                journal.confirm_before(mark)
                if lines is not None and not self.duplex:
                    self._lines_realign(lines)
        self.conn_answered = True
        self.eof_mark = None
        self.poison = 0
        if self.episode is not None and self.state is CONNECTED:
            self.episode = None  # the connection carried an answer again: the episode ends
        dialect = self.dialect
        if dialect is None and self.wrote and (self.session or not self.banner):
            # The common case: a known writer, no protocol knowledge, no banner bookkeeping.
            if journal.keeping:
                self.digest.update(data)
            self.answered += len(data)
            return
        if not self.wrote:
            if not self.detected:
                self.detect(None, bytes(data))
                dialect = self.dialect
            if dialect is None and len(self.banner) < 8192:
                self.banner += data
                self.server_first = True
        elif not self.session and self.banner:
            self.session = True
        if dialect is not None:
            chunk = bytes(data)
            dialect.read(chunk)
            if journal.keeping:
                self.digest.update(dialect.mask(chunk))
        elif journal.keeping:
            self.digest.update(data)
        self.answered += len(data)

    def detect(self, first_write: bytes | None, first_read: bytes | None) -> None:
        self.detected = True
        try:
            from . import dialects
        except ImportError:  # pragma: no cover - the dialect layer is optional
            return
        try:
            self.dialect = dialects.detect(first_write, first_read, prelude=self.policy.prelude)
        except Exception:  # a dialect must never break the connection  # pragma: no cover
            self.dialect = None
        if self.dialect is not None:
            if getattr(self.dialect, "acks", False) and self.policy.confirm == "answer":
                self.tcp_ack = True  # requests without answers: look at TCP acknowledgements
            if first_write is not None:
                self.dialect.wrote(first_write)

    def eof(self, nbytes: int, others_active: bool,
            peer_alive: bool | None = None) -> Verdict | Drop:
        """The connection's read returned EOF. A verdict, or a Drop to judge with ``drop``.

        ``others_active``: another greenlet is inside a write on this connection.
        ``peer_alive``: what the socket found out about the peer after this EOF (None: not
        asked) — True when the peer's TCP went on acknowledging our bytes after its FIN (a
        half-close, §5), False when the connection is gone (a reset arrived)."""
        from ._errors import classify

        def unanswered(cut: bool = False) -> Drop:
            from ._errors import UnansweredEOFError

            exc = UnansweredEOFError("peer closed the connection without answering")
            info = classify(exc, phase="read")
            assert info is not None
            return Drop(info, "eof", cut=cut)

        if self.half_closed or peer_alive:
            # A half-close (§5): the reader gets the EOF, as a plain socket gives it, and
            # nothing is re-sent for it; the writer goes on until the peer stops reading.
            self.half_closed = True
            return Verdict(PASS_EOF, "half-close")
        if others_active or (peer_alive is False and self.duplex):
            return unanswered()  # full duplex: a writer consumed the reset; this EOF is it
        if nbytes and self.journal.pending and self.policy.eof != "pass" and self.line_stream():
            # The answers so far were to earlier records: a drop, unless it repeats for the
            # same re-sent records POISON_CAP times with no answer byte in between.
            if self.eof_mark == self.journal.mark():
                self.eof_repeats += 1
            if self.eof_repeats < POISON_CAP:
                return unanswered()
        if self.answered:
            # An EOF after part of an answer ends it, as a plain socket shows it, unless the
            # dialect's framing says the answer is cut (a body shorter than its length): then
            # it is resumed as a reset mid-answer is (§5b), but softly — CUT_RETRY for the
            # server to be back, CUT_WAIT to answer, and on any failure the caller gets this EOF,
            # so a server that closed for good (urllib3's one-shot test servers) costs a
            # moment, never a different error (docs/decisions.md).
            if nbytes and self.policy.eof != "pass" and self.cut_at != self.answered:
                dialect = self.dialect
                if dialect is not None and dialect.truncated():
                    return unanswered(cut=True)
            return Verdict(PASS_EOF, "end")
        if self.policy.eof == "pass" or not self.journal.pending or not nbytes:
            return Verdict(PASS_EOF, "end")
        if self.eof_mark is not None and self.eof_mark == self.journal.mark():
            self.journal.clear()
            return Verdict(PASS_EOF, "eof-repeat",
                           "the server closed again without answering the re-sent request: "
                           "that is its answer, passed on as EOF")
        return unanswered()

    def drop(self, d: Drop) -> Verdict:
        """Judge a drop by the RULES (module docstring, rule 4)."""
        for name, condition, kind, discard, quiet in RULES:
            note = condition(self, d)
            if note is not None:
                if d.cut and kind == SURFACE:
                    return Verdict(PASS_EOF, "end", note)  # the EOF ends the answer, as before
                if d.phase == "eof" and kind == SURFACE:
                    # Not recoverable: the EOF itself goes to the caller, as a plain socket
                    # gives it, so the protocol's own "closed without an answer" handling runs.
                    return Verdict(PASS_EOF, name, note)
                return Verdict(kind, name, note, discard=discard, quiet=quiet)
        if d.cut:
            self.cut_at = self.answered
        elif d.phase == "eof":
            self.eof_mark = self.journal.mark()
        elif self.journal.pending and not self.conn_answered:
            # The key costs a CRC of the unanswered bytes: only when it can matter.
            key = self.poison_key() if self.poisoned.seen or (
                self.episode is not None and self.poison >= POISON_CAP) else None
            if key is not None and self.poisoned.recalls(key):
                return Verdict(SURFACE, "poison",
                               "the server reset the connection each time these unanswered "
                               f"bytes were re-sent, on an earlier connection to it ({POISON_CAP}"
                               " times, no answer byte in between): that is its answer, so "
                               "they are not re-sent again", discard=True)
            if self.episode is not None:
                mark = self.journal.mark()
                self.poison = self.poison + 1 if self.poison_mark == mark else 1
                self.poison_mark = mark
                if self.poison > POISON_CAP:
                    if key is not None:
                        deadline = self.policy.deadline
                        self.poisoned.remember(key, 30.0 if deadline is None else deadline)
                    return Verdict(SURFACE, "poison",
                                   f"the server reset the connection each time the unanswered "
                                   f"request(s) were re-sent ({POISON_CAP} times, no answer "
                                   "byte in between): that is its answer", discard=True)
        # A read cut mid-answer resumes it; so does any drop inside an exchange the dialect
        # holds whole (MULTI...EXEC: re-sent whole, its answers so far checked).
        resume = self.answered if d.phase == "read" or d.cut or self.holding() else 0
        if self.duplex:
            # Full duplex: the unconfirmed records only; the reader's stream goes on. On a
            # line protocol the answer line it has begun is resumed (its bytes checked).
            resume = 0
            lines = self.lines
            if lines is not None and lines.partial and self.journal.pending:
                resume = len(lines.partial)
                self.digest.reset()
                self.digest.update(bytes(lines.partial))
            self.journal.drop_kept()
        return Verdict(RECOVER, "recover", resume=resume)

    def poison_key(self) -> tuple[Any, int] | None:
        """The poison memory's key for the unanswered bytes (None: not kept, or no peer)."""
        journal = self.journal
        if self.target is None or not journal.keep_data or journal.overflowed:
            return None
        return (self.target, _crc32(journal.unconfirmed()))

    def lazy_refusal(self) -> str | None:
        """Why a call after a surfaced error may not open a new connection lazily (None: it
        may). design.md §5: a surfaced error leaves the socket as dead as a plain one, unless the
        dialect knows a fresh connection is equivalent (no greeting, no login, no handshake)."""
        if not self.dead:
            return None
        dialect = self.dialect
        if dialect is not None:
            why: str | None = dialect.refusal()
            if why is not None:
                return why
            if dialect.fresh_ok():
                return None
            return (f"{dialect.name}: a new connection would lack this one's state (a "
                    "greeting, a login or a handshake the application did)")
        if self.server_first:
            return ("the server spoke first (a greeting, then a login, as in SMTP, FTP, POP3, "
                    "IMAP): a new connection would start a session the application never "
                    "opened")
        if self.policy.on_reconnect is not None:
            return None  # the application's hook restores the session on a new connection
        return ("the protocol is not known, so a new connection cannot be known to be "
                "equivalent (it could lack a login or a handshake the application did)")

    def holding(self) -> bool:
        return self.dialect is not None and bool(self.dialect.hold())

    def resume_refusal(self) -> str | None:
        """Why the answer in progress cannot be resumed (None: it can, §5b)."""
        policy = self.policy
        if not policy.resume_answers:
            return "resume_answers is off, so it is surfaced"
        if policy.replay not in REPLAYING:
            return f"replay={policy.replay!r} never resumes an answer"
        if not self.journal.kept_bytes and self.wrote:
            return ("its request is no longer kept (larger than journal_limit, or confirmed), "
                    "so it cannot be re-sent")
        if self.dialect is not None and not self.dialect.resumable():
            return (f"{self.dialect.name}: the request it answers is not idempotent, so it is "
                    "not executed twice")
        return None

    # -- recovery -----------------------------------------------------------------------------

    def begin_episode(self, exc: BaseException | None) -> Episode:
        """A drop to recover: continue the episode in progress or start a new one."""
        episode = self.episode
        if episode is None or episode.healthy():
            episode = self.episode = Episode(self.policy, self.clock, exc)
        else:
            if episode.original is None:
                episode.original = exc
            episode.last = exc
        return episode

    def reconnected(self, resumed: bool) -> None:
        """A new connection is ready (restored, replayed): publish it."""
        self.gen += 1
        self.conn_answered = False
        self.half_closed = False
        lines = self.lines
        if lines is not None:
            # The new connection answers the re-sent records from the first unconfirmed one.
            self._lines_realign(lines)
            lines.ans = lines.confirmed
            if not resumed:
                lines.partial.clear()
        if not resumed:
            self.answered = 0
            self.digest.reset()
            self.cut_at = None
        if self.episode is not None:
            self.episode.up_since = self.clock()
            self.episode.attempted(True, False)
        if self.dialect is not None:
            self.dialect.new_connection()
        if self.state is not CLOSED:
            self.move("reconnected")

    def discarded(self) -> None:
        """The connection was thrown away after a surfaced error: the caller owns recovery,
        and the next connection starts a new conversation."""
        self.journal.clear()
        self.gen += 1
        self.half_closed = False
        self.lines = None  # counting begins again at the next clean point
        self.lines_off = False
        self.eof_repeats = 0
        if self.dialect is not None:
            self.dialect.discard()
        self.answered = 0
        self.digest.reset()
        self.cut_at = None
        self.episode = None
        self.eof_mark = None
        self.poison = 0
        if self.banner or self.session:
            # A lazily reconnected socket hands the next banner to the application, as a
            # fresh connection would.
            self.wrote = False
            self.banner = bytearray()
            self.session = False
