"""LDAPv3 (BER, RFC 4511): the BIND is the connection's login; writes are not re-sent.

Rules of this module (docs/design.md §5 "Idempotency decides where a dialect knows it", §5a):

1. Framing only. Every LDAPMessage is a BER SEQUENCE (tag 0x30, definite length, RFC 4511
   §5.1): its length is read from the header and the rest passed by counting; only the first
   ``_HEAD`` bytes of a message (message ID, operation tag, the DN or result code) are kept,
   and a BindRequest whole (up to ``_SETUP_LIMIT``).
2. Setup: the last BindRequest answered ``success`` (RFC 4511 §4.2) is recorded; ``restore()``
   re-sends it first on every new connection and checks that the BindResponse is a success
   (``SetupMismatch`` otherwise: surfaced, nothing re-sent). A failed bind leaves the
   connection anonymous (§4.2.1): nothing recorded. A SASL bind that needs more than one
   round trip (``saslBindInProgress``) cannot be redone: refused.
3. Not idempotent (never re-sent once written whole and unanswered, §4.6-§4.9, §4.12): Add,
   Modify, Delete, ModifyDN, and Extended operations. Re-sent: Bind, Search, Compare,
   Abandon, Unbind.
4. StartTLS (the Extended operation 1.3.6.1.4.1.1466.20037) turns the stream into TLS the
   application runs itself: every later drop is refused, for the socket's life.
5. Answers: every response names its request's message ID; a search is answered until its
   SearchResultDone. ``truncated()`` while a request awaits its response or a message is cut;
   answers are never resumed (a search's entries are many messages).
6. A framing error: parsing stops; with a bind recorded that is a refusal, without one the
   dialect is "unknown" (byte rules).
"""

from __future__ import annotations

from ._base import Dialect, Restore, SetupMismatch

_HEAD = 512
_SETUP_LIMIT = 65536
_MAX_MESSAGE = 1 << 30

BIND_REQ, BIND_RESP, UNBIND, SEARCH, SEARCH_ENTRY, SEARCH_DONE = 0x60, 0x61, 0x42, 0x63, 0x64, 0x65
MODIFY, ADD, DELETE, MODDN, COMPARE, ABANDON = 0x66, 0x68, 0x4A, 0x6C, 0x6E, 0x50
SEARCH_REF, EXT_REQ, EXT_RESP, INTERMEDIATE = 0x73, 0x77, 0x78, 0x79
_WRITES = {ADD: "ADD", MODIFY: "MODIFY", DELETE: "DELETE", MODDN: "MODDN", EXT_REQ: "EXTENDED"}
_NOT_FINAL = (SEARCH_ENTRY, SEARCH_REF, INTERMEDIATE)
_START_TLS = b"1.3.6.1.4.1.1466.20037"


class _Lost(Exception):
    pass


def _header(data: bytes, i: int) -> tuple[int, int, int] | None:
    """(tag, header length, value length) of the TLV at ``data[i]``, or None if the header
    is not all here. Raises _Lost on an indefinite or absurd length."""
    if i + 2 > len(data):
        return None
    tag, first = data[i], data[i + 1]
    if first < 0x80:
        return tag, 2, first
    n = first & 0x7F
    if n == 0 or n > 4:
        raise _Lost("an indefinite or oversized BER length")
    if i + 2 + n > len(data):
        return None
    return tag, 2 + n, int.from_bytes(data[i + 2:i + 2 + n], "big")


def _parse_head(head: bytes) -> tuple[int, int, bytes]:
    """(message ID, operation tag, the operation's value as far as ``head`` has it)."""
    h = _header(head, 0)
    if h is None or h[0] != 0x30:
        raise _Lost("not an LDAPMessage")
    i = h[1]
    mid = _header(head, i)
    if mid is None or mid[0] != 0x02 or not 1 <= mid[2] <= 4:
        raise _Lost("no message ID")
    msgid = int.from_bytes(head[i + mid[1]:i + mid[1] + mid[2]], "big")
    i += mid[1] + mid[2]
    op = _header(head, i)
    if op is None:
        raise _Lost("no protocol operation")
    return msgid, op[0], head[i + op[1]:]


