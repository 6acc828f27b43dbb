"""Session mode's I/O (design.md §11): the ``Relay`` server, and the client side (``open_session``).

Rules of this module:

1. The protocol lives in ``_session`` (sans-IO); this module only moves bytes and obeys it.
   Both ends share one carrier (``_Carrier``): a *plain end* (the upstream socket on the relay,
   the application's socket pair on the client) and at most one *link* (a connection between
   client and relay) at a time, with the session's ``Stream`` between them.
2. Frames built for one link are sent on that link or not at all: a frame that finds its link
   replaced is dropped, because the resume re-sent its units already (no duplicates).
3. Nothing of a session (its link, buffers, upstream) is touched before the resume's proof
   checks; an unknown id is checked against a dummy secret so it costs the same.
4. Backpressure, never loss: a carrier stops reading its plain end while ``limit`` bytes are
   unacknowledged, and writes to a plain end block until the kernel takes them.
5. A bare FIN or RST between client and relay is a drop, never the session's end; the end is
   an END frame (EOF or reset) or an ABORT. A session that cannot be resumed is surfaced to the
   application as a reset and logged at WARNING, never re-sent into a new session.
6. Every wait is bounded: handshakes by ``HANDSHAKE_TIMEOUT``, a detached session by
   ``session_timeout``, a client's reconnecting by its ``RetryPolicy``, a silent link by the
   heartbeat of each end (the client's ``heartbeat``; the relay's ``link_timeout``).
7. The application's writes skip the local pair (``direct_write``): its socket frames them
   onto the link itself, the frames built under the link's lock so that the stream's order is
   the wire's. Once anything is written through the pair's descriptor instead (TLS the
   application runs, ``sendmsg``, a ``dup``, a non-blocking write, the session's end), the
   socket writes through the pair for good: one path at a time, never two interleaved.
8. The application's reads may skip the pair too (a *handoff*): when its socket waits in its
   own ``recv``/``recv_into`` and every byte the pump wrote to the pair has been read through
   that socket's own methods (counted: ``pair_written == pair_read``, so the pair is empty,
   whatever the kernel still has in flight), the pump hands what it parsed (at most what the
   call asked for, at most ``HANDOFF_MAX``) to the waiting call as the socket's *front* and
   wakes it as its readable descriptor would. The front is read before the pair; while it is
   there the pump writes nothing to the pair without putting the front in first, so the
   order is the stream's. A front left by a call that ended otherwise (killed, or a socket
   timeout that raced it) is returned by the next read, or written to the pair first (so
   ``select()`` sees it); ``close()``, ``detach()`` and ``dup()`` write it to the pair before
   they act. Any read the socket does not count (``recvmsg``, flags, a TLS layer, a dup,
   ``os.read``) leaves ``pair_written > pair_read`` for good: no handoff after it.
9. A link is read at all times: what the plain end does not take at once waits in the
   carrier's delivery queue (``outq``, in stream order, an END marker behind the bytes before
   it), written by one writer greenlet, so control frames (PING, END, ABORT) never wait behind
   a stalled plain end. Acknowledgements cover only units handed on (``Stream.held`` are
   not), so the peer's limit bounds the queue; past this end's own limit the link is not
   read until it drains. Frames go out whole and in as few writes as the stream allows:
   acks ride on data, a standalone ACK only for data that waited ``ACK_DELAY`` or after
   ``ACK_EVERY`` bytes (a forwarder without TCP_NODELAY holds a small write behind an
   unacknowledged one for its delayed ACK).
"""

from __future__ import annotations

import atexit
import errno
import hmac
import ipaddress
import logging
import os
import socket as _stdsocket
import struct
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.socket as gsocket
from gevent._hub_primitives import wait_on_watcher as _wait_on_watcher

from . import _session as sp
from ._policy import RetryPolicy

__all__ = ["Relay", "open_session", "set_session_targets", "is_session_target",
           "parse_address"]

log = logging.getLogger("resilientsock")

RECV_SIZE = 256 * 1024  # big reads: fewer frames, fewer syscalls (picked, measured in bench)
BIG_WRITE = 16 * 1024  # from here on a header and its payload go out as two buffers (no copy)
ACK_EVERY = 256 * 1024  # a standalone ACK once this much is unacknowledged (picked)
# ... or this long after data arrived with nothing to piggyback on: TCP's own delayed ACK (200
# ms, RFC 1122's bound). Short delays cost more than they save: a standalone ACK followed
# within the path's delayed-ACK time (40 ms on Linux) by a DATA frame holds that DATA behind
# Nagle's algorithm on any forwarder without TCP_NODELAY (measured: 0.02x ping-pong at 20 ms,
# whose timer also fired at once on the loop's stale clock). Acks ride on data otherwise.
ACK_DELAY = 0.2
HANDSHAKE_TIMEOUT = 10.0  # docs/design.md §11
LINK_TIMEOUT = 30.0  # the relay's liveness bound for a silent client link (docs/design.md §11)
# The upstream connect has its own bound, well inside the handshake's: a black-holed upstream
# reaches the client as an ERROR naming it, not as the handshake's timeout (#26).
UPSTREAM_CONNECT_TIMEOUT = 5.0
CREATION_HOLD = 5.0  # a session whose client never showed it got CREATED: held this long
_LINGER_RST = struct.pack("ii", 1, 0)
_DUMMY_SECRET = os.urandom(sp.SECRET_LEN)  # for unknown ids: same cost, always False
_DUMMY_ID = os.urandom(sp.NONCE_LEN)
_PLAIN_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF)


