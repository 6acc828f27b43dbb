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
   retry of the same bytes on a new socket surfaces at once), or the server reset
   ``POISON_CAP`` new connections in a row at once, before they carried a byte, with nothing
   to re-send (``SILENT_WINDOW``: its answer to every connection, surfaced), or an unanswered
   EOF repeats (passed on).
5. A budget (``Episode``) belongs to one recovery episode: it starts at a drop and ends when
   the connection has carried an answer again, or has stayed up longer than a whole deadline
   (so a long call that meets a second drop much later starts afresh, review r20, while a
   poison record that is reset after every re-send exhausts one budget). A socket timeout set
   by the application bounds every call as well (``call_end``): the caller asked never to wait
   longer (§4).
6. Full duplex on a line protocol (one greenlet writes request lines, another reads one answer
   line for each): answer lines are counted and confirm the request lines they answer
   (``_Lines``); a stream that is not that shape stops the counting for good.
7. The socket asks, the machine tells. An error in a call: ``error`` answers with an action
   (raise it as is, call again on the connection another greenlet published, find these
   facts by I/O), then ``judge`` with the facts (surface with this note, recover). An EOF:
   ``eof_seen`` (pass it on, read again, ask whether the peer still reads), then
   ``eof_judge``. A recovery is a generator, ``recover``: it yields what to do next —
   ``Wait``, ``Connect``, ``Handshake``, ``Restore``, ``SkipBanner``, ``RunHook``,
   ``Abandon``, ``Replay``, ``Resume`` — and is sent what came of it (``None``: done;
   ``Connected``; ``Failed`` with the error classified), until it yields one of the three
   ends: ``Done`` (the new connection is published), ``GiveUp`` (raise this error with this
   note) or ``Stop`` (``close()`` ended it). Every budget, backoff, final-margin and give-up
   decision is made here, under the injected clock; the socket only performs the I/O, each
   step after the connect bounded by the ``until`` the action carries.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from typing import Any
from zlib import crc32 as _crc32

try:  # xxHash's XXH3 runs at ~45 GB/s here, CRC-32 at ~4: the digest is on the read path
    from xxhash import xxh3_64 as _xxh3_64

    _xxh3: Any = _xxh3_64
except ImportError:  # pragma: no cover - the declared dependency is missing
    _xxh3 = None

from greenlet import getcurrent as _getcurrent

from . import _libraries
from ._answer import _AnswerChanged, _CutNotResumed
from ._errors import ErrorCategory, ErrorInfo, UnansweredEOFError, classify
from ._journal import Journal
from ._policy import RetryPolicy

__all__ = ["Machine", "Episode", "TokenBucket", "PoisonMemory", "POISONED", "Verdict", "Drop",
           "RULES", "TRANSITIONS", "CONNECTED", "RECOVERING", "BROKEN", "CLOSED", "SERVER_GONE",
           "Action", "Raise", "Retry", "HandOver", "FindFacts", "Surface", "Recover", "PassEOF",
           "ReadAgain", "AskPeer", "Wait", "Connect", "Connected", "Failed", "Handshake",
           "Restore", "SkipBanner", "RunHook", "Abandon", "CountAcked", "Replay", "Resume",
           "AnswerCheck", "Done", "GiveUp", "Stop", "Recovery"]

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
# A new connection that the server resets before it carried a byte either way, at once
# (within SILENT_WINDOW seconds of being established, or SILENT_RTTS times what its connect
# took if that is longer, at most SILENT_WINDOW_MAX), with nothing to re-send (the client
# waits for a banner, or a TLS handshake): POISON_CAP of them in a row within one episode are
# the server's answer to every connection (a server past its connection limit, a load
# balancer with no backend, a firewall's reset), surfaced as a plain client sees the first
# one. A reset that comes later, or one with something to re-send, breaks the row. Picked:
# such a server resets within its accept's scheduling (a few ms on loopback, one round trip
# on a path); a flaky path resets at random times, and a storm that resets every 50-200 ms
# meets a connection that waits for a late banner or a push three times in a row (review
# w5: with a 1 s window, such a storm was surfaced where the socket recovered it before).
SILENT_WINDOW = 0.02
SILENT_RTTS = 4
SILENT_WINDOW_MAX = 1.0
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
# A request written after the peer's FIN, in one greenlet (§5, half-close): the socket looks
# at the TCP state (one TCP_INFO read) before the first write of each of a connection's first
# FIN_PROBES exchanges. Picked: servers that half-close and go on reading do it after their
# first answer or few (HTTP/1.0 and lingering close, one-shot line servers); a look at every
# exchange would cost 4-5% of a loopback ping-pong (measured, docs/design.md §12), and a
# half-close later in a long conversation is left to the EOF rules (re-sent, a known limit).
FIN_PROBES = 16


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
    # An EOF: the peer's FIN was in before every unanswered request was written, and the
    # dialect's servers never read after their FIN (``fin_is_final``): none of them was read.
    unread: bool = False


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


def _answered_mid_write(m: Machine) -> bool:
    """A reader greenlet took answer bytes while a write was under way on this connection,
    and no write has completed since (``Machine.mid_write``): the peer answered before that
    write was done — an early answer, whichever greenlet meets the drop first."""
    mid = m.mid_write
    return mid is not None and mid[0] == m.gen and mid[1] == m.journal._total


def _early_answer(m: Machine, d: Drop) -> str | None:
    # Full duplex on a line protocol (another greenlet reads one answer line per request
    # line): unread bytes are answers to earlier lines, re-sent and answered again on the new
    # connection, not an early answer to the write that failed. Elsewhere (an upload the
    # server answered early and closed on, with a reader greenlet) they are one — still
    # unread when the write fails, or already taken by the reader during that write.
    if d.writing and (d.early_answer or _answered_mid_write(m)) \
            and not ((d.duplex or m.duplex) and m.line_stream()):
        return ("the server answered before the write failed (an early answer such as 413 or "
                "404 from a server that closed without reading the rest): that answer is "
                "delivered and nothing is re-sent")
    return None