def looks_like(first_write: bytes) -> bool:
    """Is this first record an LDAPMessage carrying a Bind, Search or Extended request?"""
    try:
        h = _header(first_write, 0)
        if h is None or h[0] != 0x30 or h[2] > _MAX_MESSAGE:
            return False
        _, op, _ = _parse_head(first_write[:_HEAD])
    except (_Lost, IndexError):
        return False
    return op in (BIND_REQ, SEARCH, EXT_REQ)


def _string(value: bytes) -> bytes:
    """The first OCTET STRING in ``value`` (a DN), or the value itself (DelRequest)."""
    h = _header(value, 0)
    if h is None or h[0] != 0x04:
        return value
    return value[h[1]:h[1] + h[2]]


def _result(value: bytes) -> int | None:
    """An LDAPResult's resultCode (the ENUMERATED that opens it)."""
    h = _header(value, 0)
    if h is None or h[0] != 0x0A or not 1 <= h[2] <= 4:
        return None
    return int.from_bytes(value[h[1]:h[1] + h[2]], "big")


class _Messages:
    """Incremental LDAPMessage framer: ``feed`` returns (head, whole or None) per message."""

    def __init__(self) -> None:
        self._buf = bytearray()  # the header and head of the message being read
        self._left = 0           # its bytes still to pass
        self._whole: bytearray | None = None
        self._head = b""
        self.keep_whole = False  # keep the next messages whole (bind requests)

    @property
    def inside(self) -> bool:
        return bool(self._buf) or self._left > 0

    def feed(self, data: bytes) -> list[tuple[bytes, bytes | None]]:
        out = []
        i, n = 0, len(data)
        while i < n:
            if self._left:
                take = min(self._left, n - i)
                if len(self._head) < _HEAD:
                    self._head += data[i:i + min(take, _HEAD - len(self._head))]
                if self._whole is not None:
                    self._whole += data[i:i + take]
                self._left -= take
                i += take
                if not self._left:
                    out.append((self._head, bytes(self._whole) if self._whole is not None
                                else None))
                continue
            old = len(self._buf)
            buf = bytes(self._buf) + data[i:i + 6 - old]
            h = _header(buf, 0)
            if h is None:
                self._buf = bytearray(buf)
                if len(self._buf) >= 6:
                    raise _Lost("a BER header over 6 bytes")
                break
            tag, hl, vl = h
            if tag != 0x30 or vl > _MAX_MESSAGE:
                raise _Lost("not an LDAPMessage")
            i += hl - old
            head = buf[:hl]
            self._buf = bytearray()
            self._head = head
            self._left = vl
            self._whole = bytearray(head) if self.keep_whole and hl + vl <= _SETUP_LIMIT \
                else None
            if not vl:
                out.append((self._head, bytes(self._whole) if self._whole is not None else None))
        return out


class _LdapRestore(Restore):
    """Re-send the recorded BindRequest; its response must be a success."""

    __slots__ = ("_messages",)

    def __init__(self, bind: bytes) -> None:
        super().__init__(bind)
        self._messages = _Messages()

    def feed(self, data: bytes) -> int | None:
        # Frame one message: feed only up to its end, so what follows stays the caller's.
        used = 0
        for k in range(len(data)):
            got = self._messages.feed(data[k:k + 1])
            used = k + 1
            if got:
                head = got[0][0]
                try:
                    _, op, value = _parse_head(head)
                except _Lost as e:
                    raise SetupMismatch(f"LDAP: the BIND's answer is not an LDAPMessage "
                                        f"({e})") from None
                code = _result(value) if op == BIND_RESP else None
                if code != 0:
                    raise SetupMismatch(
                        "LDAP: the BIND was answered " + (f"resultCode {code}" if code
                                                          is not None else f"op {op:#x}")
                        + " on the new connection; the original answer was success")
                return used
        return None