def parse_address(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[IPv6]:PORT"`` to ``(host, port)``; ValueError naming ``text``."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r}: expected a 'HOST:PORT' string")
    raw = text.strip()
    if raw.startswith("["):
        host, sep, port = raw[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [IPv6]:PORT")
    else:
        host, sep, port = raw.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{text!r}: expected HOST:PORT (IPv6 as [::1]:PORT)")
    if not host:
        raise ValueError(f"{text!r}: the host is empty")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return host, int(port)


def _addr(value: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(value, tuple):
        return value[0], int(value[1])
    return parse_address(value)


def _abort(sock: Any) -> None:
    """Close with RST (SO_LINGER 0): the peer's next recv raises ConnectionResetError."""
    if sock is None:
        return
    try:
        sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    sock.close()


def _nodelay(sock: Any) -> None:
    try:
        sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
    except OSError:
        pass


def _fileno(sock: Any) -> int:
    """The descriptor's number: the kernel hands out the lowest free one, so a high number
    means about that many are open (the relay's cheap check of its descriptor reserve)."""
    try:
        return int(sock.fileno())
    except (OSError, ValueError):
        return 0


class _ReadTimedOut(Exception):
    """Internal: the session socket's own timeout ran out in a read open to a handoff (told
    apart from any TimeoutError the application's own gevent.Timeout throws)."""


HANDOFF_MAX = 16 * 1024  # a front this small fits an empty pair whole (rule 8; picked)
_IOV_BATCH = 64  # at most this many buffers to one sendmsg (IOV_MAX is 1024 on Linux)


def _sendall_views(sock: Any, parts: list[Any]) -> None:
    """``sendall`` of several buffers, in order: one ``sendmsg`` where the socket has it (no
    copy, one syscall), a joined copy otherwise (a TLS socket)."""
    if hasattr(sock, "cipher") or not hasattr(sock, "sendmsg"):
        sock.sendall(b"".join(parts))
        return
    if len(parts) > _IOV_BATCH:  # many small frames: one copy beats IOV_MAX slices
        sock.sendall(b"".join(parts))
        return
    bufs = [memoryview(p) for p in parts]
    while bufs:
        _advance(bufs, sock.sendmsg(bufs))  # gevent's: waits for the socket, its timeout


def _recv_ready(sock: Any, size: int, drained: bool) -> bytes:
    """``sock.recv(size)``; when the last read was short (``drained``: it took all the socket
    had, and that was a message, not a stream's worth: under ``BIG_WRITE``), waiting for the
    socket to be readable first, without the read that would only fail with EAGAIN (a
    syscall and an exception a message; the loop's readiness is level-triggered: bytes, an
    EOF or an error that came meanwhile wake the wait at once). A stream read on at once."""
    if drained and sock.timeout != 0.0:
        watcher = sock._read_event
        if watcher is None:  # closed under us by another greenlet
            raise OSError(errno.EBADF, "the socket was closed")
        _wait_on_watcher(watcher, sock.timeout, hub=sock.hub)
        try:
            return sock._sock.recv(size)  # type: ignore[no-any-return]
        except BlockingIOError:
            pass  # readable, and then not (another reader?): gevent's read waits again
    return sock.recv(size)  # type: ignore[no-any-return]


def _wait_timed(watcher: Any, timeout: float, hub: Any) -> None:
    """Wait for ``watcher`` as gevent's socket does with a timeout (``_ReadTimedOut`` when it
    runs out), the timeout a bare loop timer instead of a ``gevent.Timeout``: the same timer
    (priority -1, started on the loop's updated clock) without the nine Python calls around
    it, on every read of a request/answer loop."""
    timer = hub.loop.timer(timeout, priority=-1)
    timer.start(gevent.getcurrent().throw, _ReadTimedOut(), update=True)
    try:
        _wait_on_watcher(watcher, None, hub=hub)
    finally:
        timer.close()


def _advance(bufs: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes a ``sendmsg`` sent from the front of ``bufs``."""
    while n and bufs:
        if n >= len(bufs[0]):
            n -= len(bufs.pop(0))
        else:
            bufs[0] = bufs[0][n:]
            n = 0


class _Interrupted(BaseException):
    """Internal: a write was interrupted after its frames were handed to a greenlet that
    finishes them and releases the link's lock; ``exc`` is re-raised to the caller."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.exc = exc


class _LinkIO:
    """One connection between client and relay: its socket, its protocol ``Link``, and the
    lock that keeps one frame from interleaving with another (two greenlets write)."""

    __slots__ = ("sock", "link", "wlock", "alive", "tls", "heard", "beat", "drained")

    def __init__(self, sock: Any, link: sp.Link) -> None:
        self.sock = sock
        self.link = link
        self.wlock = gevent.lock.Semaphore()
        self.alive = True
        self.heard = time.monotonic()  # when bytes last came (the heartbeat's timer reads it)
        self.beat: Any = None  # that timer, while a pump reads the link
        self.drained = False  # the last read was a message's: the socket had no more (_recv_ready)
        # Read once, while the socket is open (a closed one raises from __getattr__).
        self.tls = hasattr(sock, "cipher")

    def close(self, rst: bool = False) -> None:
        self.alive = False
        beat, self.beat = self.beat, None
        if beat is not None:
            beat.close()
        if rst:
            _abort(self.sock)
        else:
            self.sock.close()


class _Carrier:
    """A session's stream between a plain end and the current link (rule 1)."""

    __slots__ = ("stream", "plain", "cur", "room_ev", "ack_armed", "ack_mark", "ack_timer",
                 "finished", "aborted", "plain_reader", "plain_lock", "outq", "outq_bytes",
                 "writer", "drained_ev", "heartbeat", "waiting_pong", "__weakref__")

    side = "?"

    def __init__(self, stream: sp.Stream, plain: Any) -> None:
        self.stream = stream
        self.plain = plain
        self.cur: _LinkIO | None = None
        self.room_ev = gevent.event.Event()
        self.ack_armed = False
        self.ack_mark = 0  # the count received when the delayed-ACK timer was armed
        self.ack_timer: Any = None  # the hub's timer for a delayed ACK (made on first use)
        self.finished = False
        self.aborted: str | None = None  # an ABORT to (re)send until the session is gone
        self.plain_reader: Any = None
        # One writer at a time on the plain end, in stream order.
        self.plain_lock = gevent.lock.Semaphore()
        # The delivery queue (rule 9): what the plain end did not take at once, in stream
        # order (payloads, and an Ended marker last), written by ``writer`` while the link
        # goes on being read. Its units are ``stream.held``: not acknowledged until written.
        self.outq: deque[Any] = deque()
        self.outq_bytes = 0
        self.writer: Any = None
        self.drained_ev = gevent.event.Event()
        # Liveness of the link: PING after ``heartbeat`` s of silence, a drop after two.
        self.heartbeat: float | None = None
        self.waiting_pong = False

    # -- sending on the current link (rule 2) ----------------------------------------------

    def _send(self, lio: _LinkIO | None, frames: bytes) -> None:
        """Send ``frames`` (control frames: DATA goes through ``_send_data``) on ``lio`` if it
        is still the current link (rule 2)."""
        if lio is None or not lio.alive or not frames:
            return
        with lio.wlock:
            if lio is not self.cur or not lio.alive:
                return
            try:
                lio.sock.sendall(frames)
            except (OSError, ValueError):  # ValueError: an SSL socket closed under us
                self._link_lost(lio, "send failed")

    def direct_write(self, data: Any, timeout: float | None, whole: bool) -> int:
        """The application's bytes framed straight onto the link (rule 7): no trip through
        the local pair. Returns how many bytes were taken (for ``whole``, all of them or what
        was taken before this end of the session was over), or -1 when it was over before any
        byte: the caller then writes the rest to its socket, which shows what a plain socket
        would (EPIPE after a shutdown, a reset when the session is gone: the pair's other end
        is closed or reset). Bytes taken are in the stream: carried exactly once, whatever the
        link does next. Blocks while ``limit`` bytes are unacknowledged (backpressure) or
        another write holds the link, at most ``timeout`` seconds: then ``TimeoutError`` (a
        partial ``send`` returns what it took instead)."""
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        total = len(view)
        if not total:
            return 0
        stream = self.stream
        end = None if timeout is None else time.monotonic() + timeout
        done = 0
        while done < total:
            if self._over():
                return done if done else -1
            room = stream.room()
            # (The first chunk, with room for it, goes without a look at the clock.)
            left = None if end is None or (room > 0 and not done) else end - time.monotonic()
            if room <= 0 or (left is not None and left <= 0):
                if left is not None and left <= 0:
                    if done and not whole:
                        return done
                    raise TimeoutError("timed out")
                self.room_ev.clear()
                self.room_ev.wait(left)
                continue
            n = min(total - done, room, sp.MAX_DATA)
            taken = self._send_data(view[done:done + n], end)
            if taken is None:
                return done if done else -1
            if not taken:
                continue  # the link stayed busy past the time left: the check above raises
            done += n
            if not whole:
                break
        return done

    def _over(self) -> bool:
        return self.finished or self.aborted is not None or self.stream.end_sent is not None

    def direct_end(self) -> None:
        """The application shut down its writing end: END, behind its bytes."""
        if not self._over():
            self._end_here(False, "")

    def _send_built(self, build: Any) -> None:
        """Send the frames ``build()`` returns on the current link, built under its lock so
        that the stream's order is the wire's (rule 7); with no link, build only (the resume
        sends them)."""
        while True:
            lio = self.cur
            if lio is None or not lio.alive:
                build()
                return
            with lio.wlock:
                if lio is not self.cur or not lio.alive:
                    continue
                frames = build()
                if frames:
                    try:
                        lio.sock.sendall(frames)
                    except (OSError, ValueError):
                        self._link_lost(lio, "send failed")
                return

    def _send_data(self, chunk: memoryview, end: float | None) -> bool | None:
        """``chunk`` into the stream and onto the current link, framed under the link's lock
        (rule 7); with no link, into the stream only (the resume sends it). False: the link's
        lock was not free before ``end`` (monotonic; nothing taken); None: this end of the
        session is over (nothing taken)."""
        stream = self.stream
        while True:
            if self._over():
                return None
            lio = self.cur
            if lio is None or not lio.alive:
                stream.data(chunk)
                return True
            waited = not lio.wlock.acquire(blocking=False)
            if waited:
                wait = None if end is None else max(0.0, end - time.monotonic())
                if not lio.wlock.acquire(timeout=wait):
                    return False
            handed = False
            try:
                if waited and (lio is not self.cur or not lio.alive):
                    continue  # replaced while we waited: the new link (or none)
                if waited and self._over():
                    return None
                if len(chunk) >= BIG_WRITE:
                    parts = [stream.data_header(chunk), chunk]
                else:
                    parts = [stream.data(chunk)]
                try:
                    handed = self._push(lio, parts, end)
                except _Interrupted as interrupted:
                    handed = True  # a greenlet finishes the frame and releases the lock
                    raise interrupted.exc.with_traceback(interrupted.exc.__traceback__) \
                        from None
                return True
            finally:
                if not handed:
                    lio.wlock.release()

    def _push(self, lio: _LinkIO, parts: list[Any], end: float | None) -> bool:
        """Send ``parts`` on ``lio`` (its lock held) in the caller's greenlet, waiting for the
        link while the caller's time lasts (``end``, monotonic; None: no limit) and a link
        silent for a heartbeat is lost. When the time runs out, or the wait is interrupted
        (``gevent.Timeout``, a kill), with frames not wholly sent, the rest is copied and
        finished by a greenlet that then releases the lock (True): a frame is never left half
        sent, and the bytes are in the stream whatever the caller does next. A TLS link is
        written by that greenlet, which the caller waits for while its time lasts."""
        if len(parts) == 1 and not lio.tls:
            # The hot path: one small frame, taken whole by the socket (the usual case).
            frame = parts[0]
            try:
                n = lio.sock._sock.send(frame)
            except BlockingIOError:
                n = 0
            except OSError:
                self._link_lost(lio, "send failed")
                return False
            if n == len(frame):
                return False
            parts = [memoryview(frame)[n:]]
        if lio.tls:
            worker = gevent.spawn(self._finish_push, lio, [bytes(p) for p in parts])
            try:
                worker.join(None if end is None else max(0.0, end - time.monotonic()))
            except BaseException as exc:
                raise _Interrupted(exc) from None  # the worker carries on, releases the lock
            return True
        raw = lio.sock._sock
        heartbeat = lio.sock.timeout
        bufs = [memoryview(p) for p in parts]
        try:
            while True:
                try:
                    # One syscall for a header and its payload, and no copy of either.
                    n = raw.sendmsg(bufs) if len(bufs) > 1 else raw.send(bufs[0])
                except BlockingIOError:
                    n = 0
                except OSError:
                    self._link_lost(lio, "send failed")
                    return False
                _advance(bufs, n)
                if not bufs:
                    return False
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    gevent.spawn(self._finish_push, lio, [bytes(b) for b in bufs])
                    return True
                wait = heartbeat if left is None else (
                    left if heartbeat is None else min(left, heartbeat))
                watcher = lio.sock._write_event  # the socket's own (wait_write makes one)
                if watcher is None:  # closed under us by another greenlet
                    self._link_lost(lio, "send failed")
                    return False
                try:
                    _wait_on_watcher(watcher, wait, hub=lio.sock.hub)
                except TimeoutError:
                    if left is not None and left <= wait:
                        continue  # the caller's time is up: the check above hands over
                    self._link_lost(lio, f"send: link silent for {wait:g} s")
                    return False
                except (OSError, ValueError):  # closed under us by another greenlet
                    self._link_lost(lio, "send failed")
                    return False
        except BaseException as exc:
            if bufs and lio.alive:  # interrupted mid-frame: finish it, then release the lock
                gevent.spawn(self._finish_push, lio, [bytes(b) for b in bufs])
                raise _Interrupted(exc) from None
            raise

    def _send_now(self, lio: _LinkIO, frames: bytes) -> bool:
        """``frames`` on ``lio`` (its lock held) if the socket takes them whole without
        waiting: then the lock is released and True. Otherwise nothing is sent (False)."""
        raw = None if lio.tls else getattr(lio.sock, "_sock", None)
        if raw is None or len(frames) > BIG_WRITE:
            return False
        try:
            n = raw.send(frames)
        except BlockingIOError:
            n = 0
        except OSError:
            lio.wlock.release()
            self._link_lost(lio, "send failed")
            return True
        if n < len(frames):
            if n:  # the rest behind it, at the link's pace
                gevent.spawn(self._finish_push, lio, [frames[n:]])
                return True
            return False
        lio.wlock.release()
        return True

    def _finish_push(self, lio: _LinkIO, rest: list[Any]) -> None:
        """Send ``rest`` on ``lio`` (its lock held; released here) at the link's pace: each
        ``send`` waits at most the socket's timeout (the heartbeat) for room, so a big
        re-send on a slow path is progress, never a deadline."""
        try:
            for part in rest:
                view = memoryview(part)
                while len(view):
                    n = lio.sock.send(view[:RECV_SIZE])
                    view = view[n:]
        except (OSError, ValueError):
            self._link_lost(lio, "send failed")
        finally:
            lio.wlock.release()

    def _link_lost(self, lio: _LinkIO, why: str) -> None:
        """The link broke: forget it (the session waits for, or makes, a new one)."""
        self.drained_ev.set()  # a pump_link waiting for the queue to drain returns
        if self.cur is lio:
            self.cur = None
            lio.close()
            self.on_detached(why)
        elif lio.alive:
            lio.close()

    def on_detached(self, why: str) -> None:  # overridden
        pass

    # -- the plain end -> frames -------------------------------------------------------------

    def pump_plain(self) -> None:
        """Read the plain end into DATA frames until it ends (then an END frame)."""
        stream = self.stream
        plain = self.plain
        drained = False
        while not self.finished:
            room = stream.room()
            if room <= 0:
                self.room_ev.clear()
                self.room_ev.wait()  # set by pump_link when acks make room, or by finish()
                continue
            size = min(RECV_SIZE, room)
            try:
                data = _recv_ready(plain, size, drained)
                drained = len(data) < min(size, BIG_WRITE)
            except OSError as exc:
                if self.finished or self.aborted:
                    return
                self._end_here(True, f"{self.side} reset ({exc.__class__.__name__})")
                return
            if stream.end_sent is not None:
                return
            if not data:
                self._end_here(False, "")
                return
            self.count_plain(len(data))
            # Framed under the link's lock, as the application's direct writes are (rule 7).
            self._send_data(memoryview(data), None)

    def count_plain(self, n: int) -> None:  # overridden
        pass

    def count_queued(self, n: int) -> None:  # overridden: the relay's total of delivery queues
        pass

    def _end_here(self, reset: bool, reason: str) -> None:
        self._send_built(lambda: self.stream.end(reset, reason))
        self.plain_ended(reset)
        self._maybe_finish()

    def plain_ended(self, reset: bool) -> None:  # overridden
        pass

    # -- frames -> the plain end --------------------------------------------------------------

    def pump_link(self, lio: _LinkIO) -> None:
        """Obey the frames on ``lio`` (those already buffered first) until the link breaks or
        the session ends."""
        link = lio.link
        stream = self.stream
        # The DATA of one received chunk goes to the plain end in one write (the payloads are
        # views of that chunk), or to the delivery queue behind what waits there (rule 9):
        # counted as received when parsed, so handed on before any other event is obeyed
        # and before anything else can return.
        batch: list[Any] = []
        fast: memoryview | None = None  # a chunk that was one whole DATA frame: its payload
        while lio.alive and not self.finished:
            if fast is not None:  # nothing else came with it: no events to parse
                size = len(fast)
                stream.held += size
                self._hand_on(fast, size)
            while fast is None:
                if lio is not self.cur:
                    # Replaced by a resume while this pump waited: the frames still buffered
                    # here are the new link's to re-send (counted from the resume's numbers);
                    # parsing them now would deliver them twice (rule 2).
                    return
                try:
                    ev = link.next_event()
                except sp.Refused as exc:
                    self._deliver_batch(batch)
                    self.on_refused(lio, exc)
                    return
                except sp.ProtocolError as exc:
                    self._deliver_batch(batch)
                    log.warning("resilientsock: %s session link: protocol error: %s",
                                self.side, exc.reason)
                    self._link_lost(lio, f"protocol error: {exc.reason}")
                    return
                if isinstance(ev, sp.Data):
                    batch.append(ev.payload)
                    continue
                self._deliver_batch(batch)
                if ev is sp.NEED_DATA:
                    break
                if isinstance(ev, sp.Ended):
                    stream.held += 1  # the end marker's unit, acknowledged once obeyed
                    if self.outq or self.writer is not None:
                        self.outq.append(ev)  # behind the bytes before it
                    else:
                        self._apply_end(ev)
                elif isinstance(ev, sp.Aborted):
                    self.on_aborted(ev.reason)
                    return
                elif isinstance(ev, sp.Ping):
                    self._send(lio, stream.pong())
            fast = None
            if not self.room_ev.ready() and stream.room() > 0:
                self.room_ev.set()
            due = stream.received - stream.held - stream.ack_sent  # stream.ack_due()
            if due >= ACK_EVERY:
                self._send(lio, stream.ack())
            elif due and not self.ack_armed:
                self._arm_ack()
            if ((stream.end_sent is not None or stream.end_received is not None
                 or self.finished) and self._maybe_finish()) or not lio.alive:
                return  # (no end marker either way: nothing to finish, no call)
            # Read on while the plain end is stalled (PINGs answered, ENDs and ABORTs seen:
            # rule 9), unless the queue outgrew the limit (a peer that ignores acks): then
            # wait for it to drain, or for this link to be lost or replaced.
            while (self.outq_bytes > stream.limit and lio is self.cur and lio.alive
                   and not self.finished):
                self.drained_ev.clear()
                self.drained_ev.wait()
            if lio is not self.cur or not lio.alive or self.finished:
                return
            try:
                data = self.recv_link(lio)
            except (OSError, ValueError) as exc:  # ValueError: an SSL socket closed under us
                self._link_lost(lio, f"recv: {exc}")
                return
            if not data:
                self._link_lost(lio, "closed by peer")
                return
            if lio is self.cur:
                # The hot path: a chunk that is one whole DATA frame (a request, an answer)
                # is handed on without events; anything else is parsed frame by frame.
                try:
                    fast = link.data_frame(data)
                except sp.ProtocolError as exc:
                    log.warning("resilientsock: %s session link: protocol error: %s",
                                self.side, exc.reason)
                    self._link_lost(lio, f"protocol error: {exc.reason}")
                    return
                if fast is not None:
                    continue
            link.receive_data(data)

    def recv_link(self, lio: _LinkIO) -> bytes:
        """The next bytes of the link. The heartbeat (``heartbeat``, the link socket's
        timeout): a link silent for one interval gets a PING; silent for another, it is a
        drop (a black hole, or a peer stopped without FIN or RST, reveals itself only this
        way). Any bytes count as life: a big re-send or a stalled plain end is not death.

        On a TCP link the heartbeat is one timer per link (``_beat``), not a timeout armed
        and cancelled around every read: a message costs a clock read here, no timer."""
        if not lio.tls and self.heartbeat:
            raw = lio.sock._sock
            wait_first = lio.drained  # (see _recv_ready)
            while True:
                if not wait_first:
                    try:
                        data = raw.recv(RECV_SIZE)
                    except BlockingIOError:
                        pass
                    else:
                        self.waiting_pong = False
                        lio.heard = time.monotonic()
                        lio.drained = len(data) < BIG_WRITE
                        if lio.beat is None:
                            self._arm_beat(lio, self.heartbeat)
                        return data  # type: ignore[no-any-return]
                wait_first = False
                watcher = lio.sock._read_event
                if watcher is None:  # closed under us by another greenlet
                    raise OSError(errno.EBADF, "the link was closed")
                if lio.beat is None:
                    self._arm_beat(lio, self.heartbeat)
                # Woken by bytes, by a close (OSError), or by the heartbeat (TimeoutError).
                _wait_on_watcher(watcher, None, hub=lio.sock.hub)
        while True:
            try:
                data = lio.sock.recv(RECV_SIZE)
            except TimeoutError:
                if self.waiting_pong:
                    raise TimeoutError(f"peer silent for {2 * (self.heartbeat or 0):.1f} s"
                                       ) from None
                self.waiting_pong = True
                self._send(lio, self.stream.ping())
                continue
            self.waiting_pong = False
            return data  # type: ignore[no-any-return]

    def _arm_beat(self, lio: _LinkIO, delay: float) -> None:
        # A new timer each time (see _arm_ack); update=True: the loop's clock may be stale.
        if lio.beat is not None:
            lio.beat.close()
        timer = lio.beat = gevent.get_hub().loop.timer(delay)
        timer.start(self._beat, lio, update=True)

    def _beat(self, lio: _LinkIO) -> None:
        """In the hub (no I/O here): the heartbeat of a TCP link (``recv_link``), exactly as
        the socket's timeout would have it: a PING once the link was silent for
        ``heartbeat``, a drop once it stays silent for another (thrown into the read)."""
        timer, lio.beat = lio.beat, None
        if timer is not None:
            timer.close()
        heartbeat = self.heartbeat
        if lio is not self.cur or not lio.alive or self.finished or not heartbeat:
            return
        silent = time.monotonic() - lio.heard
        if silent < heartbeat:
            self._arm_beat(lio, heartbeat - silent)
            return
        if not self.waiting_pong:
            self.waiting_pong = True
            gevent.spawn(self._ping, lio)
        else:
            watcher = lio.sock._read_event
            waiter = getattr(watcher and watcher.callback, "__self__", None)
            if waiter is not None:  # the pump is waiting to read: thrown in now, as a
                # socket timeout is (from its timer, in the hub; no callback between)
                waiter.throw(TimeoutError(f"peer silent for {2 * heartbeat:.1f} s"))
                return
        self._arm_beat(lio, heartbeat)

    def _ping(self, lio: _LinkIO) -> None:
        self._send(lio, self.stream.ping())

    def _arm_ack(self) -> None:
        """The delayed ACK: a timer in the hub, not a greenlet per chunk; in a conversation
        the answer carries the ack first, and the timer then finds nothing to send."""
        self.ack_armed = True
        self.ack_mark = self.stream.ack_point
        # A new timer each time: gevent's libev timer restarted after it fired fires again at
        # once (measured, gevent 26.9), and update=True: the loop's cached clock may be stale
        # by however long this greenlet ran (a timer started on it fires early).
        if self.ack_timer is not None:
            self.ack_timer.close()
        timer = self.ack_timer = gevent.get_hub().loop.timer(ACK_DELAY)
        timer.start(self._ack_timer_fired, update=True)

    def _ack_timer_fired(self) -> None:
        """In the hub (no I/O here): a standalone ACK only for data that waited ACK_DELAY
        unacknowledged. Data that came since (the ack for the older rode an answer) gets a
        timer of its own: an ACK right behind fresh data would hold the answer to it behind
        Nagle's algorithm on a forwarder without TCP_NODELAY."""
        self.ack_armed = False
        if self.finished:
            return
        stream = self.stream
        if stream.ack_sent < self.ack_mark:
            gevent.spawn(self._delayed_ack)
        elif stream.ack_due():
            # Re-armed from a loop callback, outside this timer's own.
            gevent.get_hub().loop.run_callback(self._rearm_ack)

    def _rearm_ack(self) -> None:
        if not self.ack_armed and not self.finished and self.stream.ack_due():
            self._arm_ack()

    def _delayed_ack(self) -> None:
        if self.stream.ack_due() and not self.finished:
            self._send(self.cur, self.stream.ack())

    def _deliver_batch(self, batch: list[Any]) -> None:
        if batch:
            payload = batch[0] if len(batch) == 1 else list(batch)
            batch.clear()
            size = sum(map(len, payload)) if isinstance(payload, list) else len(payload)
            self.stream.held += size
            self._hand_on(payload, size)

    def _hand_on(self, payload: Any, size: int) -> None:
        """``payload`` (``size`` units, counted in ``stream.held``) to the plain end: at once
        what it takes without waiting when nothing is queued, the rest behind the queue,
        written by the writer greenlet (rule 9). Never blocks."""
        if not self.outq and self.writer is None:
            done = self._deliver(payload, block=False)
            if done:
                self._delivered(done)
            if done >= size:
                return
            if done:
                payload = memoryview(b"".join(payload) if isinstance(payload, list)
                                     else payload)[done:]
                size -= done
        # A view of a received chunk stays valid: the parser never reuses a chunk's memory.
        self.outq.append(payload)
        self.outq_bytes += size
        self.count_queued(size)
        if self.writer is None:
            self.writer = gevent.spawn(self._write_queue)

    def _write_queue(self) -> None:
        """The writer greenlet: the queue to the plain end, in order, blocking as the plain
        end does; each payload acknowledged once written."""
        outq = self.outq
        try:
            while outq and not self.finished:
                item = outq[0]
                if isinstance(item, sp.Ended):
                    outq.popleft()
                    self._apply_end(item)
                    continue
                size = sum(map(len, item)) if isinstance(item, list) else len(item)
                self._deliver(item)
                if outq and outq[0] is item:
                    outq.popleft()
                    self.outq_bytes -= size
                    self.count_queued(-size)
                self._delivered(size)
                self._ack_if_due()
        finally:
            self.writer = None
            self.drained_ev.set()

    def _delivered(self, n: int) -> None:
        self.stream.held -= n
        if self.outq_bytes <= self.stream.limit:
            self.drained_ev.set()

    def _ack_if_due(self) -> None:
        due = self.stream.ack_due()
        if due >= ACK_EVERY:
            self._send(self.cur, self.stream.ack())
        elif due and not self.ack_armed and not self.finished:
            self._arm_ack()

    def _apply_end(self, ev: sp.Ended) -> None:
        """The peer's end marker, obeyed after every byte before it, then acknowledged."""
        self._peer_ended(ev)
        self.stream.held -= 1
        self._send(self.cur, self.stream.ack())
        self._maybe_finish()

    def _deliver(self, payload: bytes | memoryview | list[Any], block: bool = True) -> int:
        """Write ``payload`` (or a list of payloads, in order) to the plain end: whole
        (``block``), or what it takes without waiting. Returns the bytes taken; all of them
        when the plain end is gone (they are dropped: its failure is handled here)."""
        size = sum(map(len, payload)) if isinstance(payload, list) else len(payload)
        if not block and not self.plain_lock.acquire(blocking=False):
            return 0
        if block:
            self.plain_lock.acquire()
        failed: OSError | None = None
        try:
            plain = self.plain
            if plain is None or self.aborted:
                return size
            try:
                if block:
                    if isinstance(payload, list):
                        _sendall_views(plain, payload)
                    else:
                        plain.sendall(payload)
                    return size
                raw = getattr(plain, "_sock", None)
                if raw is None:
                    return 0
                try:
                    if isinstance(payload, list):
                        if len(payload) > _IOV_BATCH:
                            return 0
                        return raw.sendmsg(payload)  # type: ignore[no-any-return]
                    return raw.send(payload)  # type: ignore[no-any-return]
                except BlockingIOError:
                    return 0
            except OSError as exc:
                failed = exc
                return size
        finally:
            self.plain_lock.release()
            if failed is not None:
                self.plain_write_failed(failed)

    def plain_write_failed(self, exc: OSError) -> None:
        """The plain end cannot take more: it is gone. End our direction with a reset if it is
        still open; otherwise abort the session (the peer must stop feeding it)."""
        if self.finished:
            return
        reason = f"{self.side} end closed ({exc.__class__.__name__})"
        if self.stream.end_sent is None:
            self._end_here(True, reason)
        else:
            self._send_abort(reason)

    def _send_abort(self, reason: str) -> None:
        self.aborted = reason
        self._send(self.cur, self.stream.abort(reason))
        self.finish(abort_plain=True)

    def _peer_ended(self, ev: sp.Ended) -> None:
        with self.plain_lock:  # after every byte before the end marker
            plain = self.plain
            if plain is None:
                return
            if ev.reset:
                self.plain = None
                _abort(plain)
                return
            try:
                plain.shutdown(gsocket.SHUT_WR)
            except OSError:
                pass

    def on_aborted(self, reason: str) -> None:
        self.finish(abort_plain=True)

    def on_refused(self, lio: _LinkIO, exc: sp.Refused) -> None:
        self._link_lost(lio, str(exc))

    def _maybe_finish(self) -> bool:
        stream = self.stream
        if stream.end_sent is not None and stream.end_received is not None \
                and not stream.held and self.plain is not None:
            plain, self.plain = self.plain, None  # both directions over at the plain end
            plain.close()
        if stream.done and not self.finished:
            self.finish(abort_plain=False)
            return True
        return self.finished

    def finish(self, abort_plain: bool) -> None:
        """The session is over at this end: close the link and the plain end."""
        if self.finished:
            return
        self.finished = True
        self.room_ev.set()
        self.drained_ev.set()
        self.outq.clear()
        self.count_queued(-self.outq_bytes)
        self.outq_bytes = 0
        timer, self.ack_timer = self.ack_timer, None
        if timer is not None:
            timer.close()
        lio, self.cur = self.cur, None
        if lio is not None:
            lio.close()
        plain, self.plain = self.plain, None
        if plain is not None:
            if abort_plain:
                _abort(plain)
            else:
                plain.close()
        self.on_finished()

    def on_finished(self) -> None:  # overridden
        pass


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
            if freed and relay.starved:
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
        if relay.starved:
            relay.wake_starved()


class _Source:
    """What the relay knows about one client address (admission, failures)."""

    __slots__ = ("sessions", "fresh", "failures", "window", "slow_until", "connecting")

    def __init__(self) -> None:
        self.sessions = 0  # sessions created from here and not finished
        self.connecting = 0  # creations admitted, their upstream connect under way
        self.fresh: list[_RelaySession] = []  # creations not yet shown alive (oldest first)
        self.failures = 0  # failed handshakes in the current window
        self.window = 0.0
        self.slow_until = 0.0


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
        """True while nothing shows the client ever received CREATED: no byte and no ack from
        it, no resume (which needs the secret). Such a session may be handed to a retry of
        its creation (CREATED again, every byte re-sent from 0) or evicted when it is also
        detached: its client cannot have used it."""
        stream = self.stream
        return not (self.resumes or stream.received or stream.acked or self.finished)

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
        lio.wlock.acquire()
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
            # Counted as received at the handshake, so delivered whatever this link does
            # next: behind what the old link queued, before anything this one carries.
            self.stream.held += len(early)
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
        self.relay.queued += n

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
        self.listen = _addr(listen)
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
             "creations_abandoned", "evictions", "late_preambles", "slowed_connections",
             "plain_refusals"), 0)
        self.buffered = 0  # unacknowledged bytes across all sessions (see _RelayStream)
        self.queued = 0  # bytes from clients waiting in sessions' delivery queues upstream
        self.starved: set[_RelaySession] = set()
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
        from .testing._loop import LoopThread

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
                    and now - src.window >= FAIL_WINDOW and now >= src.slow_until:
                del self._sources[key]

    def wake_starved(self) -> None:
        starved, self.starved = self.starved, set()
        for session in starved:
            session.room_ev.set()

    def forget(self, session: _RelaySession) -> None:
        """A session is finished: its bookkeeping goes."""
        if self._creating.get(session.nonce) is session:
            del self._creating[session.nonce]
        src = self._sources.get(session.source)
        if src is not None:
            src.sessions -= 1
            if session in src.fresh:
                src.fresh.remove(session)
        self.starved.discard(session)
        stream = session.stream
        if isinstance(stream, _RelayStream):
            stream.release()

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
        try:
            serve = self._handle_inner(sock, source)
        finally:
            self._pending.discard(sock)
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
        link = sp.Link(sp.RELAY)
        first = b""
        # Plain or session? Wait plain_after for the client's first bytes (server-first
        # protocols say nothing until greeted: proxy those plainly, but watch their first
        # bytes: a session client slower than plain_after is refused there, never forwarded).
        try:
            with gevent.Timeout(self.plain_after):
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
            return lambda: self._proxy_plainly(sock, b"", sniff=True)
        if sp.preamble_verdict(first) is not False and not self._pace(source):
            sock.close()  # a session handshake from a source that failed too often
            return None
        link.receive_data(first)
        timer = gevent.Timeout(self.handshake_timeout)
        timer.start()
        try:
            serve = self._handshake(sock, link, source)
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
        return serve

    def _read_event(self, sock: Any, link: sp.Link) -> Any:
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

    def _handshake(self, sock: Any, link: sp.Link,
                   source: str = "") -> Callable[[], None] | None:
        """The handshake on a new connection; returns what serves it afterwards (None: it
        was rejected or closed)."""
        try:
            ev = self._read_event(sock, link)
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
            return self._create(sock, link, ev, source)
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
                ev = self._read_event(sock, link)
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

    def _create(self, sock: Any, link: sp.Link, ev: Any,
                source: str = "") -> Callable[[], None] | None:
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
            upstream, code, why = self._connect_upstream()
        finally:
            src.connecting -= 1
            self._connecting -= 1
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

    def _proxy_plainly(self, client: Any, first: bytes, sniff: bool = False) -> None:
        """Proxy a plain client. ``sniff`` (it was silent for ``plain_after``): its first
        bytes are held until they cannot be the session preamble; a session client that was
        merely slow is refused there (a reset: it retries), never forwarded (#25)."""
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
        state = {"eofs": 0}
        down = gevent.spawn(self._pump_plain, upstream, client, state, "bytes_down")
        if sniff:
            kind, first = self._sniff(client)
            if kind != "plain":
                down.kill()
                self._plain_socks.difference_update((client, upstream))
                if kind == "session":
                    self.counters["late_preambles"] += 1
                    self._log_throttled("late_preamble", "a session client's first bytes "
                                        f"came after plain_after ({self.plain_after} s): "
                                        "refused (it retries), nothing forwarded")
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
        bytes to forward; b"" at its EOF), ("session", b"") when they are the preamble, or
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
                    return "session", b""
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

    def _pump_plain(self, source: Any, target: Any, state: dict[str, int],
                    counter: str) -> None:
        """Copy ``source`` to ``target``: a FIN is passed on as a FIN, a reset as a reset."""
        counters = self.counters
        while True:
            try:
                data = source.recv(RECV_SIZE)
            except OSError:
                data = None
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