def _answered_then_dropped(m: Machine, d: Drop) -> str | None:
    # The same early answer met by the reader: it read the answer during the write, then the
    # connection's end (the reset or EOF of a server that closed without reading the rest).
    # Which greenlet meets the drop first is the scheduler's choice; the verdict must not be.
    # The connection is kept (not discarded): the writer is still inside its write on it and
    # gets its own error from it, as on a plain socket, not the EBADF of a connection closed
    # under it (docs/design.md §5: one greenlet's call never kills another's).
    if not d.writing and _answered_mid_write(m) and not (m.duplex and m.line_stream()):
        return ("the server answered while the upload was still being written (an early "
                "answer such as 413 from a server that closed without reading the rest), and "
                "the reader has that answer: the connection's end is passed on as a plain "
                "socket gives it, and nothing is re-sent")
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
    if d.unread:
        # Written after the server's FIN (a stale keep-alive connection), to a server that
        # never reads after it: it never ran, and runs once on the new connection (wave 5:
        # a POST there was passed on as EOF when the server's reset came after the write,
        # and re-sent when it came before, as the scheduler had it).
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


def _client_login(m: Machine, d: Drop) -> str | None:
    if m.login is None or not m.conn_answered or m.dialect is not None \
            or m.policy.on_reconnect is not None:
        return None
    return (f"the connection began with a login ({m.login} ...), which was answered: a new "
            "connection would not have it, and commands re-sent there would run logged out "
            "(RetryPolicy(prelude=1) / --prelude 1 redoes and checks it on every new "
            "connection; an on_reconnect hook can restore it)")


def _mid_answer(m: Machine, d: Drop) -> str | None:
    if m.duplex:
        # Full duplex: the reader's stream goes on, nothing is resumed; unless the reader
        # stopped inside a message, whose rest no new connection carries (a STOMP CONNECTED
        # cut 10 bytes in: stomp.py waited 10 s for the rest, the broker for a CONNECT).
        dialect = m.dialect
        if dialect is None or not dialect.mid_frame():
            return None
        return (f"the connection dropped while the reader was inside a {dialect.name} message "
                "(full duplex): its rest cannot come on a new connection")
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
# First words of a first record that logs in (an unknown client-first line protocol).
# Words that authenticate, only: a greeting word (HELLO, HELO, IDENTIFY) is the first line of
# many line protocols that keep no login, whose drops the byte rules recover.
_LOGIN_WORDS = frozenset(b"LOGIN LOGON AUTH AUTHENTICATE USER SIGNIN".split())


def _login_word(data: Any) -> str | None:
    """The first word of ``data`` if it is a login line (``LOGIN robot secret``), else None."""
    head = bytes(memoryview(data)[:4096])
    line = head.split(b"\n", 1)
    if len(line) < 2 or not line[0].strip():
        return None  # not a line protocol's first line
    word = line[0].split(None, 1)[0].upper()
    return word.decode() if word in _LOGIN_WORDS else None


_TOKEN = re.compile(rb"[0-9A-Za-z]+")
_APOP_STAMP = re.compile(rb"<[^<>\s]*@[^<>\s]*>")  # RFC 1939: <process-ID.clock@hostname>
_NONCE_MIN = 16  # letters and digits this long in a banner: a nonce, not a date or a counter


def banner_refusal(old: bytes, new: bytes, resend: bytes) -> str | None:
    """A new connection's banner ``new`` differs from ``old``, the one the application read:
    why the unanswered bytes ``resend`` must not be re-sent after it, or None when the change
    is one they cannot depend on (a clock, a counter: skipped as before, docs/design.md §5a).

    They may depend on it when the old banner carries a challenge — RFC 1939's APOP timestamp
    (the login digest covers it), or a nonce (letters and digits, ``_NONCE_MIN`` or more, that
    the new banner lacks) — or when a word of the old banner that the new one lacks is a word
    of the bytes to re-send (a session number the client echoes)."""
    if _APOP_STAMP.search(old):
        return "it carries a challenge (an APOP timestamp) the writes may be computed from"
    gone = set(_TOKEN.findall(old)) - set(_TOKEN.findall(new))
    for word in gone:
        if len(word) >= _NONCE_MIN and not word.isdigit() and not word.isalpha():
            return "it carries a nonce the writes may be computed from"
    if gone & set(_TOKEN.findall(resend)):
        return "the writes to re-send carry a word of the old banner that the new one lacks"
    return None


def _silent_note() -> str:
    return (f"the server reset each new connection at once, before it carried a byte "
            f"({POISON_CAP} in a row, nothing to re-send): that is its answer to every "
            "connection")


