"""RESP (redis, valkey, keydb, ...): commands written, replies read, paired first in first out.

Rules of this module (docs/design.md §5a, §5b; the protocol: https://redis.io/docs/latest/develop/
reference/protocol-spec/):

1. Framing only. Commands are arrays of bulk strings or inline lines; replies are RESP2 or
   RESP3 values of any type (``+ - : $ * _ # , ( ! = % ~ > |``). Bulk payloads nobody needs
   are skipped by counting, never copied; only the first ``_ARG_LIMIT`` bytes of a command's
   first ``_ARGS`` arguments, and replies to the few commands whose answer matters (setup,
   EXEC with queued setup, pub/sub confirmations), are kept.
2. Pairing: every complete top-level reply answers the oldest unanswered command, except
   pushes (``>``, RESP3), attributes (``|``, not a value), the replies of (P|S)(UN)SUBSCRIBE
   (recognised by content), and everything after MONITOR. A reply with no command to pair
   with, a framing error, or CLIENT REPLY OFF / SKIP: the stream is lost (rule 6).
3. Setup (AUTH, HELLO, SELECT, CLIENT SETNAME / SETINFO / NO-EVICT / NO-TOUCH, READONLY /
   READWRITE) that succeeded is recorded with its reply, the LAST of each kind only, in the
   order last sent, authentication first; ``restore()`` re-sends it and checks every answer
   (HELLO's modulo its per-connection ``id``). A failed setup command changed nothing and is
   not recorded. RESET forgets all of it (the server does too).
4. MULTI ... EXEC / DISCARD: ``hold()`` from MULTI written until its EXEC / DISCARD reply is
   complete, so the whole transaction is re-sent or none of it. Setup queued inside takes
   effect when EXEC's reply says so.
5. Refused (surfaced): under WATCH (until the EXEC / DISCARD / UNWATCH reply), subscribed (until
   every subscription is gone), MONITOR, CLIENT TRACKING on, and a reply cut mid-way whose
   commands are not idempotent.
6. Lost: parsing stops. With no connection state recorded, that is "unknown" (byte rules);
   with state recorded, a refusal (the setup can no longer be known to be right).
7. ``truncated()`` (an EOF cuts the answer, §5b) while a reply has begun and not ended, or a
   command still awaits its reply; never while subscribed or under MONITOR.
"""

from __future__ import annotations

from collections import deque
from typing import TypeAlias

from ._base import Dialect, Restore, SetupMismatch

_ARGS = 16          # arguments of a command kept (name included)
_ARG_LIMIT = 4096   # bytes per kept argument
_CAPTURE = 65536    # bytes of a reply kept when its content matters
_SUB_CAPTURE = 4096  # bytes of a reply kept while subscribed (confirmations are small)
_GROUP_LIMIT = 4096  # commands an answer may belong to and still be resumed


class _Lost(Exception):
    """The byte stream is not RESP as far as this module can follow it."""


