"""Session mode (docs/design.md §11/§12): the same relay, sessions against plain proxying, one run.

    python benchmarks/bench_session.py [--runs N] [--quick] [--idle N] [--append PATH]

Processes: an upstream server (``_server``: echo, or sink with a one-byte answer), the relay
(``python -m resilientsock relay``), and this script as the client (gevent). Every
measurement alternates plain / session connections to the same relay, N runs, medians:

pingpong  64-byte write, 64-byte echo, round trips per second on one connection of each
          kind, open together, taking turns of 1/20 of the round trips (the order rotating),
          so that the machine's load weighs on all alike.
bulk      64 KiB ``sendall`` of 1 GiB (256 MiB with --quick) to the sink, until its answer
          (about a second: a 128 MiB transfer took 0.1 s, where TCP's ramp-up and where the
          scheduler puts three busy processes on two CPUs moved one run by ±20%).
resume    a FaultProxy (in this process) between client and relay: RST every connection, then
          time one 64-byte round trip; resume cost = that minus the median round trip through
          the same path, in round trips (target ≤ 2).
nagle     pingpong through a forwarder without TCP_NODELAY (``_forwarder``: a gevent process
          that sets it on neither side, as socat without ``nodelay`` and many home-made
          forwarders): a plain and a session connection through the same forwarder and
          relay, in turns as for pingpong. A frame split
          into two writes, or a standalone ACK followed by DATA, waits for the path's
          delayed ACK (40 ms) there (target ≥ 0.8×; 0.04× at c94b32e).
idle      Python-heap bytes per idle connection held by the relay (tracemalloc in a relay
          process of its own; clients and upstream in others), sessions against plain
          proxying; the difference is what a session costs (target ≤ 8 KiB).

Targets: pingpong and bulk ≥ 0.8× plain. The report is a Markdown section on stdout;
``--append PATH`` also appends it to PATH (``make bench`` does, after bench.py writes it).
Internal entry points: ``_server``, ``_forwarder``, ``_idle_clients``, ``_idle_relay``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PING = b"p" * 64


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _spawn(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        raise RuntimeError(f"{args}: no startup line")
    return proc, line


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
    proc.communicate(timeout=20)


# -- internal: the upstream server ---------------------------------------------------------


def _server() -> None:
    """First byte E: echo. S + 8-byte total: read that many, answer b"k". H: hold idle."""
    import gevent
    import gevent.server

    def handle(sock: Any, _addr: Any) -> None:
        try:
            serve(sock)
        except OSError:  # a client reset (the resume measurements do that on purpose)
            pass

    def serve(sock: Any) -> None:
        mode = sock.recv(1)
        if mode == b"E":
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                sock.sendall(data)
        elif mode == b"S":
            head = b""
            while len(head) < 8:
                head += sock.recv(8 - len(head))
            left = int.from_bytes(head, "big")
            while left > 0:
                data = sock.recv(262144)
                if not data:
                    return
                left -= len(data)
            sock.sendall(b"k")
            sock.recv(1)
        else:
            sock.recv(1)

    server = gevent.server.StreamServer(("127.0.0.1", 0), handle, backlog=4096)
    server.start()
    print(server.address[1], flush=True)
    gevent.get_hub().threadpool.spawn(sys.stdin.read).get()


def _forwarder(host: str, port: int) -> None:
    """Forward every connection to (host, port) WITHOUT TCP_NODELAY on either side (Nagle's
    algorithm on, as on many real paths); print the port, run until stdin closes."""
    import socket

    import gevent
    import gevent.server
    import gevent.socket as gsocket

    def pump(src: Any, dst: Any) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
        except OSError:
            return

    def handle(client: Any, _addr: Any) -> None:
        try:
            upstream = gsocket.create_connection((host, port))
        except OSError:
            client.close()
            return
        down = gevent.spawn(pump, upstream, client)
        pump(client, upstream)
        down.join()
        client.close()
        upstream.close()

    server = gevent.server.StreamServer(("127.0.0.1", 0), handle, backlog=4096)
    server.start()
    print(server.address[1], flush=True)
    gevent.get_hub().threadpool.spawn(sys.stdin.read).get()


# -- the client measurements ---------------------------------------------------------------


class RawSession:
    """A session client with no application socket pair and no retransmit buffer: what the
    relay alone costs (its frames, its pumps), next to what the whole client side costs."""

    def __init__(self, address: tuple[str, int]) -> None:
        import gevent.socket as gsocket

        from resilientsock.session import protocol as sp

        self.sp = sp
        self.sock = gsocket.create_connection(address, timeout=30)
        self.sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        self.stream = sp.Stream()
        self.link = sp.Link(sp.CLIENT)
        self.sock.sendall(self.link.send_hello_new(self.stream))
        self.pending = b""
        while not isinstance(self._event(), sp.Created):
            pass

    def _event(self) -> Any:
        while True:
            ev = self.link.next_event()
            if ev is not self.sp.NEED_DATA:
                return ev
            self.link.receive_data(self.sock.recv(262144))

    def sendall(self, data: bytes) -> None:
        self.stream.data_sent += len(data)
        self.sock.sendall(self.sp.HEADER.pack(self.sp.DATA, len(data), self.stream.received)
                          + data)

    def recv(self, n: int) -> bytes:
        while not self.pending:
            ev = self._event()
            if isinstance(ev, self.sp.Data):
                self.pending = ev.payload
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    def close(self) -> None:
        self.sock.close()


def _connect(mode: str, address: tuple[str, int]) -> Any:
    import gevent.socket as gsocket

    from resilientsock import RetryPolicy
    from resilientsock.session import open_session

    if mode == "raw":
        return RawSession(address)
    if mode in ("session", "unix"):
        return open_session(address, timeout=30, policy=RetryPolicy(deadline=30),
                            unix_pair=mode == "unix")
    sock = gsocket.create_connection(address, timeout=30)
    sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
    return sock


def _recv_exact(sock: Any, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            raise EOFError("EOF")
        out += data
    return out


def pingpong_alternating(address: tuple[str, int], count: int, modes: tuple[str, ...],
                         slices: int = 20) -> dict[str, float]:
    """Round trips per second on one connection of each mode, open together: ``count``
    round trips each, in ``slices`` turns whose order rotates, so a load that comes and goes
    on the machine weighs on every mode alike."""
    socks = {mode: _connect(mode, address) for mode in modes}
    spent = dict.fromkeys(socks, 0.0)
    for sock in socks.values():
        sock.sendall(b"E")
        for _ in range(50):
            sock.sendall(PING)
            _recv_exact(sock, 64)
    turn = max(1, count // slices)
    for i in range(slices):
        k = i % len(modes)
        for mode in modes[k:] + modes[:k]:
            sock = socks[mode]
            start = time.perf_counter()
            for _ in range(turn):
                sock.sendall(PING)
                _recv_exact(sock, 64)
            spent[mode] += time.perf_counter() - start
    for sock in socks.values():
        sock.close()
    return {mode: turn * slices / spent[mode] for mode in modes}


def bulk(mode: str, address: tuple[str, int], total: int) -> float:
    sock = _connect(mode, address)
    block = b"b" * 65536
    start = time.perf_counter()
    sock.sendall(b"S" + total.to_bytes(8, "big"))
    for _ in range(total // len(block)):
        sock.sendall(block)
    assert _recv_exact(sock, 1) == b"k"
    elapsed = time.perf_counter() - start
    sock.close()
    return total / elapsed / (1 << 20)


def resume(address: tuple[str, int], faults: int) -> tuple[float, float, float]:
    """(median round trip, median fault-to-echo, resume cost in round trips) in seconds."""
    from resilientsock.testing import FaultProxy

    with FaultProxy(address) as proxy:
        sock = _connect("session", proxy.address)
        sock.sendall(b"E")
        rts = []
        for _ in range(300):
            t = time.perf_counter()
            sock.sendall(PING)
            _recv_exact(sock, 64)
            rts.append(time.perf_counter() - t)
        after = []
        for _ in range(faults):
            proxy.reset_all()
            t = time.perf_counter()
            sock.sendall(PING)
            _recv_exact(sock, 64)
            after.append(time.perf_counter() - t)
        sock.close()
    rt = statistics.median(rts)
    fault = statistics.median(after)
    return rt, fault, (fault - rt) / rt


def resume_direct(address: tuple[str, int], faults: int) -> tuple[float, float, float]:
    """As ``resume``, with no proxy: the client's link is shut down under it (SHUT_RDWR, a
    drop seen at once on both sides), so the figure is TCP connect + the handshake alone."""
    import gc
    import socket

    from resilientsock.session import client as _client

    sock = _connect("session", address)
    sock.sendall(b"E")
    carrier = next(o for o in gc.get_objects() if isinstance(o, _client._ClientSession)
                   and not o.finished)
    rts, after = [], []
    for _ in range(300):
        t = time.perf_counter()
        sock.sendall(PING)
        _recv_exact(sock, 64)
        rts.append(time.perf_counter() - t)
    for _ in range(faults):
        lio = carrier.cur
        assert lio is not None
        t = time.perf_counter()
        lio.sock.shutdown(socket.SHUT_RDWR)
        sock.sendall(PING)
        _recv_exact(sock, 64)
        after.append(time.perf_counter() - t)
    sock.close()
    rt = statistics.median(rts)
    fault = statistics.median(after)
    return rt, fault, (fault - rt) / rt


# -- idle memory ------------------------------------------------------------------------------


def _idle_clients(mode: str, host: str, port: int, count: int) -> None:
    """Open ``count`` idle connections (sessions by hand, with the protocol's Link: one fd
    each), print "ready", hold them until stdin closes."""
    import gevent
    import gevent.pool
    import gevent.socket as gsocket

    from resilientsock.session import protocol as sp

    socks: list[Any] = []

    def one() -> None:
        sock = gsocket.create_connection((host, port), timeout=60)
        if mode == "session":
            link = sp.Link(sp.CLIENT)
            sock.sendall(link.send_hello_new(sp.Stream()))
            while True:
                link.receive_data(sock.recv(4096))
                ev = link.next_event()
                if ev is not sp.NEED_DATA:
                    break
            # The upstream holds on its first byte: send "H" as DATA inside the session.
            stream = link.stream
            assert stream is not None
            sock.sendall(stream.data(b"H"))
        else:
            sock.sendall(b"H")
        socks.append(sock)

    pool = gevent.pool.Pool(200)
    for _ in range(count):
        pool.spawn(one)
    pool.join(raise_error=True)
    print("ready", flush=True)
    gevent.get_hub().threadpool.spawn(sys.stdin.read).get()


def _idle_relay(mode: str, count: int) -> None:
    """Run a relay in this process and report the heap it holds for ``count`` idle
    connections of ``mode`` (one line: bytes per connection)."""
    import tracemalloc

    import gevent

    from resilientsock.session import Relay

    server, port = _spawn([__file__, "_server"])
    # Every connection comes from one address, all at once: the admission caps that guard a
    # relay against one source (sessions, unproven creations) are lifted for the measurement.
    cap = count + 100
    relay = Relay(("127.0.0.1", 0), ("127.0.0.1", int(port)), plain_after=5.0,
                  max_sessions=cap, max_sessions_per_source=cap, max_fresh_per_source=cap)
    relay.start()
    # Warm up one connection of the mode (first-use allocations are not per-connection).
    warm, _ = _spawn([__file__, "_idle_clients", mode, *map(str, relay.address), "1"])
    _end(warm)
    gevent.sleep(0.5)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    clients, _ = _spawn([__file__, "_idle_clients", mode, *map(str, relay.address),
                         str(count)])
    key = "sessions_active" if mode == "session" else "plain_connections"
    end = time.monotonic() + 300
    while relay.stats()[key] < count and time.monotonic() < end:
        time.sleep(0.2)  # polling a counter in another thread, bounded
    time.sleep(1.0)  # let the last bytes flow through the relay's pumps
    held = tracemalloc.get_traced_memory()[0] - base
    print(f"{held / count:.0f}", flush=True)
    _end(clients)
    relay.stop()
    _end(server)


# -- the report -----------------------------------------------------------------------------


def ratio_spread(session: list[float], plain: list[float]) -> tuple[float, float, float]:
    """(median, lowest, highest) of the per-run ratios session / plain: each run's two
    measurements were taken back to back, so a ratio compares like with like on a machine
    whose load moves between runs; the spread shows how far one run can be trusted."""
    ratios = [s / p for s, p in zip(session, plain)]
    return statistics.median(ratios), min(ratios), max(ratios)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/bench_session.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smaller transfers, 3 runs")
    parser.add_argument("--idle", type=int, default=9800,
                        help="idle connections for the memory figure (default 9800: this "
                             "machine's hard limit of 20,000 fds allows ~9,990, 2 a session)")
    parser.add_argument("--append", metavar="PATH", help="also append the report to PATH")
    args = parser.parse_args(argv)
    runs = 3 if args.quick else args.runs
    total = (256 if args.quick else 1024) << 20
    pings = 2000 if args.quick else 5000

    import gevent  # noqa: F401 - the client side runs on gevent

    server, port = _spawn([__file__, "_server"])
    relay, line = _spawn(["-m", "resilientsock", "relay", "--listen", "127.0.0.1:0",
                          "--upstream", f"127.0.0.1:{port}", "--plain-after", "5"])
    from resilientsock.session import parse_address

    address = parse_address(line.split()[3])
    fwd, fport = _spawn([__file__, "_forwarder", *map(str, address)])
    via_fwd = ("127.0.0.1", int(fport))
    results: dict[str, dict[str, list[float]]] = {"pingpong": {}, "bulk": {}, "nagle": {}}
    try:
        modes = ["plain", "session", "unix", "raw"]
        for run in range(runs):
            # The order rotates every run: whatever follows a given mode (the relay and the
            # sink still settling after a transfer) is shared out evenly.
            for mode in modes[run % 4:] + modes[:run % 4]:
                results["bulk"].setdefault(mode, []).append(bulk(mode, address, total))
            for test, where, kinds in (("pingpong", address, tuple(modes)),
                                       ("nagle", via_fwd, ("plain", "session"))):
                for mode, rate in pingpong_alternating(where, pings, kinds).items():
                    results[test].setdefault(mode, []).append(rate)
        rt, fault, cost = resume(address, 30 if args.quick else 100)
        drt, dfault, dcost = resume_direct(address, 30 if args.quick else 100)
    finally:
        _end(fwd)
        _end(relay)
        _end(server)
    idle: dict[str, float] = {}
    for mode in ("plain", "session"):
        proc = subprocess.run([sys.executable, __file__, "_idle_relay", mode, str(args.idle)],
                              capture_output=True, text=True, env=_env(), timeout=900)
        idle[mode] = float(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 \
            else float("nan")

    lines = ["", "## Session mode (bench_session.py)", "",
             f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs, "
             f"Python {platform.python_version()}",
             f"- One relay process; plain = a client-first connection the relay proxies "
             f"plainly, session = `open_session()` (the application's socket pair and the "
             f"client's pump included), relay only = a client speaking the protocol itself. "
             f"Median of {runs} runs, the order rotated every run; a ratio is the median "
             f"of each run's own ratio (plain and session measured in that run, alternating), "
             f"with their range.",
             "", "| test | plain | session | ratio | target |", "|---|---:|---:|---:|---|"]

    def row(name: str, test: str, mode: str, fmt: str, target: str) -> None:
        plain, other = results[test]["plain"], results[test][mode]
        ratio, low, high = ratio_spread(other, plain)
        if target == "≥ 0.8":
            target += f" ({'met' if ratio >= 0.8 else 'MISSED'})"
        lines.append(f"| {name} | {fmt.format(statistics.median(plain))} | "
                     f"{fmt.format(statistics.median(other))} | {ratio:.2f} "
                     f"({low:.2f}–{high:.2f}) | {target} |")

    for test, unit, fmt in (("pingpong", "round trips/s", "{:,.0f}"), ("bulk", "MiB/s",
                                                                         "{:,.0f}")):
        row(f"{test} ({unit})", test, "session", fmt, "≥ 0.8")
        row(f"{test}, AF_UNIX pair ({unit})", test, "unix", fmt, "(`unix_pair=True`)")
        row(f"{test}, relay only ({unit})", test, "raw", fmt, "(no application socket pair)")
    row("pingpong through a forwarder without TCP_NODELAY (round trips/s)", "nagle",
        "session", "{:,.0f}", "≥ 0.8")
    diff = idle["session"] - idle["plain"]
    lines += [
        f"| idle heap per connection ({args.idle:,}) | {idle['plain']:,.0f} B | "
        f"{idle['session']:,.0f} B | +{diff:,.0f} B | ≤ 8 KiB over plain "
        f"({'met' if diff <= 8192 else 'MISSED'}) |",
        "",
        f"Resume (through a FaultProxy, RST, {30 if args.quick else 100} faults): median "
        f"round trip {rt * 1e6:,.0f} µs; median fault-to-echo {fault * 1e6:,.0f} µs; "
        f"resume cost {cost:.2f} round trips (the proxy's own accept and connect to the "
        f"relay included).",
        "",
        f"Resume, direct (the client's link shut down under it, no proxy): median round trip "
        f"{drt * 1e6:,.0f} µs; median drop-to-echo {dfault * 1e6:,.0f} µs; resume cost "
        f"{dcost:.2f} round trips (TCP connect + the one-round-trip ticket handshake; target "
        f"≤ 2: {'met' if dcost <= 2 else 'MISSED'}).", ""]
    report = "\n".join(lines)
    print(report)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as fh:
            fh.write(report + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_server":
        _server()
    elif len(sys.argv) > 1 and sys.argv[1] == "_forwarder":
        _forwarder(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_idle_clients":
        _idle_clients(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_idle_relay":
        _idle_relay(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(main())