RULES: tuple[tuple[str, Callable[[Machine, Drop], str | None], str, bool, bool], ...] = (
    ("read-timeout", _read_timeout, SURFACE, False, True),
    ("peer-not-reading", _peer_not_reading, SURFACE, False, False),
    ("early-answer", _early_answer, EARLY_ANSWER, False, False),
    ("answered-then-dropped", _answered_then_dropped, SURFACE, False, False),
    ("half-closed", _half_closed, SURFACE, True, False),
    ("not-retryable", _not_retryable, SURFACE, True, False),
    ("dialect", _dialect, SURFACE, True, False),
    ("not-idempotent", _not_idempotent, SURFACE, True, False),
    ("server-session", _server_session, SURFACE, True, False),
    ("client-login", _client_login, SURFACE, True, False),
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
        # The application's first write after a banner, when it failed (the drop came first):
        # the socket writes it again on the new connection, so the banner rule counts it.
        self.unwritten = b""
        self.session = False  # a banner, then an answer to a write: session state exists
        self.server_first = False  # this lineage's server speaks first (survives a discard)
        # An unknown client-first protocol whose first record is a login (rule client-login):
        # its first word, e.g. "LOGIN".
        self.login: str | None = None
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
        # New connections reset at once before carrying a byte, nothing to re-send
        # (SILENT_WINDOW), in a row; and when the current connection was published.
        self.silent = 0
        self.conn_since: float | None = None
        self.silent_window = SILENT_WINDOW  # SILENT_WINDOW, or longer for a slow connect
        # The peer half-closed this connection and still takes our bytes (§5: a half-close
        # is not a drop): its EOF is passed on, and a write error on it later is surfaced.
        self.half_closed = False
        # The peer's FIN had already arrived when the first unanswered record was written on
        # connection ``gen``: (gen, the bytes its TCP had acknowledged then), found by the
        # socket before that write (``fin_probe``: TCP with Linux TCP_INFO, not TLS). An EOF
        # for that record is then a half-close if the peer's TCP acknowledges the record
        # (it still reads: passed on, nothing re-sent), a drop if it resets (§5).
        self.fin_probing = False  # the socket can look (set once, before the first connect)
        self.fin_probe = 0  # looks left on this connection (FIN_PROBES from each new one)
        self.fin_before: tuple[int, int] | None = None
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
        # (gen, bytes journaled) when answer bytes were read while another greenlet was inside a
        # write: an early answer while that connection lives and no write completed since.
        self.mid_write: tuple[int, int] | None = None

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
            # Another greenlet is inside a read while this one wrote.
            if not self.duplex:
                self._become_duplex()
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
            self.unwritten = b""
            if not self.detected:
                self.detect(bytes(data), None)
                if self.dialect is not None and self.lines is not None:
                    self._lines_stop()  # a known protocol: its dialect knows better
            if self.dialect is None and not self.banner:
                self.login = _login_word(data)

    def _become_duplex(self) -> None:
        """Full duplex from now on (rule 6: lines confirm). Records that the answer rule
        confirmed before this (a writer greenlet wrote several lines before the reader's first
        read, which got the first answer line only) but whose answer lines have not come are
        unconfirmed again while their bytes are still kept, so that a drop re-sends them (was,
        wave 5: they were neither answered nor re-sent, the reader waited out its timeout)."""
        self.duplex = True
        lines = self.lines
        journal = self.journal
        keep, done = journal._keep, journal._done
        if lines is None or not journal.keep_data or journal.overflowed or keep == done:
            return
        data = journal.with_kept()  # the bytes from ``keep`` on: kept records, then unconfirmed
        unconfirmed = data[done - keep:].count(b"\n")
        missing = lines.req - lines.ans - unconfirmed  # kept request lines still unanswered
        ends, head = journal._ends, journal._head
        index = head
        after = lines.req - unconfirmed  # request lines up to the end of record index - 1
        marks: list[tuple[int, int]] = []
        while index > 0 and missing > 0:
            end = ends[index - 1]
            if end <= keep:
                break  # no longer kept
            start = ends[index - 2] if index >= 2 else keep
            count = data[start - keep:end - keep].count(b"\n")
            if not count or count > missing:
                break
            marks.append((journal._base + index, after))
            missing -= count
            after -= count
            index -= 1
        if not marks:
            return
        journal._head = index
        journal._done = ends[index - 1] if index > 0 else keep
        lines.marks.extendleft(marks)  # (reversed by extendleft: oldest first)
        lines.confirmed = after

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
            if not self.duplex:  # another greenlet is inside a write while this one read
                self._become_duplex()
            # ... and until that write completes, this answer came before it was done.
            self.mid_write = (self.gen, journal._total)
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
        self.silent = 0
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
            # The records written while this read waited (full duplex) are not answered by
            # it: the journal keeps them unconfirmed, and so must the dialect (unsafe()).
            dialect.answered(journal.seq - mark)
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
            peer_alive: bool | None = None, *, unread: bool = False) -> Verdict | Drop:
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
            return Drop(info, "eof", cut=cut, unread=unread and not cut)

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
                    return Verdict(PASS_EOF, name, note, discard=discard)
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
        elif (self.episode is not None and not self.conn_answered and not self.journal.pending
              and d.info.category is ErrorCategory.CONNECTION_LOST
              and self.conn_since is not None
              and self.clock() - self.conn_since < self.silent_window):
            self.silent += 1
            if self.silent >= POISON_CAP:
                return Verdict(SURFACE, "silent-resets", _silent_note(), discard=True)
        if d.info.category is ErrorCategory.CONNECTION_LOST and (
                self.journal.pending or self.conn_since is None
                or self.clock() - self.conn_since >= self.silent_window):
            self.silent = 0  # not reset at once with nothing to re-send: the row is broken
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

    def _refused_for_idempotency(self) -> bool:
        """The answer in progress is not resumed only because its request is not idempotent
        (``resume_refusal``'s dialect reason, with resuming otherwise on)."""
        dialect = self.dialect
        return (dialect is not None and self.policy.resume_answers
                and self.policy.replay in REPLAYING and not dialect.resumable())

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
        self.conn_since = self.clock()
        self.half_closed = False
        self.fin_probe = FIN_PROBES if self.fin_probing else 0
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
        self.silent = 0
        if self.banner or self.session:
            # A lazily reconnected socket hands the next banner to the application, as a
            # fresh connection would.
            self.wrote = False
            self.banner = bytearray()
            self.unwritten = b""
            self.session = False

    # -- an error in a call (rule 7) ----------------------------------------------------------

    def error(self, exc: BaseException, phase: str, gen: int, writing: bool, *, closed: bool,
              nonblocking: bool, reader_waiting: bool, data: Any = None) -> Action:
        """An I/O call of connection ``gen`` raised ``exc`` in ``phase`` ("read" or "write").

        ``closed``: the socket object is closed; ``nonblocking``: its timeout is 0 for now (a
        poll: its caller owns the retry loop, so nothing is recovered while it lasts, and the
        bookkeeping goes on, docs/design.md §6); ``reader_waiting``: a greenlet is blocked in
        a read on this connection; ``data``: what the interrupted write call was writing."""
        if closed or self.state is CLOSED or nonblocking:
            return RAISE
        if self.gen != gen or self.state is not CONNECTED:
            # Another greenlet's error discarded the connection (so is this call's), or
            # another greenlet recovered, or is recovering: the call is made again there.
            return RAISE if self.state is BROKEN else RETRY
        if not isinstance(exc, Exception):
            # gevent.Timeout, GreenletExit, KeyboardInterrupt (docs/design.md §3): during a
            # read the connection and journal stay, as a plain socket keeps them; during a
            # write part of a record may be out, so the connection is discarded.
            if phase != "write":
                return RAISE
            if reader_waiting:
                # Another greenlet waits in a read on this connection, and a plain socket
                # would hand it the answer when it comes (docs/design.md §5: one greenlet's
                # interruption never kills another's call). The connection stays, as the
                # plain one would; part of a record may be out, so nothing on it can be
                # replayed any more: protection ends for this socket.
                return HAND_OVER
            self.discarded()
            self.move("interrupted")
            return Raise(discard=True)
        info = classify(exc, phase=phase)
        if info is None:
            return RAISE  # not a connection problem: unchanged, connection kept
        if writing and data is not None and self.banner and not self.wrote:
            # The first write after a banner failed: the drop (a reset right after the
            # greeting) reached the socket before it. The call is made again on the new
            # connection after its banner, as a journaled record would be re-sent: that banner
            # is skipped and checked against these bytes (an APOP digest). Was (session 12):
            # it was handed to the application as this write's answer, and every answer after
            # it was one behind (smtplib's DATA met RCPT's 250, ftplib's login took the 220 for
            # USER's answer, poplib's old APOP digest reached the new server).
            self.unwritten = bytes(data)
        category = info.category
        return FindFacts(
            Drop(info, phase, writing=writing),
            acked=self.tcp_ack and (self.policy.confirm == "tcp-ack"
                                    or bool(self.dialect.write_only())),
            not_reading=phase == "write" and category is ErrorCategory.TIMEOUT,
            early=phase == "write" and category is ErrorCategory.CONNECTION_LOST)

    def judge(self, drop: Drop, gen: int) -> Action:
        """The facts of ``error``'s ``FindFacts`` are in ``drop``: what to do about it."""
        if self.gen != gen or self.state is not CONNECTED:  # moved while the facts were found
            return RAISE if self.state is BROKEN else RETRY
        if drop.writing and drop.duplex and not self.duplex:
            # A reader greenlet was inside a read during this write: the overlap that makes
            # the socket full duplex, which ``wrote_data`` would have seen had the write
            # succeeded (was, wave 5: a write failing before that, the reader's unread
            # answer lines were taken for an early answer and the drop surfaced).
            self._become_duplex()
        verdict = self.drop(drop)
        if verdict.kind == RECOVER:
            return Recover(verdict.resume, drop.info.category)
        if verdict.quiet:
            return Surface(verdict, drop.info)  # the application's own read timeout
        if verdict.kind == EARLY_ANSWER:
            self.journal.end_answer()
        elif verdict.discard:
            self.discarded()
            self.move("surface-discard")
        else:
            self.move("surface-keep")
            if drop.phase == "write" and self.tcp_ack and (
                    self.policy.confirm == "tcp-ack"
                    or (self.dialect is not None and self.dialect.write_only())):
                # Part of this write's record may be out, and it is not in the journal: the
                # peer's TCP acknowledgements would count it as later records' bytes.
                return Surface(verdict, drop.info, warn=verdict.rule == "dialect",
                               unprotect=True)
        # A dialect's refusal is logged at WARNING: some clients swallow the exception (and
        # its note) in a thread of their own (paramiko's transport).
        return Surface(verdict, drop.info, warn=verdict.rule == "dialect")

    def lazy_note(self) -> str | None:
        """A write on a broken socket: None to reconnect, else the note of the EPIPE it gets
        instead, as on the plain dead socket (``lazy_refusal``, docs/design.md §5)."""
        why = self.lazy_refusal()
        if why is None:
            return None
        return (f"resilientsock: not reconnected: an error was surfaced on this connection "
                f"and {why}; open a new connection, as without resilientsock")

    # -- an EOF (rule 7) ----------------------------------------------------------------------

    def eof_seen(self, gen: int, nbytes: int, *, closed: bool, nonblocking: bool) -> Action:
        """A read of connection ``gen`` that asked for ``nbytes`` returned EOF."""
        if self.state is CLOSED or closed or nonblocking:
            return PassEOF(Verdict(PASS_EOF, "non-blocking" if nonblocking else "closed"))
        if self.gen != gen or self.state is not CONNECTED:
            return READ_AGAIN  # the connection moved under this read: read on the new one
        others = self.writing > 0 or self.state is RECOVERING
        writer = self.writer
        idle = (self.writing == 0 and self.lines is not None and not self.journal.pending
                and writer is not None and not writer.dead)
        if (self.writing > 0 or idle) and nbytes and not self.half_closed:
            # Full duplex: a writer is mid-call, or between calls with everything answered.
            # This EOF is either the peer's half-close (it still reads our upload), the end
            # of a connection whose reset the writer consumed, or the path cut between two
            # writes: ask the connection (docs/design.md §5).
            # (A second at most to learn it; a writer between calls gets DUPLEX_EOF_WAIT.)
            return AskPeer(idle, others, DUPLEX_EOF_WAIT if idle else 1.0)
        fin = self.fin_before
        if fin is not None and fin[0] == gen and self.dialect is not None \
                and self.dialect.fin_is_final():
            # The FIN was in before this exchange's first write (the look is made only while
            # nothing is unanswered): the server, which never reads after its FIN, read none
            # of what is unanswered.
            return self.eof_judge(gen, nbytes, others, None, unread=True)
        if (fin is not None and fin[0] == gen and nbytes and self.journal.pending
                and not self.half_closed and self.policy.eof != "pass"):
            # One greenlet wrote a request after the peer's FIN (§5: a half-close is not a
            # drop): a peer that still reads acknowledges it, one that closed resets it.
            # (Not where the dialect knows its servers never read after their FIN: there a
            # forwarder that passes the FIN on and takes our bytes would pass a stale
            # keep-alive connection's EOF on instead of re-sending the request.)
            return AskPeer(False, others, 1.0, acked=fin[1])
        return self.eof_judge(gen, nbytes, others, None)

    def eof_judge(self, gen: int, nbytes: int, others: bool, alive: bool | None, *,
                  unread: bool = False) -> Action:
        """``eof_seen``'s EOF with what ``AskPeer`` found (``alive``; None: not asked);
        ``unread``: what is unanswered was written after the FIN of a server that never
        reads after it (``Drop.unread``)."""
        if self.gen != gen or self.state is not CONNECTED:
            return READ_AGAIN  # the writer met the drop and recovered: read again there
        outcome = self.eof(nbytes, others, alive, unread=unread)
        if isinstance(outcome, Verdict):
            if outcome.rule == "eof-repeat":
                # The server's answer is to close: the caller gets the EOF, the connection
                # (closed by the peer) is let go and the next write reconnects.
                self.discarded()
                self.move("surface-discard")
                return PassEOF(outcome, discard=True, report="eof-repeat")
            return PassEOF(outcome)
        verdict = self.drop(outcome)
        if outcome.cut:
            if verdict.kind == PASS_EOF:  # not resumable: the EOF ends the answer, as before
                # Refused because the request is not idempotent (a POST whose answer was cut
                # after its head): the EOF carries no note, so the log names the request at
                # WARNING, as for an unanswered one below. Under TLS a reset reads as this
                # EOF; over TCP the same reset surfaces with the note. (Was: a DEBUG line.)
                return PassEOF(verdict, report="cut", info=outcome.info,
                               warn=self._refused_for_idempotency())
            leave = _libraries.draining() or _libraries.retrying_now(self.library)
            if leave is not None:
                # The library re-requests the call itself (its retries), or is throwing the
                # rest of this answer away (urllib3's drain_conn): a resume would only spend
                # a request.
                return PassEOF(Verdict(PASS_EOF, "cut", f"left to {leave}"), report="cut")
            # Resumed softly (``recover(soft=True)``): on any failure the EOF stands.
            return Recover(verdict.resume, ErrorCategory.CONNECTION_LOST, UnansweredEOFError(
                f"peer closed the connection {self.answered} byte(s) into an answer that its "
                "framing says is longer"), cut=True)
        if verdict.kind == PASS_EOF:
            # Not recoverable under the rules: the EOF itself reaches the caller, as a plain
            # socket gives it; the journal is the caller's now (nothing re-sent twice). A
            # request not re-sent for want of idempotency reaches the caller as an EOF, which
            # carries no note (a TLS reset reads as one): the log names it at WARNING.
            if verdict.discard:
                self.discarded()
                self.move("surface-discard")
            return PassEOF(verdict, discard=verdict.discard, report="surfaced",
                           info=outcome.info, warn=verdict.rule == "not-idempotent")
        return Recover(verdict.resume, outcome.info.category, UnansweredEOFError(
            f"peer closed the connection without answering {len(self.journal) or 'some'} "
            "request(s)"))

    # -- the recovery loop (rule 7) -----------------------------------------------------------

    def recover(self, error: BaseException | None, call_end: float | None,
                app_timeout: float | None, *, resume: int = 0, first: bool = False,
                in_place: bool = False, soft: bool = False, bucket: TokenBucket | None = None,
                rand: Callable[[], float] = random.random) -> Recovery:
        """Start a recovery (the state moves to recovering now); returns its steps.

        ``error``: the drop (None: a first connect, or a broken socket used again);
        ``call_end``: when the call must return (the application's timeout, §4);
        ``app_timeout``: the socket's timeout (it caps every connect too, and names the give
        up); ``resume``: bytes of the answer the caller already has (§5b); ``first``: the
        application's own connect; ``in_place``: its first attempt connects the socket the
        application made; ``soft``: an EOF cut the answer — refusals are retried for
        CUT_RETRY, the rest of an attempt gets CUT_WAIT, and on any failure the caller gets
        the EOF (``GiveUp(cut=True)``)."""
        if soft:
            self.episode = None  # a budget of its own: CUT_RETRY for refusals
        self.move("recover")
        episode = self.begin_episode(error)
        if not first and not episode.attempts:
            # A drop (or a broken socket used again) inside a call that the client library's
            # own retry layer will retry: a reconnect that finds nobody listening is its to
            # retry, so layered retries do not multiply (docs/design.md §9).
            episode.library = _libraries.retrying_now(self.library)
        return self._recovery(episode, error, call_end, app_timeout, resume, first, in_place,
                              soft, BUCKET if bucket is None else bucket, rand)

    def _recovery(self, episode: Episode, error: BaseException | None, call_end: float | None,
                  app_timeout: float | None, resume: int, first: bool, in_place: bool,
                  soft: bool, bucket: TokenBucket, rand: Callable[[], float]) -> Recovery:
        policy = self.policy
        if error is not None:
            if policy.confirm == "tcp-ack":
                yield COUNT_ACKED  # what the old peer's TCP did get is not re-sent
            if policy.on_disconnect is not None:
                yield RunHook(policy.on_disconnect, classify(error, phase="read"),
                              _until(episode.end(call_end)), fatal=False)
        if not in_place:
            # The old connection is abandoned and its unconfirmed bytes re-sent elsewhere: it
            # goes with an RST, so the kernel does not deliver its unsent bytes late, after
            # the replay, once the path is back (a duplicate out of order).
            yield ABANDON
        end = call_end  # when attempts must stop
        if soft:
            cap = episode.start + CUT_RETRY
            end = cap if call_end is None else min(call_end, cap)
        while True:
            if self.state is CLOSED:
                yield STOP
                return
            # At least one attempt, whatever the time: "within the application's timeout
            # plus at most one connect attempt" (docs/design.md §4).
            if episode.attempts and episode.spent(end, app_timeout):
                yield self._give_up(episode, soft)
                return
            delay = 0.0 if first and not episode.attempts else episode.delay(bucket, rand)
            if delay > 0:
                remaining = episode.remaining(end)
                if delay >= remaining:
                    if episode.final or remaining <= FINAL_MARGIN:
                        yield Wait(max(0.0, remaining))
                        if self.state is CLOSED:
                            yield STOP
                            return
                        if call_end is not None and self.clock() >= call_end:
                            episode.timeout_hit = app_timeout
                        yield self._give_up(episode, soft)
                        return
                    # The wait outlasts the budget: one last attempt just before it ends.
                    episode.final = True
                    delay = remaining - FINAL_MARGIN
                yield Wait(delay)
                if self.state is CLOSED:
                    yield STOP
                    return
            episode.attempts += 1
            outcome = yield from self._attempt(episode, call_end, app_timeout, resume, first,
                                               in_place, soft)
            if outcome is None or self.state is CLOSED:
                yield STOP
                return
            if isinstance(outcome, Failed):
                failure, info = outcome.error, outcome.info
                episode.last = failure
                if episode.original is None:
                    episode.original = failure  # a first connect: its first error is the one
                gone = info is not None and info.category in SERVER_GONE
                episode.attempted(outcome.reached, gone)
                if soft and not gone:
                    yield self._let_go(failure)  # an EOF cut: the caller gets the EOF
                    return
                if info is not None and info.category is ErrorCategory.TLS_TRANSPORT:
                    episode.tls_transport += 1
                elif info is None or not info.retryable or not (policy.retry_connect
                                                                or not first):
                    yield self._give_up(episode, soft,
                                        permanent=info is None or not info.retryable)
                    return
                elif episode.library and gone:
                    # The server is not there (refused, no route, no name): the library's own
                    # retries decide whether to wait for it, as they do without resilientsock,
                    # so layered retries do not multiply into minutes (docs/design.md §9).
                    yield self._give_up(episode, soft, library=episode.library)
                    return
                elif (outcome.reached and self.journal.pending
                      and info.category is ErrorCategory.CONNECTION_LOST):
                    # The server was reached and reset the connection while its setup or the
                    # replay went out: a poison strike, as a drop after the replay is.
                    self.poison += 1
                    if self.poison > POISON_CAP:
                        yield self._give_up(episode, soft, poison=True)
                        return
                elif (not self.journal.pending
                      and info.category is ErrorCategory.CONNECTION_LOST):
                    # Nothing to re-send: reset in the connect itself (a reset there is the
                    # server's, which accepted it), or at once in its TLS handshake or banner.
                    since = self.conn_since
                    if since is None or self.clock() - since < self.silent_window:
                        self.silent += 1
                        if self.silent >= POISON_CAP:
                            yield self._give_up(episode, soft, silent=True)
                            return
                    else:
                        self.silent = 0  # a reset later on: not at once, the row is broken
                continue
            seconds = self.clock() - episode.start
            if first and episode.attempts == 1 and episode.original is None:
                self.episode = None  # a first connect that just worked is no episode
                self.reconnected(False)
                yield Done(False, episode.attempts, seconds)
                return
            self.reconnected(outcome is True)
            if first:
                self.episode = None
            yield Done(True, episode.attempts, seconds)
            return

    def _attempt(self, episode: Episode, call_end: float | None, app_timeout: float | None,
                 resume: int, first: bool, in_place: bool,
                 soft: bool) -> Generator[Action, Any, Failed | bool | None]:
        """One attempt: connect, then restore and replay under the time left. Returns
        whether the answer in progress was resumed, the failure, or None (closed)."""
        policy = self.policy
        per_address = policy.connect_timeout
        if app_timeout is not None:
            per_address = app_timeout if per_address is None else min(per_address, app_timeout)
        connect_limit = per_address
        if soft:
            connect_limit = CUT_WAIT if per_address is None else min(per_address, CUT_WAIT)
        left = episode.remaining(call_end)
        if left != math.inf:
            # Each connect attempt gets at most what is left of the budget (docs/design.md
            # §4), the last one too (made FINAL_MARGIN before the end).
            left = max(left, 0.001)
            connect_limit = left if connect_limit is None else min(connect_limit, left)
        began = self.clock()
        self.conn_since = None  # a reset in the connect itself is at once
        result = yield Connect(connect_limit, in_place, counted=episode.attempts > 1 or not first)
        if self.state is CLOSED:
            return None
        if isinstance(result, Failed):
            return result
        # Connected: what fails from here met the server.
        left = episode.remaining(call_end)
        limit = per_address
        if left != math.inf:
            limit = left if limit is None else min(limit, left)
        now = self.conn_since = self.clock()
        # "At once" on this path: SILENT_RTTS connects' time (rule silent-resets).
        self.silent_window = min(SILENT_WINDOW_MAX, max(SILENT_WINDOW, SILENT_RTTS * (now - began)))
        until = None if limit is None else now + max(limit, 0.001)
        soon = until
        if soft:
            # After an EOF cut: CUT_WAIT from here (TLS handshake, setup, replay) to the new
            # answer's first byte; or the EOF stands.
            cut = now + CUT_WAIT
            soon = cut if until is None else min(until, cut)
        if not isinstance(result, Connected) or result.fresh:
            # (In place, the raw connect did it all, TLS too.)
            got = yield Handshake(soon)
            if self.state is CLOSED:
                return None
            if isinstance(got, Failed):
                return replace(got, reached=True)
        # The dialect's setup, the banner, the hook, the replay and the answer resume
        # (§5a, §5b), on the new connection before it is published.
        dialect = self.dialect
        try:
            setup = dialect.restore() if dialect is not None else None
        except Exception as failure:
            return _step_failed(failure)  # the dialect's own failure: this attempt's
        if setup is not None and setup.payload:
            got = yield Restore(setup, soon)
            if self.state is CLOSED:
                return None
            if isinstance(got, Failed):
                return replace(got, reached=True)
        if (self.wrote or self.unwritten) and self.banner and dialect is None:
            # The application already read a banner, and the new connection's is not the
            # answer to anything the replay (or the interrupted write) is about to send.
            got = yield SkipBanner(bytes(self.banner), soon)
            if self.state is CLOSED:
                return None
            if isinstance(got, Failed):
                return replace(got, reached=True)
        if policy.on_reconnect is not None and not first:
            got = yield RunHook(policy.on_reconnect, episode.attempts, soon)
            if self.state is CLOSED:
                return None
            if isinstance(got, Failed):
                return replace(got, reached=True)
        journal = self.journal
        if resume:
            payload = journal.with_kept()
        else:
            journal.drop_kept()
            payload = journal.unconfirmed()
        if len(payload):
            got = yield Replay(payload, len(journal), soon)
            if self.state is CLOSED:
                return None
            if isinstance(got, Failed):
                return replace(got, reached=True)
        journal.restart_stream(len(payload))
        if not resume:
            return False
        if dialect is not None:
            try:
                dialect.reset_answer()
            except Exception as failure:
                return _step_failed(failure)
        check = AnswerCheck(resume, self.digest.intdigest(), dialect)
        got = yield Resume(check, soon, until)
        if self.state is CLOSED:
            return None
        if isinstance(got, Failed):
            return replace(got, reached=True)
        if not check.matches():  # (the socket raises check.changed() itself, as a failed step)
            changed = check.changed()
            return Failed(changed, classify(changed, phase="connect", context=False), True)
        return True

    def _give_up(self, episode: Episode, soft: bool, permanent: bool = False,
                 poison: bool = False, library: str | None = None,
                 silent: bool = False) -> GiveUp:
        """The budget is spent: the original error, with a note saying what was tried."""
        if soft:
            # An EOF cut that could not be resumed: no error for the caller, who gets the
            # EOF; the connection is let go.
            return self._let_go(_CutNotResumed(episode.describe()))
        exc = episode.original or episode.last
        if exc is None:
            exc = ConnectionError("resilientsock: could not connect")
        text = episode.describe()
        if permanent:
            text += "; that error is not retried"
        if poison:
            text += (f"; the server reset the connection each time the unanswered request(s) "
                     f"were re-sent ({POISON_CAP} times): that is its answer")
        if silent:
            text += "; " + _silent_note()
        if library:
            text += f"; left to {library}'s own retries"
        self.discarded()
        self.move("gave-up")
        last = episode.last
        return GiveUp(exc, text, last if last is not None and last is not exc else None,
                      False, episode.attempts, self.clock() - episode.start)

    def _let_go(self, error: BaseException) -> GiveUp:
        """A soft recovery (an EOF cut) ends: the connection is let go, the EOF stands."""
        self.discarded()
        self.move("gave-up")
        episode = self.episode
        return GiveUp(error, "", None, True, 0 if episode is None else episode.attempts, 0.0)

    def abandon(self, exception: bool) -> bool:
        """Something was raised inside a recovery (an application's ``gevent.Timeout``, a
        bug): the connection is let go. Returns whether it was still being recovered."""
        if self.state is not RECOVERING:
            return False
        self.discarded()
        self.move("gave-up" if exception else "interrupted")
        return True


