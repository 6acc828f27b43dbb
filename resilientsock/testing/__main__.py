"""``python -m resilientsock.testing``: MessageServers driven by commands on stdin.

For tests that need the server in another process (another network namespace, say). One
command per line; each answer is one line on stdout:

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

import json
import sys

from ._loop import LoopThread
from ._servers import MessageServer


def main() -> int:
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
