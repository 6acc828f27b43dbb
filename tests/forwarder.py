"""``Forwarder``: a plain TCP forwarder on loopback, as the simple ones in front of servers are
(docker-proxy, ``ssh -L``, socat, home-made ones): a pump per direction, an EOF passed on as a
half-close (``shutdown(SHUT_WR)``) while the other direction goes on until it ends too. It sets
TCP_NODELAY on neither side (Nagle's algorithm on, as socat without ``nodelay``).

Unlike FaultProxy, which closes the client's connection at the server's FIN (as Toxiproxy
does), it keeps the client's side open and still takes its bytes after the server's FIN.
Subclasses may look at every chunk (``_taps``). benchmarks/bench_session.py has its own
forwarder process: what it measures is that process's round trips.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
import gevent.socket as gsocket

from resilientsock.testing._loop import ListenerService

Tap = Callable[[bytes], None]


class Forwarder(ListenerService):
    """Forwards every connection to ``upstream`` (its own hub and thread; ``with`` or
    ``start()``/``close()``). An error on either side closes both; a connection still open
    after 30 s is closed (an arbitrary bound, far above any test here)."""

    def __init__(self, upstream: tuple[str, int], name: str = "forwarder") -> None:
        super().__init__(name, "127.0.0.1", 0, None)
        self.upstream = upstream

    def _taps(self) -> tuple[Tap | None, Tap | None]:
        """For each new connection: what sees each chunk client -> upstream, and
        upstream -> client, before it is passed on (None: nothing)."""
        return None, None

    def _handle(self, client: Any) -> None:
        try:
            server = gsocket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        server.settimeout(None)
        up, down = self._taps()
        pumps = [gevent.spawn(self._pump, client, server, up),
                 gevent.spawn(self._pump, server, client, down)]
        gevent.joinall(pumps, timeout=30)
        for sock in (client, server):
            sock.close()

    @staticmethod
    def _pump(src: Any, dst: Any, tap: Tap | None) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    dst.shutdown(gsocket.SHUT_WR)
                    return
                if tap is not None:
                    tap(data)
                dst.sendall(data)
        except OSError:
            for sock in (src, dst):
                sock.close()

    def _teardown(self) -> None:
        self._close_listener()
