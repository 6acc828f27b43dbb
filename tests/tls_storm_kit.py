"""Shared pieces of the TLS storm tests (tests/test_tls_storms.py): a seeded TLS storm through a
FaultProxy, TLS test servers that count on the server side, and the differential runner.

The storm fires every 50-200 ms, one of: RST both ways (``reset_all``), FIN both ways
(``close_all``), a chunk cut in the middle of a TLS record then RST (``cut_after`` a few bytes
into the next chunk, either direction), and a cut inside the TLS handshake of the reconnect
that follows (``cut_after(..., new_only=True)`` then RST of what is open). The same seed gives
the same sequence of faults in the plain run and in the resilientsock run; their timing
against the client's operations differs, so runs are judged by invariants counted on the
server (nothing run more often than the plain client can run it, nothing lost silently), not
by equal counts.
"""

from __future__ import annotations

import json
import socket
import socketserver
import ssl
from pathlib import Path
from typing import Any

from conftest import FaultThread, ServedInThread, run_as, wrap_server_side

from resilientsock.testing import FaultProxy

KINDS = ("rst", "fin", "cut-record", "cut-handshake")


class TLSStorm(FaultThread):
    """Faults through ``proxy`` every 50-200 ms from a thread of its own until stopped, at
    most ``limit`` of them. ``fired`` lists the kinds in order."""

    def __init__(self, proxy: FaultProxy, seed: int, kinds: tuple[str, ...] = KINDS,
                 period: tuple[float, float] = (0.05, 0.2), limit: int = 10_000) -> None:
        super().__init__(proxy, seed, kinds)
        self.period = period
        self.limit = limit

    def _run(self) -> None:
        px, rng = self.proxy, self.rng
        while len(self.fired) < self.limit and not self.stop.wait(rng.uniform(*self.period)):
            kind = rng.choice(self.kinds)
            self.fired.append(kind)
            if kind == "rst":
                px.reset_all()
            elif kind == "fin":
                px.close_all()
            elif kind == "cut-record":
                # A few bytes into the next chunk: inside its first TLS record (5 bytes of
                # header, then at least 17 of an AEAD record), then RST.
                px.cut_after(rng.randrange(1, 20), rng.choice(["down", "up"]), how="reset")
            else:
                # The reconnect's handshake: the ClientHello (up, ~300-500 bytes) or the
                # server's flight (down, ~1-2 KB with a trustme certificate) is cut.
                if rng.random() < 0.5:
                    px.cut_after(rng.randrange(1, 300), "up", how=rng.choice(["reset", "close"]),
                                 new_only=True)
                else:
                    px.cut_after(rng.randrange(1, 1200), "down",
                                 how=rng.choice(["reset", "close"]), new_only=True)
                px.reset_all()


class CA:
    """A trustme CA, its certificate in ``cafile``, and a server context for 127.0.0.1."""

    def __init__(self, tmp_path: Path) -> None:
        import trustme

        self.ca = trustme.CA()
        self.cafile = tmp_path / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.cafile))
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ca.issue_cert("localhost", "127.0.0.1").configure_cert(self.server_ctx)


class TLSWrapping(ServedInThread):
    """A threaded loopback server mixin that wraps each accepted connection in TLS in its own
    thread (a cut handshake never stalls the accept loop) and counts what it ran in
    ``counts``. ``tls=False``: plaintext (a STARTTLS server wraps later itself)."""

    request_queue_size = 128
    context: ssl.SSLContext
    tls: bool

    def setup_tls(self, context: ssl.SSLContext, tls: bool) -> None:
        self.context = context
        self.tls = tls
        self.start_counting()

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(10)
        # Line protocols answer in several small writes: without TCP_NODELAY each waits for
        # the client's delayed ACK (40 ms), and the storm would meet every operation.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            try:
                request = wrap_server_side(self.context, request)
            except (OSError, ValueError):
                self.count("handshake failed")
                request.close()
                return
        self.count("connections")
        try:
            self.RequestHandlerClass(request, client_address, self)
        finally:
            try:
                request.close()
            except OSError:
                pass


class TLSCountingServer(TLSWrapping, socketserver.ThreadingTCPServer):
    def __init__(self, handler: type[socketserver.BaseRequestHandler], context: ssl.SSLContext,
                 tls: bool = True) -> None:
        socketserver.ThreadingTCPServer.__init__(self, ("127.0.0.1", 0), handler)
        self.setup_tls(context, tls)


def run_client(mode: str, script: Path, *args: Any, timeout: float = 120) -> list[dict[str, Any]]:
    """Run a client script (plain or under the runner); its stdout is one JSON object per
    operation. Returns them; a non-zero exit is a failure of the test."""
    out = run_as(mode, script, *args, timeout=timeout)
    assert out.returncode == 0, (mode, out.stdout[-2000:], out.stderr[-4000:])
    ops = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    for op in ops:
        op["stderr"] = out.stderr
    return ops


CLIENT_PRELUDE = '''\
import json, sys, time, os

def notes(exc):
    out, seen = [], set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out += [str(n) for n in getattr(e, "__notes__", None) or []]
        todo += [e.__cause__, e.__context__]
    return out

def report(i, kind, key, exc=None, t0=None, **extra):
    rec = {"i": i, "kind": kind, "key": key, "ok": exc is None,
           "dt": round(time.monotonic() - t0, 3) if t0 else None}
    if exc is not None:
        rec["exc"] = type(exc).__module__ + "." + type(exc).__qualname__
        rec["msg"] = str(exc)[:200]
        rec["notes"] = notes(exc)
    rec.update(extra)
    print(json.dumps(rec), flush=True)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
