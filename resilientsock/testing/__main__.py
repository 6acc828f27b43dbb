"""``python -m resilientsock.testing``: the standalone fault proxy, and MessageServers.

Two subcommands (``--help`` on each explains its options):

    proxy    FaultProxies with a Toxiproxy-compatible HTTP API:
             python -m resilientsock.testing proxy --listen 127.0.0.1:26379 \\
                 --upstream 127.0.0.1:6379 [--name redis] [--api 127.0.0.1:8474]
             Repeat --listen/--upstream (and --name) for several proxies, or create them with
             ``POST /proxies`` on the API. One line per listener on stdout ("proxy NAME
             LISTEN -> UPSTREAM", "api HOST:PORT"), then "ready"; runs until SIGINT/SIGTERM.
    servers  (the default, with no arguments) MessageServers driven by commands on stdin.

Bad options: one line on stderr and exit status 2.

The ``servers`` mode is for tests that need the server in another process (another network
namespace, say). One command per line; each answer is one line on stdout:

    listen HOST PORT   start a MessageServer there          -> "listening HOST PORT"
    stop HOST          close that listener and its clients  -> "stopped HOST"
    count              messages received so far, all hosts  -> "count N"
    dump               every n received, in arrival order   -> "received [n, ...]" (JSON)
    connections        connections accepted, per host       -> "connections {...}" (JSON)
    quit               close everything and exit            -> "bye"

Messages from every listener go to one shared, ordered list, so a client that moves from
one address to another is checked for loss and order as one stream.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any, NoReturn

from ._loop import LoopThread
from ._servers import MessageServer

PROG = "python -m resilientsock.testing"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def _address(text: str) -> tuple[str, int]:
    from ._proxy import parse_address

    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> _Parser:
    parser = _Parser(prog=PROG, description="Fault-injection helpers of resilientsock: "
                     "a standalone fault proxy with a Toxiproxy-compatible API, and "
                     "stdin-driven MessageServers (the default with no arguments).")
    sub = parser.add_subparsers(dest="command", metavar="{proxy,servers}")
    proxy = sub.add_parser(
        "proxy", prog=f"{PROG} proxy",
        help="TCP fault proxies with a Toxiproxy-compatible HTTP API",
        description="Run FaultProxies (Toxiproxy's toxics, refusals, resets) until SIGINT "
        "or SIGTERM. Give --listen and --upstream once per proxy (in pairs, in order), "
        "and/or --api to create and change proxies over Toxiproxy's HTTP API "
        "(GET/POST /proxies, /proxies/NAME/toxics, /reset, /version, /populate). "
        "Prints 'proxy NAME LISTEN -> UPSTREAM' and 'api HOST:PORT' lines, then 'ready'.",
        epilog="example: %(prog)s --listen 127.0.0.1:26379 --upstream 127.0.0.1:6379 "
        "--name redis --api 127.0.0.1:8474")
    proxy.add_argument("--listen", action="append", type=_address, default=[],
                       metavar="HOST:PORT", help="where a proxy listens (port 0: a free one)")
    proxy.add_argument("--upstream", action="append", type=_address, default=[],
                       metavar="HOST:PORT", help="where that proxy connects to")
    proxy.add_argument("--name", action="append", default=[],
                       help="that proxy's name in the API (default: proxy1, proxy2, ...)")
    proxy.add_argument("--api", type=_address, metavar="HOST:PORT",
                       help="serve the Toxiproxy-compatible HTTP API there "
                       "(Toxiproxy's default is 127.0.0.1:8474); none if omitted")
    proxy.add_argument("--config", metavar="FILE",
                       help="a JSON list of proxies, as Toxiproxy's -config (POST /populate)")
    proxy.add_argument("--seed", default="0",
                       help="seed for toxicity rolls, jitter and slicer sizes (default 0)")
    proxy.add_argument("--connect-timeout", type=float, default=5.0, metavar="SECONDS",
                       help="timeout of each connect to an upstream (default 5)")
    sub.add_parser("servers", prog=f"{PROG} servers",
                   help="MessageServers driven by commands on stdin (the default)",
                   description="Read commands on stdin (listen HOST PORT, stop HOST, count, "
                   "dump, connections, quit); one answer line each on stdout.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "proxy":
        return run_proxies(args)
    return run_servers()


def run_proxies(args: Any) -> int:
    """The ``proxy`` subcommand; returns the exit status."""
    import logging

    from ._api import ToxiproxyAPI
    from ._proxy import _join
    from ._toxics import ToxicError

    parser = _Parser(prog=f"{PROG} proxy")
    if len(args.listen) != len(args.upstream):
        parser.error("give --listen and --upstream in pairs, one pair per proxy")
    if len(args.name) > len(args.listen):
        parser.error("more --name than proxies")
    if not args.listen and args.api is None and args.config is None:
        parser.error("nothing to run: give --listen/--upstream, --config or --api")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    api_host, api_port = args.api or ("127.0.0.1", 0)
    api = ToxiproxyAPI(api_host, api_port, seed=args.seed,
                       connect_timeout=args.connect_timeout)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    # A runtime error is one line naming the address or file it concerns, and status 2.
    what = ""
    try:
        if args.api is not None:
            what = f"--api {_join(args.api)}"
            api.start()
        else:
            api._loop.start()  # the proxies' loop, without the HTTP listener
        names = args.name + [f"proxy{i}" for i in range(len(args.name) + 1,
                                                         len(args.listen) + 1)]
        for name, listen, upstream in zip(names, args.listen, args.upstream):
            what = f"proxy {name} (--listen {_join(listen)})"
            api.create_proxy(name, _join(listen), _join(upstream))
        if args.config:
            what = f"--config {args.config}"
            with open(args.config, encoding="utf-8") as fh:
                config = json.load(fh)
            status, body = api._loop.call(api._populate, config)
            if status >= 300:
                raise ToxicError(body["error"], status)
        for name, proxy in api.proxies.items():
            print(f"proxy {name} {_join(proxy.address)} -> {_join(proxy.upstream)}", flush=True)
        if args.api is not None:
            print(f"api {_join(api.address)}", flush=True)
        print("ready", flush=True)
        while not stopping.wait(1.0):
            pass
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"{PROG} proxy: error: {what}: {exc}\n")
        return 2
    finally:
        api.shutdown()
    return 0


def run_servers() -> int:
    """The ``servers`` subcommand (see the module docstring)."""
    loop = LoopThread("message-servers").start()
    servers: dict[str, MessageServer] = {}  # listening now
    accepted: dict[str, int] = {}  # connections accepted per host, stopped ones included
    received: list[int] = []

    def reply(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    try:
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            cmd, args = words[0], words[1:]
            if cmd == "listen" and len(args) == 2:
                srv = MessageServer(loop=loop, host=args[0], port=int(args[1]))
                srv.received = received  # one ordered stream across addresses
                servers[args[0]] = srv.start()
                reply(f"listening {srv.address[0]} {srv.address[1]}")
            elif cmd == "stop" and len(args) == 1 and args[0] in servers:
                srv = servers.pop(args[0])
                srv.shutdown()
                accepted[args[0]] = srv.connections
                reply(f"stopped {args[0]}")
            elif cmd == "count":
                reply(f"count {loop.call(len, received)}")
            elif cmd == "dump":
                reply("received " + json.dumps(loop.call(list, received)))
            elif cmd == "connections":
                counts = dict(accepted, **{h: s.connections for h, s in servers.items()})
                reply("connections " + json.dumps(counts))
            elif cmd == "quit":
                break
            else:
                reply(f"error: bad command {line.strip()!r}")
    finally:
        for srv in servers.values():
            srv.shutdown()
        loop.stop()
    reply("bye")
    return 0


if __name__ == "__main__":
    sys.exit(main())
