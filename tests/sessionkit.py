"""Helpers for the session tests on real paths (test_session_paths.py, test_session_storms.py).

``Recorder``: a TCP forwarder that, like many middleboxes (socat without ``nodelay``, home-made
forwarders), does NOT set TCP_NODELAY on either side, and records every chunk it reads with its
time, split into session frames, so a test can count what one application write became on
the wire.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import gevent
import gevent.socket as gsocket

from resilientsock.session import protocol as sp
from resilientsock.testing import LoopThread


class _Parser:
    """Splits one direction's bytes into session frames (types), across chunks."""

    def __init__(self, preamble: bool) -> None:
        self.buf = bytearray()
        self.skip = len(sp.PREAMBLE) if preamble else 0

    def feed(self, data: bytes) -> list[int]:
        self.buf += data
        if self.skip:
            take = min(self.skip, len(self.buf))
            del self.buf[:take]
            self.skip -= take
        types = []
        while len(self.buf) >= sp.HEADER_LEN:
            ftype, length, _ = sp.HEADER.unpack_from(self.buf, 0)
            if len(self.buf) < sp.HEADER_LEN + length:
                break
            del self.buf[:sp.HEADER_LEN + length]
            types.append(ftype)
        return types


class Recorder:
    """A forwarder without TCP_NODELAY (its own hub and thread). ``chunks``: one entry per
    ``recv``: (monotonic time, "up" or "down", size, frame types completed by it, bytes of a
    frame still incomplete after it)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.chunks: list[tuple[float, str, int, list[int], int]] = []
        self.connections = 0
        self.loop = LoopThread("recorder").start()
        self.address = self.loop.call(self._listen)

    def _listen(self) -> tuple[str, int]:
        sock = gsocket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.listener = sock
        gevent.spawn(self._accept, sock)
        return sock.getsockname()  # type: ignore[no-any-return]

    def _accept(self, sock: Any) -> None:
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return
            self.connections += 1
            gevent.spawn(self._serve, client)

    def _serve(self, client: Any) -> None:
        try:
            upstream = gsocket.create_connection(self.target)
        except OSError:
            client.close()
            return

        def pump(src: Any, dst: Any, direction: str) -> None:
            parser = _Parser(preamble=direction == "up")
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    types = parser.feed(data)
                    self.chunks.append((time.monotonic(), direction, len(data), types,
                                        len(parser.buf)))
                    dst.sendall(data)
            except OSError:
                return

        down = gevent.spawn(pump, upstream, client, "down")
        pump(client, upstream, "up")
        down.join()
        client.close()
        upstream.close()

    def stop(self) -> None:
        self.loop.call(self.listener.close)
        self.loop.stop()
