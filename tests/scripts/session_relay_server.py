"""A MessageServer behind a session relay, in one process (for tests in a network namespace).

    python session_relay_server.py LISTEN_HOST PORT

Prints "ready" once both listen; then, for every line on stdin, prints one JSON line:
{"received": [...], "connections": N, "resumed": N}. Ends when stdin closes.
"""

import json
import sys

from resilientsock.session import Relay
from resilientsock.testing import MessageServer

server = MessageServer().start()
relay = Relay((sys.argv[1], int(sys.argv[2])), server.address, plain_after=2.0).start()
print("ready", flush=True)
for _ in sys.stdin:
    print(json.dumps({"received": server.received, "connections": server.connections,
                      "resumed": relay.stats()["sessions_resumed"]}), flush=True)
relay.stop()
server.shutdown()
