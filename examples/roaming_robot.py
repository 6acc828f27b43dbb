"""A cleaning robot that roams out of Wi-Fi range, and the network faults that come with it.

Two ways to run it:

    python examples/roaming_robot.py HOST PORT [COUNT]
        The robot alone: sends COUNT readings (default 1000) to a MessageServer-style
        server ("MSG n ..." -> "ACK n"), with dead_peer_timeout=2 so a link that dies
        silently is noticed in seconds, and logs every drop and reconnect.

    sudo python examples/roaming_robot.py --simulate [--count N]
        Builds two network namespaces joined by a veth pair (resilientsock.testing.NetnsPair),
        runs a server in one and the robot in the other, and walks the robot through what a
        roaming robot meets: its route gone (ENETUNREACH), its Wi-Fi link down, the access
        point silent (a black hole: only dead_peer_timeout notices), and the server moving to
        a new address under the same name. At the end, every reading is accounted for.
        Needs root and iproute2; everything it built is removed on exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

import resilientsock
from resilientsock import ResilientSocket, RetryPolicy

SERVER_NAME = "robot-server.test"
PORT = 7000


def robot(host: str, port: int, count: int) -> int:
    """The robot loop: every reading acknowledged, whatever the network does."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%X")
    policy = RetryPolicy(
        deadline=60,  # keep trying for a minute per call before giving up
        dead_peer_timeout=2,  # a silent link is noticed in ~2-3 s, not ~15 min
        retry_read_timeouts=True,  # no answer within the timeout: reconnect and re-send
        connect_timeout=2,
        backoff_max=1.0,
        on_disconnect=lambda sock, info: logging.info("robot: lost the link: %s (%s)",
                                                      info.errno_name, info.category.name),
        on_reconnect=lambda sock, attempt: logging.info("robot: reconnected (attempt %d)",
                                                        attempt),
    )
    # An ACK is due within 3 s: past that, reconnect and re-send (retry_read_timeouts).
    with ResilientSocket.connect((host, port), policy, timeout=3) as sock, \
            sock.makefile("rb") as reader:
        for n in range(1, count + 1):
            sock.sendall(b"MSG %d battery=87%% position=(12.5,7.25)\n" % n)
            answer = reader.readline()
            if answer != b"ACK %d\n" % n:
                raise SystemExit(f"robot: expected ACK {n}, got {answer!r}")
            if n % 100 == 0:
                print(f"robot: {n} readings acknowledged", flush=True)
            time.sleep(0.01)
    print(f"robot: all {count} readings acknowledged; reconnects: "
          f"{resilientsock.stats().get('reconnects', 0)}", flush=True)
    return 0


def simulate(count: int) -> int:
    """The whole roaming story in two network namespaces (root only)."""
    from resilientsock.testing import NetnsPair

    why_not = NetnsPair.unavailable()
    if why_not:
        print(f"--simulate cannot run here: {why_not}", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    with NetnsPair() as net:
        net.set_client_hosts(f"127.0.0.1 localhost\n{net.server_ip} {SERVER_NAME}\n")
        server = net.popen("server", [sys.executable, "-m", "resilientsock.testing"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert server.stdin is not None and server.stdout is not None

        def ask(command: str) -> str:
            server.stdin.write(command + "\n")  # type: ignore[union-attr]
            server.stdin.flush()  # type: ignore[union-attr]
            return server.stdout.readline().strip()  # type: ignore[union-attr]

        try:
            print(ask(f"listen {net.server_ip} {PORT}"))
            bot = net.popen("client", [sys.executable, __file__, SERVER_NAME, str(PORT),
                                       str(count)], env=env)

            def scene(title: str, seconds: float) -> None:
                print(f"--- {title} ({seconds:g} s)", flush=True)
                try:
                    bot.wait(timeout=seconds)
                except subprocess.TimeoutExpired:
                    pass

            scene("all is well", 1.5)
            net.delete_route()
            scene("the robot's route is gone: connects fail with ENETUNREACH", 5)
            net.restore_route()
            scene("back in range", 1.5)
            net.client_link(up=False)
            scene("Wi-Fi link down", 5)
            net.client_link(up=True)
            scene("link up again", 1.5)
            net.blackhole(True)
            scene("the access point goes silent (a black hole)", 5)
            net.blackhole(False)
            scene("the access point answers again", 1.5)
            new_ip = "10.77.1.3"
            net.add_server_address(new_ip)
            print(ask(f"listen {new_ip} {PORT}"))
            net.set_client_hosts(f"127.0.0.1 localhost\n{new_ip} {SERVER_NAME}\n")
            print(ask(f"stop {net.server_ip}"), f"-> {SERVER_NAME} now resolves to {new_ip}")
            rc = bot.wait(timeout=120)
            received = json.loads(ask("dump").split(" ", 1)[1])
        finally:
            ask("quit")
            server.wait(10)
            server.stdin.close()
            server.stdout.close()
    missing = sorted(set(range(1, count + 1)) - set(received))
    print(f"server: {len(set(received))} distinct readings of {count}, "
          f"{len(received) - len(set(received))} duplicate(s), missing: {missing or 'none'}")
    return 0 if rc == 0 and not missing else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host", nargs="?", help="server host name or address")
    parser.add_argument("port", nargs="?", type=int, help="server port")
    parser.add_argument("count", nargs="?", type=int, default=1000,
                        help="readings to send (default 1000)")
    parser.add_argument("--simulate", action="store_true",
                        help="run the whole roaming story in network namespaces (root)")
    parser.add_argument("--count", dest="sim_count", type=int, default=1500,
                        help="readings in --simulate (default 1500)")
    args = parser.parse_args()
    if args.simulate:
        return simulate(args.sim_count)
    if args.host is None or args.port is None:
        parser.error("HOST and PORT are required (or --simulate)")
    if args.count < 1:
        parser.error("COUNT must be >= 1")
    return robot(args.host, args.port, args.count)


if __name__ == "__main__":
    sys.exit(main())