class _Req:
    __slots__ = ("op", "label")

    def __init__(self, op: int, label: str) -> None:
        self.op = op
        self.label = label


class LdapDialect(Dialect):
    """LDAPv3 connection knowledge (module docstring: the rules)."""

    name = "ldap"

    def __init__(self) -> None:
        self._bind: bytes | None = None  # the recorded successful BindRequest (rule 2)
        self._tls: str | None = None
        self._sasl: str | None = None
        self.lost: str | None = None
        self._fresh()

    def _fresh(self) -> None:
        self._w = _Messages()
        self._w.keep_whole = True  # requests are small; binds are kept whole
        self._r = _Messages()
        self._pending: dict[int, _Req] = {}
        self._binds: dict[int, bytes | None] = {}  # bind requests awaiting their response

    # -- feeding --------------------------------------------------------------------------

    def wrote(self, data: bytes) -> None:
        if self.lost is not None or self._tls is not None:
            return
        try:
            for head, whole in self._w.feed(data):
                self._request(head, whole)
        except (_Lost, IndexError, ValueError) as e:
            self._lose(f"request: {e}")

    def _request(self, head: bytes, whole: bytes | None) -> None:
        msgid, op, value = _parse_head(head)
        if op in (UNBIND, ABANDON):
            return  # no response
        if op == BIND_REQ:
            self._binds[msgid] = whole
        if op == EXT_REQ and _START_TLS in value[:40]:
            self._tls = ("LDAP: StartTLS made the connection TLS that the application runs "
                         "itself; a new connection would lack its keys")
        what = _WRITES.get(op)
        if what is not None:
            dn = _string(value) if op != EXT_REQ else b""
            label = f"{what} {dn[:80].decode('utf-8', 'replace')}".strip()
        else:
            label = ""
        self._pending[msgid] = _Req(op, label)

    def read(self, data: bytes) -> None:
        if self.lost is not None or self._tls is not None:
            return
        try:
            for head, _ in self._r.feed(data):
                self._response(head)
        except (_Lost, IndexError, ValueError) as e:
            self._lose(f"response: {e}")

    def _response(self, head: bytes) -> None:
        msgid, op, value = _parse_head(head)
        if op in _NOT_FINAL:
            return
        self._pending.pop(msgid, None)
        if op == BIND_RESP and msgid in self._binds:
            bind = self._binds.pop(msgid)
            code = _result(value)
            if code == 0:
                if bind is None:
                    self._sasl = ("LDAP: a BIND too large to record was made, so it cannot "
                                  "be redone on a new connection")
                else:
                    self._bind = bind
                    self._sasl = None
            elif code == 14:  # saslBindInProgress: a multi-step SASL exchange
                self._sasl = ("LDAP: a multi-step SASL BIND is bound to this connection and "
                              "cannot be redone on a new one")
            else:
                self._bind = None  # a failed bind leaves the connection anonymous (§4.2.1)

    def _lose(self, why: str) -> None:
        self.lost = why
        self._pending.clear()

    # -- questions ------------------------------------------------------------------------

    def refusal(self) -> str | None:
        if self._tls is not None:
            return self._tls
        if self._sasl is not None:
            return self._sasl
        if self.lost is not None and self._bind is not None:
            return (f"LDAP: the message stream could not be followed ({self.lost}), so the "
                    "BIND cannot be redone with certainty")
        return None

    def restore(self) -> Restore | None:
        if self._bind is None or self.lost is not None or self._tls is not None:
            return None
        return _LdapRestore(self._bind)

    def unsafe(self) -> str | None:
        if self.lost is not None:
            return None
        for req in self._pending.values():
            if req.label:
                return req.label
        return None

    def fresh_ok(self) -> bool:
        return self.refusal() is None and self.lost is None

    def truncated(self) -> bool:
        if self.lost is not None or self._tls is not None:
            return False
        return bool(self._pending) or self._r.inside

    def discard(self) -> None:
        if self._bind is None:
            self.lost = None
        self._fresh()