# =============================================================================================
# The client side

_targets: frozenset[tuple[str, int]] = frozenset()
_session_ssl: Any = None


def set_session_targets(targets: Iterable[str] | None) -> None:
    """Connections to these ``"HOST:PORT"`` targets (IPv6 as ``[::1]:PORT``) become sessions;
    None or [] turns session mode off. ValueError naming the bad entry, and then nothing
    changes."""
    global _targets
    if targets is None:
        _targets = frozenset()
        return
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t.strip()]
    parsed = set()
    for entry in targets:
        try:
            host, port = parse_address(entry)
        except ValueError as exc:
            raise ValueError(f"session target {exc}") from None
        if port == 0:
            raise ValueError(f"session target {entry!r}: port 0 is not a server")
        parsed.add((host.lower(), port))
    _targets = frozenset(parsed)


def session_targets() -> list[str]:
    return sorted(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in _targets)


def set_session_tls(context: Any) -> None:
    """An ``ssl.SSLContext`` for TLS between client and relay (None: plain TCP). The
    application's own TLS to its server rides inside the session either way."""
    global _session_ssl
    _session_ssl = context


def is_session_target(address: object) -> bool:
    """Is ``address`` (as given to connect(): ``(host, port[, ...])``) a session target?"""
    if not _targets or not isinstance(address, tuple) or len(address) < 2:
        return False
    host, port = address[0], address[1]
    if not isinstance(host, str) or not isinstance(port, int):
        return False
    return (host.lower().strip("[]"), port) in _targets


