"""The cost of resilience, measured against the plain gevent socket in the same run.

    python benchmarks/bench.py [--quick] [--runs N] [--only overhead,recovery,herd,memory]
                               [--write benchmarks/RESULTS.md]

Sections (each one table; ratios are against the gevent socket measured in the same run):

sameproc  the docs/design.md §12 targets: one process runs both a server and its client, patched by
          gevent.monkey alone or by resilientsock.patch(); 64 B ping-pong, 64 KiB bulk
          ``sendall`` of 128 MiB to a reader that answers only at the end, and a download
          (one request, a long answer read with recv_into: the read path's cost,
          answer-resume digest included); alternating runs, median of per-run ratios.
overhead  64-byte ping-pong round trips per second and bulk throughput (64 KiB ``sendall``
          to a sink, 512 MiB, best of 3 transfers per run) on loopback for the stdlib socket,
          the gevent socket, ``ResilientSocket`` direct and a socket made under ``patch()``.
          Every client runs in its own process against the same server process; variants
          are interleaved; the median of N runs (default 5) is shown with the spread.
recovery  Time from an RST (server up) to the interrupted ``readline`` returning: in one
          process, plain and TLS, alternating rounds against a hand-written reconnect under
          gevent.monkey (the I/O floor); through FaultProxy, over 200 faults; and with the
          server down for 1 s, time from it being back to the call returning, next to the
          same wait in the backoff schedule alone (simulated).
herd      2,000 greenlets, one connection each, all reset at once: every message accounted
          for, the peak of connection attempts in any 10 ms window, time until all recovered.
memory    Python-heap bytes per idle connection (10,000 connections), ResilientSocket over
          the gevent socket (tracemalloc); and the journal's memory under a steady unanswered
          stream with ``journal_limit`` set.

Internal entry points (used by the script itself): ``_server MODE`` and ``_client ...``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
PING = 64
CHUNK = 64 * 1024
VARIANTS = ("stdlib", "gevent", "resilient", "patched")


def _pin(which: str) -> None:
    """Client on the first CPU, server on the last: less scheduler noise in the ratios."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[0] if which == "client" else cpus[-1]})


def _raise_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the server process --

def server_main(mode: str) -> None:
    """echo: ping-pong; sink: read all, then answer the byte count; hold: accept and keep."""
    from gevent import monkey

    monkey.patch_all()
    import socket

    from gevent.server import StreamServer

    _pin("server")
    _raise_fd_limit(30000)
    held: list[Any] = []

    def handle(conn: Any, _addr: Any) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mode == "echo":
            buf = bytearray(65536)
            while True:
                n = conn.recv_into(buf)
                if not n:
                    return
                conn.sendall(memoryview(buf)[:n])
        elif mode == "sink":
            buf = bytearray(1 << 20)
            total = 0
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                total += n
            conn.sendall(total.to_bytes(8, "big"))
        else:
            held.append(conn)
            conn.recv(1)  # until the client goes away

    server = StreamServer(("127.0.0.1", 0), handle, backlog=4096)
    server.start()
    print(server.server_port, flush=True)
    import gevent

    gevent.get_hub().threadpool.spawn(sys.stdin.read).get()  # until the parent closes stdin
    server.stop(timeout=1)


class Server:
    """A server subprocess; ``port`` once it listens."""

    def __init__(self, mode: str) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "_server", mode],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=ENV)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- overhead: client processes --

def _connect(variant: str, port: int) -> Any:
    address = ("127.0.0.1", port)
    if variant == "stdlib":
        import socket
        sock = socket.create_connection(address)
    elif variant == "gevent":
        import gevent.socket
        sock = gevent.socket.create_connection(address)
    elif variant == "resilient":
        from resilientsock import ResilientSocket
        sock = ResilientSocket.connect(address)
    elif variant == "patched":
        import resilientsock
        resilientsock.patch()
        import socket
        sock = socket.create_connection(address)
        assert type(sock).__name__ == "ResilientSocket", type(sock)
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    import socket as std
    sock.setsockopt(std.IPPROTO_TCP, std.TCP_NODELAY, 1)
    return sock


