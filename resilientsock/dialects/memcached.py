"""memcached, text and meta protocol: commands written, replies read, paired first in first out.

Rules of this module (design.md §5 "Idempotency decides where a dialect knows it"; the protocol:
https://github.com/memcached/memcached/blob/master/doc/protocol.txt):

1. Framing only. A command is a line; storage commands (``set add replace append prepend
   cas``, meta ``ms``) carry a data block of the length the line gives, passed by counting,
   never copied. Replies are lines; ``VALUE`` (text retrieval, until ``END``) and ``VA``
   (meta) carry a data block, also counted.
2. Idempotency (a command that may have reached the server is re-sent only if running it
   twice leaves the server as once would): ``get gets gat gats touch delete set replace
   version stats verbosity quit``, ``mg mn me``, ``ms`` in set or replace mode without a CAS
   compare, ``md`` without a CAS compare. Never: ``incr decr append prepend add cas
   flush_all``, ``ma``, ``ms`` in add / append / prepend mode or with ``C``, ``md`` with
   ``C``, and any command this module does not know. (``add`` run twice stores once, but the
   second answer, ``NOT_STORED``, tells the caller it lost a race it won: locks are built on
   it. ``set`` re-sent right after the drop is HTTP PUT's case; one replayed much later over
   a newer value is what rule 3 prevents.)
3. ``noreply`` (text) and the meta ``q`` flag: the command gets no answer on success, so no
   answer will ever confirm it. ``write_only()`` is True while nothing written awaits an
   answer, and the core then confirms what the peer's TCP acknowledged (``acks``): an old
   ``set ... noreply`` is never replayed after a later drop, over another client's newer
   value.
4. Unanswered means written whole since the application's last read (the journal's rule: a
   read confirms every record written before it began).
5. A fresh connection is equivalent (the text and meta protocols have no login; SASL is the
   binary protocol's): after a surfaced error the core may reconnect lazily.
6. Quiet meta commands (``q``) make replies unpairable (a hit answers, a miss does not): from
   the first one, answers in progress are neither resumed nor called cut. A framing error:
   parsing stops and the dialect is "unknown" (byte rules).
"""

from __future__ import annotations

from collections import deque

from ._base import Dialect, unanswered_after

_STORAGE = frozenset((b"set", b"add", b"replace", b"append", b"prepend", b"cas"))
_RETRIEVAL = frozenset((b"get", b"gets", b"gat", b"gats"))
_SAFE = frozenset((b"get", b"gets", b"gat", b"gats", b"touch", b"delete", b"set", b"replace",
                   b"version", b"stats", b"verbosity", b"quit", b"mg", b"mn", b"me"))
_KNOWN = _SAFE | _STORAGE | frozenset((b"incr", b"decr", b"flush_all", b"ms", b"md", b"ma",
                                       b"cache_memlimit", b"shutdown", b"lru_crawler",
                                       b"slabs", b"watch", b"misbehave"))
_NO_ANSWER = frozenset((b"quit",))
_LINE_LIMIT = 8192
_GROUP_LIMIT = 4096


class _Lost(Exception):
    """The stream is not memcached's text / meta protocol as far as this module follows it."""


def looks_like(first_write: bytes) -> bool:
    """Is this first record a memcached text or meta command (a known lowercase command
    word, a line ending in CRLF, and for storage commands numeric fields)?"""
    end = first_write.find(b"\r\n", 0, _LINE_LIMIT)
    if end <= 0:
        return False
    words = first_write[:end].split(b" ")
    name = words[0]
    if name not in _KNOWN:
        return False
    try:
        if name in _STORAGE:
            return len(words) >= (6 if name == b"cas" else 5) and int(words[4]) >= 0
        if name == b"ms":
            return len(words) >= 3 and int(words[2]) >= 0
        if name in (b"mg", b"md", b"ma") or name in _RETRIEVAL or name in (b"incr", b"decr",
                                                                           b"delete", b"touch"):
            return len(words) >= 2 and bool(words[1])
    except ValueError:
        return False
    return True


class _Cmd:
    __slots__ = ("name", "key", "safe", "answer", "retrieval", "quiet")

    def __init__(self, words: list[bytes]) -> None:
        name = self.name = words[0]
        self.key = words[1] if len(words) > 1 else b""
        flags = words[2:]
        noreply = bool(flags) and flags[-1] == b"noreply" and name not in (b"mg", b"ms",
                                                                            b"md", b"ma")
        self.quiet = name in (b"mg", b"ms", b"md", b"ma") and b"q" in flags
        self.answer = not noreply and not self.quiet and name not in _NO_ANSWER
        self.retrieval = name in _RETRIEVAL or name == b"stats"
        if name == b"ms":
            mode = next((f[1:2] for f in flags[1:] if f[:1] == b"M" and len(f) == 2), b"S")
            self.safe = mode in (b"S", b"s", b"R", b"r") and not any(
                f[:1] == b"C" for f in flags[1:])
        elif name == b"md":
            self.safe = not any(f[:1] == b"C" for f in flags)
        else:
            self.safe = name in _SAFE

    def label(self) -> str:
        text = self.name.decode("latin-1")
        if self.key and self.name not in (b"gat", b"gats", b"flush_all", b"verbosity"):
            text += " " + self.key[:40].decode("latin-1", "replace")
        if not self.answer and not self.quiet and self.name not in _NO_ANSWER:
            text += " noreply"
        return text


