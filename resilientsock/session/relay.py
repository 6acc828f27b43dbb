"""The session relay (docs/design.md §11): listen, accept, tell plain from session clients,
authenticate a resume, attach a session to its new link, and proxy plain clients.

Follows the rules in ``carrier``'s docstring (rule 3: nothing of a session is touched before
the resume's proof checks).
"""

from __future__ import annotations

import errno
import hmac
import os
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.socket as gsocket

from . import protocol as sp
from .carrier import HANDSHAKE_TIMEOUT, RECV_SIZE, _abort, _Carrier, _LinkIO, _nodelay, log
from .targets import _addr

__all__ = ["Relay"]

LINK_TIMEOUT = 30.0  # the relay's liveness bound for a silent client link (docs/design.md §11)
# The upstream connect has its own bound, well inside the handshake's: a black-holed upstream
# reaches the client as an ERROR naming it, not as the handshake's timeout (#26).
UPSTREAM_CONNECT_TIMEOUT = 5.0
CREATION_HOLD = 5.0  # a session whose client never showed it got CREATED: held this long


_DUMMY_SECRET = os.urandom(sp.SECRET_LEN)  # for unknown ids: same cost, always False
_DUMMY_ID = os.urandom(sp.NONCE_LEN)
_PLAIN_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF)


def _fileno(sock: Any) -> int:
    """The descriptor's number: the kernel hands out the lowest free one, so a high number
    means about that many are open (the relay's cheap check of its descriptor reserve)."""
    try:
        return int(sock.fileno())
    except (OSError, ValueError):
        return 0


# =============================================================================================
# The relay