def _step_failed(failure: Exception) -> Failed:
    """A dialect call the recovery makes on the new connection raised (a bug): that attempt
    failed, as a step that raises does (classified alone: not retried), so the caller gets the
    original error with a note, never the dialect's own exception type."""
    return Failed(failure, classify(failure, phase="connect", context=False), True)


def _until(end: float) -> float | None:
    return None if end == math.inf else end


# Reconnect failures that say the server is not there (refused, no route, no name): inside a
# retrying library they are surfaced at the first attempt; after an EOF cut they are retried
# for CUT_RETRY.
SERVER_GONE = frozenset({ErrorCategory.REFUSED, ErrorCategory.UNREACHABLE,
                         ErrorCategory.DNS_TEMPORARY, ErrorCategory.DNS_PERMANENT})

BUCKET = TokenBucket()  # the process-wide reconnect limiter (the socket passes its own)


# -- actions: what the machine tells the socket to do (rule 7) -----------------------------------

@dataclass(frozen=True)
class Raise:
    """Raise the error as it is (no note). ``discard``: the connection was let go (close it)."""

    discard: bool = False


@dataclass(frozen=True)
class Retry:
    """Make the call again: another greenlet published (or is publishing) a new connection."""


@dataclass(frozen=True)
class HandOver:
    """A write was interrupted (a BaseException) while another greenlet reads: the
    connection stays for the reader, protection ends, the interruption is raised."""