class SessionClosedError(ConnectionResetError):
    """Raised internally when the relay no longer holds the session."""


class _ClientSession(_Carrier):
    __slots__ = ("address", "policy", "sid", "secret", "ssl_context", "reconnects", "runner",
                 "ticket", "version", "front", "waiting", "pair_written", "pair_read")

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

    def _deliver(self, payload: bytes | memoryview | list[Any], block: bool = True) -> int:
        size = sum(map(len, payload)) if isinstance(payload, list) else len(payload)
        waiting = self.waiting
        if (waiting is not None and self.front is None and self.pair_written == self.pair_read
                and 0 < size <= waiting[1] and size <= HANDOFF_MAX and self.plain is not None
                and not self.aborted):
            watcher = waiting[0]._read_event
            callback = None if watcher is None else watcher.callback
            if callback is not None:  # the read is blocked on its descriptor: hand it over
                self.front = b"".join(payload) if isinstance(payload, list) else bytes(payload)
                self.waiting = None
                gevent.get_hub().loop.run_callback(callback, *watcher.args)
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
            lio.wlock.acquire()
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
    sock.__dict__["_rs_reader"] = session if isinstance(session, _ClientSession) else None
    _direct_sockets.add(sock)


def _direct_off_in_child() -> None:
    # The session's link and greenlets are the parent's: a child writes through the pair
    # descriptor it inherited, as it would on a plain shared connection.
    for sock in list(_direct_sockets):
        sock.__dict__["_rs_direct"] = None
        sock.__dict__["_rs_reader"] = None
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


