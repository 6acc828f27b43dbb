"""Protocols whose handshake cannot be replayed into a new connection (docs/design.md §5a).

Rules of this module:

1. Each protocol here negotiates per-connection state in its first exchange (keys, a nonce, a
   session, a channel): SSH (RFC 4253 §4.2, §7), TLS carried by the application itself on a
   plain socket (RFC 8446 §2), the MySQL / MariaDB greeting (protocol 10), the PostgreSQL
   startup packet / SSLRequest / GSSENCRequest (protocol 3.0), AMQP 0-9-1 and 1.0 (the
   ``AMQP`` protocol header), MQTT 3.1 / 3.1.1 / 5 (CONNECT).
2. Protected only before the handshake begins: while the application has written nothing but
   the opening message (one record) and read nothing, a drop may re-send that message to a
   new connection (it carries no state of the old one). From the first byte read, or a second
   record written, every drop is refused with a sentence that names the protocol: never
   replayed, never a freeze on a connection that cannot understand the replay. The refusal
   is sticky for the lineage, ``discard()`` included: bytes the application writes after a
   surfaced drop belong to a session no new connection has.
3. Server-first protocols (SSH servers that speak first, the MySQL greeting) are detected on
   the first read: the handshake has begun when the dialect is made.
4. Answers are never resumed here (``resumable()`` is False): there is nothing left to
   resume once the handshake began, and before it no answer exists.
"""

from __future__ import annotations

from ._base import Dialect

_WHY = {
    "ssh": "SSH: the handshake began (version lines exchanged); a new TCP connection cannot "
           "continue this session (its keys are negotiated per connection, RFC 4253)",
    "tls": "TLS (carried by the application): the handshake began; its keys belong to this "
           "connection and a new one cannot continue it (RFC 8446)",
    "mysql": "MySQL: the server greeting was read; the client's authentication answer is "
             "built from that greeting's nonce, which a new connection would not share",
    "postgresql": "PostgreSQL: the startup exchange began; authentication, TLS and the "
                  "session belong to this connection",
    "amqp": "AMQP: the connection handshake began (protocol header answered); the connection "
            "and its channels cannot be continued on a new one",
    "mqtt": "MQTT: the CONNECT was answered; what follows belongs to that session and a new "
            "connection would have to CONNECT again",
}


class HandshakeDialect(Dialect):
    """A protocol protected only before its handshake begins (module docstring, rule 2)."""

    def __init__(self, name: str, server_first: bool = False) -> None:
        self.name = name
        self._writes = 0
        self._began = server_first

    def wrote(self, data: bytes) -> None:
        self._writes += 1
        if self._writes > 1:
            self._began = True

    def read(self, data: bytes) -> None:
        if data:
            self._began = True

    def refusal(self) -> str | None:
        return _WHY[self.name] if self._began else None

    def discard(self) -> None:
        # Sticky: after a surfaced drop the application's next bytes (if it writes any on
        # this socket) are the middle of a session that a new connection never had.
        pass


def detect(first_write: bytes | None, first_read: bytes | None) -> HandshakeDialect | None:
    """The handshake protocol these first bytes open, or None. Never raises."""
    if first_read is not None:
        data = first_read
        if data.startswith(b"SSH-"):
            return HandshakeDialect("ssh", server_first=True)
        if _mysql_greeting(data):
            return HandshakeDialect("mysql", server_first=True)
        return None
    if first_write is None:
        return None
    data = first_write
    if data.startswith(b"SSH-"):
        return HandshakeDialect("ssh")
    if _client_hello(data):
        return HandshakeDialect("tls")
    if data.startswith(b"AMQP") and len(data) >= 8:
        return HandshakeDialect("amqp")
    if _postgres_startup(data):
        return HandshakeDialect("postgresql")
    if _mqtt_connect(data):
        return HandshakeDialect("mqtt")
    return None


def _client_hello(data: bytes) -> bool:
    # TLSPlaintext: type 22 (handshake), legacy_record_version 3.0-3.4, then a handshake
    # message of type 1 (ClientHello). RFC 8446 §5.1, §4.
    if len(data) < 5 or data[0] != 0x16 or data[1] != 0x03 or data[2] > 0x04:
        return False
    return len(data) == 5 or data[5] == 0x01


def _mysql_greeting(data: bytes) -> bool:
    # Protocol::Handshake v10: 3-byte little-endian payload length, sequence id 0, then
    # protocol version 10 and a NUL-terminated server version string.
    # A client that reads the 4-byte packet header on its own sees only that: binary, with
    # NULs no text banner has, so the header alone is enough.
    if len(data) < 4 or data[3] != 0:
        return False
    length = data[0] | data[1] << 8 | data[2] << 16
    if not 20 <= length <= 1024:
        return False
    if len(data) == 4:
        return True
    if data[4] != 10:
        return False
    version = data[5:5 + 64]
    end = version.find(b"\0")
    text = version if end < 0 else version[:end]
    return end != 0 and all(0x20 < b < 0x7F for b in text)


_PG_CODES = (196608, 80877103, 80877104, 80877102)  # 3.0, SSLRequest, GSSENCRequest, cancel


def _postgres_startup(data: bytes) -> bool:
    if len(data) < 8:
        return False
    length = int.from_bytes(data[:4], "big")
    code = int.from_bytes(data[4:8], "big")
    if code not in _PG_CODES:
        return False
    if code == 196608:
        return 8 < length <= 10000
    return length in (8, 16)


def _mqtt_connect(data: bytes) -> bool:
    # Fixed header 0x10, remaining length (variable byte integer, 1-4 bytes), then the
    # protocol name as a UTF-8 string: "MQTT" (3.1.1, 5) or "MQIsdp" (3.1).
    if len(data) < 2 or data[0] != 0x10:
        return False
    i = 1
    while i < min(len(data), 5) and data[i] & 0x80:
        i += 1
    i += 1
    return data[i:i + 6] == b"\x00\x04MQTT" or data[i:i + 8] == b"\x00\x06MQIsdp"
