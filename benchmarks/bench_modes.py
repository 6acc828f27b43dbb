"""What each delivery mode costs when the network is fine (docs/choosing-a-mode.md).

    python benchmarks/bench_modes.py [--runs N] [--quick] [--append benchmarks/RESULTS.md]

64-byte ping-pong round trips per second and bulk throughput (64 KiB ``sendall`` to a sink)
on loopback, for the plain gevent socket and ``ResilientSocket`` in each mode:
``replay="unanswered"`` (the default: at-least-once), ``replay="safe"``, ``replay="none"`` and
``confirm="tcp-ack"``. Each client runs in its own process against one server process (the
servers of bench.py); variants are interleaved; ratio = median of the variant / median of
gevent in the same run. Session mode's costs are bench_session.py's table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402 - the servers, the pinning and the client loops are bench.py's

MODES: dict[str, dict[str, Any] | None] = {
    "gevent": None,
    "at-least-once (default)": {},
    "replay safe": {"replay": "safe"},
    "replay none": {"replay": "none"},
    "confirm tcp-ack": {"confirm": "tcp-ack"},
}


def client_main(mode: str, test: str, port: int, amount: float) -> None:
    """One measurement in this process, printed as JSON (bench.client_main's loops)."""
    fields = MODES[mode]
    if fields is None:
        bench.client_main("gevent", test, port, amount)
        return
    from resilientsock import ResilientSocket, RetryPolicy

    policy = RetryPolicy(**fields)

    def connect(variant: str, port: int) -> Any:
        import socket

        sock = ResilientSocket.connect(("127.0.0.1", port), policy)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    bench._connect = connect  # type: ignore[assignment]
    bench.client_main("resilient", test, port, amount)


def run_client(mode: str, test: str, port: int, amount: float) -> float:
    out = subprocess.run([sys.executable, __file__, "_client", mode, test, str(port),
                          str(amount)], capture_output=True, text=True, env=bench.ENV,
                         timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} {test} client failed:\n{out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["value"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_modes.py", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--append", metavar="PATH", help="append the report to PATH")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, list[float]]] = {}
    for test, server_mode, amount in (("pingpong", "echo", 0.5 if args.quick else 1.0),
                                      ("bulk", "sink", 64 if args.quick else 256)):
        samples: dict[str, list[float]] = {m: [] for m in MODES}
        with bench.Server(server_mode) as srv:
            for _ in range(args.runs):
                for mode in MODES:  # interleaved: drift hits every mode alike
                    samples[mode].append(run_client(mode, test, srv.port, amount))
        results[test] = samples
    lines = ["", "## Delivery modes, network fine (bench_modes.py)", "",
             f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
             f"- `ResilientSocket` in each mode against the gevent socket, median of "
             f"{args.runs} interleaved runs (docs/choosing-a-mode.md).", "",
             "| mode | ping-pong (round trips/s) | ratio | bulk (MiB/s) | ratio |",
             "|---|---:|---:|---:|---:|"]
    base = {t: statistics.median(results[t]["gevent"]) for t in results}
    for mode in MODES:
        ping = statistics.median(results["pingpong"][mode])
        bulk = statistics.median(results["bulk"][mode])
        lines.append(f"| {mode} | {ping:,.0f} | {ping / base['pingpong']:.2f} | "
                     f"{bulk:,.0f} | {bulk / base['bulk']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        client_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "_server":
        bench.server_main(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