@dataclass(frozen=True)
class FindFacts:
    """Find out by I/O what the machine cannot know, fill in ``drop``, then ``judge`` it.
    ``acked``: confirm what the peer's TCP acknowledged; ``not_reading``: is the peer alive
    but not reading (a write timeout); ``early``: are the peer's bytes waiting (a reset
    write: an early answer?). The socket always tells whether a reader is there (duplex)."""

    drop: Drop
    acked: bool = False
    not_reading: bool = False
    early: bool = False


@dataclass(frozen=True)
class Surface:
    """Raise the error with the verdict's note (``quiet``: no note, DEBUG: the application's
    own read timeout). The machine already let the connection go if ``verdict.discard``."""

    verdict: Verdict
    info: ErrorInfo
    warn: bool = False  # log at WARNING (the note may be swallowed by the client)
    # The connection is kept after a write that may have sent part of its record (a write
    # timeout): where records are confirmed by the peer's TCP acknowledgements, those
    # unrecorded bytes would shift the count, so protection ends for this socket (it goes on
    # as the plain socket it wraps).
    unprotect: bool = False


@dataclass(frozen=True)
class Recover:
    """Run a recovery (``Machine.recover``) with ``resume``; ``error``: the exception to
    recover from when it is not the one the call caught (an unanswered EOF); ``cut``: softly,
    the EOF stands on any failure."""

    resume: int
    category: ErrorCategory
    error: BaseException | None = None
    cut: bool = False


