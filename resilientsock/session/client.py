"""Session mode's client side (docs/design.md §11): ``open_session``, the session's life on
the client (``_ClientSession``: resume after every drop), and the application's socket, whose
writes frame onto the link (rule 7) and whose reads may take a handoff (rule 8).

Follows the rules in ``carrier``'s docstring.
"""

from __future__ import annotations

import atexit
import errno
import ipaddress
import os
import socket as _stdsocket
import struct
import time
import weakref
from typing import Any

import gevent
import gevent.socket as gsocket

from .._answer import _MSG_PEEK
from .._machine import FINAL_MARGIN
from .._policy import RetryPolicy
from . import protocol as sp
from . import targets
from .carrier import (
    ACK_DELAY,
    HANDSHAKE_TIMEOUT,
    _abort,
    _Carrier,
    _Hub,
    _LinkIO,
    _nodelay,
    _ReadTimedOut,
    log,
)

__all__ = ["open_session", "set_direct", "direct_methods", "SessionClosedError"]

HANDOFF_MAX = 16 * 1024  # a front this small fits an empty pair whole (rule 8; picked)


class SessionClosedError(ConnectionResetError):
    """Raised internally when the relay no longer holds the session."""


class _ClientSession(_Carrier):
    __slots__ = ("address", "policy", "sid", "secret", "ssl_context", "reconnects", "runner",
                 "ticket", "version", "front", "waiting", "pair_written", "pair_read", "lost")

    side = "application"

    def __init__(self, address: tuple[str, int], policy: RetryPolicy, stream: sp.Stream,
                 plain: Any, sid: bytes, secret: bytes, heartbeat: float,
                 ssl_context: Any) -> None:
        super().__init__(stream, plain)
        self.address = address
        self.policy = policy
        self.sid = sid
        self.secret = secret
        self.heartbeat = heartbeat
        self.ssl_context = ssl_context
        self.reconnects = 0
        self.runner: Any = None
        self.ticket = b""
        self.version = 1  # the session's protocol version (from CREATED)
        # The handoff to a waiting read (rule 8): the bytes handed, the read waiting (its
        # socket, its size), and the bytes written to and read from the pair.
        self.front: bytes | None = None
        self.waiting: tuple[Any, int] | None = None
        self.pair_written = 0
        self.pair_read = 0
        self.lost: str | None = None  # why the session could not be resumed (the note)

    def _deliver(self, payload: bytes | memoryview | list[Any], block: bool = True) -> int:
        size = sum(map(len, payload)) if isinstance(payload, list) else len(payload)
        waiting = self.waiting
        if (waiting is not None and self.front is None and self.pair_written == self.pair_read
                and 0 < size <= waiting[1] and size <= HANDOFF_MAX and self.plain is not None
                and not self.aborted):
            if _Hub.wake_reader(waiting[0]):  # the read is blocked on its descriptor: hand
                # it over (the wake-up runs after this returns: nothing yields in between)
                self.front = b"".join(payload) if isinstance(payload, list) else bytes(payload)
                self.waiting = None
                return size
        if self.front is not None:
            self.flush_front()
        done = super()._deliver(payload, block)
        self.pair_written += done
        return done

    def flush_front(self) -> None:
        """Write a front no read took to the pair, before anything after it (rule 8)."""
        with self.plain_lock:
            front, plain = self.front, self.plain
            if front is None or plain is None or self.aborted:
                return  # no pair to write to: the next read returns it, then the end
            self.front = None
            self.pair_written += len(front)
            try:
                plain.sendall(front)
            except OSError as exc:
                failed: OSError | None = exc
            else:
                failed = None
        if failed is not None:
            self.plain_write_failed(failed)

    def _peer_ended(self, ev: sp.Ended) -> None:
        if self.front is not None and not ev.reset:
            self.flush_front()  # the EOF goes behind it, for select() too
        super()._peer_ended(ev)

    def run(self, lio: _LinkIO) -> None:
        """The session's life: serve the link, resume after every drop, until it ends."""
        try:
            self.plain_reader = gevent.spawn(self.pump_plain)
            while not self.finished:
                self.pump_link(lio)
                if self.finished:
                    return
                try:
                    lio = self._resume()
                except Exception as exc:  # noqa: BLE001 - surfaced to the application
                    self._surface(str(exc))
                    return
        finally:
            if not self.finished:
                self.finish(abort_plain=True)

    def prove_created(self, lio: _LinkIO) -> None:
        """An ACK on the creating link if nothing went to the relay on it yet (see
        ``open_session``)."""
        stream = self.stream
        if not (stream.data_sent or stream.ack_sent or stream.end_sent or self.reconnects):
            self._send(lio, stream.ack())

    def on_detached(self, why: str) -> None:
        log.info("resilientsock: session %s to %s:%d: link lost (%s); resuming",
                 self.sid.hex()[:8], *self.address, why)

    def on_refused(self, lio: _LinkIO, exc: sp.Refused) -> None:
        self._link_lost(lio, str(exc))

    def _surface(self, reason: str) -> None:
        if self.aborted is not None or (self.stream.end_sent is not None
                                        and self.stream.end_received is not None):
            # Nothing is missing from the application's point of view.
            log.info("resilientsock: session %s ended (%s)", self.sid.hex()[:8], reason)
            self.finish(abort_plain=False)
            return
        log.warning("resilientsock: session to relay %s:%d cannot be resumed: %s; the "
                    "connection is reset (nothing is re-sent into a new session)",
                    self.address[0], self.address[1], reason)
        # Before the reset below: the application's call that meets it carries the note.
        self.lost = reason
        self.finish(abort_plain=True)

    def _resume(self) -> _LinkIO:
        """A new link with the session resumed on it (the caller serves it), or raise."""
        policy = self.policy
        started = time.monotonic()
        attempt = restarts = 0
        last: BaseException | None = None
        while not self.finished:
            elapsed = time.monotonic() - started
            if policy.deadline is not None and elapsed >= policy.deadline:
                raise TimeoutError(f"relay unreachable for {elapsed:.1f} s (deadline "
                                   f"{policy.deadline} s; last error: {last})")
            if policy.max_attempts is not None and attempt >= policy.max_attempts:
                raise TimeoutError(f"{attempt} resume attempts failed (last error: {last})")
            delay = policy.backoff(attempt)
            if policy.deadline is not None:
                delay = min(delay, max(0.0, policy.deadline - elapsed))
            if delay:
                gevent.sleep(delay)
            attempt += 1
            # A resume is two round trips on a live path: an attempt slower than two
            # heartbeats (at least 1 s) met a dead path; try a new connection instead.
            budget = min(policy.connect_timeout or HANDSHAKE_TIMEOUT, HANDSHAKE_TIMEOUT,
                         max(1.0, 2 * (self.heartbeat or HANDSHAKE_TIMEOUT)))
            if policy.deadline is not None:
                budget = max(0.01, min(budget, policy.deadline - (time.monotonic() - started)))
            try:
                with gevent.Timeout(budget, TimeoutError(f"resume took over {budget:.2f} s")):
                    lio = self._resume_once(budget)
            except sp.Refused as exc:
                raise SessionClosedError(f"the relay refused the resume: {exc}") from None
            except sp.ProtocolError as exc:
                raise SessionClosedError(f"the relay failed the resume: {exc.reason}") from None
            except OSError as exc:
                last = exc
                # Met the relay's path (a reset, not a refusal) after attempts that found
                # nobody: the outage is over and the schedule restarts, as RetryPolicy's does
                # (at most 3 times a resume); a grown backoff would outlast the app's timeout.
                if attempt > 1 and restarts < 3 and \
                        not isinstance(exc, (ConnectionRefusedError, TimeoutError)):
                    attempt, restarts = 1, restarts + 1
                continue
            self.reconnects += 1
            return lio
        raise SessionClosedError("the session ended")

    def _resume_once(self, timeout: float) -> _LinkIO:
        sock = _connect(self.address, timeout, self.ssl_context)
        try:
            link = sp.Link(sp.CLIENT)
            if self.ticket:  # one round trip, or two if the relay no longer holds the ticket
                # From version 2 a small unacknowledged request rides the HELLO (early
                # data): the relay delivers it before it answers, a round trip sooner.
                sock.sendall(link.send_hello_ticket(self.sid, self.stream, self.ticket,
                                                    self.secret, version=self.version))
            else:
                sock.sendall(link.send_hello_resume(self.sid, self.stream))
            ev = _client_event(sock, link)
            if isinstance(ev, sp.Challenged):
                sock.sendall(link.send_proof(self.secret))
                ev = _client_event(sock, link)
            if not isinstance(ev, sp.Resumed):
                raise sp.ProtocolError(f"expected RESUMED, got {ev!r}")
            lio = _LinkIO(sock, link)
            lio.take_new()
            try:
                frames = link.finish_resume(self.secret)
                self.ticket = link.next_ticket
                self.cur = lio
                self.waiting_pong = False
                sock.settimeout(self.heartbeat)
                if self.aborted:
                    frames += self.stream.abort(self.aborted)
            except BaseException:
                if self.cur is lio:  # a link that failed its resume is nobody's current one
                    self.cur = None
                lio.alive = False
                lio.wlock.release()
                raise
        except BaseException:
            sock.close()
            raise
        # The re-sent units: a few frames at once; a backlog at the link's pace in a greenlet
        # that then releases the lock, outside this attempt's time (it never has to fit in
        # one attempt).
        if not self._send_now(lio, frames):
            gevent.spawn(self._finish_push, lio, [frames])
        if self.stream.room() > 0:
            self.room_ev.set()
        log.info("resilientsock: session %s resumed (relay had %d of %d sent)",
                 self.sid.hex()[:8], *(link.peer_counts or (0, 0))[:1], self.stream.sent)
        return lio