# Read-only commands, and writes whose second execution changes nothing (RFC-style: an
# idempotent request). A resumed answer re-executes its commands (§5b); a changed answer is
# caught by the comparison, but INCR's ":6" after ":5" would not be, so it is not here.
READ_ONLY = frozenset(b"""
    GET MGET GETRANGE SUBSTR STRLEN EXISTS TYPE TTL PTTL EXPIRETIME PEXPIRETIME DUMP LCS
    HGET HMGET HGETALL HKEYS HVALS HLEN HEXISTS HSTRLEN HSCAN HRANDFIELD
    LRANGE LLEN LINDEX LPOS
    SMEMBERS SISMEMBER SMISMEMBER SCARD SSCAN SRANDMEMBER SUNION SINTER SDIFF SINTERCARD
    ZRANGE ZRANGEBYSCORE ZREVRANGE ZREVRANGEBYSCORE ZRANGEBYLEX ZREVRANGEBYLEX ZSCORE ZMSCORE
    ZCARD ZCOUNT ZLEXCOUNT ZRANK ZREVRANK ZSCAN ZUNION ZINTER ZDIFF ZINTERCARD ZRANDMEMBER
    XRANGE XREVRANGE XLEN
    GETBIT BITCOUNT BITPOS BITFIELD_RO GEOPOS GEODIST GEOHASH GEOSEARCH GEORADIUS_RO
    GEORADIUSBYMEMBER_RO PFCOUNT
    SCAN KEYS DBSIZE RANDOMKEY EXISTS TOUCH PING ECHO TIME LASTSAVE INFO ROLE LOLWUT
    JSON.GET JSON.MGET JSON.TYPE JSON.STRLEN JSON.ARRLEN JSON.OBJKEYS JSON.OBJLEN
    AUTH HELLO SELECT READONLY READWRITE
    SET MSET SETEX PSETEX HSET HMSET SADD SREM ZREM HDEL DEL UNLINK PERSIST
""".split())
# Options that make SET answer or act differently when run twice.
_SET_UNSAFE = frozenset((b"NX", b"XX", b"GET", b"IFEQ"))
# Two-word commands: the read-only subcommands.
READ_ONLY_SUB = {
    b"CLIENT": frozenset((b"SETNAME", b"SETINFO", b"GETNAME", b"ID", b"INFO", b"LIST",
                          b"NO-EVICT", b"NO-TOUCH")),
    b"CONFIG": frozenset((b"GET",)),
    b"OBJECT": frozenset((b"ENCODING", b"FREQ", b"IDLETIME", b"REFCOUNT")),
    b"MEMORY": frozenset((b"USAGE", b"STATS")),
    b"XINFO": frozenset((b"STREAM", b"GROUPS", b"CONSUMERS")),
    b"COMMAND": frozenset((b"COUNT", b"DOCS", b"INFO", b"LIST", b"GETKEYS")),
    b"CLUSTER": frozenset((b"SLOTS", b"SHARDS", b"NODES", b"INFO", b"MYID", b"KEYSLOT")),
}
SETUP = frozenset((b"AUTH", b"HELLO", b"SELECT", b"READONLY", b"READWRITE"))
SETUP_CLIENT = frozenset((b"SETNAME", b"SETINFO", b"NO-EVICT", b"NO-TOUCH"))
_SUBSCRIBE = frozenset((b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE",
                        b"UNSUBSCRIBE", b"PUNSUBSCRIBE", b"SUNSUBSCRIBE"))
_CONFIRMS = frozenset((b"subscribe", b"psubscribe", b"ssubscribe",
                       b"unsubscribe", b"punsubscribe", b"sunsubscribe"))
_MESSAGES = frozenset((b"message", b"pmessage", b"smessage"))
# Commands whose handling is more than "queue it for the next reply".
_SPECIAL = _SUBSCRIBE | SETUP | frozenset((b"MONITOR", b"MULTI", b"EXEC", b"DISCARD", b"WATCH",
                                           b"UNWATCH", b"RESET", b"CLIENT"))
_INLINE_START = frozenset(b"""PING AUTH SELECT HELLO CLIENT MULTI READONLY READWRITE INFO
    DBSIZE FLUSHDB FLUSHALL SUBSCRIBE PSUBSCRIBE MONITOR COMMAND""".split())


def looks_like(first_write: bytes) -> bool:
    """Is this first record a RESP command? An array of bulk strings (``*N\\r\\n$``), or an
    inline command from a short list of names no other common text protocol starts with
    (memcached's ``get`` / ``set``, SMTP's ``EHLO``, HTTP's ``GET /`` are not RESP here)."""
    if first_write[:1] == b"*":
        end = first_write.find(b"\r\n", 1, 24)
        if end < 2 or not first_write[1:end].isdigit() or int(first_write[1:end]) < 1:
            return False
        rest = first_write[end + 2:end + 3]
        return rest in (b"$", b"")
    end = first_write.find(b"\r\n", 0, 1024)
    if end <= 0:
        return False
    word = first_write[:end].split(b" ", 1)[0]
    return word.isalpha() and word.upper() in _INLINE_START