@dataclass(frozen=True)
class PassEOF:
    """Hand the caller the EOF. ``discard``: the connection was let go (close it);
    ``report``: "" (nothing to log), "eof-repeat", "cut" or "surfaced" (what to log)."""

    verdict: Verdict
    discard: bool = False
    report: str = ""
    info: ErrorInfo | None = None
    warn: bool = False


@dataclass(frozen=True)
class ReadAgain:
    """The connection moved under this read: read again on the new one."""


@dataclass(frozen=True)
class AskPeer:
    """Full duplex: find out whether the peer still takes our bytes after its EOF (it
    half-closed), then ``eof_judge``. ``idle``: the writer is between calls (wait up to
    DUPLEX_EOF_WAIT for its next write); ``others`` goes back to ``eof_judge``; ``wait``: how
    long to poll for the answer at most (None after it, when idle: the stream's end);
    ``acked``: a single greenlet wrote after the peer's FIN (``Machine.fin_before``) — poll for
    the whole ``wait``, alive once the peer's TCP acknowledged more than this."""

    idle: bool
    others: bool
    wait: float = 1.0
    acked: int | None = None  # one greenlet: the peer's TCP_INFO bytes_acked before the write


@dataclass(frozen=True)
class Wait:
    """Sleep this long (``close()`` ends the wait at once)."""

    seconds: float


