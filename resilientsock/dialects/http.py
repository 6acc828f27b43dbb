"""HTTP/1.x: requests written, responses read, paired first in first out (pipelining kept).

Rules of this module (docs/design.md §5a, §5b; RFC 9110 semantics, RFC 9112 message syntax):

1. h11 parses every message head: a fresh SERVER-role ``h11.Connection`` per request head the
   application wrote, a fresh CLIENT-role one per response head it read (sent the request's
   method, Host and Upgrade first, so HEAD and CONNECT are framed right). Bodies are framed
   here, by counting (RFC 9112 §6.3: no body after HEAD, 1xx, 204, 304; ``Transfer-Encoding:
   chunked``; ``Content-Length``; else until close), because h11 copies every body byte
   (measured: 52 us per 64 KiB chunk, against ~1 us counted here).
2. A ``101`` to a request with ``Upgrade``, or a ``2xx`` to ``CONNECT``, makes the connection a
   tunnel of a protocol we cannot see: every later drop is refused (RFC 9110 §7.8, §9.3.6),
   for the whole lineage.
3. ``Authorization`` / ``Proxy-Authorization: NTLM | Negotiate`` written, or a 401 / 407 whose
   ``WWW-Authenticate`` / ``Proxy-Authenticate`` offers them: the authentication is bound to
   this connection (RFC 4559 §4; MS-NTHT), so a drop on it is refused until it is discarded.
4. Resume (§5b): the answer in progress may be re-requested only if every request it belongs
   to uses an idempotent method (RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE) and
   the answer began at a response boundary. ``mask`` blanks every ``Date`` header's value
   (RFC 9110 §6.6.1; IMF-fixdate is 29 bytes, so offsets line up; a different length shifts
   the rest of the answer and the comparison fails, which is the safe side).
5. ``truncated()`` (an EOF cuts the answer, §5b) while a response head, a body framed by
   ``Content-Length`` or chunked encoding, or a request still awaiting its response is
   incomplete; never for a body delimited by the connection's close (RFC 9112 §6.3 rule 8).
6. ``hold()`` while a request has had an interim (1xx) response and its final response is not
   complete (``Expect: 100-continue``): the core keeps its head for a whole re-send.
7. Any parse error: parsing stops and the dialect is "unknown" (no refusal, no resume), except
   that a tunnel or connection-bound authentication already seen stays refused.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import h11

from ._base import Dialect

IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
_HEAD_LIMIT = 65536
_CONN_BOUND = (b"ntlm", b"negotiate")


class _Body:
    """Counts a message body's bytes (RFC 9112 §6, §7.1): length, chunked, or until close."""

    __slots__ = ("mode", "left", "line", "state")
    LENGTH, CHUNKED, CLOSE = 1, 2, 3

    def __init__(self, mode: int, left: int = 0) -> None:
        self.mode = mode
        self.left = left
        self.line = b""
        self.state = 0  # chunked: 0 size line, 1 data (+CRLF), 2 trailer lines

    @property
    def done(self) -> bool:
        return self.mode == 0

    def feed(self, data: bytes, i: int) -> int:
        """Consume body bytes of ``data`` from ``i``; returns where the body stopped."""
        n = len(data)
        mode = self.mode
        if mode == self.LENGTH:
            take = min(self.left, n - i)
            self.left -= take
            if not self.left:
                self.mode = 0
            return i + take
        if mode == self.CLOSE:
            return n
        while i < n and self.mode:
            if self.state == 1:
                take = min(self.left, n - i)
                self.left -= take
                i += take
                if not self.left:
                    self.state = 0
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self.line += data[i:]
                if len(self.line) > 4096:
                    raise ValueError("a chunk-size or trailer line over 4 KiB")
                return n
            line = (self.line + data[i:j]).rstrip(b"\r")
            self.line = b""
            i = j + 1
            if self.state == 0:
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size:
                    self.left = size + 2
                    self.state = 1
                else:
                    self.state = 2
            elif not line:  # the empty line that ends the trailer section
                self.mode = 0
        return i