def encode(args: list[bytes]) -> bytes:
    """A command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


# -- framing ----------------------------------------------------------------------------------

class _Replies:
    """Incremental reply framer. ``feed`` returns the top-level values it completed, each as
    ``(type byte, raw bytes or None)``; raw is kept only while ``capture`` (a byte limit) is
    set when the value begins, and is None if it was larger."""

    __slots__ = ("_line", "_skip", "_stack", "_cap", "_cap_limit", "_over", "_type",
                 "_open", "capture")

    def __init__(self) -> None:
        self._line = b""          # a partial line carried to the next chunk
        self._skip = 0            # bulk payload (+ CRLF) still to pass
        self._stack: list[list[int]] = []  # [elements left, is attribute]
        self._cap: bytearray | None = None
        self._cap_limit = 0
        self._over = False
        self._type = 0
        self._open = False        # a top-level value's first line was parsed, not complete
        self.capture = 0          # set by the owner: keep up to this many bytes of the next value

    def feed(self, data: bytes, i: int = 0,
             max_values: int = 0) -> tuple[list[tuple[int, bytes | None]], int]:
        """Frame ``data[i:]``. Returns (completed values, the index in data where framing
        stopped); it stops after ``max_values`` values when that is > 0. Raises _Lost on a
        framing error."""
        out: list[tuple[int, bytes | None]] = []
        n = len(data)
        while i < n:
            if self._skip:
                take = self._skip if self._skip <= n - i else n - i
                if self._cap is not None:
                    self._keep(data[i:i + take])
                self._skip -= take
                i += take
                if self._skip:
                    break
                if self._element_done():
                    out.append(self._finish())
                    if max_values and len(out) >= max_values:
                        return out, i
                continue
            # a line
            if self._line:
                if self._line[-1:] == b"\r" and data[i:i + 1] == b"\n":
                    line = self._line[:-1]
                    i += 1
                else:
                    j = data.find(b"\r\n", i)
                    if j < 0:
                        self._line += data[i:]
                        if len(self._line) > _CAPTURE:
                            raise _Lost("a reply line longer than 64 KiB")
                        i = n
                        break
                    line = self._line + data[i:j]
                    i = j + 2
                self._line = b""
            else:
                j = data.find(b"\r\n", i)
                if j < 0:
                    self._line = data[i:]
                    if len(self._line) > _CAPTURE:
                        raise _Lost("a reply line longer than 64 KiB")
                    i = n
                    break
                line = data[i:j]
                i = j + 2
            if self._value_line(line):
                out.append(self._finish())
                if max_values and len(out) >= max_values:
                    return out, i
        return out, i

    def _keep(self, b: bytes) -> None:
        cap = self._cap
        assert cap is not None
        if len(cap) + len(b) > self._cap_limit:
            self._cap = None
            self._over = True
        else:
            cap += b

    def _value_line(self, line: bytes) -> bool:
        """One line of a value; True when a top-level value is complete."""
        if not line:
            raise _Lost("an empty reply line")
        t = line[0]
        if not self._stack and not self._open:
            self._open = True
            self._type = t
            self._over = False
            if self.capture:
                self._cap = bytearray()
                self._cap_limit = self.capture
            else:
                self._cap = None
        elif not self._stack and self._type == 0x7C:  # after a top-level attribute
            self._type = t
        if self._cap is not None:
            self._keep(line + b"\r\n")
        if t in b"+-:_#,(":
            return self._element_done()
        if t in b"$!=":
            try:
                size = int(line[1:])
            except ValueError:
                raise _Lost("a bad bulk length") from None
            if size < 0:
                if size != -1:
                    raise _Lost("a bad bulk length")
                return self._element_done()
            self._skip = size + 2
            return False
        if t in b"*%~>|":
            try:
                count = int(line[1:])
            except ValueError:
                raise _Lost("a bad aggregate length") from None
            if count < 0:
                if count != -1:
                    raise _Lost("a bad aggregate length")
                return self._element_done()
            if t in b"%|":
                count *= 2
            if count == 0:
                return self._element_done()
            self._stack.append([count, t == 0x7C])
            return False
        raise _Lost("not a RESP type byte: %r" % line[:1])

    def _element_done(self) -> bool:
        st = self._stack
        while st:
            top = st[-1]
            top[0] -= 1
            if top[0]:
                return False
            st.pop()
            if top[1]:
                return False  # an attribute: the value it annotates follows
        if self._type == 0x7C:
            return False  # a top-level attribute ended; its value follows
        return True

    @property
    def in_value(self) -> bool:
        """A top-level value has begun (>= 1 byte of it read) and is not complete."""
        return self._open or bool(self._line)

    def _finish(self) -> tuple[int, bytes | None]:
        self._open = False
        raw = None if self._cap is None else bytes(self._cap)
        self._cap = None
        return self._type, raw


# A parsed RESP value: (type byte, body); the body is the bytes of a simple or bulk value, the
# values of an aggregate, or None for a null.
RespValue: TypeAlias = "tuple[int, bytes | list[RespValue] | None]"


def parse(raw: bytes, pos: int = 0) -> tuple[RespValue, int]:
    """A whole RESP value (small, already framed) as Python data: simple values as
    ``(type byte, bytes)``, aggregates as ``(type byte, [values])``; attributes dropped."""
    j = raw.index(b"\r\n", pos)
    t = raw[pos]
    body = raw[pos + 1:j]
    pos = j + 2
    if t in b"+-:_#,(":
        return (t, body), pos
    if t in b"$!=":
        size = int(body)
        if size < 0:
            return (t, None), pos
        return (t, raw[pos:pos + size]), pos + size + 2
    count = int(body)
    if count < 0:
        return (t, None), pos
    if t in b"%|":
        count *= 2
    items: list[RespValue] = []
    for _ in range(count):
        item, pos = parse(raw, pos)
        items.append(item)
    if t == 0x7C:
        return parse(raw, pos)
    return (t, items), pos


def _is_error(t: int) -> bool:
    return t in (0x2D, 0x21)  # '-' '!'


def _whole_command(data: bytes, i: int, n: int) -> tuple[list[bytes], int] | None:
    """The common case, fast: a whole small command array at ``data[i]``, or None."""
    j = data.find(b"\r\n", i, i + 24)
    if j < 0:
        return None
    try:
        count = int(data[i + 1:j])
        if not 0 < count <= _ARGS:
            return None
        i = j + 2
        args = []
        for _ in range(count):
            if data[i] != 0x24:
                return None
            j = data.find(b"\r\n", i, i + 24)
            if j < 0:
                return None
            size = int(data[i + 1:j])
            i = j + 2
            if not 0 <= size <= _ARG_LIMIT or i + size + 2 > n:
                return None
            args.append(data[i:i + size])
            i += size + 2
    except (ValueError, IndexError):
        return None
    return args, i


class _Commands:
    """Incremental command framer (arrays of bulk strings, or inline lines). ``feed``
    returns completed commands as lists of arguments (``None`` for one not kept whole)."""

    __slots__ = ("_line", "_skip", "_left", "_args", "_whole", "_want")

    def __init__(self) -> None:
        self._line = b""
        self._skip = 0       # payload (+ CRLF) of the current bulk still to come
        self._left = -1      # bulk strings left in the current array; -1: between commands
        self._args: list[bytes] = []
        self._whole = True   # every argument of the current command is kept
        self._want = False   # the current bulk is kept

    def feed(self, data: bytes) -> list[tuple[list[bytes], bool]]:
        out: list[tuple[list[bytes], bool]] = []
        i = 0
        n = len(data)
        while i < n:
            if self._left < 0 and data[i] == 0x2A and not self._line:
                whole = _whole_command(data, i, n)
                if whole is not None:
                    out.append((whole[0], True))
                    i = whole[1]
                    continue
            if self._skip:
                take = self._skip if self._skip <= n - i else n - i
                if self._want:
                    self._line += data[i:i + take]
                self._skip -= take
                i += take
                if self._skip:
                    break
                if self._want:
                    self._args.append(self._line[:-2])
                    self._line = b""
                self._left -= 1
                if self._left == 0:
                    out.append((self._args, self._whole))
                    self._args = []
                    self._whole = True
                    self._left = -1
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self._line += data[i:]
                if len(self._line) > _CAPTURE:
                    raise _Lost("a command line longer than 64 KiB")
                break
            line = self._line + data[i:j] if self._line else data[i:j]
            self._line = b""
            i = j + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._left < 0:
                if line[:1] == b"*":
                    try:
                        count = int(line[1:])
                    except ValueError:
                        raise _Lost("a bad command length") from None
                    if count > 0:
                        self._left = count
                    continue
                words = line.split()
                if words:  # an inline command; empty lines are ignored by the server
                    out.append((words, True))
                continue
            if line[:1] != b"$":
                raise _Lost("a command argument that is not a bulk string")
            try:
                size = int(line[1:])
            except ValueError:
                raise _Lost("a bad argument length") from None
            if size < 0:
                raise _Lost("a bad argument length")
            self._want = len(self._args) < _ARGS and size <= _ARG_LIMIT and self._whole
            if not self._want:
                if not self._args:
                    raise _Lost("a command name longer than 4 KiB")
                self._whole = False
            elif i + size + 2 <= n:  # the whole argument is here: take it at once
                self._args.append(data[i:i + size])
                i += size + 2
                self._left -= 1
                if self._left == 0:
                    out.append((self._args, self._whole))
                    self._args = []
                    self._whole = True
                    self._left = -1
                continue
            self._skip = size + 2
        return out


# -- the dialect ------------------------------------------------------------------------------

class _Cmd:
    __slots__ = ("name", "args", "whole", "kind", "queued", "safe")

    def __init__(self, args: list[bytes], whole: bool) -> None:
        self.name = args[0].upper()
        self.args = args
        self.whole = whole
        self.kind = ""
        self.queued: list[_Cmd] = []
        self.safe = _idempotent(self.name, args)


def _idempotent(name: bytes, args: list[bytes]) -> bool:
    if name in READ_ONLY:
        if name == b"SET":
            return not any(a.upper() in _SET_UNSAFE for a in args[3:])
        return True
    sub = READ_ONLY_SUB.get(name)
    return sub is not None and len(args) > 1 and args[1].upper() in sub


def _name(cmd: _Cmd) -> str:
    """A command for a note: its name and first key, e.g. ``INCR counter``."""
    name = cmd.name.decode("latin-1")
    if len(cmd.args) > 1:
        key = cmd.args[1][:40].decode("latin-1", "replace")
        return f"{name} {key}"
    return name


def _setup_key(cmd: _Cmd) -> str | None:
    name, args = cmd.name, cmd.args
    if name == b"AUTH":
        return "auth"
    if name == b"HELLO":
        return "hello"
    if name == b"SELECT":
        return "select"
    if name in (b"READONLY", b"READWRITE"):
        return "readmode"
    if name == b"CLIENT" and len(args) > 1:
        sub = args[1].upper()
        if sub == b"SETINFO" and len(args) > 2:
            return "setinfo " + args[2].decode("latin-1").lower()
        if sub in SETUP_CLIENT:
            return sub.decode("latin-1").lower()
    return None


class _Restore(Restore):
    """Re-send the setup; check each answer against the original (modulo HELLO's id)."""

    __slots__ = ("_expect", "_replies")

    def __init__(self, entries: list[tuple[str, bytes, bytes]]) -> None:
        super().__init__(b"".join(cmd for _, cmd, _ in entries))
        self._expect = deque((key, reply) for key, _, reply in entries)
        self._replies = _Replies()

    def feed(self, data: bytes) -> int | None:
        i = 0
        while self._expect:
            self._replies.capture = _CAPTURE
            try:
                values, i = self._replies.feed(data, i, 1)
            except _Lost as e:
                raise SetupMismatch(f"RESP: the setup answer is not RESP ({e})") from None
            if not values:
                return None
            t, raw = values[0]
            if t == 0x3E:  # a push is no answer
                continue
            key, want = self._expect.popleft()
            if raw is None or not _same_answer(key, want, raw):
                got = "a reply over 64 KiB" if raw is None else _show(raw)
                raise SetupMismatch(f"RESP: {_label(key)} was answered {got} on the new "
                                    f"connection; the original answer was {_show(want)}")
        return i


def _label(key: str) -> str:
    return {"auth": "AUTH", "hello": "HELLO", "select": "SELECT",
            "readmode": "READONLY/READWRITE"}.get(key, "CLIENT " + key.upper())


def _show(raw: bytes) -> str:
    text = raw[:60].decode("latin-1").replace("\r\n", " ").strip()
    return repr(text + ("..." if len(raw) > 60 else ""))


def _same_answer(key: str, want: bytes, got: bytes) -> bool:
    if want == got:
        return True
    if key != "hello":
        return False
    try:
        return _without_id(parse(want)[0]) == _without_id(parse(got)[0])
    except (ValueError, IndexError):
        return False


def _without_id(value: RespValue) -> RespValue | list[tuple[RespValue, RespValue]]:
    t, items = value
    if not isinstance(items, list):
        return value
    pairs = [(items[k], items[k + 1]) for k in range(0, len(items) - 1, 2)]
    return [p for p in pairs if not (isinstance(p[0], tuple) and p[0][1] == b"id")]


class RespDialect(Dialect):
    """RESP2 / RESP3 connection state for the recovery core (module docstring: the rules)."""

    name = "resp"

    def __init__(self) -> None:
        self._setup: dict[str, tuple[bytes, bytes, bool]] = {}  # key: (command, reply, auth)
        self._setup_unknown: str | None = None
        self.lost: str | None = None
        self._fresh()

    def _fresh(self) -> None:
        """The per-stream state: nothing in flight, no server-side mode."""
        self._commands = _Commands()
        self._replies = _Replies()
        self._fifo: deque[_Cmd] = deque()
        self._captures = 0                 # commands in the FIFO whose reply is kept
        self._multi: _Cmd | None = None    # the MULTI being queued into
        self._held = 0                     # MULTI ... EXEC/DISCARD exchanges not yet answered
        self._watch = False
        self._monitor = False
        self._tracking = False
        self._subscribed = False
        self._sub_counts = [0, 0]          # channels + patterns, shard channels
        self._sub_expect = 0               # confirmations still expected
        self._read_since_write = False
        self._group: list[_Cmd] = []       # commands the current answer belongs to
        self._aligned = True               # the current answer began at a reply boundary
        self._exec_begun = False

    # -- feeding --------------------------------------------------------------------------

    def wrote(self, data: bytes) -> None:
        if self.lost is not None:
            return
        if self._read_since_write:
            self._read_since_write = False
            if not self._held:
                self._group = []
                self._aligned = not self._fifo and not self._replies.in_value
        try:
            for args, whole in self._commands.feed(data):
                self._command(_Cmd(args, whole))
        except _Lost as e:
            self._lose(str(e))
        except Exception as e:  # never break the connection (rule 6)  # pragma: no cover
            self._lose(f"unexpected {type(e).__name__} on a command")

    def read(self, data: bytes) -> None:
        self._read_since_write = True
        if self.lost is not None or self._monitor:
            return
        replies = self._replies
        try:
            if self._captures or self._subscribed:
                # some replies' content matters: one value at a time, each with its capture
                i = 0
                n = len(data)
                while i < n:
                    if not replies.in_value:
                        replies.capture = (_SUB_CAPTURE if self._subscribed else
                                           self._capture_for(self._fifo[0] if self._fifo
                                                             else None))
                    values, i = replies.feed(data, i, 1)
                    if not values:
                        break
                    self._reply(*values[0])
                    if self.lost is not None or self._monitor:
                        return
            else:
                replies.capture = 0
                values, _ = replies.feed(data)
                for t, raw in values:
                    self._reply(t, raw)
                    if self.lost is not None or self._monitor:
                        return
        except _Lost as e:
            self._lose(str(e))
            return
        except Exception as e:  # never break the connection (rule 6)  # pragma: no cover
            self._lose(f"unexpected {type(e).__name__} on a reply")
            return
        if self._fifo and self._fifo[0].kind == "exec" and replies.in_value:
            self._exec_begun = True

    # -- questions ------------------------------------------------------------------------

    def refusal(self) -> str | None:
        if self.lost is not None:
            if self._setup or self._held or self._watch or self._subscribed:
                return (f"RESP: the command stream could not be followed ({self.lost}), so "
                        "the connection state it set up cannot be restored with certainty")
            return None
        if self._monitor:
            return "RESP: MONITOR is active; commands run during the gap would be missed"
        if self._subscribed:
            return "RESP: a SUBSCRIBE is active; pushes sent during the gap would be missed"
        if self._watch:
            return ("RESP: under WATCH; a new connection would run the transaction without "
                    "the watched keys' guarantee")
        if self._tracking:
            return ("RESP: CLIENT TRACKING is on; invalidation messages sent during the gap "
                    "would be missed")
        if self._setup_unknown is not None:
            return f"RESP: {self._setup_unknown}, so it cannot be restored"
        if self._replies.in_value and not self.resumable():
            names = ", ".join(sorted({c.name.decode("latin-1") for c in self._group
                                      if not c.safe})) or "unknown"
            return (f"RESP: a reply was cut mid-way and its command(s) ({names}) are not "
                    "idempotent, so they are not re-sent")
        return None

    def unsafe(self) -> str | None:
        if self.lost is not None:
            return None  # refused already when state was recorded; else unknown (byte rules)
        for cmd in self._fifo:
            kind = cmd.kind
            if kind in ("multi", "queued", "discard", "error"):
                continue  # queued commands run only at EXEC; these run nothing
            if kind == "exec":
                bad = next((q for q in cmd.queued if not q.safe), None)
                if bad is not None:
                    return f"MULTI ... EXEC ({_name(bad)})"
                continue
            if not cmd.safe:
                return _name(cmd)
        return None

    def fresh_ok(self) -> bool:
        # A new connection gets the recorded setup back (restore); nothing else in RESP is
        # connection state the refusals do not cover.
        return self.lost is None and self.refusal() is None

    def restore(self) -> Restore | None:
        if not self._setup or self.lost is not None:
            return None
        entries = [(k, c, r) for k, (c, r, auth) in self._setup.items() if auth]
        entries += [(k, c, r) for k, (c, r, auth) in self._setup.items() if not auth]
        return _Restore(entries)

    def hold(self) -> bool:
        return bool(self._held) and self.lost is None

    def fin_is_final(self) -> bool:
        return True

    def resumable(self) -> bool:
        if self.lost is not None or not self._aligned or self._subscribed or self._monitor:
            return False
        in_multi = False
        for cmd in self._group:
            if cmd.kind == "multi":
                in_multi = True
            elif cmd.kind in ("exec", "discard"):
                in_multi = False
                if cmd.kind == "exec" and (self._exec_begun or cmd not in self._fifo):
                    if not all(q.safe for q in cmd.queued):
                        return False
            elif not in_multi and not cmd.safe:
                return False
        return True

    def truncated(self) -> bool:
        if self.lost is not None or self._monitor or self._subscribed:
            return False
        return self._replies.in_value or bool(self._fifo)

    def new_connection(self) -> None:
        # A recovered connection carries on the same command stream (restored, replayed);
        # the state whose drop is refused cannot be set here.
        self._read_since_write = False

    def discard(self) -> None:
        """The connection was thrown away after a surfaced error: whatever was in flight is
        gone, the next connection starts at a command boundary with the recorded setup (a
        stream already lost stays lost only if setup had been recorded)."""
        if self.lost is not None and not self._setup:
            self.lost = None
        self._fresh()

    # -- internals ------------------------------------------------------------------------

    def _lose(self, why: str) -> None:
        self.lost = why
        self._fifo.clear()
        self._captures = 0
        self._group = []

    def _push(self, cmd: _Cmd) -> None:
        self._fifo.append(cmd)
        if self._capture_for(cmd):
            self._captures += 1

    def _capture_for(self, cmd: _Cmd | None) -> int:
        if cmd is None:
            return 0
        if cmd.kind in ("setup", "tracking") or (cmd.kind == "exec" and cmd.queued and any(
                q.kind == "setup" for q in cmd.queued)):
            return _CAPTURE
        return 0

    def _command(self, cmd: _Cmd) -> None:
        name = cmd.name
        if len(self._group) < _GROUP_LIMIT:
            self._group.append(cmd)
        else:
            self._aligned = False  # too long a pipeline to judge: not resumed
        if name not in _SPECIAL and self._multi is None:
            self._fifo.append(cmd)  # the common case: an ordinary command, reply not kept
            return
        if name in _SUBSCRIBE:
            self._subscribed = True
            channels = len(cmd.args) - 1 if cmd.whole else 1
            self._sub_expect += max(channels, 1)
            return  # answered by confirmations, recognised by content
        if name == b"MONITOR":
            self._monitor = True
            return
        multi = self._multi
        if multi is not None:
            if name in (b"EXEC", b"DISCARD"):
                cmd.kind = "exec" if name == b"EXEC" else "discard"
                cmd.queued = multi.queued
                self._multi = None
                self._exec_begun = False
            elif name in (b"MULTI", b"WATCH"):
                cmd.kind = "error"  # refused inside MULTI, nothing queued
            else:
                cmd.kind = "queued"
                if _setup_key(cmd) is not None:
                    q = _Cmd(cmd.args, cmd.whole)
                    q.kind = "setup"
                    multi.queued.append(q)
                else:
                    multi.queued.append(cmd)
            self._push(cmd)
            return
        if name == b"MULTI":
            cmd.kind = "multi"
            self._multi = cmd
            self._held += 1
        elif name in (b"EXEC", b"DISCARD"):
            cmd.kind = "error"  # without MULTI: an error reply
        elif name == b"WATCH":
            self._watch = True
        elif name == b"UNWATCH":
            cmd.kind = "unwatch"
        elif name == b"RESET":
            cmd.kind = "reset"
        elif name == b"CLIENT" and len(cmd.args) > 1:
            sub = cmd.args[1].upper()
            if sub == b"REPLY" and (len(cmd.args) < 3 or cmd.args[2].upper() != b"ON"):
                self._lose("CLIENT REPLY OFF / SKIP: replies no longer answer commands")
                return
            if sub == b"TRACKING":
                cmd.kind = "tracking"
        if not cmd.kind and _setup_key(cmd) is not None:
            cmd.kind = "setup"
        self._push(cmd)

    def _reply(self, t: int, raw: bytes | None) -> None:
        if self._subscribed and self._sub_reply(t, raw):
            return
        if t == 0x3E:  # a push (RESP3): invalidations, pub/sub; answers no command
            return
        if not self._fifo:
            self._lose("a reply with no command to answer")
            return
        cmd = self._fifo.popleft()
        if self._captures and self._capture_for(cmd):
            self._captures -= 1
        kind = cmd.kind
        if kind == "setup":
            if not _is_error(t):
                self._record(cmd, raw)
        elif kind == "multi":
            if _is_error(t):
                self._held -= 1
                self._multi = None
        elif kind in ("exec", "discard"):
            self._held = max(self._held - 1, 0)
            self._watch = False
            self._exec_begun = False
            if kind == "exec" and not _is_error(t):
                self._exec_setup(cmd, raw)
        elif kind == "unwatch":
            self._watch = False
        elif kind == "reset" and not _is_error(t):
            self._setup.clear()
            self._setup_unknown = None
            self._watch = self._subscribed = self._tracking = False
            self._held = 0
            self._multi = None
        elif kind == "tracking" and not _is_error(t):
            on = len(cmd.args) > 2 and cmd.args[2].upper() == b"ON"
            self._tracking = on

    def _record(self, cmd: _Cmd, raw: bytes | None) -> None:
        key = _setup_key(cmd)
        assert key is not None
        if raw is None or not cmd.whole:
            self._setup_unknown = f"a {_label(key)} too large to record was sent"
            return
        auth = key == "auth"
        if key == "hello":
            upper = [a.upper() for a in cmd.args[2:]]
            auth = b"AUTH" in upper
            if b"SETNAME" in upper:
                self._setup.pop("setname", None)
        self._setup.pop(key, None)
        self._setup[key] = (encode(cmd.args), raw, auth)

    def _exec_setup(self, cmd: _Cmd, raw: bytes | None) -> None:
        if not any(q.kind == "setup" for q in cmd.queued):
            return
        try:
            value = parse(raw)[0] if raw is not None else None
        except (ValueError, IndexError):
            value = None
        if value is None:
            self._setup_unknown = "setup inside MULTI whose EXEC reply could not be read"
            return
        t, items = value
        if not isinstance(items, list):
            return  # a null EXEC (WATCH failed): nothing ran
        for q, item in zip(cmd.queued, items):
            if q.kind == "setup" and not _is_error(item[0]):
                self._record(q, _unparse(item))

    def _sub_reply(self, t: int, raw: bytes | None) -> bool:
        """A reply while subscribed: True if it was a confirmation or a message."""
        if raw is None:
            return t in (0x3E, 0x2A)  # too big for a confirmation: a message
        if t not in (0x3E, 0x2A):
            return False
        try:
            value = parse(raw)[0]
        except (ValueError, IndexError):
            return False
        items = value[1]
        if not isinstance(items, list) or not items or not isinstance(items[0][1], bytes):
            return t == 0x3E
        kind = items[0][1].lower()
        if kind in _MESSAGES:
            return True
        if kind not in _CONFIRMS or len(items) < 3:
            return t == 0x3E
        try:
            count = int(items[2][1])
        except (TypeError, ValueError):
            count = 0
        self._sub_counts[1 if kind in (b"ssubscribe", b"sunsubscribe") else 0] = count
        self._sub_expect = max(self._sub_expect - 1, 0)
        if kind.endswith(b"unsubscribe") and self._sub_counts == [0, 0] and \
                not self._sub_expect:
            self._subscribed = False
        return True


def _unparse(value: RespValue) -> bytes:
    """The RESP bytes of a value from ``parse`` (used for an element of EXEC's reply)."""
    t, body = value
    if isinstance(body, list):
        n = len(body) // 2 if t in b"%|" else len(body)
        return bytes((t,)) + b"%d\r\n" % n + b"".join(_unparse(v) for v in body)
    if body is None:
        return bytes((t,)) + b"-1\r\n"
    if t in b"$!=":
        return bytes((t,)) + b"%d\r\n" % len(body) + body + b"\r\n"
    return bytes((t,)) + body + b"\r\n"
