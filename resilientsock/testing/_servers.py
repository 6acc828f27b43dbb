"""Small real servers for tests, examples and the demo (each in a LoopThread).

``MessageServer`` speaks the robot protocol: the client sends ``MSG <n> <text>\\n`` lines and
the server answers ``ACK <n>\\n`` for each, recording every ``n`` in arrival order (so a test
can count duplicates and losses). ``mode="echo"`` echoes bytes; ``mode="sink"`` reads and
never answers (telemetry). Every complete line is kept in ``lines``.

Deterministic triggers for tests: ``HALF <n>`` records n, answers ``ACK `` without the rest
and waits (a drop then lands mid-answer); ``POISON`` resets the connection (SO_LINGER 0)
every time it arrives; ``PING`` answers ``PONG``.
"""

from __future__ import annotations

import struct
from typing import Any

import gevent
import gevent.socket as gsocket

from ._loop import LoopThread


class MessageServer:
    """A line server on 127.0.0.1 (see module docstring). ``received``: every n, in order."""

    def __init__(self, mode: str = "ack", loop: LoopThread | None = None, port: int = 0) -> None:
        if mode not in ("ack", "echo", "sink"):
            raise ValueError(f"mode must be 'ack', 'echo' or 'sink', got {mode!r}")
        self.mode = mode
        self._own_loop = loop is None
        self._loop = loop or LoopThread("message-server")
        self._port = port
        self._listener: Any = None
        self._clients: set[Any] = set()
        self.received: list[int] = []
        self.lines: list[bytes] = []
        self.bytes_received = 0
        self.connections = 0
        self.address: tuple[str, int] = ("127.0.0.1", port)

    def start(self) -> MessageServer:
        if self._own_loop:
            self._loop.start()
        self._loop.call(self._listen)
        return self

    def stop(self) -> None:
        """Close the listener and every client connection (the server 'goes down')."""
        self._loop.call(self._close)

    def restart(self) -> None:
        """Listen again on the same port after ``stop()``."""
        self._loop.call(self._listen)

    def shutdown(self) -> None:
        try:
            self.stop()
        finally:
            if self._own_loop:
                self._loop.stop()

    def __enter__(self) -> MessageServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def unique(self) -> set[int]:
        return set(self.received)

    def duplicates(self) -> int:
        return len(self.received) - len(set(self.received))

    def _listen(self) -> None:
        if self._listener is not None:
            return
        sock = gsocket.socket()
        sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))
        sock.listen(1024)
        self._port = sock.getsockname()[1]
        self.address = ("127.0.0.1", self._port)
        self._listener = sock
        gevent.spawn(self._accept_loop, sock)

    def _close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for client in list(self._clients):
            client.close()
        self._clients.clear()

    def _accept_loop(self, listener: Any) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.connections += 1
            self._clients.add(client)
            gevent.spawn(self._serve, client)

    def _serve(self, client: Any) -> None:
        buf = b""
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    return
                self.bytes_received += len(data)
                if self.mode == "echo":
                    client.sendall(data)
                    continue
                buf += data
                *lines, buf = buf.split(b"\n")
                replies = []
                for line in lines:
                    self.lines.append(line)
                    parts = line.split(b" ", 2)
                    if len(parts) >= 2 and parts[0] in (b"MSG", b"HALF") and parts[1].isdigit():
                        n = int(parts[1])
                        self.received.append(n)
                        replies.append(b"ACK %d\n" % n if parts[0] == b"MSG" else b"ACK ")
                    elif parts[0] == b"PING":
                        replies.append(b"PONG\n")
                    elif parts[0] == b"POISON":
                        client.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_LINGER,
                                          struct.pack("ii", 1, 0))
                        return
                if replies and self.mode == "ack":
                    client.sendall(b"".join(replies))
        except OSError:
            return
        finally:
            self._clients.discard(client)
            client.close()