@dataclass(frozen=True)
class Connect:
    """Open a connection to the target (every address of its name, each for ``limit``);
    ``in_place``: the first attempt connects the application's own socket; ``counted``: a
    reconnect attempt for the process-wide counters. Send back ``Connected`` or ``Failed``."""

    limit: float | None
    in_place: bool = False
    counted: bool = True


@dataclass(frozen=True)
class Connected:
    """A ``Connect`` result: ``fresh``: a new connection replaced the socket's (not the
    in-place connect, which did its own TLS handshake)."""

    fresh: bool = True


@dataclass(frozen=True)
class Failed:
    """What any step sends back when it raised: the error and its classification (for a
    connect: alone, without its context, docs/design.md §3). ``reached``: set by the machine
    (the connect had succeeded)."""

    error: BaseException
    info: ErrorInfo | None
    reached: bool = False


@dataclass(frozen=True)
class Handshake:
    """TLS: handshake on the new connection, by ``until``."""

    until: float | None


@dataclass(frozen=True)
class Restore:
    """The dialect's setup (§5a): send ``setup.payload``, feed what comes back to
    ``setup.feed`` until it returns non-None (an exception from it: a different answer,
    not retried)."""

    setup: Any
    until: float | None


@dataclass(frozen=True)
class SkipBanner:
    """Read the new connection's banner and drop it (``first``: the one the application read;
    review r10)."""

    first: bytes
    until: float | None