def client_main(variant: str, test: str, port: int, amount: float) -> None:
    """Print one JSON result: round trips per second, or MiB per second."""
    _pin("client")
    sock = _connect(variant, port)
    if test == "pingpong":
        msg = b"p" * PING
        buf = bytearray(PING)
        view = memoryview(buf)
        count = 0
        t0 = time.perf_counter()
        end = t0 + amount
        while True:
            sock.sendall(msg)
            got = 0
            while got < PING:
                n = sock.recv_into(view[got:])
                if not n:
                    raise SystemExit("echo server closed")
                got += n
            count += 1
            if count % 256 == 0 and time.perf_counter() >= end:
                break
        elapsed = time.perf_counter() - t0
        print(json.dumps({"value": count / elapsed}))
    elif test == "bulk":
        # Best of three transfers on fresh connections: one process's transient noise
        # (page faults, a scheduler hiccup) should not decide its sample.
        chunk = b"b" * CHUNK
        total = int(amount) * (1 << 20)
        best = 0.0
        for rep in range(3):
            if rep:
                sock.close()
                sock = _connect(variant, port)
            t0 = time.perf_counter()
            for _ in range(total // CHUNK):
                sock.sendall(chunk)
            sock.shutdown(1)
            answer = b""
            while len(answer) < 8:
                part = sock.recv(8 - len(answer))
                if not part:
                    raise SystemExit("sink closed early")
                answer += part
            elapsed = time.perf_counter() - t0
            assert int.from_bytes(answer, "big") == total
            best = max(best, total / elapsed / (1 << 20))
        print(json.dumps({"value": best}))
    sock.close()


def run_client(variant: str, test: str, port: int, amount: float) -> float:
    out = subprocess.run([sys.executable, __file__, "_client", variant, test, str(port),
                          str(amount)], capture_output=True, text=True, env=ENV, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} {test} client failed:\n{out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["value"])


def bench_overhead(runs: int, quick: bool) -> dict[str, Any]:
    results: dict[str, dict[str, list[float]]] = {}
    for test, mode, amount in (("pingpong", "echo", 0.5 if quick else 1.0),
                               ("bulk", "sink", 128 if quick else 512)):
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        with Server(mode) as srv:
            for _ in range(runs):
                for variant in VARIANTS:  # interleaved: drift hits every variant alike
                    samples[variant].append(run_client(variant, test, srv.port, amount))
        results[test] = samples
    return results


# -- overhead with both ends in one patched process (docs/design.md §12) --

def _patch_as(mode: str) -> None:
    """Patch this process as ``mode`` says: ``gevent`` (gevent.monkey alone), ``patched``
    (resilientsock.patch()) or ``patched-noresume`` (the same, without the answer-resume
    digest)."""
    if mode in ("patched", "patched-noresume"):
        if mode == "patched-noresume":
            os.environ["RESILIENTSOCK_RESUME_ANSWERS"] = "0"
        import resilientsock
        resilientsock.patch()
    else:
        from gevent import monkey
        monkey.patch_all()


def sameproc_main(mode: str, test: str, amount: float) -> None:
    """One process that runs a server and its client, patched by ``mode``: ``gevent``
    (gevent.monkey alone) or ``patched`` (resilientsock.patch()). Prints one JSON result."""
    _patch_as(mode)
    import socket

    import gevent

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve() -> None:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(CHUNK)
        total = 0
        if test == "download":  # one request, then a long answer the client reads
            conn.recv_into(buf)
            total = int(amount) * (1 << 20)
            chunk = memoryview(b"d" * CHUNK)
            for _ in range(total // CHUNK):
                conn.sendall(chunk)
            conn.close()
            return
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            if test == "pingpong":
                conn.sendall(memoryview(buf)[:n])
            else:
                total += n
        if test == "bulk":
            conn.sendall(total.to_bytes(8, "big"))
        conn.close()

    server = gevent.spawn(serve)
    sock = socket.create_connection(listener.getsockname())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode != "gevent":
        assert getattr(sock, "resilient", False), "the client must be protected"
    if test == "pingpong":
        msg = b"p" * PING
        view = memoryview(bytearray(PING))
        count = 0
        t0 = time.perf_counter()
        end = t0 + amount
        while True:
            sock.sendall(msg)
            got = 0
            while got < PING:
                got += sock.recv_into(view[got:])
            count += 1
            if count % 256 == 0 and time.perf_counter() >= end:
                break
        value = count / (time.perf_counter() - t0)
    elif test == "download":
        total = int(amount) * (1 << 20)
        view = memoryview(bytearray(CHUNK))
        t0 = time.perf_counter()
        sock.sendall(b"GET\n")
        got = 0
        while got < total:
            n = sock.recv_into(view)
            if not n:
                raise SystemExit("server closed early")
            got += n
        value = total / (time.perf_counter() - t0) / (1 << 20)
    else:
        chunk = b"b" * CHUNK
        total = int(amount) * (1 << 20)
        t0 = time.perf_counter()
        for _ in range(total // CHUNK):
            sock.sendall(chunk)
        sock.shutdown(1)
        answer = b""
        while len(answer) < 8:
            answer += sock.recv(8 - len(answer))
        assert int.from_bytes(answer, "big") == total
        value = total / (time.perf_counter() - t0) / (1 << 20)
    sock.close()
    server.join(5)
    print(json.dumps({"value": value}))


def readcost_main(mode: str) -> None:
    """The read path's own cost: one 64 KiB ``recv_into`` from a receive buffer that already
    holds the data (the kernel's copy and the call, no wake-up, no sender in between), so the
    difference between modes is the wrapper, the bookkeeping and the digest alone. Prints the
    median over 200 batches of the per-read mean, in µs."""
    _patch_as(mode)
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    sock = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.sendall(b"GET\n")  # one request: what follows is its answer (resume keeps a digest)
    conn.recv(16)
    view = memoryview(bytearray(CHUNK))
    data = b"d" * CHUNK
    batch = 32  # 2 MiB: fits the buffers set above, so every read finds its data there
    per_read = []
    for _ in range(200):
        for _ in range(batch):
            conn.sendall(data)
        got, calls = 0, 0
        t0 = time.perf_counter()
        while got < batch * CHUNK:
            got += sock.recv_into(view)
            calls += 1
        per_read.append((time.perf_counter() - t0) / calls * 1e6)
    sock.close()
    conn.close()
    print(json.dumps({"value": statistics.median(per_read)}))


def recovery_main(mode: str, tls: bool, faults: int) -> None:
    """Recovery after an RST with the server up, in one process (docs/design.md §12): a server
    greenlet answers ``MSG n`` lines with ``ACK n``, or resets the connection (SO_LINGER 0)
    instead of answering when told to; the client sends a line and reads its answer. Time
    from the reset to the answer read. ``patched``: resilientsock.patch() recovers by itself;
    ``gevent``: gevent.monkey alone, the client reconnects by hand (a new connection, TLS
    handshake, the line re-sent): the I/O floor of the same recovery. Prints one JSON list
    of seconds."""
    if mode == "patched":
        import resilientsock
        resilientsock.patch()
    else:
        from gevent import monkey
        monkey.patch_all()
    import socket
    import ssl
    import struct

    import gevent

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    address = listener.getsockname()
    sctx = cctx = None
    if tls:
        import trustme

        ca = trustme.CA()
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(sctx)
        cctx = ssl.create_default_context()
        ca.configure_trust(cctx)
    state = {"cut": False, "at": 0.0}

    def serve(conn: Any) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if sctx is not None:
                conn = sctx.wrap_socket(conn, server_side=True)
            f = conn.makefile("rb")
            while True:
                line = f.readline()
                if not line:
                    return
                if state["cut"]:
                    state["cut"] = False
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    state["at"] = time.perf_counter()
                    f.close()
                    conn.close()  # an RST instead of the answer
                    return
                conn.sendall(b"ACK " + line[4:])
        except OSError:
            conn.close()

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            gevent.spawn(serve, conn)

    gevent.spawn(accept)

    def connect() -> Any:
        sock = socket.create_connection(address, timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if cctx is not None:
            sock = cctx.wrap_socket(sock, server_hostname="127.0.0.1")
        return sock

    sock = connect()
    if mode == "patched":
        assert getattr(sock, "resilient", False), "the client must be protected"
    reader = sock.makefile("rb")
    times = []
    for n in range(1, faults + 1):
        # Paced (20 ms apart, not synchronisation): back to back, faults would measure the
        # process-wide reconnect limiter (reconnect_rate), not a lone drop's recovery.
        gevent.sleep(0.02)
        state["cut"] = True
        line = b"MSG %d x\n" % n
        sock.sendall(line)
        try:
            got = reader.readline()
        except OSError:
            if mode == "patched":
                raise
            got = b""
        if not got and mode != "patched":  # by hand: what the library does for us
            reader.close()
            sock.close()
            sock = connect()
            reader = sock.makefile("rb")
            sock.sendall(line)
            got = reader.readline()
        if got != b"ACK %d x\n" % n:
            raise SystemExit(f"wrong answer after recovery: {got!r}")
        times.append(time.perf_counter() - state["at"])
    reader.close()
    sock.close()
    print(json.dumps(times))


def bench_recovery_rounds(rounds: int, faults: int) -> dict[str, dict[str, list[list[float]]]]:
    """Alternating rounds, each in its own process: by hand (gevent) and patched."""
    out: dict[str, dict[str, list[list[float]]]] = {}
    for tls in (False, True):
        samples: dict[str, list[list[float]]] = {"gevent": [], "patched": []}
        for run in range(rounds):
            modes = ["gevent", "patched"] if run % 2 == 0 else ["patched", "gevent"]
            for mode in modes:
                res = subprocess.run([sys.executable, __file__, "_recovery", mode,
                                      "1" if tls else "0", str(faults)],
                                     capture_output=True, text=True, env=ENV, timeout=300)
                if res.returncode != 0:
                    raise RuntimeError(f"recovery {mode} tls={tls} failed:\n"
                                       f"{res.stderr[-2000:]}")
                samples[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
        out["tls" if tls else "plain"] = samples
    return out


def _digest_cost_us(rounds: int = 20000) -> float:
    """Microseconds the answer-resume digest takes per 64 KiB (the best of three timings)."""
    from resilientsock._machine import new_digest

    digest = new_digest()
    view = memoryview(bytearray(CHUNK))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(rounds):
            digest.update(view)
        best = min(best, (time.perf_counter() - t0) / rounds)
    return best * 1e6


def bench_sameproc(runs: int, quick: bool) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {}
    for test, amount in (("pingpong", 0.3 if quick else 0.6), ("bulk", 128),
                         ("download", 256 if quick else 512)):
        modes = ["gevent", "patched"]
        if test == "download":  # where the read path's cost is: with and without the digest
            modes.append("patched-noresume")
        samples: dict[str, list[float]] = {mode: [] for mode in modes}
        for run in range(runs):
            # Alternating, in one invocation, the order rotated every run: adjacent runs see
            # the same machine, so the ratio is taken per run (drift cancels).
            k = run % len(modes)
            for mode in modes[k:] + modes[:k]:
                out = subprocess.run([sys.executable, __file__, "_sameproc", mode, test,
                                      str(amount)], capture_output=True, text=True, env=ENV,
                                     timeout=300)
                if out.returncode != 0:
                    raise RuntimeError(f"sameproc {mode} {test} failed:\n{out.stderr[-2000:]}")
                samples[mode].append(float(json.loads(out.stdout.strip().splitlines()[-1])
                                           ["value"]))
        results[test] = samples
    modes = ["gevent", "patched", "patched-noresume"]
    cost: dict[str, list[float]] = {mode: [] for mode in modes}
    for run in range(runs):
        k = run % len(modes)
        for mode in modes[k:] + modes[:k]:
            out = subprocess.run([sys.executable, __file__, "_readcost", mode],
                                 capture_output=True, text=True, env=ENV, timeout=300)
            if out.returncode != 0:
                raise RuntimeError(f"readcost {mode} failed:\n{out.stderr[-2000:]}")
            cost[mode].append(float(json.loads(out.stdout.strip().splitlines()[-1])["value"]))
    results["readcost"] = cost
    return results


# -- recovery (in process: FaultProxy and MessageServer on their own loop threads) --

def bench_recovery(faults: int, quick: bool) -> dict[str, Any]:
    import threading

    from resilientsock import ResilientSocket, RetryPolicy
    from resilientsock.testing import FaultProxy, MessageServer

    policy = RetryPolicy(deadline=20)
    out: dict[str, Any] = {}
    with MessageServer() as server, FaultProxy(server.address) as proxy:
        sock = ResilientSocket.connect(proxy.address, policy, timeout=10)
        reader = sock.makefile("rb")
        times = []
        for n in range(1, faults + 1):
            # Faults are paced (20 ms apart): back to back, they would measure the
            # process-wide reconnect limiter (reconnect_rate=200/s refills a token every
            # 5 ms), not a lone drop's recovery.
            time.sleep(0.02)
            proxy.cut_after(0, "down")  # the answer's first byte becomes an RST
            sock.sendall(b"MSG %d x\n" % n)
            if reader.readline() != b"ACK %d\n" % n:
                raise RuntimeError("wrong answer after recovery")
            done = time.monotonic()
            times.append(done - proxy.last_fault_at)
        out["rst"] = {"samples": times, "reconnects": sock.reconnects}

        # Server down for 1 s: the call blocks reconnecting; time from "back" to done.
        back_gaps = []
        for n in range(3 if quick else 8):
            msg = faults + 1 + n
            proxy.refuse_now()
            proxy.reset_all()
            reopened: list[float] = []

            def reopen(reopened: list[float] = reopened) -> None:
                time.sleep(1.0)  # the outage's length, not synchronisation
                reopened.append(time.monotonic())
                proxy.accept_again()
            t = threading.Thread(target=reopen)
            t.start()
            sock.sendall(b"MSG %d x\n" % msg)  # meets the reset: reconnecting until back
            if reader.readline() != b"ACK %d\n" % msg:
                raise RuntimeError("wrong answer after the server came back")
            done = time.monotonic()
            t.join()
            back_gaps.append(done - reopened[0])
        out["down_1s"] = {"samples": back_gaps, "schedule": _schedule_gaps(policy, 1.0)}
        reader.close()
        sock.close()
    return out


def _schedule_gaps(policy: Any, down: float, trials: int = 20000, seed: int = 1) -> list[float]:
    """What the backoff schedule allows: simulated waits between the server coming back
    after ``down`` seconds and the next attempt (attempts themselves taken as instant)."""
    import random

    rng = random.Random(seed)
    gaps = []
    for _ in range(trials):
        t, attempt = 0.0, 0
        while t < down:
            attempt += 1
            t += policy.backoff(attempt, rng.random)
        gaps.append(t - down)
    return gaps


# -- herd --

def bench_herd(count: int) -> dict[str, Any]:
    import gevent
    import gevent.event

    from resilientsock import ResilientSocket, RetryPolicy
    from resilientsock.testing import FaultProxy, MessageServer

    _raise_fd_limit(4 * count + 1000)
    policy = RetryPolicy(deadline=120, connect_timeout=10)
    reset_done = gevent.event.Event()
    recovered_at: list[float] = []
    with MessageServer() as server, FaultProxy(server.address) as proxy:
        proxy.record_accepts = True
        ready = gevent.event.Event()
        connected = [0]

        def robot(i: int) -> None:
            sock = ResilientSocket.connect(proxy.address, policy, timeout=60)
            with sock, sock.makefile("rb") as reader:
                sock.sendall(b"MSG %d before\n" % (2 * i + 1))
                assert reader.readline() == b"ACK %d\n" % (2 * i + 1)
                connected[0] += 1
                if connected[0] == count:
                    ready.set()
                reset_done.wait()
                sock.sendall(b"MSG %d after\n" % (2 * i + 2))  # meets the reset: reconnects
                assert reader.readline() == b"ACK %d\n" % (2 * i + 2)
                recovered_at.append(time.monotonic())

        greenlets = [gevent.spawn(robot, i) for i in range(count)]
        if not ready.wait(timeout=120):
            raise RuntimeError(f"only {connected[0]} of {count} connected")
        accepts_before = len(proxy.accept_times)
        t_reset = time.monotonic()
        proxy.reset_all()
        reset_done.set()
        gevent.joinall(greenlets, timeout=180, raise_error=True)
        attempts = proxy.accept_times[accepts_before:]
        received = list(server.received)
    missing = set(range(1, 2 * count + 1)) - set(received)
    windows: dict[int, int] = {}
    for t in attempts:
        windows[int((t - t_reset) / 0.010)] = windows.get(int((t - t_reset) / 0.010), 0) + 1
    return {
        "count": count,
        "recovered": len(recovered_at),
        "missing": len(missing),
        "duplicates": len(received) - len(set(received)),
        "attempts": len(attempts),
        "peak_10ms": max(windows.values()) if windows else 0,
        "all_recovered_s": max(recovered_at) - t_reset if recovered_at else float("nan"),
    }


# -- memory --

def bench_memory(count: int) -> dict[str, Any]:
    import gc
    import tracemalloc

    import gevent.socket

    from resilientsock import ResilientSocket, RetryPolicy

    _raise_fd_limit(2 * count + 1000)
    out: dict[str, Any] = {}
    with Server("hold") as srv:
        address = ("127.0.0.1", srv.port)
        for name, make in (("gevent", lambda: gevent.socket.create_connection(address)),
                           ("resilient", lambda: ResilientSocket.connect(address))):
            gc.collect()
            tracemalloc.start()
            base = tracemalloc.take_snapshot()
            socks = [make() for _ in range(count)]
            gc.collect()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            grown = sum(s.size_diff for s in after.compare_to(base, "filename"))
            out[name] = grown / count
            for s in socks:
                s.close()
            del socks

    # The journal under a steady unanswered stream: the sink never answers.
    limit = 4 << 20
    with Server("sink") as srv:
        sock = ResilientSocket.connect(("127.0.0.1", srv.port),
                                       RetryPolicy(journal_limit=limit))
        chunk = bytearray(b"j" * CHUNK)
        import logging
        logging.getLogger("resilientsock").setLevel(logging.ERROR)  # the expected warning
        tracemalloc.start()
        base_mem = tracemalloc.get_traced_memory()[0]
        for _ in range((32 << 20) // CHUNK):
            sock.sendall(bytes(chunk))  # a fresh bytes object per call, as real writes are
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["journal"] = {"limit": limit, "written": 32 << 20, "held": current - base_mem,
                          "peak": peak - base_mem, "unconfirmed": sock.unconfirmed_bytes}
        sock.close()
    return out


# -- report --

def _median_spread(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def _pct(xs: list[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/bench.py", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per overhead variant "
                        "(median shown; default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes (a smoke run; not for RESULTS.md)")
    parser.add_argument("--only", default="overhead,sameproc,recovery,herd,memory",
                        help="comma-separated sections (default: all)")
    parser.add_argument("--write", metavar="PATH", help="also write the report to PATH")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - {"overhead", "sameproc", "recovery", "herd", "memory"}
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}")
    if args.runs < 1:
        parser.error("--runs must be >= 1")

    import gevent

    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    emit("# Benchmarks: resilientsock against the plain gevent socket\n")
    emit(f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    emit(f"- Machine: {platform.system()} {platform.release()} {platform.machine()}, "
         f"{os.cpu_count()} CPUs")
    emit(f"- Python {platform.python_version()}, gevent {gevent.__version__}")
    emit("- Overhead clients are pinned to the first CPU and servers to the last.")
    emit(f"- Command: `python benchmarks/bench.py {' '.join(argv or sys.argv[1:])}`".rstrip())
    verdicts: list[str] = []

    if "overhead" in sections:
        res = bench_overhead(args.runs, args.quick)
        emit("\n## Overhead, network fine (loopback)\n")
        emit(f"Median of {args.runs} runs, spread min-max; ratio = median / gevent's median.\n")
        emit("| test | variant | median | spread | ratio |")
        emit("|---|---|---:|---:|---:|")
        targets = {"pingpong": 0.90, "bulk": 0.95}
        for test, unit in (("pingpong", "round trips/s"), ("bulk", "MiB/s")):
            base = statistics.median(res[test]["gevent"])
            for variant in VARIANTS:
                med, lo, hi = _median_spread(res[test][variant])
                emit(f"| {test} | {variant} | {med:,.0f} {unit} | {lo:,.0f}-{hi:,.0f} | "
                     f"{med / base:.3f} |")
            for variant in ("resilient", "patched"):
                ratio = statistics.median(res[test][variant]) / base
                ok = ratio >= targets[test]
                verdicts.append(f"{test} {variant}: {ratio:.3f}x gevent (target >= "
                                f"{targets[test]:.2f}x): {'met' if ok else 'MISSED'}")

    if "sameproc" in sections:
        runs = max(args.runs, 11)
        res = bench_sameproc(runs, args.quick)
        emit("\n## Overhead, both ends in one patched process (docs/design.md §12)\n")
        emit(f"One process runs the server and its client: `gevent.monkey.patch_all()` alone "
             f"against `resilientsock.patch()` (the accepted socket passes through, the client "
             f"is protected). Alternating runs, median of {runs}.\n")
        emit("| test | gevent.monkey (median) | resilientsock.patch() (median) | ratio: median of "
             "adjacent pairs (range) | target |")
        emit("|---|---:|---:|---:|---:|")
        for test, unit, target in (("pingpong", "round trips/s", 0.95), ("bulk", "MiB/s", 0.97),
                                   ("download", "MiB/s", 0.97)):
            base = statistics.median(res[test]["gevent"])
            mine = statistics.median(res[test]["patched"])
            pairs = [p / g for g, p in zip(res[test]["gevent"], res[test]["patched"])]
            ratio = statistics.median(pairs)
            emit(f"| {test} | {base:,.0f} {unit} | {mine:,.0f} {unit} | {ratio:.3f} "
                 f"({min(pairs):.2f}-{max(pairs):.2f}) | >= {target:.2f} |")
            verdicts.append(f"one process, {test}: {ratio:.3f}x gevent.monkey (median of "
                            f"per-pair ratios; target >= {target:.2f}x): "
                            f"{'met' if ratio >= target else 'MISSED'}")
        off = res["download"]["patched-noresume"]
        pairs = [p / g for g, p in zip(res["download"]["gevent"], off)]
        base_dl = statistics.median(res["download"]["gevent"])
        emit(f"| download, `resume_answers` off | {base_dl:,.0f} MiB/s | "
             f"{statistics.median(off):,.0f} MiB/s | {statistics.median(pairs):.3f} "
             f"({min(pairs):.2f}-{max(pairs):.2f}) | - |")
        digest_us = _digest_cost_us()
        read_us = CHUNK / (statistics.median(res["download"]["gevent"]) * (1 << 20)) * 1e6
        emit(f"\nThe answer-resume digest (design.md §5b: every byte the caller gets, detection "
             f"except with probability <= 2^-32) costs {digest_us:.2f} µs per 64 KiB read here "
             f"(xxhash XXH3-64), {read_us:.1f} µs being the whole 64 KiB read at gevent's "
             f"median rate: {digest_us / read_us:.1%} of the read path by itself.")
        verdicts.append(f"one process, download: the digest alone is {digest_us / read_us:.1%} "
                        f"of a 64 KiB read at loopback speed (see the section)")
        cost = res["readcost"]
        plain_us = statistics.median(cost["gevent"])
        on = [p - g for g, p in zip(cost["gevent"], cost["patched"])]
        off = [p - g for g, p in zip(cost["gevent"], cost["patched-noresume"])]
        emit(f"\nThe read path alone (one 64 KiB `recv_into` from a receive buffer that already "
             f"holds the data: the kernel's copy and the call, no wake-up; median of {runs} "
             f"alternating runs): gevent {plain_us:.2f} µs; resilientsock "
             f"+{statistics.median(on):.2f} µs ({min(on):+.2f} to {max(on):+.2f}) with answer "
             f"resume, +{statistics.median(off):.2f} µs ({min(off):+.2f} to {max(off):+.2f}) "
             f"without: the digest is the difference, the rest is the wrapper and the "
             f"bookkeeping.")

    if "recovery" in sections:
        res = bench_recovery(50 if args.quick else 200, args.quick)
        rst = res["rst"]["samples"]
        emit("\n## Recovery\n")
        emit("| case | n | median | p99 | max | note |")
        emit("|---|---:|---:|---:|---:|---|")
        emit(f"| RST, server up, through FaultProxy (threads): fault to call done | {len(rst)} | "
             f"{statistics.median(rst) * 1e3:.2f} ms | {_pct(rst, 0.99) * 1e3:.2f} ms | "
             f"{max(rst) * 1e3:.2f} ms | {res['rst']['reconnects']} reconnects |")
        down = res["down_1s"]
        sched = down["schedule"]
        emit(f"| server down 1 s: back to call done | {len(down['samples'])} | "
             f"{statistics.median(down['samples']) * 1e3:.0f} ms | - | "
             f"{max(down['samples']) * 1e3:.0f} ms | the schedule alone (simulated): median "
             f"{statistics.median(sched) * 1e3:.0f} ms, p90 {_pct(sched, 0.9) * 1e3:.0f} ms |")
        rounds = max(args.runs, 9)
        faults = 40 if args.quick else 100
        rr = bench_recovery_rounds(rounds, faults)
        emit(f"\nRST with the server up, in one process (design.md §12): a server greenlet resets "
             f"the connection instead of answering; time from the reset to the answer read. "
             f"{rounds} alternating rounds of {faults} faults, each round in its own process: "
             f"`resilientsock.patch()` recovering by itself against gevent.monkey alone with "
             f"the client reconnecting by hand (new connection, TLS handshake, the line "
             f"re-sent: the I/O floor). Median and p99 over all faults; the range is that of "
             f"the per-round medians.\n")
        emit("| case | by hand (gevent): median | p99 | resilientsock: median (round range) | "
             "p99 | target |")
        emit("|---|---:|---:|---:|---:|---:|")
        for case, target in (("plain", 0.001), ("tls", 0.005)):
            hand = [x for r in rr[case]["gevent"] for x in r]
            mine = [x for r in rr[case]["patched"] for x in r]
            per_round = [statistics.median(r) for r in rr[case]["patched"]]
            med = statistics.median(mine)
            emit(f"| {case} | {statistics.median(hand) * 1e3:.2f} ms | "
                 f"{_pct(hand, 0.99) * 1e3:.2f} ms | {med * 1e3:.2f} ms "
                 f"({min(per_round) * 1e3:.2f}-{max(per_round) * 1e3:.2f}) | "
                 f"{_pct(mine, 0.99) * 1e3:.2f} ms | <= {target * 1e3:.0f} ms |")
            verdicts.append(f"recovery after RST, server up, {case}: median {med * 1e3:.2f} ms, "
                            f"p99 {_pct(mine, 0.99) * 1e3:.2f} ms (target <= "
                            f"{target * 1e3:.0f} ms median): "
                            f"{'met' if med <= target else 'MISSED'}")
        measured, expected = statistics.median(down["samples"]), statistics.median(sched)
        verdicts.append(f"server down 1 s: median wait after it was back {measured * 1e3:.0f} ms"
                        f", the schedule's own median {expected * 1e3:.0f} ms (no target; "
                        "full jitter makes this wait random by design)")

    if "herd" in sections:
        count = 500 if args.quick else 2000
        res = bench_herd(count)
        emit("\n## Herd\n")
        emit("| connections | recovered | missing | duplicates | attempts | peak / 10 ms | "
             "all recovered after |")
        emit("|---:|---:|---:|---:|---:|---:|---:|")
        emit(f"| {res['count']} | {res['recovered']} | {res['missing']} | {res['duplicates']} "
             f"| {res['attempts']} | {res['peak_10ms']} ({res['peak_10ms'] / count:.1%}) | "
             f"{res['all_recovered_s']:.2f} s |")
        ok = res["peak_10ms"] <= 0.2 * count and res["missing"] == 0
        verdicts.append(f"herd: peak {res['peak_10ms']} of {count} attempts in 10 ms "
                        f"({res['peak_10ms'] / count:.1%}, target <= 20%), missing "
                        f"{res['missing']}: {'met' if ok else 'MISSED'}")

    if "memory" in sections:
        count = 2000 if args.quick else 10000
        res = bench_memory(count)
        extra = res["resilient"] - res["gevent"]
        emit("\n## Memory\n")
        emit(f"Python heap (tracemalloc) per idle connection, {count:,} connections:\n")
        emit("| socket | bytes per connection |")
        emit("|---|---:|")
        emit(f"| gevent | {res['gevent']:,.0f} |")
        emit(f"| ResilientSocket | {res['resilient']:,.0f} (+{extra:,.0f}) |")
        j = res["journal"]
        emit(f"\nJournal under an unanswered stream: {j['written'] >> 20} MiB written in 64 KiB "
             f"calls with `journal_limit` = {j['limit'] >> 20} MiB: heap held after "
             f"{j['held'] / (1 << 20):.2f} MiB, peak {j['peak'] / (1 << 20):.2f} MiB, "
             f"unconfirmed_bytes {j['unconfirmed']:,}.")
        verdicts.append(f"idle connection: +{extra:,.0f} bytes over gevent (target <= 2048): "
                        f"{'met' if extra <= 2048 else 'MISSED'}")
        verdicts.append(f"journal: peak {j['peak'] / (1 << 20):.2f} MiB with a "
                        f"{j['limit'] >> 20} MiB limit: "
                        f"{'met' if j['peak'] <= j['limit'] + (2 << 20) else 'MISSED'}")

    emit("\n## Targets\n")
    for v in verdicts:
        emit(f"- {v}")
    if args.write:
        Path(args.write).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_server":
        server_main(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "_sameproc":
        sameproc_main(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_readcost":
        readcost_main(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "_recovery":
        recovery_main(sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_client":
        client_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    else:
        sys.exit(main())
