"""Session mode's carrier (docs/design.md §11): a session's bytes between a link and a plain end.

The package ``resilientsock.session`` is session mode, one job a file: ``protocol`` (the wire
format and the session state, sans-IO), this file (the carrier both ends share, and the only
file that touches gevent's internals, all of them behind ``_Hub``), ``relay`` (the ``Relay``
server: listen, accept, authenticate, attach, the plain proxy), ``client`` (``open_session``
and the application's socket), ``targets`` (which addresses speak the session protocol) and
``cli`` (``python -m resilientsock relay``).

Rules of session mode's I/O (``relay`` and ``client`` follow them too; "rule N" elsewhere
means these):

1. The protocol lives in ``protocol`` (sans-IO); this package only moves bytes and obeys it.
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

import errno
import logging
import struct
import time
from collections import deque
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.socket as gsocket
from gevent._hub_primitives import wait_on_watcher as _wait_on_watcher

from . import protocol as sp

log = logging.getLogger("resilientsock")


class _Hub:
    """Every use of gevent's internals in session mode, and nothing else (the rest of the
    package uses gevent's public API only): the OS socket under a gevent socket, waiting on
    a socket's own watchers, waking a read blocked on one, and the hub's timers. What each
    relies on is named here, so a gevent upgrade is checked in one place (gevent 26)."""

    @staticmethod
    def raw(sock: Any) -> Any:
        """The non-blocking OS socket under a gevent socket (``_sock``): a ``send`` or
        ``recv`` on it never waits (BlockingIOError instead). None for anything else."""
        return getattr(sock, "_sock", None)

    @staticmethod
    def this_threads_hub() -> Any:
        """The calling thread's hub, None when it has none (never creates one;
        ``gevent._hub_local.get_hub_if_exists``)."""
        from gevent._hub_local import get_hub_if_exists

        return get_hub_if_exists()

    @staticmethod
    def wait_writable(sock: Any, timeout: float | None) -> bool:
        """Wait until ``sock`` may be written, at most ``timeout`` seconds (then
        TimeoutError), on the socket's own write watcher (``_write_event``, which its
        ``wait_write`` made) and hub. False at once when the socket was closed under us (no
        watcher); OSError or ValueError when it is closed while we wait."""
        watcher = sock._write_event
        if watcher is None:
            return False
        _wait_on_watcher(watcher, timeout, hub=sock.hub)
        return True

    @staticmethod
    def wait_readable(sock: Any, timeout_exc: type[BaseException]) -> None:
        """Wait as a gevent socket's own ``recv`` does (its timeout raising ``timeout_exc``,
        its cancel on ``close()``), so that ``wake_reader`` can end the wait. The timeout is
        a bare loop timer instead of a ``gevent.Timeout``: the same timer (priority -1,
        started on the loop's updated clock) without the nine Python calls around it, on
        every read of a request/answer loop."""
        watcher, timeout = sock._read_event, sock.timeout
        if watcher is None or not timeout:
            sock._wait(watcher, timeout_exc)
            return
        timer = sock.hub.loop.timer(timeout, priority=-1)
        timer.start(gevent.getcurrent().throw, timeout_exc(), update=True)
        try:
            _wait_on_watcher(watcher, None, hub=sock.hub)
        finally:
            timer.close()

    @staticmethod
    def wait_bytes(sock: Any, timeout: float | None = None) -> bool:
        """Wait until ``sock`` may be read, on its own read watcher (``_read_event``) and hub,
        at most ``timeout`` seconds (then TimeoutError; None: no limit of its own): ended by
        bytes, an EOF or an error, by a close (OSError), or by ``interrupt_read`` (its
        exception). False at once when the socket was closed under us (no watcher)."""
        watcher = sock._read_event
        if watcher is None:
            return False
        _wait_on_watcher(watcher, timeout, hub=sock.hub)
        return True

    @staticmethod
    def interrupt_read(sock: Any, exc: BaseException) -> bool:
        """If a greenlet waits on ``sock``'s read watcher (``wait_bytes``), throw ``exc`` into
        it now, as a socket timeout does (from a timer, in the hub; no callback between:
        the watcher's callback is the waiting greenlet's ``switch``) (True); otherwise
        nothing (False)."""
        watcher = sock._read_event
        waiter = getattr(watcher and watcher.callback, "__self__", None)
        if waiter is None:
            return False
        waiter.throw(exc)
        return True

    @staticmethod
    def wake_reader(sock: Any) -> bool:
        """If a greenlet is blocked in ``wait_readable(sock)``, schedule its wake-up as the
        descriptor becoming readable would (True); otherwise do nothing (False)."""
        watcher = sock._read_event
        callback = None if watcher is None else watcher.callback
        if callback is None:
            return False
        gevent.get_hub().loop.run_callback(callback, *watcher.args)
        return True

    @staticmethod
    def timer(delay: float, callback: Any, *args: Any) -> Any:
        """A one-shot timer in the hub (no greenlet) calling ``callback(*args)`` after ``delay``
        seconds, measured from now (``update=True``: the loop's cached clock may be stale by
        however long the current greenlet ran). ``close()`` cancels it. A new timer each
        time: gevent's libev timer restarted after it fired fires again at once (measured,
        gevent 26.9)."""
        timer = gevent.get_hub().loop.timer(delay)
        timer.start(callback, *args, update=True)
        return timer

    @staticmethod
    def call_soon(callback: Any) -> None:
        """``callback()`` from the hub's loop, outside the current timer's or greenlet's turn."""
        gevent.get_hub().loop.run_callback(callback)


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
# A delivery queue may always hold this much, whatever budget its end has across sessions
# (over it, the link is read only while the queue is smaller: interactive sessions go on).
QUEUE_FLOOR = 64 * 1024