_FIRST_ANSWER = (sp.AWAIT_CREATED, sp.AWAIT_CHALLENGE, sp.AWAIT_TICKET_ANSWER)


def _client_event(sock: Any, link: sp.Link) -> Any:
    while True:
        first = link.state in _FIRST_ANSWER
        try:
            ev = link.next_event()
        except sp.ProtocolError as exc:
            if first and exc.code == sp.E_PROTOCOL:
                # The relay's first answer is no session frame: this connection was proxied
                # plainly (our first bytes came after its plain_after; it refuses such a
                # connection without forwarding a byte of ours) or is no relay's. A failed
                # attempt, retried like a reset: nothing of the session went anywhere.
                raise ConnectionResetError(
                    errno.ECONNRESET, f"the relay's answer is not a session frame "
                    f"({exc.reason}): proxied plainly?") from None
            raise
        if ev is not sp.NEED_DATA:
            return ev
        data = sock.recv(sp.HANDSHAKE_LIMIT)
        if not data:
            raise ConnectionResetError("the relay closed the connection during the handshake")
        link.receive_data(data)


def _connect(address: tuple[str, int], timeout: float | None, ssl_context: Any) -> Any:
    host = address[0]
    try:
        family = gsocket.AF_INET6 if ipaddress.ip_address(host).version == 6 else \
            gsocket.AF_INET
    except ValueError:
        family = None
    if family is None:
        sock = gsocket.create_connection(address, timeout=timeout)
    else:
        # An address literal: no resolver round trip (gevent's resolves in a thread pool,
        # about a loopback round trip of its own on every resume).
        sock = gsocket.socket(family, gsocket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
    _nodelay(sock)
    if ssl_context is not None:
        try:
            sock = ssl_context.wrap_socket(sock, server_hostname=address[0])
        except BaseException:
            sock.close()
            raise
    return sock


def _socket_pair(unix: bool = False) -> tuple[Any, Any]:
    """A connected loopback TCP pair (application end, our end): TCP, so the application can
    set TCP options on it as on any connection to a server. ``unix=True``: an AF_UNIX pair
    (each send costs the kernel far less than loopback TCP's; measured in bench_session.py),
    for callers that set no TCP options on it or swallow the EOPNOTSUPP."""
    if unix:
        app, ours = gsocket.socketpair(gsocket.AF_UNIX, gsocket.SOCK_STREAM)
        return app, ours
    listener = gsocket.socket(gsocket.AF_INET, gsocket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        app = gsocket.socket(gsocket.AF_INET, gsocket.SOCK_STREAM)
        try:
            app.connect(listener.getsockname())
            ours, _ = listener.accept()
        except BaseException:
            app.close()
            raise
    finally:
        listener.close()
    # Accepting from our own listener: check it is the socket we connected (another local
    # process could race us to the port).
    if ours.getpeername() != app.getsockname():
        ours.close()
        app.close()
        raise ConnectionError("session socket pair: unexpected peer")
    _nodelay(app)
    _nodelay(ours)
    return app, ours


_direct_sockets: weakref.WeakSet[Any] = weakref.WeakSet()
_client_sessions: weakref.WeakSet[Any] = weakref.WeakSet()  # open_session's, for the exit


def set_direct(sock: Any, session: Any) -> None:
    """``sock``'s writes frame onto ``session``'s link from now on (rule 7)."""
    sock.__dict__["_rs_direct"] = session
    sock.__dict__["_rs_session"] = session  # kept when the direct path is off: the note
    sock.__dict__["_rs_reader"] = session if isinstance(session, _ClientSession) else None
    _direct_sockets.add(sock)


def _direct_off_in_child() -> None:
    # The session's link and greenlets are the parent's: a child writes through the pair
    # descriptor it inherited, as it would on a plain shared connection.
    for sock in list(_direct_sockets):
        sock.__dict__["_rs_direct"] = None
        sock.__dict__["_rs_reader"] = None
        sock.__dict__["_rs_session"] = None
    _client_sessions.clear()  # nor does its exit end the parent's sessions


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_direct_off_in_child)


EXIT_FLUSH = 2.0  # seconds process exit may spend ending its sessions, all of them together
EXIT_WAIT = 1.0  # ... of which waiting for the relay's END (picked: a loopback-to-WAN round trip)


def _pair_pending(sock: Any) -> int:
    """Bytes waiting in the local pair for the pump (0 when it cannot tell)."""
    try:
        import fcntl
        import termios

        buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", buf)[0])
    except (OSError, ValueError, ImportError):
        return 0


def _end_sessions_at_exit() -> None:
    """Process exit closes every connection: a FIN to each peer. A session's FIN is its END
    frame, which only this process can send: sent here for each session still open, behind
    what the application wrote (the pump first carries what the pair holds, and the EOF of
    a pair already closed), at most ``EXIT_FLUSH`` seconds in all. A pair that could not be
    drained in that time ends with a reset, never a clean EOF on a stream cut short. The pair
    is then reset, so a write after this (another exit hook's) fails, as on a closed socket,
    instead of vanishing. Otherwise the relay would hold the upstream connection open until
    ``session_timeout``, as if the client had only lost its link."""
    deadline = time.monotonic() + EXIT_FLUSH
    for session in list(_client_sessions):
        try:
            plain = session.plain
            while (not session._over() and plain is not None and time.monotonic() < deadline
                   and _pair_pending(plain) > 0):
                gevent.sleep(0.01)  # the pump carries them (bounded by the deadline)
            if not session._over():
                if plain is not None and _pair_pending(plain) > 0:
                    session._end_here(True, "the application's process exited")
                else:
                    session._end_here(False, "")
            if plain is not None and session.plain is plain:
                _abort(plain)
        except Exception:  # pragma: no cover - never in the way of the process's exit
            continue
    # Then wait, briefly, for each session's end on the relay's side too (the upstream's EOF,
    # the acknowledgements): a session whose link just vanishes is, for the relay, a client
    # away, held for the session timeout and then reported as expired. One still open when
    # the time is up is torn down with ABORT, at once and quietly.
    runners = [s.runner for s in list(_client_sessions)
               if not s.finished and s.runner is not None and s.cur is not None]
    if runners:
        try:
            gevent.joinall(runners, timeout=max(0.0, min(EXIT_WAIT,
                                                          deadline - time.monotonic())))
        except Exception:  # pragma: no cover - never in the way of the process's exit
            pass
    for session in list(_client_sessions):
        try:
            if not session.finished:
                session._send_abort("the application's process exited")
        except Exception:  # pragma: no cover - never in the way of the process's exit
            continue


atexit.register(_end_sessions_at_exit)


def _pair_closed(session: Any) -> bool:
    """Every descriptor of the application's end of the pair is closed and the pump has
    nothing left to read: the pair says EOF at once (a peek, never a wait). Only asked in
    the thread whose hub runs the session (its link and locks are that hub's)."""
    runner = session.runner
    if runner is None or runner.parent is not _Hub.this_threads_hub():
        return False
    raw = _Hub.raw(session.plain)
    if raw is None:
        return False
    try:
        return raw.recv(1, _MSG_PEEK) == b""  # type: ignore[no-any-return]
    except OSError:  # BlockingIOError: bytes still unread, or another descriptor open
        return False


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # pragma: no cover - 3.10 (PEP 678 without add_note)
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]