@dataclass(frozen=True)
class RunHook:
    """Call ``hook(sock, arg)`` by ``until``. ``fatal``: its exception fails the attempt
    (``on_reconnect``); otherwise it is logged and the recovery goes on (``on_disconnect``)."""

    hook: Callable[..., Any]
    arg: Any
    until: float | None
    fatal: bool = True


@dataclass(frozen=True)
class Abandon:
    """Close the old connection (if any) with an RST."""


@dataclass(frozen=True)
class CountAcked:
    """``confirm="tcp-ack"``: confirm what the old connection's peer acknowledged."""


@dataclass(frozen=True)
class Replay:
    """Send ``payload`` (``records`` unconfirmed records) on the new connection by ``until``."""

    payload: Any
    records: int
    until: float | None


@dataclass(frozen=True)
class Resume:
    """Read the re-sent request's new answer into ``check`` while it ``need``s bytes (or to
    EOF): the first byte by ``first_until``, the rest by ``until`` (§5b)."""

    check: AnswerCheck
    first_until: float | None
    until: float | None


@dataclass(frozen=True)
class Done:
    """The new connection is published. ``reconnected``: count it as a reconnect (not a first
    connect that just worked)."""

    reconnected: bool
    attempts: int
    seconds: float


@dataclass(frozen=True)
class GiveUp:
    """The recovery failed: close the connection and raise ``error`` — with ``note`` and
    ``from cause`` — or, ``cut``, as it is (an EOF cut: the caller gets the EOF)."""

    error: BaseException
    note: str
    cause: BaseException | None
    cut: bool
    attempts: int
    seconds: float


@dataclass(frozen=True)
class Stop:
    """``close()`` ended the recovery."""


class AnswerCheck:
    """The re-sent request's new answer, compared with what the caller already got of the
    old one (§5b): ``k`` bytes, through the dialect's mask, against the old digest."""

    __slots__ = ("k", "need", "got", "expected", "dialect", "digest")

    def __init__(self, k: int, expected: int, dialect: Any = None) -> None:
        self.k = k
        self.need = k
        self.got = 0
        self.expected = expected
        self.dialect = dialect
        self.digest = new_digest()

    def feed(self, chunk: bytes) -> None:
        self.need -= len(chunk)
        self.got += len(chunk)
        dialect = self.dialect
        self.digest.update(dialect.mask(chunk) if dialect is not None else chunk)

    def matches(self) -> bool:
        return self.need <= 0 and self.digest.intdigest() == self.expected

    def changed(self) -> BaseException:
        """The error of an answer that cannot be continued (an attempt failure)."""
        return _AnswerChanged(
            f"the re-sent request's new answer differs from the {self.k} byte(s) the caller "
            "already has, so it cannot be continued")


RAISE, RETRY, HAND_OVER, READ_AGAIN = Raise(), Retry(), HandOver(), ReadAgain()
ABANDON, COUNT_ACKED, STOP = Abandon(), CountAcked(), Stop()

Action = (Raise | Retry | HandOver | FindFacts | Surface | Recover | PassEOF | ReadAgain | AskPeer
          | Wait | Connect | Handshake | Restore | SkipBanner | RunHook | Abandon | CountAcked
          | Replay | Resume | Done | GiveUp | Stop)
# A recovery's steps: send None (a step done), Connected or Failed; ends at Done, GiveUp, Stop.
Recovery = Generator[Action, "Connected | Failed | None", None]