class MemcachedDialect(Dialect):
    """memcached text / meta protocol knowledge (module docstring: the rules)."""

    name = "memcached"
    acks = True  # requests without answers (noreply): the core looks at TCP acknowledgements

    def __init__(self) -> None:
        self.lost: str | None = None
        self._unpaired = False
        self._fresh()

    def _fresh(self) -> None:
        self._wline = b""
        self._wskip = 0
        self._wcmd: _Cmd | None = None  # a storage command whose data block is being written
        self._rline = b""
        self._rskip = 0
        self._rin = False            # a reply has begun and is not complete
        self._rdone_after_skip = False
        self._fifo: deque[_Cmd] = deque()  # commands awaiting an answer
        # written whole and not answered yet (rule 4): (record, command); a read answers the
        # records written before it began (answered(late))
        self._since_read: list[tuple[int, _Cmd]] = []
        self._records = 0
        self._read_since_write = False
        self._group: list[_Cmd] = []
        self._aligned = True

    # -- feeding --------------------------------------------------------------------------

    def wrote(self, data: bytes) -> None:
        self._records += 1
        if self.lost is not None:
            return
        if self._read_since_write:
            self._read_since_write = False
            self._group = []
            self._aligned = not self._fifo and not self._rin
        try:
            self._write(data)
        except (_Lost, ValueError, IndexError) as e:
            self._lose(f"command: {e}")

    def _write(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._wskip:
                take = min(self._wskip, n - i)
                self._wskip -= take
                i += take
                if not self._wskip and self._wcmd is not None:
                    self._whole(self._wcmd)
                    self._wcmd = None
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self._wline += data[i:]
                if len(self._wline) > _LINE_LIMIT:
                    raise _Lost("a command line over 8 KiB")
                return
            line = self._wline + data[i:j]
            self._wline = b""
            i = j + 1
            line = line.rstrip(b"\r")
            if not line:
                continue
            words = line.split()
            name = words[0]
            if name in _STORAGE:
                self._wskip = int(words[4]) + 2
            elif name == b"ms":
                self._wskip = int(words[2]) + 2
            cmd = _Cmd(words)
            if cmd.quiet:
                self._unpaired = True
            if cmd.answer:
                self._fifo.append(cmd)
            if len(self._group) < _GROUP_LIMIT:
                self._group.append(cmd)
            else:
                self._aligned = False
            # A storage command is whole once its data block is: until then it cannot have
            # run, so it joins the unanswered ones (rule 4) when its block is written.
            if self._wskip:
                self._wcmd = cmd
            else:
                self._whole(cmd)

    def _whole(self, cmd: _Cmd) -> None:
        entry = (self._records, cmd)
        if len(self._since_read) < _GROUP_LIMIT:
            self._since_read.append(entry)
        elif not cmd.safe:
            self._since_read[-1] = entry  # the newest stays: answered() keeps it longest

    def answered(self, late: int) -> None:
        if self._since_read:
            self._since_read = unanswered_after(self._since_read, self._records - late)

    def read(self, data: bytes) -> None:
        self._read_since_write = True
        if self.lost is not None or self._unpaired:
            return
        try:
            self._read(data)
        except (_Lost, ValueError, IndexError) as e:
            self._lose(f"reply: {e}")

    def _read(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._rskip:
                take = min(self._rskip, n - i)
                self._rskip -= take
                i += take
                if not self._rskip and self._rdone_after_skip:
                    self._reply_done()
                continue
            if not self._fifo:
                raise _Lost("a reply with no command to answer")
            self._rin = True
            j = data.find(b"\n", i)
            if j < 0:
                self._rline += data[i:]
                if len(self._rline) > _LINE_LIMIT:
                    raise _Lost("a reply line over 8 KiB")
                return
            line = (self._rline + data[i:j]).rstrip(b"\r")
            self._rline = b""
            i = j + 1
            self._line(line)

    def _line(self, line: bytes) -> None:
        cmd = self._fifo[0]
        word = line.split(b" ", 1)[0]
        if word in (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR"):
            self._reply_done()
        elif cmd.retrieval:
            if word == b"VALUE":
                self._rskip = int(line.split()[3]) + 2
                self._rdone_after_skip = False
            elif word == b"STAT":
                pass
            else:  # END, or anything else ends it
                self._reply_done()
        elif word == b"VA":
            self._rskip = int(line.split()[1]) + 2
            self._rdone_after_skip = True
        else:
            self._reply_done()

    def _reply_done(self) -> None:
        self._rin = False
        self._rdone_after_skip = False
        if self._fifo:
            self._fifo.popleft()

    def acked(self) -> None:
        self._since_read = []

    def _lose(self, why: str) -> None:
        self.lost = why
        self._fifo.clear()
        self._since_read = []
        self._group = []

    # -- questions ------------------------------------------------------------------------

    def _writing_data(self) -> bool:
        return bool(self._wskip) or bool(self._wline)

    def unsafe(self) -> str | None:
        if self.lost is not None:
            return None
        for _, cmd in self._since_read:
            if not cmd.safe:
                return cmd.label()
        return None

    def fresh_ok(self) -> bool:
        return True

    def write_only(self) -> bool:
        return self.lost is None and not self._fifo and not self._writing_data()

    def fin_is_final(self) -> bool:
        return True

    def resumable(self) -> bool:
        if self.lost is not None or self._unpaired or not self._aligned or not self._group:
            return False
        return all(c.safe for c in self._group)

    def truncated(self) -> bool:
        if self.lost is not None or self._unpaired:
            return False
        return self._rin or bool(self._rskip) or bool(self._fifo)

    def discard(self) -> None:
        self.lost = None
        self._unpaired = False
        self._fresh()
