"""What FaultProxy costs with no fault set: direct vs through the proxy, in one run.

    python benchmarks/bench_proxy.py [--runs N] [--quick] [--append benchmarks/RESULTS.md]

Three processes, as a Toxiproxy user runs them: a plain blocking server, the standalone
proxy (``python -m resilientsock.testing proxy``), and this script as the client. Each run
measures, alternating direct / through the proxy:

pingpong  64-byte write, 64-byte echo, N round trips on one connection: µs per round trip;
          "added" is the proxy's median minus the direct median.
bulk      64 KiB ``sendall`` to a sink that reads and discards, 256 MiB per transfer
          (64 MiB with --quick): MB/s (10^6 bytes per second, as Toxiproxy's FAQ counts).

Targets (issue #16): ≤ 100 µs added per round trip, ≥ 500 MB/s. Toxiproxy's FAQ states
< 100 µs and about 1000 MB/s on four cores. The report is a Markdown section on stdout;
``--append PATH`` also appends it to PATH (``make bench`` does, after bench.py writes it).

Internal entry point: ``_server`` (the echo/sink server; prints its port).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
PING = 64
CHUNK = 64 * 1024


def _server() -> int:
    """Plain blocking threads: the first byte says echo (b"P") or sink (b"B")."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mode = conn.recv(1)
            buf = bytearray(1 << 20)
            while True:
                n = conn.recv_into(buf)
                if not n:
                    return
                if mode == b"P":
                    conn.sendall(memoryview(buf)[:n])

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def pingpong(address: tuple[str, int], rounds: int) -> float:
    """Median-free: the mean µs per round trip over ``rounds`` (after 200 warm-up)."""
    with socket.create_connection(address, timeout=30) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sendall(b"P")
        msg = b"x" * PING
        for i in range(200 + rounds):
            if i == 200:
                t0 = time.perf_counter()
            c.sendall(msg)
            got = 0
            while got < PING:
                part = c.recv(PING - got)
                if not part:
                    raise RuntimeError("echo closed")
                got += len(part)
        return (time.perf_counter() - t0) / rounds * 1e6


def bulk(address: tuple[str, int], total: int) -> float:
    """MB/s of 64 KiB sendall to the sink (the close waits for the sink to read it all)."""
    chunk = b"\0" * CHUNK
    with socket.create_connection(address, timeout=60) as c:
        c.sendall(b"B")
        t0 = time.perf_counter()
        for _ in range(total // CHUNK):
            c.sendall(chunk)
        c.shutdown(socket.SHUT_WR)
        c.recv(1)  # EOF once the sink (through the proxy, if any) has read everything
        return total / (time.perf_counter() - t0) / 1e6


def _start(args: list[str]) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True,
                            env=ENV)
    assert proc.stdout is not None
    return proc, [proc.stdout.readline().strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/bench_proxy.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="alternating runs (default 7)")
    parser.add_argument("--quick", action="store_true", help="fewer round trips and bytes")
    parser.add_argument("--append", metavar="PATH", help="append the report to PATH")
    args = parser.parse_args(argv)
    rounds = 2000 if args.quick else 10000
    total = (64 if args.quick else 256) << 20

    server, (port,) = _start([__file__, "_server"])
    direct = ("127.0.0.1", int(port))
    proxy = subprocess.Popen(
        [sys.executable, "-m", "resilientsock.testing", "proxy", "--listen", "127.0.0.1:0",
         "--upstream", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proxy.stdout is not None
        line = proxy.stdout.readline().split()  # "proxy proxy1 127.0.0.1:PORT -> ..."
        host, _, pport = line[2].rpartition(":")
        via = (host, int(pport))
        assert proxy.stdout.readline().strip() == "ready"
        ping = {"direct": [], "proxy": []}  # type: dict[str, list[float]]
        mbs = {"direct": [], "proxy": []}  # type: dict[str, list[float]]
        for _ in range(args.runs):
            for name, address in (("direct", direct), ("proxy", via)):
                ping[name].append(pingpong(address, rounds))
                mbs[name].append(bulk(address, total))
    finally:
        proxy.terminate()
        proxy.wait(timeout=20)
        server.kill()
        server.wait(timeout=20)

    med = {k: statistics.median(v) for k, v in ping.items()}
    bmed = {k: statistics.median(v) for k, v in mbs.items()}
    added = med["proxy"] - med["direct"]
    lines = [
        "", "## FaultProxy, no fault set (`benchmarks/bench_proxy.py`)", "",
        f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; load average at the end "
        f"{os.getloadavg()[0]:.2f} (the machine is shared: noise shows in the spread)",
        "- Three processes: a blocking server, the standalone proxy "
        "(`python -m resilientsock.testing proxy`), the client; direct and through the "
        f"proxy alternating, {args.runs} runs, median and spread (min-max).",
        f"- pingpong: {rounds} round trips of {PING} B per run; bulk: "
        f"{total >> 20} MiB of 64 KiB `sendall` to a sink per run.", "",
        "| test | path | median | spread | target |", "|---|---|---:|---:|---|",
        f"| pingpong | direct | {med['direct']:.1f} µs | {min(ping['direct']):.1f}-"
        f"{max(ping['direct']):.1f} | |",
        f"| pingpong | proxy | {med['proxy']:.1f} µs | {min(ping['proxy']):.1f}-"
        f"{max(ping['proxy']):.1f} | added {added:.1f} µs "
        f"({'pass' if added <= 100 else 'FAIL'}: ≤ 100 µs) |",
        f"| bulk | direct | {bmed['direct']:,.0f} MB/s | {min(mbs['direct']):,.0f}-"
        f"{max(mbs['direct']):,.0f} | |",
        f"| bulk | proxy | {bmed['proxy']:,.0f} MB/s | {min(mbs['proxy']):,.0f}-"
        f"{max(mbs['proxy']):,.0f} | {'pass' if bmed['proxy'] >= 500 else 'FAIL'}: "
        "≥ 500 MB/s |", "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as fh:
            fh.write(report)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_server"]:
        sys.exit(_server())
    sys.exit(main())