def _lost_note(sock: Any, exc: OSError) -> None:
    """A reset or EPIPE that a session's end meets because the relay no longer holds the
    session gets the note docs/design.md §11 promises (once)."""
    session = sock.__dict__.get("_rs_session")
    lost = getattr(session, "lost", None)
    if lost and exc.errno in (errno.ECONNRESET, errno.EPIPE) and not any(
            str(note).startswith("resilientsock:")
            for note in getattr(exc, "__notes__", None) or ()):
        note = (f"resilientsock: the relay no longer holds the session ({lost}); nothing was "
                "re-sent into a new session")
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        else:  # pragma: no cover - 3.10 (PEP 678 without add_note)
            exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]


def direct_methods(base: Any) -> dict[str, Any]:
    """``send``/``sendall`` that frame onto the session's link (rule 7), over ``base``'s own
    methods, and the calls after which the socket writes through the pair for good. The
    session is the instance's ``_rs_direct`` (None: the pair, as any socket)."""
    b_send, b_sendall, b_sendmsg = base.send, base.sendall, getattr(base, "sendmsg", None)
    b_sendto = base.sendto
    b_shutdown, b_dup, b_detach, b_close = base.shutdown, base.dup, base.detach, base.close
    b_recv, b_recv_into = base.recv, base.recv_into

    def off(self: Any) -> None:
        self.__dict__["_rs_direct"] = None

    def reads_off(self: Any) -> None:
        # Rule 8: what was handed and not read goes to the pair first.
        reader = self.__dict__.get("_rs_reader")
        if reader is not None:
            self.__dict__["_rs_reader"] = None
            if reader.front is not None:
                reader.flush_front()

    def wait(self: Any, reader: Any, n: int) -> None:
        """Wait as gevent's own read does (its timeout, its cancel on close), open to a
        handoff of at most ``n`` bytes (rule 8)."""
        reader.waiting = (self, n)
        try:
            _Hub.wait_readable(self, _ReadTimedOut)  # its timeout a bare timer (see there)
        except _ReadTimedOut:
            if reader.front is not None:
                return  # the bytes came before the socket timeout's turn: the read gets them
            raise TimeoutError("timed out") from None
        except BaseException:
            if reader.front is not None:  # killed, or the application's own timeout: the
                gevent.spawn(reader.flush_front)  # next read or select() has the bytes
            raise
        finally:
            if reader.waiting is not None and reader.waiting[0] is self:
                reader.waiting = None

    def drained(self: Any, reader: Any) -> bool:
        """Every byte written to the pair was read here: a read would only fail with EAGAIN,
        so wait for the handoff or the descriptor first (an EOF or a reset on the pair makes
        it readable: the wait returns at once, as it does for bytes already there)."""
        return reader.front is None and reader.pair_written == reader.pair_read \
            and self.timeout != 0.0

    def take_front(reader: Any, n: int) -> bytes:
        front = reader.front
        if len(front) <= n:
            reader.front = None
            return front  # type: ignore[no-any-return]
        reader.front = front[n:]
        return front[:n]  # type: ignore[no-any-return]

    def recv(self: Any, bufsize: int, flags: int = 0) -> bytes:
        try:
            reader = self.__dict__.get("_rs_reader")
            if reader is None or flags or bufsize <= 0:
                return b_recv(self, bufsize, flags)  # type: ignore[no-any-return]
            wait_first = drained(self, reader)
            while True:
                if reader.front is not None:
                    return take_front(reader, bufsize)
                if not wait_first:
                    try:
                        data = _Hub.raw(self).recv(bufsize)
                    except BlockingIOError:
                        if self.timeout == 0.0:
                            raise
                    else:
                        reader.pair_read += len(data)
                        return data  # type: ignore[no-any-return]
                wait_first = False
                wait(self, reader, bufsize)
        except OSError as exc:
            _lost_note(self, exc)
            raise

    def recv_into(self: Any, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        try:
            reader = self.__dict__.get("_rs_reader")
            if reader is None or flags:
                return b_recv_into(self, buffer, nbytes, flags)  # type: ignore[no-any-return]
            view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            n = nbytes or len(view)
            if n <= 0 or n > len(view):
                return b_recv_into(self, buffer, nbytes, flags)  # type: ignore[no-any-return]
            wait_first = drained(self, reader)
            while True:
                if reader.front is not None:
                    data = take_front(reader, n)
                    view[:len(data)] = data
                    return len(data)
                if not wait_first:
                    try:
                        k = _Hub.raw(self).recv_into(view, n)
                    except BlockingIOError:
                        if self.timeout == 0.0:
                            raise
                    else:
                        reader.pair_read += k
                        return k  # type: ignore[no-any-return]
                wait_first = False
                wait(self, reader, n)
        except OSError as exc:
            _lost_note(self, exc)
            raise

    def ended(session: Any) -> None:
        # Our END (EOF) is out (a shutdown, or the process's exit): a write now fails as after
        # SHUT_WR, never into the void, whether or not the session has carried the other
        # direction to its end since (the exit hook waits for that).
        end = session.stream.end_sent
        if end is not None and not end.reset and session.aborted is None:
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    def send(self: Any, data: Any, flags: int = 0, *args: Any, **kw: Any) -> int:
        try:
            session = self.__dict__.get("_rs_direct")
            if session is not None:
                if not flags and not args and not kw and self.timeout != 0.0:
                    n = session.direct_write(data, self.timeout, whole=False)
                    if n >= 0:
                        return n  # type: ignore[no-any-return]
                    ended(session)
                off(self)
            # gevent's own sendall calls send(chunk, flags, timeout=...): passed on as given.
            return b_send(self, data, flags, *args, **kw)  # type: ignore[no-any-return]
        except OSError as exc:
            _lost_note(self, exc)
            raise

    def sendall(self: Any, data: Any, flags: int = 0) -> None:
        try:
            session = self.__dict__.get("_rs_direct")
            if session is not None:
                if not flags and self.timeout != 0.0:
                    view = data if isinstance(data, memoryview) else memoryview(data)
                    if view.format != "B" or view.ndim != 1:
                        view = view.cast("B")
                    n = session.direct_write(view, self.timeout, whole=True)
                    if n >= len(view):
                        return
                    # The session ended at this end before all of it was taken: the rest goes
                    # to the pair, which raises what a plain socket would (EPIPE, a reset).
                    ended(session)
                    off(self)
                    b_sendall(self, view[max(n, 0):], flags)
                    return
                off(self)
            b_sendall(self, data, flags)
        except OSError as exc:
            _lost_note(self, exc)
            raise

    def sendmsg(self: Any, *args: Any) -> int:
        off(self)
        return b_sendmsg(self, *args)  # type: ignore[misc, no-any-return]

    def sendto(self: Any, *args: Any) -> int:
        # Through the pair, as sendmsg: the direct path off first, or the next send() would
        # overtake these bytes on the link (the address is ignored on a connected stream).
        off(self)
        return b_sendto(self, *args)  # type: ignore[no-any-return]

    def shutdown(self: Any, how: int) -> None:
        session = self.__dict__.get("_rs_direct")
        if how != gsocket.SHUT_RD:
            off(self)
            if session is not None:
                # The END goes out now, behind every byte written (a shutdown is the
                # connection's, whatever descriptor says it); the pair's own EOF then finds
                # it sent.
                session.direct_end()
        b_shutdown(self, how)

    def dup(self: Any) -> Any:
        off(self)
        reads_off(self)
        return b_dup(self)

    def detach(self: Any) -> int:
        off(self)
        reads_off(self)
        return b_detach(self)  # type: ignore[no-any-return]

    def close(self: Any) -> None:
        # The END goes when the last descriptor of the pair's end closes (a dup, a forked
        # child or a makefile() object may still write), as the kernel sends a FIN: the pump
        # sends it at the pair's EOF. When this close was the last one and the direct path
        # was still on (nothing written through the pair), the END goes out now (docs/design.md
        # §11: "a client's close() ends its session on the relay at once"), not when this
        # thread's hub next runs: a script without patch() that then waits with time.sleep or
        # a thread's join held its session and upstream for the session timeout.
        session = self.__dict__.get("_rs_direct")
        off(self)
        reads_off(self)
        b_close(self)
        if session is not None and _pair_closed(session):
            try:
                session.direct_end()
            except Exception:  # noqa: BLE001 - best effort: the pump sends it at the EOF
                log.debug("resilientsock: END at close() not sent; left to the pump",
                          exc_info=True)

    methods = {"send": send, "sendall": sendall, "sendto": sendto, "shutdown": shutdown,
               "dup": dup, "detach": detach, "close": close, "recv": recv,
               "recv_into": recv_into}
    if b_sendmsg is not None:
        methods["sendmsg"] = sendmsg
    return methods


class _SessionSocket(gsocket.socket):  # type: ignore[misc]
    """The application's end of a session: a real socket (one end of a local pair, so that
    reads, ``fileno()``, ``select()`` and TLS run by the application work as on any
    connection), whose own ``send``/``sendall`` frame the bytes onto the link (rule 7)."""


for _name, _method in direct_methods(gsocket.socket).items():
    setattr(_SessionSocket, _name, _method)


def _retryable_first_connect(exc: BaseException) -> bool:
    if isinstance(exc, _stdsocket.gaierror):
        return exc.errno == getattr(_stdsocket, "EAI_AGAIN", None)
    if isinstance(exc, ConnectionRefusedError | ConnectionResetError | TimeoutError |
                  _stdsocket.timeout | ConnectionAbortedError):
        return True
    return isinstance(exc, OSError) and exc.errno in (
        errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ETIMEDOUT)


def open_session(address: tuple[Any, ...], *, timeout: float | None = None,
                 policy: RetryPolicy | None = None, heartbeat: float | None = None,
                 ssl_context: Any = None, unix_pair: bool = False) -> Any:
    """Open a session through the relay at ``address``; return the application's end.

    The result is a connected gevent TCP socket whose byte stream is carried exactly once, in
    order, through the relay by a background greenlet, across any number of client<->relay
    drops (resumed under ``policy``: its deadline per outage, its backoff). Its close() and
    shutdown(SHUT_WR) become the session's end; the upstream's EOF or reset become EOF or a
    reset on it.

    Raises what a plain connect raises (ConnectionRefusedError, TimeoutError/socket.timeout,
    gaierror) when the relay cannot be reached within the policy, and ConnectionRefusedError
    when the relay cannot reach its upstream. After such an error nothing was created
    upstream... except when the drop hit between the relay's CREATED and our reading it: that
    session is orphaned and expires on the relay (its upstream saw a connection with no data).
    When the session later cannot be resumed (relay restarted, session expired, proof
    rejected), the returned socket is reset (the application's next recv raises
    ConnectionResetError, with a note saying the relay no longer holds the session, and
    why) and the reason is logged at WARNING.

    ``unix_pair=True`` returns an AF_UNIX socket instead of loopback TCP: cheaper per write,
    but TCP-level ``setsockopt`` calls on it fail (EOPNOTSUPP) and ``getpeername()`` is ''.
    """
    policy = policy or RetryPolicy()
    host, port = address[0], int(address[1])
    addr = (host, port)
    if ssl_context is None:
        ssl_context = targets.session_tls() or _ssl_from_env()
    if heartbeat is None:
        heartbeat = (policy.dead_peer_timeout or 30.0) / 2
    stream = sp.Stream(policy.journal_limit or 16 * 1024 * 1024)
    key = policy.session_key or os.environ.get("RESILIENTSOCK_SESSION_KEY") or None
    key_bytes = key.encode() if isinstance(key, str) else key
    sock, link, ev = _create_session(addr, timeout, policy, ssl_context, stream, key_bytes)
    assert isinstance(ev, sp.Created)
    sock.settimeout(heartbeat)
    pair_app, ours = _socket_pair(unix_pair)
    # The application's end as a _SessionSocket (the same descriptor): its writes skip the pair.
    app = _SessionSocket(pair_app.family, pair_app.type, pair_app.proto, pair_app.detach())
    app.settimeout(timeout)
    session = _ClientSession(addr, policy, stream, ours, ev.session_id, ev.secret, heartbeat,
                             ssl_context)
    set_direct(app, session)
    _client_sessions.add(session)
    session.ticket = link.next_ticket
    session.version = link.version
    lio = _LinkIO(sock, link)
    session.cur = lio
    session.runner = gevent.spawn(session.run, lio)
    # A session whose application says nothing yet (a connection opened ahead of use) shows
    # the relay it got CREATED with an ACK once ACK_DELAY passed with nothing sent: until
    # then the relay holds it only creation_hold (5 s) after a drop, not session_timeout.
    # Not sooner: a standalone frame right before a request would hold that request behind
    # Nagle's algorithm on a forwarder without TCP_NODELAY.
    gevent.spawn_later(ACK_DELAY, session.prove_created, lio)
    log.info("resilientsock: session %s to relay %s:%d created", ev.session_id.hex()[:8],
             host, port)
    return app


def _create_session(addr: tuple[str, int], timeout: float | None, policy: RetryPolicy,
                    ssl_context: Any, stream: sp.Stream,
                    key: bytes | None) -> tuple[Any, sp.Link, Any]:
    """Connect and create a session, retried under ``policy`` like a first connect (#25): a
    refused connect, a reset, a FIN or a timeout during the handshake, a busy relay. Every
    attempt's HELLO carries the first one's nonce: a relay that created the session on an
    attempt whose CREATED was lost answers with that session (version 3), so the upstream
    sees one connection. Returns (socket, link, Created)."""
    host, port = addr
    started = time.monotonic()
    attempt = 0
    nonce = os.urandom(sp.NONCE_LEN)
    # The application's own timeout bounds the whole creation, as it bounds a first connect
    # (docs/design.md §4): every attempt gets at most what is left of it. A non-blocking
    # socket (timeout 0) gets one attempt under the policy's bounds and no retry: a creation
    # cannot be non-blocking, but it must not wait out the deadline either.
    nonblocking = timeout == 0.0
    call_end = started + timeout if timeout else None
    final = False  # the last attempt the application's timeout allows has been made
    while True:
        spent = time.monotonic() - started
        # The session handshake is bounded like a TLS handshake is: by connect_timeout.
        budget = min(HANDSHAKE_TIMEOUT, policy.connect_timeout or HANDSHAKE_TIMEOUT)
        connect_timeout = timeout if timeout else policy.connect_timeout
        if policy.deadline is not None:
            left = max(policy.deadline - spent, 0.01)
            connect_timeout = min(connect_timeout or left, left)
            budget = min(budget, left)
        if call_end is not None:
            left = max(call_end - time.monotonic(), 0.01)
            connect_timeout = min(connect_timeout or left, left)
            budget = min(budget, left)
        sock = None
        failure: BaseException
        try:
            sock = _connect(addr, connect_timeout, ssl_context)
            link = sp.Link(sp.CLIENT)
            with gevent.Timeout(budget, TimeoutError(
                    f"session handshake with the relay {host}:{port} timed out")):
                sock.sendall(link.send_hello_new(stream, nonce, key))
                ev = _client_event(sock, link)
            if not isinstance(ev, sp.Created):
                raise sp.ProtocolError(f"expected CREATED, got {ev!r}")
            return sock, link, ev
        except sp.Refused as exc:
            sock.close()  # type: ignore[union-attr]
            if exc.code == sp.E_UPSTREAM:
                if "timed out" in exc.reason:
                    raise TimeoutError(errno.ETIMEDOUT,
                                       f"relay {host}:{port}: {exc.reason}") from None
                raise ConnectionRefusedError(errno.ECONNREFUSED,
                                             f"relay {host}:{port}: {exc.reason}") from None
            if exc.code == sp.E_FORBIDDEN:
                raise PermissionError(errno.EACCES,
                                      f"relay {host}:{port}: {exc.reason}") from None
            if exc.code != sp.E_BUSY:
                raise ConnectionResetError(errno.ECONNRESET,
                                           f"relay {host}:{port}: {exc}") from None
            failure = ConnectionRefusedError(errno.ECONNREFUSED,
                                             f"relay {host}:{port} is busy: {exc.reason}")
        except sp.ProtocolError as exc:
            sock.close()  # type: ignore[union-attr]
            raise ConnectionResetError(errno.ECONNRESET,
                                       f"relay {host}:{port}: {exc.reason}") from None
        except Exception as exc:  # noqa: BLE001 - classified below, like a first connect
            if sock is not None:
                sock.close()
            failure = exc
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        attempt += 1
        now = time.monotonic()
        spent = now - started
        delay = policy.backoff(attempt)
        if policy.deadline is not None:
            delay = min(delay, max(0.0, policy.deadline - spent))
        retryable = policy.retry_connect and _retryable_first_connect(failure)
        if call_end is not None and retryable and now < call_end and delay >= call_end - now:
            # The wait outlasts the application's timeout: one last attempt just before it
            # ends, as a first connect makes (_machine.FINAL_MARGIN), not one attempt after
            # another with no wait at all until it has run out (a connect storm).
            if final or call_end - now <= FINAL_MARGIN:
                gevent.sleep(call_end - now)
                now = time.monotonic()
                spent = now - started
            else:
                final = True
                delay = call_end - now - FINAL_MARGIN
        timed_out = nonblocking or (call_end is not None and now >= call_end)
        if (not retryable or timed_out
                or (policy.deadline is not None and spent >= policy.deadline)
                or (policy.max_attempts is not None and attempt >= policy.max_attempts)):
            # As a first connect's give-up reads (docs/design.md §5): the original error, and
            # a note saying what was tried.
            last = str(failure) or type(failure).__name__
            tried = f"{attempt} attempt{'s' if attempt != 1 else ''} in {spent:.1f} s"
            if timed_out:
                note = (f"resilientsock: gave up: the socket's timeout of {timeout:g} s ran out "
                        f"after {tried} (last: {last})")
            else:
                note = f"resilientsock: gave up after {tried} (last: {last})"
            if not retryable:
                note += "; that error is not retried"
            if not any(n.startswith("resilientsock:")
                       for n in getattr(failure, "__notes__", ())):
                _add_note(failure, note + f" (creating a session through the relay "
                                          f"{host}:{port})")
            raise failure
        gevent.sleep(delay)


def _ssl_from_env() -> Any:
    ca = os.environ.get("RESILIENTSOCK_SESSION_CA")
    if not ca:
        return None
    import gevent.ssl as gssl

    return gssl.create_default_context(cafile=ca)