_FLOOR = 64 * 1024  # bytes a session may always hold, whatever the relay's budget (picked)
# ... and at most this many until its client shows it got CREATED (picked: half the default
# buffer_limit; a client whose link dropped at once still finds what the upstream sent, and
# the creation hold and the relay's budget bound the rest).
_UNPROVEN_MAX = 8 * 1024 * 1024
FAIL_WINDOW = 10.0  # seconds over which a source's failed handshakes are counted
SLOW_DELAY = 1.0  # a source over its failure limit waits this long before its handshake...
SLOW_MAX = 64  # ... at most this many at once; beyond, its connections are closed at once
_OLD_TICKETS = 3  # tickets remembered after replacement, to count stale ones apart
# A source whose session client's preamble came late gets a longer wait for its clients'
# first bytes for LATE_WINDOW: twice the lateness seen, at most LATE_WAIT_MAX (picked: a
# plain server-first client from there gets its greeting that much later, never an error),
# so its retry or next resume on the same slow path is a session at once: not another
# refusal (a server-first upstream's greeting went to the late one first), and no upstream
# connection opened for a plain attempt.
LATE_WINDOW = 60.0
LATE_WAIT_MAX = 1.0
# Once sessions that held this many bytes have finished, the C allocator is asked (at most
# once a second) to give the free memory back to the system: the relay reads into big
# buffers in its own thread, whose allocator arena keeps freed memory otherwise (a relay
# whose vanished clients' sessions expired stayed at its peak RSS: 92 MiB for 64 MiB freed).
TRIM_AFTER = 4 * 1024 * 1024
# What a connection that ends in its handshake leaves freed, about (measured: 3,000 half-open
# handshakes took 42 MiB); a flood of them is given back as ended sessions are.
_HANDSHAKE_COST = 16 * 1024


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another C library, no ctypes). Never raises: on
    Windows ``ctypes.CDLL(None)`` is a TypeError (no handle of the process itself there), and
    a relay that cannot give memory back still relays."""
    try:
        import ctypes

        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except Exception:  # ImportError, OSError, AttributeError (musl, macOS), TypeError (Windows)
        return None
    return trim


_malloc_trim = _load_malloc_trim()


class _RelayStream(sp.Stream):
    """A relay session's stream: its unacknowledged bytes count against the relay's budget
    across all sessions (``max_buffered``), attached and detached alike.

    ``room()`` is asked before every read of the upstream and after every chunk from the link,
    so the relay's total is brought up to date there (each session at most one read behind).
    A session whose client has not shown it got CREATED holds at most ``_UNPROVEN_MAX``.
    Over budget, a session may still hold ``_FLOOR`` bytes (interactive sessions keep working
    while bulk ones wait: backpressure on their upstream, nothing dropped); the ones that had
    to wait are woken when acknowledgements anywhere free room."""

    __slots__ = ("relay", "owner", "counted")

    def __init__(self, relay: Relay, limit: int) -> None:
        super().__init__(limit)
        self.relay = relay
        self.owner: Any = None
        self.counted = 0

    def room(self) -> int:
        held = len(self.unacked)
        own = max(0, self.limit - held)
        relay = self.relay
        owner = self.owner
        if owner is not None and not (self.received or self.acked) and owner.unproven():
            # Until its client shows it got CREATED (an ack, a byte, a resume), a session
            # holds at most _UNPROVEN_MAX: HELLO-and-gone pins little (#26).
            own = min(own, max(0, _UNPROVEN_MAX - held))
        if held != self.counted:
            freed = held < self.counted
            relay.buffered += held - self.counted
            self.counted = held
            assert relay.buffered >= self.counted, (relay.buffered, self.counted)
            if freed and (relay.starved or relay.queue_starved):
                relay.wake_starved()
        left = relay.max_buffered - relay.buffered
        if left >= own:
            return own
        allowed = max(left, _FLOOR - held, 0)
        if allowed <= 0 and self.owner is not None:
            relay.starved.add(self.owner)
        return min(own, allowed)

    def release(self) -> None:
        """The session is gone: its bytes no longer count."""
        relay = self.relay
        relay.buffered -= self.counted
        self.counted = 0
        assert relay.buffered >= 0, relay.buffered  # the sum of the live sessions' counts
        if relay.starved or relay.queue_starved:
            relay.wake_starved()


class _Source:
    """What the relay knows about one client address (admission, failures)."""

    __slots__ = ("sessions", "fresh", "failures", "window", "slow_until", "connecting",
                 "late_wait", "late_until")

    def __init__(self) -> None:
        self.sessions = 0  # sessions created from here and not finished
        self.connecting = 0  # creations admitted, their upstream connect under way
        self.fresh: list[_RelaySession] = []  # creations not yet shown alive (oldest first)
        self.failures = 0  # failed handshakes in the current window
        self.window = 0.0
        self.slow_until = 0.0
        self.late_wait = 0.0  # the wait for a silent client's first bytes, until late_until
        self.late_until = 0.0


class _RelaySession(_Carrier):
    __slots__ = ("relay", "sid", "secret", "expiry", "resumes", "ticket", "old_tickets",
                 "source", "nonce", "born")

    side = "upstream"

    def __init__(self, relay: Relay, sid: bytes, secret: bytes, stream: sp.Stream,
                 upstream: Any, source: str = "", nonce: bytes = b"") -> None:
        super().__init__(stream, upstream)
        self.relay = relay
        self.sid = sid
        self.secret = secret
        self.expiry: Any = None
        self.resumes = 0
        self.ticket = b""  # the one-round-trip resume's challenge, issued in advance
        self.old_tickets: tuple[bytes, ...] = ()  # replaced lately (a resume with one: stale)
        self.source = source  # the creating client's address (per-source accounting)
        self.nonce = nonce  # the creating HELLO's client nonce: a retry of it finds us
        self.born = time.monotonic()

    def unproven(self) -> bool:
        """True while nothing shows the client ever received CREATED: no byte and no frame
        from it (a client that says nothing proves it with an ACK ``ACK_DELAY`` after
        CREATED), no resume (which needs the secret). Such a session may be handed to a retry of
        its creation (CREATED again, every byte re-sent from 0) or evicted when it is also
        detached: its client cannot have used it."""
        stream = self.stream
        return not (self.resumes or stream.received or stream.acked or stream.heard
                    or self.finished)

    def fresh(self) -> bool:
        """Unproven and younger than ``creation_hold``: counts against its source's budget of
        anonymous creations, and is held only ``creation_hold`` once detached."""
        return self.unproven() and time.monotonic() - self.born < self.relay.creation_hold

    def attach(self, lio: _LinkIO, first_frames: Any, early: bytes = b"") -> None:
        """Make ``lio`` the session's link (closing a previous one), send ``first_frames()``
        on it before anything else, deliver ``early`` (a resume's early data, counted
        already) upstream, then serve the link in this greenlet."""
        old = self.cur
        if self.expiry is not None:
            self.expiry.kill(block=False)
            self.expiry = None
        # Take the new link's lock before anything can yield: every frame built from now on
        # waits behind the resume's re-sent units (rule 2).
        lio.take_new()
        self.cur = lio
        self.waiting_pong = False
        self.drained_ev.set()  # a pump_link of the old link waiting on the queue returns
        if old is not None:
            old.close()
        try:
            frames = first_frames()
            self.ticket = lio.link.next_ticket
            if self.aborted:
                frames += self.stream.abort(self.aborted)
            self.heartbeat = self.relay.link_timeout / 2
            lio.sock.settimeout(self.heartbeat)
        except BaseException:
            lio.wlock.release()
            raise
        if early:
            # Counted as received and held at the handshake (take_early), so delivered
            # whatever this link does next: behind what the old link queued, before anything
            # this one carries; acknowledged once handed on.
            self._hand_on(early, len(early))
        # CREATED or RESUMED and the re-sent units: a few frames at once, here (the usual
        # case: no greenlet between the handshake and the stream); a backlog at the link's
        # own pace in a greenlet that then releases the lock, while this one reads the link
        # (PINGs answered, the client's re-sent units taken while ours go out: neither waits
        # for the other's backlog, rule 9).
        if not self._send_now(lio, frames):
            gevent.spawn(self._finish_push, lio, [frames])
        if self.plain_reader is None:  # a new session: upstream bytes go after CREATED
            self.plain_reader = gevent.spawn(self.pump_plain)
        self.pump_link(lio)

    def on_detached(self, why: str) -> None:
        if self.finished:
            return
        if self.fresh():
            # HELLO and gone (or CREATED lost): held briefly, for a retry of the creation.
            hold = min(self.relay.creation_hold, self.relay.session_timeout)
            log.debug("resilientsock: relay: new session %s detached before its client "
                      "showed it got CREATED (%s); held %.0f s", self.sid.hex()[:8], why, hold)
            self.expiry = gevent.spawn_later(hold, self._expire)
            return
        log.info("resilientsock: relay: session %s detached (%s); held for %.0f s",
                 self.sid.hex()[:8], why, self.relay.session_timeout)
        self.expiry = gevent.spawn_later(self.relay.session_timeout, self._expire)

    def _expire(self) -> None:
        self.expiry = None
        if self.cur is None and not self.finished:
            if self.unproven():
                self.relay.counters["creations_abandoned"] += 1
                log.debug("resilientsock: relay: session %s: its client never came back for "
                          "it; upstream connection closed", self.sid.hex()[:8])
                self.finish(abort_plain=False)
                return
            log.warning("resilientsock: relay: session %s expired after %.0f s without its "
                        "client; upstream connection reset", self.sid.hex()[:8],
                        self.relay.session_timeout)
            self.relay.counters["sessions_expired"] += 1
            self.finish(abort_plain=True)

    def plain_ended(self, reset: bool) -> None:
        self.relay.counters["upstream_resets" if reset else "upstream_eofs"] += 1

    def count_plain(self, n: int) -> None:
        self.relay.counters["bytes_down"] += n

    def count_queued(self, n: int) -> None:
        relay = self.relay
        relay.queued += n
        assert relay.queued >= 0, relay.queued  # the sum of the sessions' queues
        if n < 0 and relay.queue_starved:
            relay.wake_starved()

    def over_budget(self) -> bool:
        """The relay's delivery queues hold ``max_buffered`` across its sessions (bytes
        from clients waiting for their upstreams): this session's link is not read while
        its own queue holds more than QUEUE_FLOOR; it is woken when a queue drains or a
        session ends (``Relay.wake_starved``). Bytes toward clients have their own budget
        of the same size (``_RelayStream.room``), kept apart so that a full download budget
        never stops a link from being read (its acks are what free that budget)."""
        relay = self.relay
        if relay.queued < relay.max_buffered:
            return False
        relay.queue_starved.add(self)
        return True

    def _deliver(self, payload: bytes | memoryview | list[Any], block: bool = True) -> int:
        done = super()._deliver(payload, block)
        self.relay.counters["bytes_up"] += done
        return done

    def on_finished(self) -> None:
        if self.expiry is not None:
            self.expiry.kill(block=False)
            self.expiry = None
        if self.relay.sessions.get(self.sid) is self:
            del self.relay.sessions[self.sid]
            self.relay.counters["sessions_ended"] += 1
        self.relay.forget(self)
        if isinstance(self.stream, _RelayStream):
            self.stream.owner = None  # (a reference cycle less)


class Relay:
    """A session relay in front of one upstream server (docs/design.md §11).

    ``Relay("0.0.0.0:9000", "127.0.0.1:9001")``: clients that open with the session preamble
    get sessions (exactly-once byte streams that survive any number of client<->relay drops);
    anything else is proxied plainly. The relay runs on its own gevent hub in a native thread:
    ``start()`` returns once it listens, ``stop()`` closes every connection.

    Options: ``session_timeout`` (300 s a detached session is held), ``buffer_limit`` (16 MiB
    unacknowledged per direction per session; then upstream reads pause), ``plain_after``
    (0.05 s of client silence means a plain, server-first client), ``tls_cert``/``tls_key``
    (TLS between client and relay), ``log_level``, ``handshake_timeout`` (10 s),
    ``link_timeout`` (30 s: a client link silent this long, PINGed at half of it, is a drop:
    a client stopped or cut off without FIN or RST is detached within it, and its session
    is then held ``session_timeout``).

    Admission (docs/threat-model.md): ``upstream_timeout`` (5 s, at most 0.8 x the handshake
    timeout) bounds the upstream connect; ``max_sessions`` (10,000) and
    ``max_sessions_per_source`` (1,000) cap sessions; ``max_fresh_per_source`` (32) caps
    creations per client address whose client has not yet shown it got CREATED (data, an ack
    or a resume from it), each held ``creation_hold`` (5 s) once detached; ``max_buffered``
    (256 MiB) caps unacknowledged bytes across all sessions; ``fd_reserve`` (32) descriptors
    are kept free so the relay can always accept and refuse. When a cap is reached, detached
    sessions whose client never showed up are evicted first, else the client gets ERROR
    ``E_BUSY`` (``stats()["busy_refusals"]``). ``creation_key`` (bytes): only clients proving
    it may create sessions. ``fail_limit`` (50) failed handshakes per source in 10 s slow that
    source down; rejections are logged at most once per ``log_interval`` (10 s) per kind.
    After ``stop()``, every upstream connection is closed and every session is gone.
    """

    def __init__(self, listen: str | tuple[str, int], upstream: str | tuple[str, int], *,
                 session_timeout: float = 300.0, buffer_limit: int = 16 * 1024 * 1024,
                 plain_after: float = 0.05, tls_cert: str | None = None,
                 tls_key: str | None = None, log_level: str | int | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, backlog: int = 1024,
                 link_timeout: float = LINK_TIMEOUT,
                 upstream_timeout: float = UPSTREAM_CONNECT_TIMEOUT,
                 max_sessions: int = 10_000, max_sessions_per_source: int = 1_000,
                 max_fresh_per_source: int = 32, creation_hold: float = CREATION_HOLD,
                 max_buffered: int = 256 * 1024 * 1024, fd_reserve: int = 32,
                 creation_key: bytes | str | None = None, fail_limit: int = 50,
                 log_interval: float = 10.0) -> None:
        self.listen = _addr(listen, listen=True)
        self.upstream = _addr(upstream)
        for name, value in (("session_timeout", session_timeout), ("plain_after", plain_after),
                            ("handshake_timeout", handshake_timeout),
                            ("link_timeout", link_timeout),
                            ("upstream_timeout", upstream_timeout),
                            ("creation_hold", creation_hold), ("log_interval", log_interval)):
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Relay {name}: must be a positive number of seconds "
                                 f"(got {value!r})")
        if not isinstance(buffer_limit, int) or isinstance(buffer_limit, bool) \
                or buffer_limit < 1024:
            raise ValueError(f"Relay buffer_limit: must be a whole number of bytes >= 1024 "
                             f"(got {buffer_limit!r})")
        for name, value, low in (("max_sessions", max_sessions, 1),
                                 ("max_sessions_per_source", max_sessions_per_source, 1),
                                 ("max_fresh_per_source", max_fresh_per_source, 1),
                                 ("max_buffered", max_buffered, 1024),
                                 ("fd_reserve", fd_reserve, 0), ("fail_limit", fail_limit, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Relay {name}: must be a whole number >= {low} "
                                 f"(got {value!r})")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("Relay tls_cert and tls_key go together")
        if isinstance(creation_key, str):
            creation_key = creation_key.encode()
        if creation_key is not None and (not isinstance(creation_key, bytes)
                                         or len(creation_key) < 16):
            raise ValueError("Relay creation_key: must be at least 16 bytes (or None)")
        self.session_timeout = float(session_timeout)
        self.buffer_limit = buffer_limit
        self.plain_after = float(plain_after)
        self.handshake_timeout = float(handshake_timeout)
        self.link_timeout = float(link_timeout)
        self.upstream_timeout = min(float(upstream_timeout), 0.8 * self.handshake_timeout)
        self.max_sessions = max_sessions
        self.max_sessions_per_source = max_sessions_per_source
        self.max_fresh_per_source = max_fresh_per_source
        self.creation_hold = float(creation_hold)
        self.max_buffered = max_buffered
        self.fd_reserve = fd_reserve
        self.creation_key = creation_key
        self.fail_limit = fail_limit
        self.log_interval = float(log_interval)
        self.tls_cert, self.tls_key = tls_cert, tls_key
        self.backlog = backlog
        if log_level is not None:
            log.setLevel(log_level.upper() if isinstance(log_level, str) else log_level)
        self.sessions: dict[bytes, _RelaySession] = {}
        self.counters: dict[str, int] = dict.fromkeys(
            ("connections", "plain_connections", "sessions_created", "sessions_resumed",
             "sessions_ended", "sessions_expired", "failed_proofs", "unknown_sessions",
             "stale_tickets", "early_bytes",
             "impossible_counts", "rejected_handshakes", "handshake_timeouts",
             "upstream_failures", "upstream_eofs", "upstream_resets", "bytes_up",
             "bytes_down", "busy_refusals", "forbidden_creations", "creation_retries",
             "creations_abandoned", "evictions", "late_preambles", "late_sessions",
             "slowed_connections", "plain_refusals"), 0)
        self.buffered = 0  # unacknowledged bytes across all sessions (see _RelayStream)
        self.freed = 0  # bytes finished sessions held since the last trim (TRIM_AFTER)
        self._trim_timer: Any = None
        self.queued = 0  # bytes from clients waiting in sessions' delivery queues upstream
        self.starved: set[_RelaySession] = set()
        self.queue_starved: set[_RelaySession] = set()  # links not read: over max_buffered
        self._creating: dict[bytes, _RelaySession] = {}  # nonce -> unproven session
        self._sources: dict[str, _Source] = {}
        self._throttle: dict[str, list[Any]] = {}
        self._slowed = 0
        self._connecting = 0
        self._fd_limit = 0
        self._loop: Any = None
        self._listener: Any = None
        self._ssl: Any = None
        self._plain_socks: set[Any] = set()
        self._pending: set[Any] = set()
        self.address: tuple[str, int] = self.listen

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Relay:
        """Bind and listen (OSError if the address cannot be bound), then serve."""
        from ..testing._loop import LoopThread

        if self._loop is not None:
            return self
        if self.tls_cert:
            import gevent.ssl as gssl

            ctx = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
            self._ssl = ctx
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            self._fd_limit = 0 if soft == resource.RLIM_INFINITY else int(soft)
        except (ImportError, OSError, ValueError):
            self._fd_limit = 0
        loop = LoopThread("resilientsock-relay").start()
        try:
            loop.call(self._listen)
        except BaseException:
            loop.stop()
            raise
        self._loop = loop
        return self

    def stop(self) -> None:
        """Close the listener, every session's links and upstream connections."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            loop.call(self._teardown)
        finally:
            loop.stop()

    close = stop  # the one name every service has (FaultProxy, MessageServer, ToxiproxyAPI)

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, int]:
        """Counters (failed proofs, sessions created/resumed/expired, refusals for want of
        room: ``busy_refusals``, ...) and gauges (``sessions_active``, ``sessions_detached``,
        ``buffered_bytes`` across all sessions)."""
        out = dict(self.counters)
        sessions = list(self.sessions.values())
        out["sessions_active"] = len(sessions)
        out["sessions_detached"] = sum(1 for s in sessions if s.cur is None)
        out["buffered_bytes"] = sum(len(s.stream.unacked) for s in sessions) + self.queued
        return out

    # -- admission and accounting (inside the relay's hub) ----------------------------------

    def _src(self, source: str) -> _Source:
        src = self._sources.get(source)
        if src is None:
            if len(self._sources) >= 4096:
                self._prune_sources()
            src = self._sources[source] = _Source()
        return src

    def _prune_sources(self) -> None:
        now = time.monotonic()
        for key, src in list(self._sources.items()):
            if not src.sessions and not src.fresh and not src.connecting \
                    and now - src.window >= FAIL_WINDOW and now >= src.slow_until \
                    and now >= src.late_until:
                del self._sources[key]

    def wake_starved(self) -> None:
        starved, self.starved = self.starved, set()
        for session in starved:
            session.room_ev.set()
        starved, self.queue_starved = self.queue_starved, set()
        for session in starved:
            session.drained_ev.set()

    def forget(self, session: _RelaySession) -> None:
        """A session is finished: its bookkeeping goes."""
        if self._creating.get(session.nonce) is session:
            del self._creating[session.nonce]
        src = self._sources.get(session.source)
        if src is not None:
            src.sessions -= 1
            assert src.sessions >= 0, f"{session.source}: more sessions forgotten than created"
            if session in src.fresh:
                src.fresh.remove(session)
        self.starved.discard(session)
        self.queue_starved.discard(session)
        stream = session.stream
        if isinstance(stream, _RelayStream):
            self.note_freed(stream.counted)
            stream.release()

    def note_freed(self, n: int) -> None:
        """``n`` bytes were freed (an ended session's buffers, a failed handshake): once
        ``TRIM_AFTER`` were, the memory goes back to the system within a second."""
        self.freed += n
        if self.freed >= TRIM_AFTER and self._trim_timer is None and _malloc_trim is not None \
                and self._loop is not None:  # (not while it stops)
            self._trim_timer = gevent.spawn_later(1.0, self._trim)

    def _trim(self) -> None:
        """Give the memory finished sessions held back to the system (TRIM_AFTER)."""
        self._trim_timer = None
        self.freed = 0
        if _malloc_trim is not None:
            _malloc_trim(0)

    def _evict(self, source: str | None = None) -> bool:
        """Finish the oldest detached session whose client never showed it got CREATED (from
        ``source``, or any); False if there is none."""
        src = self._sources.get(source) if source is not None else None
        # A source's own recent creations first (at most max_fresh_per_source of them), then
        # every unproven session, oldest first; stops at the first one found.
        for candidates in ([] if src is None else list(src.fresh), self._creating.values()):
            victim = None
            stale = []
            for session in candidates:
                if not session.unproven():
                    stale.append(session)  # shown alive since: no longer a candidate
                elif session.cur is None and (source is None or session.source == source):
                    victim = session
                    break
            for session in stale:
                if self._creating.get(session.nonce) is session:
                    del self._creating[session.nonce]
            if victim is not None:
                self.counters["evictions"] += 1
                victim.finish(abort_plain=False)
                return True
        return False

    def _admit(self, sock: Any, source: str) -> str | None:
        """None if a new session from ``source`` fits, else why not (for ERROR E_BUSY)."""
        src = self._src(source)
        src.fresh = [s for s in src.fresh if s.fresh()]
        # Creations admitted whose upstream connect is under way count too (they yield).
        if len(src.fresh) + src.connecting >= self.max_fresh_per_source \
                and not self._evict(source):
            return (f"too many new sessions from {source} whose client has not shown up yet "
                    f"({self.max_fresh_per_source})")
        if src.sessions + src.connecting >= self.max_sessions_per_source \
                and not self._evict(source):
            return f"too many sessions from {source} ({self.max_sessions_per_source})"
        if len(self.sessions) + self._connecting >= self.max_sessions and not self._evict():
            return f"the relay holds its maximum of {self.max_sessions} sessions"
        if self._fd_limit and _fileno(sock) >= self._fd_limit - self.fd_reserve \
                and not self._evict():
            return "the relay is out of file descriptors"
        if self.buffered + self.queued >= self.max_buffered:
            return (f"the relay's buffers are full ({self.max_buffered} bytes "
                    f"unacknowledged across its sessions)")
        return None

    def _failed(self, source: str, kind: str, reason: str) -> None:
        """A handshake from ``source`` failed: counted there (a source over ``fail_limit`` in
        ``FAIL_WINDOW`` is slowed) and logged at most once per interval per kind."""
        src = self._src(source)
        now = time.monotonic()
        if now - src.window >= FAIL_WINDOW:
            src.window = now
            src.failures = 0
        src.failures += 1
        if src.failures > self.fail_limit:
            src.slow_until = now + FAIL_WINDOW
        self._log_throttled(kind, f"session handshake rejected ({kind}) from {source}: "
                                  f"{reason}", source)

    def _log_throttled(self, kind: str, message: str, source: str = "") -> None:
        """A WARNING for the first of its kind, then at most one summary line (with the count)
        per ``log_interval``: a flood of bad handshakes cannot flood the log."""
        now = time.monotonic()
        entry = self._throttle.get(kind)
        if entry is None or (now - entry[0] >= self.log_interval and entry[3] is None):
            self._throttle[kind] = [now, 0, set(), None, message]
            log.warning("resilientsock: relay: %s", message)
            return
        entry[1] += 1
        entry[4] = message
        if len(entry[2]) < 10_000:
            entry[2].add(source)
        if entry[3] is None:
            entry[3] = gevent.spawn_later(max(0.0, entry[0] + self.log_interval - now),
                                          self._flush_log, kind)

    def _flush_log(self, kind: str) -> None:
        entry = self._throttle.get(kind)
        if entry is None or not entry[1]:
            return
        log.warning("resilientsock: relay: %d more like this in the last %.0f s, from %d "
                    "source(s); the last: %s", entry[1], self.log_interval, len(entry[2]),
                    entry[4])
        self._throttle[kind] = [time.monotonic(), 0, set(), None, entry[4]]

    def _pace(self, source: str) -> bool:
        """A source over its failure limit waits ``SLOW_DELAY`` before its handshake is served
        (at most ``SLOW_MAX`` at once; beyond, False: close it)."""
        src = self._sources.get(source)
        if src is None or src.slow_until <= time.monotonic():
            return True
        self.counters["slowed_connections"] += 1
        if self._slowed >= SLOW_MAX:
            return False
        self._slowed += 1
        try:
            gevent.sleep(SLOW_DELAY)
        finally:
            self._slowed -= 1
        return True

    def _connect_upstream(self) -> tuple[Any, int, str]:
        """(socket, 0, "") or (None, ERROR code, why: naming the upstream and the cause)."""
        host, port = self.upstream
        for attempt in (0, 1):
            try:
                upstream = gsocket.create_connection(self.upstream,
                                                     timeout=self.upstream_timeout)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and not attempt and self._evict():
                    continue
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return None, sp.E_BUSY, (f"the relay is out of file descriptors "
                                             f"({exc.strerror}): cannot connect to its "
                                             f"upstream {host}:{port}")
                if isinstance(exc, TimeoutError):
                    why = f"timed out after {self.upstream_timeout:.1f} s"
                elif isinstance(exc, ConnectionRefusedError):
                    why = "connection refused"
                else:
                    why = exc.strerror or str(exc)
                return None, sp.E_UPSTREAM, f"cannot connect to upstream {host}:{port}: {why}"
            upstream.settimeout(None)
            _nodelay(upstream)
            return upstream, 0, ""
        return None, sp.E_BUSY, "the relay is out of file descriptors"  # pragma: no cover

    # -- inside the relay's hub ------------------------------------------------------------

    def _listen(self) -> None:
        host, port = self.listen
        family = gsocket.AF_INET6 if ":" in host else gsocket.AF_INET
        sock = gsocket.socket(family, gsocket.SOCK_STREAM)
        try:
            sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(self.backlog)
        except OSError:
            sock.close()
            raise
        self.address = sock.getsockname()[:2]
        self._listener = sock
        gevent.spawn(self._accept_loop, sock)

    def _teardown(self) -> None:
        if self._trim_timer is not None:
            self._trim_timer.kill(block=False)
            self._trim_timer = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for session in list(self.sessions.values()):
            session.finish(abort_plain=True)
        for sock in list(self._plain_socks) + list(self._pending):
            sock.close()

    def _accept_loop(self, listener: Any) -> None:
        while True:
            try:
                sock, peer = listener.accept()
            except OSError as exc:
                if self._listener is not listener:
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Free what nobody can miss (a session whose client never showed up)
                    # before pausing: the relay must be able to accept and refuse.
                    if not self._evict():
                        self._log_throttled("accept", f"accept: {exc}; pausing 0.1 s")
                        gevent.sleep(0.1)
                continue
            self.counters["connections"] += 1
            gevent.spawn(self._handle, sock, str(peer[0]) if peer else "")

    def _handle(self, sock: Any, source: str = "") -> None:
        _nodelay(sock)
        self._pending.add(sock)
        serve = None
        try:
            serve = self._handle_inner(sock, source)
        finally:
            self._pending.discard(sock)
            if serve is None:  # refused, closed or timed out
                self.note_freed(_HANDSHAKE_COST)
        # The handshake (and its timer) is over: a session or a plain connection is served in
        # this greenlet for as long as it lasts, the handshake's frame and buffers gone.
        if serve is not None:
            serve()

    def _handle_inner(self, raw: Any, source: str = "") -> Callable[[], None] | None:
        """The TLS and protocol handshakes; returns what serves the connection after them
        (None: refused, closed, or already served plainly)."""
        sock = raw
        if self._ssl is not None:
            try:
                with gevent.Timeout(self.handshake_timeout):
                    sock = self._ssl.wrap_socket(raw, server_side=True)
            except (OSError, gevent.Timeout) as exc:
                self.counters["rejected_handshakes"] += 1
                log.info("resilientsock: relay: TLS handshake failed: %s", exc)
                raw.close()
                return None
        first = b""
        # Plain or session? Wait plain_after (longer for an address seen late: LATE_WINDOW)
        # for the client's first bytes (server-first protocols say nothing until greeted:
        # proxy those plainly, but watch their first bytes: a session client slower than
        # that is never forwarded: served as a session, or refused, _proxy_plainly).
        started = time.monotonic()
        try:
            with gevent.Timeout(self._plain_wait(source, started)):
                first = sock.recv(RECV_SIZE)
                if not first:
                    sock.close()
                    return None
        except gevent.Timeout:
            pass
        except OSError:
            sock.close()
            return None
        if not first:
            return lambda: self._proxy_plainly(sock, b"", sniff=True, source=source,
                                               started=started)
        return self._timed_handshake(sock, first, source)

    def _timed_handshake(self, sock: Any, first: bytes, source: str,
                         spare: list[Any] | None = None) -> Callable[[], None] | None:
        """The session handshake (or the plain proxy, for first bytes that are no preamble)
        after the client's ``first`` bytes, within ``handshake_timeout``. ``spare``: an
        upstream connection that saw nothing, for a creation to take (``_create``)."""
        link = sp.Link(sp.RELAY)
        if sp.preamble_verdict(first) is not False and not self._pace(source):
            sock.close()  # a session handshake from a source that failed too often
            return None
        link.receive_data(first)
        timer = gevent.Timeout(self.handshake_timeout)
        timer.start()
        try:
            serve = self._handshake(sock, link, source, spare)
        except gevent.Timeout as t:
            if t is not timer:
                raise
            self.counters["handshake_timeouts"] += 1
            self._failed(source, "timeout", f"handshake not finished in "
                                            f"{self.handshake_timeout:.0f} s; closed")
            sock.close()
            return None
        finally:
            timer.close()
            # The timer is the exception raised here: its traceback holds this frame, which
            # holds the timer (a cycle keeping the socket and the link's buffers until a
            # full garbage collection: a handshake flood's memory was never given back).
            del timer
        return serve

    def _late_session(self, client: Any, first: bytes, upstream: Any, source: str) -> None:
        """A session client whose preamble came after ``plain_after`` while nothing went
        either way on its plain attempt: its handshake, served as any other."""
        spare = [upstream]
        self._pending.add(client)
        try:
            serve = self._timed_handshake(client, first, source, spare)
        finally:
            self._pending.discard(client)
            for sock in spare:  # not taken by a creation: a connection that saw nothing
                sock.close()
        if serve is not None:
            serve()

    def _handshake_event(self, sock: Any, link: sp.Link) -> Any:
        while True:
            ev = link.next_event()
            if ev is not sp.NEED_DATA:
                return ev
            data = sock.recv(sp.HANDSHAKE_LIMIT)
            if not data:
                raise ConnectionResetError("closed during the handshake")
            link.receive_data(data)

    def _reject(self, sock: Any, link: sp.Link, code: int, reason: str,
                counter: str | None = None, source: str = "", log_reason: str = "",
                blame: bool = True) -> None:
        """ERROR ``code`` to the client, the connection closed, counted (and in ``counter``);
        logged at most once per interval per kind. ``blame``: the client's fault (counted
        against its source), not the relay's or the upstream's."""
        if counter is not None:
            self.counters[counter] += 1
        self.counters["rejected_handshakes"] += 1
        kind = counter or ("protocol" if code == sp.E_PROTOCOL else sp.ERROR_NAMES.get(
            code, str(code)))
        if blame:
            self._failed(source, kind, log_reason or reason)
        else:
            self._log_throttled(kind, f"session refused ({kind}) for {source}: "
                                      f"{log_reason or reason}", source)
        try:
            sock.sendall(link.send_error(code, reason))
        except (OSError, RuntimeError):
            pass
        sock.close()

    def _handshake(self, sock: Any, link: sp.Link, source: str = "",
                   spare: list[Any] | None = None) -> Callable[[], None] | None:
        """The handshake on a new connection; returns what serves it afterwards (None: it
        was rejected or closed). ``spare``: see ``_timed_handshake``."""
        try:
            ev = self._handshake_event(sock, link)
        except sp.ProtocolError as exc:
            self._reject(sock, link, exc.code, exc.reason, source=source)
            return None
        except OSError:
            sock.close()
            return None
        if ev is sp.NOT_SESSION:
            rest = link.unconsumed()
            return lambda: self._proxy_plainly(sock, rest)
        if isinstance(ev, sp.HelloNew):
            return self._create(sock, link, ev, source, spare)
        sid = link.session_id
        session = self.sessions.get(sid)
        ok = False
        if isinstance(ev, sp.HelloTicket):
            # One round trip: the proof came with the HELLO, over the session's ticket. A
            # known id and an unknown one take the same work and get the same answer (a
            # CHALLENGE) until the proof: no oracle (rule 3).
            secret = session.secret if session is not None else _DUMMY_SECRET
            ok = link.check_ticket_proof(
                session.ticket if session is not None else _DUMMY_ID, secret)
            if not ok:
                # A ticket replaced lately (stale) or a wrong proof: the same work either way.
                old = session.old_tickets if session is not None else ()
                stale = sum(link.check_ticket_proof(old[i] if i < len(old) else _DUMMY_ID,
                                                    secret) for i in range(_OLD_TICKETS)) > 0
                if session is not None:
                    if stale:
                        self.counters["stale_tickets"] += 1
                    else:
                        self.counters["failed_proofs"] += 1
                        self._failed(source, "failed_proofs",
                                     f"wrong ticket proof for session {sid.hex()[:8]}")
        if not ok:
            try:
                sock.sendall(link.send_challenge())
                ev = self._handshake_event(sock, link)
            except sp.ProtocolError as exc:
                self._reject(sock, link, exc.code, exc.reason, source=source)
                return None
            except OSError:
                sock.close()
                return None
            assert isinstance(ev, sp.ProofReceived)
            session = self.sessions.get(sid)
            # Rule 3: the proof first, against a dummy secret when the id is unknown.
            ok = link.check_proof(session.secret if session is not None else _DUMMY_SECRET)
        if session is None or not ok:
            # One answer for both, after the proof: an unknown id and a wrong proof look alike.
            self._reject(sock, link, sp.E_UNKNOWN_SESSION,
                         "the relay holds no such session, or the proof is wrong (expired, "
                         "ended, the relay restarted, or not this client's)",
                         counter="unknown_sessions" if session is None else "failed_proofs",
                         source=source,
                         log_reason="unknown session id" if session is None else
                         f"wrong proof for session {sid.hex()[:8]}")
            return None
        assert isinstance(ev, sp.ProofReceived | sp.HelloTicket)
        # The proof checked: the ticket is spent now, before anything can yield and whatever
        # the checks below say (a replay of this HELLO, now or later, finds it gone; the
        # new one goes out in RESUMED). Two authentic resumes racing: the later one to get
        # here wins, the earlier link is closed (attach).
        # Tickets replaced lately: a resume with one is stale (a lost RESUMED, a resume that
        # took the link meanwhile, a replay), not a wrong proof; for the counters only.
        session.old_tickets = (session.ticket, *session.old_tickets)[:_OLD_TICKETS]
        session.ticket = os.urandom(sp.NONCE_LEN)
        why = session.stream.check_peer_counts(ev.received, ev.sent)
        if why is not None:
            self._reject(sock, link, sp.E_IMPOSSIBLE_COUNTS, why, counter="impossible_counts",
                         source=source)
            return None
        if session.finished:
            self._reject(sock, link, sp.E_UNKNOWN_SESSION, "the session has ended",
                         source=source, blame=False)
            return None
        early = b""
        if isinstance(ev, sp.HelloTicket) and ev.early:
            # The ticket's proof covered them: the part not received yet is counted now (the
            # RESUMED counts include it) and delivered before anything the new link carries.
            taken = session.stream.take_early(ev.early_from, ev.early)
            if taken is None:
                self._reject(sock, link, sp.E_IMPOSSIBLE_COUNTS,
                             f"early data from {ev.early_from}, but only "
                             f"{session.stream.received} received",
                             counter="impossible_counts", source=source)
                return None
            early = taken
            self.counters["early_bytes"] += len(early)
        self._pending.discard(sock)
        self.counters["sessions_resumed"] += 1
        session.resumes += 1
        log.info("resilientsock: relay: session %s resumed (client had %d, relay had %d)",
                 session.sid.hex()[:8], ev.received, session.stream.received)
        lio = _LinkIO(sock, link)
        return lambda: session.attach(
            lio, lambda: link.send_resumed(session.secret, session.stream), early)

    def _create(self, sock: Any, link: sp.Link, ev: Any, source: str = "",
                spare: list[Any] | None = None) -> Callable[[], None] | None:
        key = self.creation_key
        if key is not None and not (ev.key_proof and hmac.compare_digest(
                sp.creation_proof(key, ev.nonce), ev.key_proof)):
            self._reject(sock, link, sp.E_FORBIDDEN,
                         "this relay creates sessions only for holders of its creation key "
                         "(RetryPolicy.session_key / RESILIENTSOCK_SESSION_KEY)",
                         counter="forbidden_creations", source=source)
            return None
        prior = self._creating.get(ev.nonce) if ev.nonce else None
        if prior is not None and not prior.finished and prior.unproven():
            # A retry of a creation whose CREATED never arrived (reset, FIN, black hole): the
            # same session, its one upstream connection, under a fresh id and secret; every
            # upstream byte re-sent from 0 (its client never acknowledged any).
            self.counters["creation_retries"] += 1
            del self.sessions[prior.sid]
            sid, secret = sp.new_credentials()
            prior.sid, prior.secret = sid, secret
            self.sessions[sid] = prior
            self._pending.discard(sock)
            log.info("resilientsock: relay: session %s: creation retried", sid.hex()[:8])
            lio = _LinkIO(sock, link)
            stream = prior.stream
            return lambda: prior.attach(
                lio, lambda: link.send_created(sid, secret, stream) + stream.resume(0))
        busy = self._admit(sock, source)
        if busy is not None:
            self._reject(sock, link, sp.E_BUSY, busy, counter="busy_refusals", source=source,
                         blame=False)
            return None
        src = self._src(source)
        src.connecting += 1
        self._connecting += 1
        try:
            if spare:  # a connection made for a plain attempt that saw nothing: ours
                upstream, code, why = spare.pop(), 0, ""
            else:
                upstream, code, why = self._connect_upstream()
        finally:
            src.connecting -= 1
            self._connecting -= 1
            assert src.connecting >= 0 and self._connecting >= 0, (src.connecting,
                                                                   self._connecting)
        if upstream is None:
            self._reject(sock, link, code, why,
                         counter="upstream_failures" if code == sp.E_UPSTREAM
                         else "busy_refusals", source=source, blame=False)
            return None
        sid, secret = sp.new_credentials()
        stream = _RelayStream(self, self.buffer_limit)
        session = _RelaySession(self, sid, secret, stream, upstream, source, ev.nonce)
        stream.owner = session
        self.sessions[sid] = session
        if ev.nonce:
            self._creating[ev.nonce] = session
        src.sessions += 1
        src.fresh.append(session)
        self.counters["sessions_created"] += 1
        self._pending.discard(sock)
        log.info("resilientsock: relay: session %s created", sid.hex()[:8])
        lio = _LinkIO(sock, link)
        return lambda: session.attach(lio, lambda: link.send_created(sid, secret, stream))

    # -- plain clients -----------------------------------------------------------------------

    def _plain_wait(self, source: str, now: float) -> float:
        """How long a new client from ``source`` may be silent before it is proxied plainly:
        ``plain_after``, or longer for a while after a session client from there was refused
        for a late preamble (see LATE_WINDOW)."""
        src = self._sources.get(source)
        if src is not None and src.late_until > now:
            return max(self.plain_after, src.late_wait)
        return self.plain_after

    def _proxy_plainly(self, client: Any, first: bytes, sniff: bool = False,
                       source: str = "", started: float = 0.0) -> None:
        """Proxy a plain client. ``sniff`` (it was silent for ``plain_after``): its first
        bytes are held until they cannot be the session preamble, never forwarded (#25). A
        session client that was merely slow is served as a session when nothing came from
        the upstream meanwhile, and refused (a reset: it retries) when the upstream's
        greeting went to it already."""
        self.counters["plain_connections"] += 1
        self._pending.discard(client)
        if self._fd_limit and _fileno(client) >= self._fd_limit - self.fd_reserve \
                and not self._evict():
            self.counters["plain_refusals"] += 1
            self._log_throttled("plain_fds", "plain client refused: the relay is out of "
                                              "file descriptors")
            _abort(client)
            return
        upstream, _, why = self._connect_upstream()
        if upstream is None:
            self.counters["upstream_failures"] += 1
            self._log_throttled("upstream", f"plain client: {why}")
            _abort(client)
            return
        self._plain_socks.update((client, upstream))
        state = {"eofs": 0, "down": 0}
        down = gevent.spawn(self._pump_plain, upstream, client, state, "bytes_down")
        if sniff:
            kind, first = self._sniff(client)
            if kind != "plain":
                down.kill()
                self._plain_socks.difference_update((client, upstream))
                if kind == "session":
                    self.counters["late_preambles"] += 1
                    # The next clients from there are waited for longer (LATE_WINDOW): a
                    # retry or a resume on a path that stays slow is a session at once.
                    now = time.monotonic()
                    src = self._src(source)
                    src.late_wait = min(LATE_WAIT_MAX, max(src.late_wait, 2 * (now - started)))
                    src.late_until = now + LATE_WINDOW
                    if not state["down"]:
                        # Nothing went either way (a client-first upstream said nothing): a
                        # session client merely slower than plain_after is served as one
                        # (a creation takes this upstream connection, which saw nothing;
                        # a resume closes it). Refusing it would refuse it on every
                        # attempt on a path that stays slow.
                        self.counters["late_sessions"] += 1
                        self.counters["plain_connections"] -= 1
                        self._late_session(client, first, upstream, source)
                        return
                    self._log_throttled("late_preamble", "a session client's first bytes "
                                        "came after plain_after "
                                        f"({self.plain_after} s) and the upstream's "
                                        "greeting: refused (it retries), nothing forwarded; "
                                        f"clients from {source} are waited for "
                                        f"{src.late_wait:.2f} s for {LATE_WINDOW:.0f} s")
                    upstream.close()
                else:  # the client reset: so does its upstream
                    _abort(upstream)
                _abort(client)
                return
        try:
            if first:
                upstream.sendall(first)
                self.counters["bytes_up"] += len(first)
        except OSError:
            _abort(client)
            upstream.close()
            down.kill()
            return
        self._pump_plain(client, upstream, state, "bytes_up")
        down.join()

    def _sniff(self, client: Any) -> tuple[str, bytes]:
        """A silent client's first bytes, read before any of them goes upstream: ("plain",
        bytes to forward; b"" at its EOF), ("session", bytes read) when they are the preamble, or
        ("gone", b"") on a reset. A prefix of the preamble waits for more, at most
        ``handshake_timeout``; then it is plain."""
        buf = b""
        timer = None
        try:
            while True:
                try:
                    data = client.recv(RECV_SIZE)
                except OSError:
                    return "gone", b""
                if not data:
                    return "plain", buf
                buf += data
                verdict = sp.preamble_verdict(buf)
                if verdict is False:
                    return "plain", buf
                if verdict is True:
                    return "session", buf
                if timer is None:
                    timer = gevent.Timeout(self.handshake_timeout)
                    timer.start()
        except gevent.Timeout as t:
            if t is not timer:
                raise
            return "plain", buf
        finally:
            if timer is not None:
                timer.close()
            del timer  # (a cycle through its traceback: see _timed_handshake)

    def _pump_plain(self, source: Any, target: Any, state: dict[str, int],
                    counter: str) -> None:
        """Copy ``source`` to ``target``: a FIN is passed on as a FIN, a reset as a reset."""
        counters = self.counters
        while True:
            try:
                data = source.recv(RECV_SIZE)
            except OSError:
                data = None
            if counter == "bytes_down":
                # Before anything can yield: a late preamble (_sniff) reads it. An EOF or a
                # reset from the upstream counts too (it is passed on to the client).
                state["down"] = 1
            if not data:
                if data is None:  # a reset: pass it on
                    _abort(target)
                    source.close()
                    self._plain_socks.difference_update((source, target))
                    return
                state["eofs"] += 1
                try:
                    target.shutdown(gsocket.SHUT_WR)
                except OSError:
                    state["eofs"] = 2
                if state["eofs"] >= 2:
                    source.close()
                    target.close()
                    self._plain_socks.difference_update((source, target))
                return
            try:
                target.sendall(data)
            except OSError:
                _abort(source)
                target.close()
                self._plain_socks.difference_update((source, target))
                return
            counters[counter] += len(data)