class _Req:
    __slots__ = ("method", "target", "host", "upgrade", "safe", "interim", "whole")

    def __init__(self, event: h11.Request) -> None:
        self.method = event.method
        self.target = event.target
        self.host = b"x"
        self.upgrade = None
        keyed = False
        for name, value in event.headers:
            if name == b"host":
                self.host = value
            elif name == b"upgrade":
                self.upgrade = value
            elif name == b"idempotency-key":
                keyed = True
        # RFC 9110 §9.2.2, and the IETF httpapi Idempotency-Key header: the server makes a
        # keyed request run once, however often it arrives.
        self.safe = self.method in IDEMPOTENT or keyed
        self.interim = False  # an interim (1xx) response was read for it
        self.whole = False  # every byte of it (head and body) was written

    def label(self) -> str:
        return f"{self.method.decode('latin-1')} {self.target[:60].decode('latin-1')}"


def _body_of(headers: Iterable[tuple[bytes, bytes]], *, response: bool) -> _Body | None:
    te = cl = None
    for name, value in headers:
        if name == b"transfer-encoding":
            te = value.lower()
        elif name == b"content-length":
            cl = value
    if te is not None:
        if te.rsplit(b",", 1)[-1].strip() == b"chunked":
            return _Body(_Body.CHUNKED)
        return _Body(_Body.CLOSE) if response else None
    if cl is not None:
        n = int(cl.split(b",")[0])
        return _Body(_Body.LENGTH, n) if n else None
    return _Body(_Body.CLOSE) if response else None


def _bound_auth(headers: Iterable[tuple[bytes, bytes]], names: tuple[bytes, ...]) -> bool:
    for name, value in headers:
        if name in names:
            v = value.lower()
            if any(s in v for s in _CONN_BOUND):
                return True
    return False


def _dates(raw: bytes, base: int) -> list[tuple[int, int]]:
    """Absolute [start, end) ranges of what follows ``Date:`` up to its line end (the value
    with its optional whitespace), in a head at ``base`` that may still be incomplete: an
    unfinished line's range ends where the bytes end (before a trailing CR). Defined this way,
    the bytes masked do not depend on where the chunks were cut."""
    out = []
    low = raw.lower()
    at = low.find(b"\ndate:")
    while at >= 0:
        start = at + 6
        end = raw.find(b"\n", start)
        if end < 0:
            end = len(raw)
        if raw[end - 1:end] == b"\r" and end > start:
            end -= 1
        if end > start:
            out.append((base + start, base + end))
        at = low.find(b"\ndate:", end)
    return out