def direct_methods(base: Any) -> dict[str, Any]:
    """``send``/``sendall`` that frame onto the session's link (rule 7), over ``base``'s own
    methods, and the calls after which the socket writes through the pair for good. The
    session is the instance's ``_rs_direct`` (None: the pair, as any socket)."""
    b_send, b_sendall, b_sendmsg = base.send, base.sendall, getattr(base, "sendmsg", None)
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
            watcher, timeout = self._read_event, self.timeout
            if watcher is None or not timeout:
                self._wait(watcher, _ReadTimedOut)
            else:  # the same wait, its timeout a bare timer (see _wait_timed)
                _wait_timed(watcher, timeout, self.hub)
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
        reader = self.__dict__.get("_rs_reader")
        if reader is None or flags or bufsize <= 0:
            return b_recv(self, bufsize, flags)  # type: ignore[no-any-return]
        wait_first = drained(self, reader)
        while True:
            if reader.front is not None:
                return take_front(reader, bufsize)
            if not wait_first:
                try:
                    data = self._sock.recv(bufsize)
                except BlockingIOError:
                    if self.timeout == 0.0:
                        raise
                else:
                    reader.pair_read += len(data)
                    return data  # type: ignore[no-any-return]
            wait_first = False
            wait(self, reader, bufsize)

    def recv_into(self: Any, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
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
                    k = self._sock.recv_into(view, n)
                except BlockingIOError:
                    if self.timeout == 0.0:
                        raise
                else:
                    reader.pair_read += k
                    return k  # type: ignore[no-any-return]
            wait_first = False
            wait(self, reader, n)

    def ended(session: Any) -> None:
        # Our END (EOF) is out (a shutdown, or the process's exit): a write now fails as after
        # SHUT_WR, never into the void, whether or not the session has carried the other
        # direction to its end since (the exit hook waits for that).
        end = session.stream.end_sent
        if end is not None and not end.reset and session.aborted is None:
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    def send(self: Any, data: Any, flags: int = 0, *args: Any, **kw: Any) -> int:
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

    def sendall(self: Any, data: Any, flags: int = 0) -> None:
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

    def sendmsg(self: Any, *args: Any) -> int:
        off(self)
        return b_sendmsg(self, *args)  # type: ignore[misc, no-any-return]

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
        # No END here: another descriptor of the pair's end (a dup, a forked child, a
        # makefile() object) may still write; the pump sends the END at the pair's EOF, when
        # the last one closes, as the kernel sends a FIN.
        off(self)
        reads_off(self)
        b_close(self)

    methods = {"send": send, "sendall": sendall, "shutdown": shutdown, "dup": dup,
               "detach": detach, "close": close, "recv": recv, "recv_into": recv_into}
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
    ConnectionResetError) and the reason is logged at WARNING.

    ``unix_pair=True`` returns an AF_UNIX socket instead of loopback TCP: cheaper per write,
    but TCP-level ``setsockopt`` calls on it fail (EOPNOTSUPP) and ``getpeername()`` is ''.
    """
    policy = policy or RetryPolicy()
    host, port = address[0], int(address[1])
    addr = (host, port)
    if ssl_context is None:
        ssl_context = _session_ssl or _ssl_from_env()
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
    while True:
        spent = time.monotonic() - started
        # The session handshake is bounded like a TLS handshake is: by connect_timeout.
        budget = min(HANDSHAKE_TIMEOUT, policy.connect_timeout or HANDSHAKE_TIMEOUT)
        connect_timeout = timeout if timeout is not None else policy.connect_timeout
        if policy.deadline is not None:
            left = max(policy.deadline - spent, 0.01)
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
        spent = time.monotonic() - started
        if (not policy.retry_connect or not _retryable_first_connect(failure)
                or (policy.deadline is not None and spent >= policy.deadline)
                or (policy.max_attempts is not None and attempt >= policy.max_attempts)):
            raise failure
        delay = policy.backoff(attempt)
        if policy.deadline is not None:
            delay = min(delay, max(0.0, policy.deadline - spent))
        gevent.sleep(delay)


def _ssl_from_env() -> Any:
    ca = os.environ.get("RESILIENTSOCK_SESSION_CA")
    if not ca:
        return None
    import gevent.ssl as gssl

    return gssl.create_default_context(cafile=ca)