_LINGER_RST = struct.pack("ii", 1, 0)


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


class _ReadTimedOut(Exception):
    """Internal: the session socket's own timeout ran out in a read open to a handoff (told
    apart from any TimeoutError the application's own gevent.Timeout throws)."""


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
        if not _Hub.wait_bytes(sock, sock.timeout):  # closed under us by another greenlet
            raise OSError(errno.EBADF, "the socket was closed")
        try:
            return _Hub.raw(sock).recv(size)  # type: ignore[no-any-return]
        except BlockingIOError:
            pass  # readable, and then not (another reader?): gevent's read waits again
    return sock.recv(size)  # type: ignore[no-any-return]


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
    lock that keeps one frame from interleaving with another (two greenlets write).

    Whoever holds ``wlock`` is the one writer of the link. It may hand the lock over with
    unsent frames to a greenlet (``_Carrier._finish_push``) that releases it once they are
    out; the lock is bounded, so a release by a writer that had handed it over already
    (two writers interleaving frames) raises instead of letting a third one in."""

    __slots__ = ("sock", "link", "wlock", "alive", "tls", "heard", "beat", "drained")

    def __init__(self, sock: Any, link: sp.Link) -> None:
        self.sock = sock
        self.link = link
        self.wlock = gevent.lock.BoundedSemaphore()
        self.alive = True
        self.heard = time.monotonic()  # when bytes last came (the heartbeat's timer reads it)
        self.beat: Any = None  # that timer, while a pump reads the link
        self.drained = False  # the last read was a message's: the socket had no more (_recv_ready)
        # Read once, while the socket is open (a closed one raises from __getattr__).
        self.tls = hasattr(sock, "cipher")

    def take_new(self) -> None:
        """Take the lock of a link nobody has written yet, without waiting: nothing runs
        between the caller's checks and its first frames (a resume's re-sent units go out
        before any frame built later: rule 2)."""
        taken = self.wlock.acquire(blocking=False)
        assert taken, "a new link's lock is held already"

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
        # One writer at a time on the plain end, in stream order (bounded: a second release
        # raises instead of letting two writers in).
        self.plain_lock = gevent.lock.BoundedSemaphore()
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
        assert lio.wlock.locked(), "a link written without its lock"
        if len(parts) == 1 and not lio.tls:
            # The hot path: one small frame, taken whole by the socket (the usual case).
            frame = parts[0]
            try:
                n = _Hub.raw(lio.sock).send(frame)
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
        raw = _Hub.raw(lio.sock)
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
                try:
                    writable = _Hub.wait_writable(lio.sock, wait)
                except TimeoutError:
                    if left is not None and left <= wait:
                        continue  # the caller's time is up: the check above hands over
                    self._link_lost(lio, f"send: link silent for {wait:g} s")
                    return False
                except (OSError, ValueError):  # closed under us by another greenlet
                    self._link_lost(lio, "send failed")
                    return False
                if not writable:  # closed under us by another greenlet (no watcher)
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
        assert lio.wlock.locked(), "a link written without its lock"
        raw = None if lio.tls else _Hub.raw(lio.sock)
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
        assert lio.wlock.locked(), "frames handed over without the link's lock"
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
                stream.hold(size)
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
                if isinstance(ev, sp.Ended):
                    # The end marker's unit, acknowledged once obeyed: held before handing
                    # the batch on can yield (a frame built meanwhile must not cover it).
                    stream.hold(1)
                self._deliver_batch(batch)
                if ev is sp.NEED_DATA:
                    break
                if isinstance(ev, sp.Ended):
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
            # rule 9), unless the queue outgrew the limit (a peer that ignores acks), or
            # holds more than QUEUE_FLOOR while this end is over a budget across sessions
            # (the relay's max_buffered): then wait for it to drain, or for this link to be
            # lost or replaced.
            while ((self.outq_bytes > stream.limit or (self.outq_bytes > QUEUE_FLOOR
                                                       and self.over_budget()))
                   and lio is self.cur and lio.alive and not self.finished):
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

    def over_budget(self) -> bool:  # overridden: the relay's total across its sessions
        """True while this end holds more than its budget across sessions; it then sets
        ``drained_ev`` once room was made anywhere."""
        return False

    def recv_link(self, lio: _LinkIO) -> bytes:
        """The next bytes of the link. The heartbeat (``heartbeat``, the link socket's
        timeout): a link silent for one interval gets a PING; silent for another, it is a
        drop (a black hole, or a peer stopped without FIN or RST, reveals itself only this
        way). Any bytes count as life: a big re-send or a stalled plain end is not death.

        On a TCP link the heartbeat is one timer per link (``_beat``), not a timeout armed
        and cancelled around every read: a message costs a clock read here, no timer."""
        if not lio.tls and self.heartbeat:
            raw = _Hub.raw(lio.sock)
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
                if lio.beat is None:
                    self._arm_beat(lio, self.heartbeat)
                # Woken by bytes, by a close (OSError), or by the heartbeat (TimeoutError).
                if not _Hub.wait_bytes(lio.sock):  # closed under us by another greenlet
                    raise OSError(errno.EBADF, "the link was closed")
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
        lio.beat = _Hub.timer(delay, self._beat, lio)

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
            why = f"peer silent for {2 * heartbeat:.1f} s"
            if _Hub.interrupt_read(lio.sock, TimeoutError(why)):  # the pump is waiting to
                return                                             # read: thrown in now
            # Nobody reads the link (its pump waits for the delivery queue to drain): what
            # the peer sent is unread, so a live peer has seen no PONG either and resumes.
            # A link not read is dropped as a silent one would be, or a vanished client's
            # session (and its bytes) would be held for as long as its plain end stalls.
            if self.outq_bytes:
                gevent.spawn(self._link_lost, lio, f"{why} (not read: queue full)")
                return
        self._arm_beat(lio, heartbeat)

    def _ping(self, lio: _LinkIO) -> None:
        self._send(lio, self.stream.ping())

    def _arm_ack(self) -> None:
        """The delayed ACK: a timer in the hub, not a greenlet per chunk; in a conversation
        the answer carries the ack first, and the timer then finds nothing to send."""
        self.ack_armed = True
        self.ack_mark = self.stream.ack_point
        # A new timer each time, started on a fresh clock (see _Hub.timer).
        if self.ack_timer is not None:
            self.ack_timer.close()
        self.ack_timer = _Hub.timer(ACK_DELAY, self._ack_timer_fired)

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
            _Hub.call_soon(self._rearm_ack)

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
            self.stream.hold(size)
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
        # Every queued byte is held (not acknowledged) until written: the peer's limit
        # bounds the queue (rule 9).
        assert self.outq_bytes <= self.stream.held, (self.outq_bytes, self.stream.held)
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
                    assert self.outq_bytes >= 0 and (outq or not self.outq_bytes), \
                        self.outq_bytes
                    self.count_queued(-size)
                self._delivered(size)
                self._ack_if_due()
        finally:
            self.writer = None
            self.drained_ev.set()

    def _delivered(self, n: int) -> None:
        self.stream.handed_on(n)
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
        self.stream.handed_on(1)
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
                raw = _Hub.raw(plain)
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
        # Its buffers go now, not when a reference cycle (the session and its greenlets)
        # is collected: a relay whose vanished clients' sessions expired held their bytes
        # until a full garbage collection (32 MiB for two sessions, in a quiet relay for good).
        self.stream.discard()
        self.plain_reader = None

    def on_finished(self) -> None:  # overridden
        pass
