"""Field client: pymemcache ``set`` with noreply (its default), then another client's newer
value (issue #23).

    python memcache_noreply_client.py HOST PORT DIRECT_PORT

Each operation: client A (through PORT) sets KEY to "old" with noreply, and never reads: no
answer ever comes on its connection. Client B (DIRECT_PORT, another client of the same
server) waits until the server holds "old" (polling, at most 3 s: a set cut with its
connection never lands, then ``SetLost``), and sets KEY to "new". A "new" must stay: an
"old" found on the server afterwards is A's set replayed over B's newer value.
"""
import sys
import time

from fieldops import Garbage, run
from pymemcache.client.base import Client

host, port, direct = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
a = Client((host, port), connect_timeout=5, timeout=5, no_delay=True)
b = Client((host, direct), connect_timeout=5, timeout=5, no_delay=True)


class SetLost(Exception):
    pass


def op(key: str) -> None:
    a.set(key, "old")  # pymemcache's default for set: noreply=True
    end = time.monotonic() + 3.0
    while b.get(key) != b"old":
        if time.monotonic() > end:
            raise SetLost(f"set {key} did not land in 3 s")
        time.sleep(0.002)
    if not b.set(key, "new", noreply=False):
        raise Garbage(f"the other client's set {key} was not stored")


run(op, on_error=a.close)