class HttpDialect(Dialect):
    """HTTP/1.x connection knowledge for the recovery core (module docstring: the rules)."""

    name = "http"

    def __init__(self) -> None:
        self._tunnel: str | None = None
        self._bound: str | None = None
        self.lost: str | None = None
        self._dates: list[tuple[int, int]] = []  # Date values: absolute read offsets
        self._rpos = 0            # bytes of the read stream parsed
        self._ans_start = 0       # where the current answer began (read-stream offset)
        self._cursor = -1         # re-reading an answer: the offset reached; -1: not
        self._new_answer = True   # the next read begins a new answer
        self._fresh()

    def _fresh(self) -> None:
        # write side
        self._whead: h11.Connection | None = None
        self._wbody: _Body | None = None
        self._wreq: _Req | None = None  # the request whose body is being written
        self._wpaused: _Req | None = None  # an Upgrade / CONNECT awaiting its answer
        # read side
        self._inflight: deque[_Req] = deque()  # requests whose response is not complete
        self._rhead: h11.Connection | None = None
        self._rhead_buf = bytearray()
        self._rhead_start = 0
        self._rbody: _Body | None = None
        self._open: list[tuple[int, int]] = []  # Date ranges in a head not yet complete
        # answer groups (§5b)
        self._read_since_write = False
        self._group: list[_Req] = []
        self._aligned = True

    # -- write side -----------------------------------------------------------------------

    def wrote(self, data: bytes) -> None:
        if not self.hold():  # a held exchange is one answer across its writes
            self._new_answer = True
        if self._tunnel is not None or self.lost is not None:
            return
        if self._read_since_write:
            self._read_since_write = False
            if not self.hold():
                self._group = []
                self._aligned = not self._inflight and not self._in_response()
        if self._wpaused is not None:
            self._lose("bytes written after an Upgrade / CONNECT before its answer")
            return
        try:
            self._write(data)
        except (h11.ProtocolError, ValueError, IndexError, KeyError) as e:
            self._lose(f"request: {e}")

    def _write(self, data: bytes) -> None:
        i = 0
        n = len(data)
        while i < n:
            if self._wbody is not None:
                i = self._wbody.feed(data, i)
                if self._wbody.done:
                    self._wbody = None
                    if self._wreq is not None:
                        self._wreq.whole = True
                        self._wreq = None
                continue
            conn = self._whead
            if conn is None:
                conn = self._whead = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
            conn.receive_data(data[i:] if i else data)
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return
            if not isinstance(event, h11.Request):
                raise ValueError(f"unexpected {type(event).__name__}")
            rest = conn.trailing_data[0]
            self._whead = None
            req = _Req(event)
            self._request(req, event.headers)
            body = None if req.method == b"CONNECT" else _body_of(event.headers, response=False)
            data, i, n = bytes(rest), 0, len(rest)
            if req.upgrade is not None or req.method == b"CONNECT":
                req.whole = True
                self._wpaused = req
                if n:
                    raise ValueError("bytes written after an Upgrade / CONNECT request")
                return
            self._wbody = body
            if body is None:
                req.whole = True
            else:
                self._wreq = req

    def _request(self, req: _Req, headers: Iterable[tuple[bytes, bytes]]) -> None:
        self._inflight.append(req)
        if len(self._group) < 4096:
            self._group.append(req)
        else:
            self._aligned = False  # too long a pipeline to judge: not resumed
        if _bound_auth(headers, (b"authorization", b"proxy-authorization")):
            self._bound = ("HTTP: NTLM / Negotiate authentication is bound to this connection "
                           "(a new one would not be authenticated)")
        if len(self._inflight) == 1 and self._rhead is None and self._rbody is None:
            self._start_head()

    # -- read side ------------------------------------------------------------------------

    def read(self, data: bytes) -> None:
        self._read_since_write = True
        start = self._rpos
        self._rpos += len(data)
        if self._new_answer:
            self._new_answer = False
            self._ans_start = start
            if self._dates:
                self._dates = [d for d in self._dates if d[1] > start]
        if self._tunnel is not None or self.lost is not None:
            return
        try:
            self._read(data, start)
        except (h11.ProtocolError, ValueError, IndexError, KeyError) as e:
            self._lose(f"response: {e}")

    def _read(self, data: bytes, pos: int) -> None:
        i = 0
        n = len(data)
        while i < n:
            body = self._rbody
            if body is not None:
                i = body.feed(data, i)
                if body.done:
                    self._rbody = None
                    self._response_done()
                continue
            conn = self._rhead
            if conn is None:
                if not self._inflight:
                    raise ValueError("a response with no request to answer")
                conn = self._start_head()
            if not self._rhead_buf:
                self._rhead_start = pos + i
            chunk = data[i:] if i else data
            if len(self._rhead_buf) + len(chunk) > _HEAD_LIMIT:
                raise ValueError("a response head over 64 KiB")
            self._rhead_buf += chunk
            conn.receive_data(chunk)
            i = n
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    # a head cut by the chunk: mask what of its Date values is here
                    self._open = _dates(bytes(self._rhead_buf), self._rhead_start)
                    return
                req = self._inflight[0]
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101 and req.upgrade is not None:
                        self._tunnel = ("HTTP: the connection became a tunnel (101 Switching "
                                        f"Protocols to {req.upgrade.decode('latin-1')}); its "
                                        "bytes belong to another protocol")
                        return
                    req.interim = True
                    continue
                if not isinstance(event, h11.Response):
                    raise ValueError(f"unexpected {type(event).__name__}")
                break
            rest = bytes(conn.trailing_data[0])
            head_len = len(self._rhead_buf) - len(rest)
            self._dates += _dates(bytes(self._rhead_buf[:head_len]), self._rhead_start)
            self._open = []
            self._rhead = None
            self._rhead_buf = bytearray()
            status = event.status_code
            if req.method == b"CONNECT" and 200 <= status < 300:
                self._tunnel = ("HTTP: the connection became a tunnel (CONNECT "
                                f"{req.target.decode('latin-1')} answered {status}); its "
                                "bytes belong to another protocol")
                return
            if status in (401, 407) and _bound_auth(
                    event.headers, (b"www-authenticate", b"proxy-authenticate")):
                self._bound = ("HTTP: NTLM / Negotiate authentication is bound to this "
                               "connection (a new one would not be authenticated)")
            if self._wpaused is req:
                self._wpaused = None  # the upgrade was declined: plain HTTP carries on
            if req.method == b"HEAD" or status in (204, 304):
                body = None
            else:
                body = _body_of(event.headers, response=True)
            pos = pos + n - len(rest)
            data, i, n = rest, 0, len(rest)
            if body is None:
                self._response_done()
            else:
                self._rbody = body

    def _start_head(self) -> h11.Connection:
        req = self._inflight[0]
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=16384)
        headers = [(b"host", req.host)]
        if req.upgrade is not None:
            headers += [(b"connection", b"upgrade"), (b"upgrade", req.upgrade)]
        conn.send(h11.Request(method=req.method, target=req.target, headers=headers))
        conn.send(h11.EndOfMessage())
        self._rhead = conn
        self._rhead_buf = bytearray()
        return conn

    def _response_done(self) -> None:
        self._inflight.popleft()
        if self._inflight:
            self._start_head()

    def _in_response(self) -> bool:
        return self._rbody is not None or bool(self._rhead_buf)

    def _lose(self, why: str) -> None:
        self.lost = why
        self._inflight.clear()
        self._group = []
        self._rhead = self._whead = None
        self._rbody = self._wbody = None

    # -- questions ------------------------------------------------------------------------

    def refusal(self) -> str | None:
        if self._tunnel is not None:
            return self._tunnel
        if self._bound is not None:
            return self._bound
        if self.lost is not None:
            return None
        if self._in_response() and not self.resumable():
            req = self._inflight[0] if self._inflight else None
            what = req.label() if req is not None else "a request"
            return (f"HTTP: the response to {what} was cut mid-way and is not re-requested "
                    "(its request, or one it is pipelined with, is not idempotent, RFC 9110 "
                    "§9.2.2, or was answered in part before it was written)")
        return None

    def hold(self) -> bool:
        return any(r.interim for r in self._inflight) and self.lost is None

    def unsafe(self) -> str | None:
        if self._tunnel is not None or self.lost is not None:
            return None  # refused already, or unknown (byte rules)
        for req in self._inflight:
            if req.whole and not req.safe:
                return req.label()
        return None

    def fresh_ok(self) -> bool:
        # Stateless between requests (RFC 9110 §3.3), unless a tunnel or a connection-bound
        # authentication is under way (both refused) or the stream could not be followed.
        return self._tunnel is None and self._bound is None and self.lost is None

    def fin_is_final(self) -> bool:
        return self._tunnel is None  # a tunnel's protocol may half-close

    def resumable(self) -> bool:
        if self._tunnel is not None or self._bound is not None or self.lost is not None:
            return False
        if not self._aligned or not self._group:
            return False
        return all(r.safe for r in self._group)

    def truncated(self) -> bool:
        if self._tunnel is not None or self.lost is not None:
            return False
        body = self._rbody
        if body is not None:
            return body.mode != _Body.CLOSE  # a body read until close ends at the EOF
        return bool(self._rhead_buf) or bool(self._inflight)

    def mask(self, data: bytes) -> bytes:
        n = len(data)
        if self._cursor >= 0:  # re-reading the answer on a new connection
            start = self._cursor
            self._cursor = start + n
            if self._cursor >= self._rpos:
                self._cursor = -1
        else:  # the caller's chunk, just given to read()
            start = self._rpos - n
        end = start + n
        out = None
        for a, b in (self._dates + self._open if self._open else self._dates):
            if b <= start or a >= end:
                continue
            if out is None:
                out = bytearray(data)
            lo, hi = max(a, start) - start, min(b, end) - start
            out[lo:hi] = bytes(hi - lo)
        return data if out is None else bytes(out)

    def reset_answer(self) -> None:
        self._cursor = self._ans_start if self._ans_start < self._rpos else -1
        if self._open:  # the answer was cut inside a head: what was masked stays masked
            self._dates += self._open

    def new_connection(self) -> None:
        self._read_since_write = False

    def discard(self) -> None:
        self._bound = None
        if self._tunnel is None:
            self.lost = None
        self._fresh()
        self._new_answer = True
