"""Field client: pymemcache incr loop (issue #23).

    python memcache_incr_client.py HOST PORT

Each operation adds a fresh key as 0 (noreply, pymemcache's default: no answer) and incr's it:
the incr must answer 1 (a 2 means it ran twice: Garbage; None means the add was lost). An
add, not a set: a re-sent set would reset the counter and hide a second incr. The server
counts each key's executions (its value).
pymemcache closes its socket after an error and reconnects on the next call.
"""
import sys

from fieldops import Garbage, run
from pymemcache.client.base import Client

host, port = sys.argv[1], int(sys.argv[2])
client = Client((host, port), connect_timeout=5, timeout=5, no_delay=True)


def op(key: str) -> None:
    client.add(key, "0", noreply=True)
    value = client.incr(key, 1)
    if value != 1:
        raise Garbage(f"incr {key} answered {value}: it ran {value} times")


run(op, on_error=client.close)
