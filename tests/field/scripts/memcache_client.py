"""Field client: pymemcache set + get loop.

    python memcache_client.py HOST PORT

Each operation is set(key, key) (must answer STORED) then get(key) (must be the value,
else Garbage). pymemcache closes its socket after an error and reconnects on the next call.
"""
import sys

from fieldops import Garbage, run
from pymemcache.client.base import Client

host, port = sys.argv[1], int(sys.argv[2])
client = Client((host, port), connect_timeout=5, timeout=5, no_delay=True)


def op(key: str) -> None:
    if client.set(key, key, noreply=False) is not True:
        raise Garbage("set was not STORED")
    if client.get(key) != key.encode():
        raise Garbage(f"get {key} returned something else")


run(op, on_error=client.close)
